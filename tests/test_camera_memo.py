"""The camera memo: a frame's camera modulation computed once per distinct condition, the same numbers as computing
it every chunk, for a whole chunk and for the token spans of sequence-parallel ranks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from worker.camera import actions_to_c2ws, iter_camera_condition, relative_poses
from worker.config import PRESETS
from worker.models.camera_memo import CameraMemo, memo_budget_setting
from worker.models.dit import build_dit
from worker.parallel.sp import SequenceParallel

TINY = PRESETS["tiny"].dit
CPU = torch.device("cpu")
H, W = 4, 6  # latent grid: 2 x 3 tokens per frame after the 1x2x2 patch


@pytest.fixture(scope="module")
def model():
    return build_dit(TINY, dtype=torch.float32, seed=0)


def _frames(*which: int, seed: int = 0) -> torch.Tensor:
    """A chunk's condition [1, 384, 3, H, W] whose frame j is random frame which[j]: equal numbers, equal frames."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.randn(4, 1, 384, H, W, generator=g)
    return torch.stack([pool[i] for i in which], dim=2)


def frame_keys(field: torch.Tensor) -> tuple[bytes, ...]:
    """Keys for a random test condition: its frames' bytes (the worker's come from the poses, camera.py)."""
    return tuple(field[:, :, j].contiguous().numpy().tobytes() for j in range(field.shape[2]))


def _direct(model, cam, sp=SequenceParallel()):
    ctx = model.prepare_chunk(cam, 0, None, sp)
    return ctx.cam_scale, ctx.cam_shift


def _memo(model, cam, sp=SequenceParallel()):
    ctx = model.prepare_chunk(cam, 0, None, sp, frame_keys=frame_keys(cam))
    return ctx.cam_scale, ctx.cam_shift


def _close(a, b) -> None:
    assert len(a) == len(b) == TINY.num_layers
    for x, y in zip(a, b):
        assert x.shape == y.shape
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_repeated_frames_are_computed_once_and_match_the_direct_path(model, monkeypatch):
    model.camera_memo = CameraMemo(10**9)
    calls = []
    real = model.camera_modulation_of

    def counting(tokens):
        calls.append(tokens.shape[1])
        return real(tokens)

    monkeypatch.setattr(model, "camera_modulation_of", counting)
    per_frame = (H // 2) * (W // 2)
    cam = _frames(0, 1, 0)
    want = _direct(model, cam)
    calls.clear()
    got = _memo(model, cam)
    _close(got[0], want[0])
    _close(got[1], want[1])
    assert calls == [2 * per_frame]  # frames 0 and 2 are one condition: two frames' rows, in one call
    assert model.camera_memo.computed == 2 and model.camera_memo.reused == 0
    # The next chunk holds frame 1's and frame 0's conditions again, and a new one: only that one is computed.
    cam2 = _frames(1, 0, 2)
    got2 = _memo(model, cam2)
    assert calls == [2 * per_frame, per_frame]
    assert model.camera_memo.computed == 3 and model.camera_memo.reused == 2
    want2 = _direct(model, cam2)
    _close(got2[0], want2[0])
    _close(got2[1], want2[1])
    # A frame served from the memo is the very numbers computed the first time.
    for layer in range(TINY.num_layers):
        assert torch.equal(got2[0][layer][:, per_frame : 2 * per_frame], got[0][layer][:, :per_frame])


def test_a_changed_frame_is_not_served_from_the_memo(model):
    model.camera_memo = CameraMemo(10**9)
    cam = _frames(0, 1, 2)
    _memo(model, cam)
    changed = cam.clone()
    changed[0, 5, 1, 0, 0] += 1e-3
    got = _memo(model, changed)
    want = _direct(model, changed)
    _close(got[0], want[0])
    assert model.camera_memo.computed == 4  # frame 1 changed: computed again; frames 0 and 2 reused
    assert model.camera_memo.reused == 2
    with pytest.raises(AssertionError):  # and the check can tell frame 1's old numbers from its new ones
        _close(_memo(model, cam)[0], got[0])


@pytest.mark.parametrize("share", [None, 0.3])
@pytest.mark.parametrize("which", [(0, 0, 0), (0, 1, 2), (0, 1, 0)])
def test_each_rank_s_span_matches_its_share_of_the_direct_path(model, which, share):
    cam = _frames(*which)
    for rank in range(2):
        sp = SequenceParallel(rank=rank, world=2, leader_share=share)
        model.camera_memo = CameraMemo(10**9)
        want = _direct(model, cam, sp)
        got = _memo(model, cam, sp)
        _close(got[0], want[0])
        _close(got[1], want[1])
        again = _memo(model, cam, sp)  # every span now inside an entry: nothing computed
        assert model.camera_memo.computed == len(set(which[j] for j in _frames_of(sp, rank))), (rank, which)
        for a, b in zip(again[0], got[0]):
            assert torch.equal(a, b)


def _frames_of(sp: SequenceParallel, rank: int) -> list[int]:
    per_frame = (H // 2) * (W // 2)
    span = sp.token_span(3 * per_frame)
    return [j for j in range(3) if span.start < (j + 1) * per_frame and j * per_frame < span.stop]


def test_a_wider_span_of_a_known_frame_extends_its_entry():
    memo = CameraMemo(10**9)
    frame = torch.arange(10.0).reshape(1, 10, 1)  # one "frame" of 10 positions, 1 channel
    computed = []

    def compute(rows):
        computed.append(rows.shape[1])
        return [rows * 2], [rows * 3]

    def rows(j, lo, hi):
        return frame[:, lo:hi]

    scale, _ = memo.modulation([b"k"], 10, slice(0, 4), rows, compute, 8, CPU)
    assert torch.equal(scale[0], frame[:, :4] * 2) and computed == [4]
    scale, _ = memo.modulation([b"k"], 10, slice(2, 10), rows, compute, 8, CPU)  # wider: computed over [0, 10)
    assert torch.equal(scale[0], frame[:, 2:] * 2) and computed == [4, 10]
    scale, shift = memo.modulation([b"k"], 10, slice(3, 7), rows, compute, 8, CPU)
    assert torch.equal(scale[0], frame[:, 3:7] * 2) and torch.equal(shift[0], frame[:, 3:7] * 3)
    assert computed == [4, 10] and len(memo) == 1


def test_the_budget_evicts_the_least_recently_used_frame(model):
    per_frame_bytes = 2 * TINY.num_layers * (H // 2) * (W // 2) * TINY.dim * 4  # scale + shift, fp32
    model.camera_memo = CameraMemo(int(3.5 * per_frame_bytes))
    _memo(model, _frames(0, 1, 2, seed=1))
    assert len(model.camera_memo) == 3 and model.camera_memo.nbytes == 3 * per_frame_bytes
    _memo(model, _frames(0, 0, 3, seed=1))  # frame 0 used again, frame 3 new: frame 1, the oldest, goes
    assert len(model.camera_memo) == 3
    before = model.camera_memo.computed
    _memo(model, _frames(0, 2, 3, seed=1))
    assert model.camera_memo.computed == before  # 0, 2 and 3 kept
    _memo(model, _frames(1, 1, 1, seed=1))
    assert model.camera_memo.computed == before + 1  # 1 was evicted
    # A budget smaller than one chunk keeps nothing, and still returns the chunk's numbers.
    model.camera_memo = CameraMemo(per_frame_bytes // 2)
    cam = _frames(0, 1, 2, seed=1)
    got = _memo(model, cam)
    _close(got[0], _direct(model, cam)[0])
    assert len(model.camera_memo) == 0


def test_room_is_made_before_the_new_frames_are_computed():
    memo = CameraMemo(30 * 8)  # 30 rows of 8 bytes
    seen = []

    def compute(rows):
        seen.append(memo.nbytes + rows.shape[1] * 8)  # what the memo would hold with these rows in it
        return [rows.double()], []

    frames = torch.arange(40.0).reshape(1, 40, 1)
    rows = lambda j, lo, hi: frames[:, j * 10 + lo : j * 10 + hi]  # noqa: E731
    for keys in ([b"a", b"b"], [b"c", b"d"], [b"a", b"c"], [b"b", b"b"]):
        memo.modulation(keys, 10, slice(0, 20), rows, compute, 8, CPU)
        assert memo.nbytes <= memo.budget
    assert max(seen) <= memo.budget and len(seen) == 4


def test_a_gpu_s_cap_leaves_the_peak_and_headroom(monkeypatch):
    from worker.models import camera_memo

    class Props:
        total_memory = 80 << 30

    peak = [70 << 30]
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Props)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: peak[0])
    gpu = torch.device("cuda", 0)
    memo = CameraMemo(8 << 30)
    assert memo._cap(gpu) == (80 << 30) - camera_memo.HEADROOM - (70 << 30)  # 7 GiB: less than the budget
    memo._bytes = 5 << 30  # the peak includes the memo's own bytes, which are not the others' needs
    assert memo._cap(gpu) == 8 << 30
    peak[0] = 79 << 30
    assert memo._cap(gpu) == (5 << 30) - camera_memo.HEADROOM + (1 << 30)
    peak[0] = 90 << 30
    assert memo._cap(gpu) == 0
    assert memo._cap(CPU) == 8 << 30


def test_the_budget_setting():
    assert memo_budget_setting({}) == 8 * 10**9
    assert memo_budget_setting({"LINGBOT_CAMERA_MEMO_GB": "0"}) == 0
    assert not CameraMemo(memo_budget_setting({"LINGBOT_CAMERA_MEMO_GB": "0"})).enabled
    assert memo_budget_setting({"LINGBOT_CAMERA_MEMO_GB": "1.5"}) == 1_500_000_000
    for bad in ("-1", "x", "nan"):
        with pytest.raises(ValueError, match="LINGBOT_CAMERA_MEMO_GB"):
            memo_budget_setting({"LINGBOT_CAMERA_MEMO_GB": bad})


def _chunks(**spec):
    return list(iter_camera_condition(width=96, height=64, **spec))


def test_a_held_key_gives_equal_frame_keys_and_fields():
    # Turn first, so the held "w" steps are taken from a rotated pose: the pose chain's round-off then differs
    # from frame to frame, which the rounding of the relative poses removes.
    actions = [[], ["l"], ["l"], ["l", "i"]] + [["w"]] * 8 + [["l"]] * 3 + [["w"]] * 3
    chunks = _chunks(num_chunks=6, actions=actions)
    keys = [k for c in chunks for k in c.frame_keys]
    fields = [c.field[:, :, j] for c in chunks for j in range(3)]
    assert keys[1] == keys[2]  # the two plain yaws
    assert len(set(keys[4:12])) == 1  # "w" held: one condition
    assert len(set(keys[12:15])) == 1 and keys[12] != keys[1]  # yaw again, now pitched: not the level yaw
    assert len(set(keys[15:18])) == 1 and keys[15] == keys[4]  # "w" again from the same pitch
    assert keys[0] != keys[4] and len(set(keys)) == 5  # identity, level yaw, yaw + pitch, walk, pitched yaw
    for a in range(18):  # equal keys, bit-equal fields; other keys, other fields
        for b in range(18):
            assert torch.equal(fields[a], fields[b]) == (keys[a] == keys[b]), (a, b)
    rel = relative_poses(actions_to_c2ws(actions))
    assert not np.signbit(rel[rel == 0]).any()  # a rounded -0.0 would be another key (and bf16 bit pattern)


def test_without_the_rounding_a_held_key_gives_frames_that_differ(monkeypatch):
    # The reason for camera.POSE_DECIMALS: the pose chain's round-off alone tells the held steps apart.
    from worker import camera

    monkeypatch.setattr(camera, "POSE_DECIMALS", 30)
    chunks = _chunks(num_chunks=4, actions=[[], ["l"], ["l"], ["l", "i"]] + [["w"]] * 8)
    keys = [k for c in chunks for k in c.frame_keys]
    assert len(set(keys[4:12])) > 1


def test_distinct_poses_give_distinct_conditions():
    from worker.bench import _camera_path

    keys = [k for c in _chunks(num_chunks=3, **_camera_path("distinct", 9, seed=0)) for k in c.frame_keys]
    assert len(set(keys)) == len(keys) == 9
    # the bench's warm-up path shares no frame with it but the first, the identity
    warm = {k for c in _chunks(num_chunks=3, **_camera_path("distinct", 9, seed=1)) for k in c.frame_keys}
    assert warm & set(keys) == {keys[0]}
    other_size = iter_camera_condition(width=128, height=64, num_chunks=1, **_camera_path("distinct", 3, seed=0))
    assert not set(next(other_size).frame_keys) & set(keys)  # the keys hold the size (and so the intrinsics) too


def test_a_rollout_with_the_memo_matches_one_without(tiny_engine, monkeypatch):
    from worker.rollout import RolloutJob

    def run() -> tuple[list[float], torch.Tensor]:
        g = torch.Generator().manual_seed(0)
        job = RolloutJob(prompt="a corridor", image=torch.rand(3, 48, 64, generator=g) * 2 - 1, num_chunks=3,
                         width=64, height=48, seed=1, kv_window=6, kv_sink=3,
                         camera_actions=[[], ["l"], ["w"], ["w"], ["w"], ["w"], ["w"], ["l"], ["w"]])
        outs = list(tiny_engine.rollout(job))
        return [o.stats["camera_frames_computed"] for o in outs], torch.cat([o.latents for o in outs], dim=2)

    tiny_engine.dit.camera_memo.clear()
    computed, latents = run()
    assert computed == [3, 0, 0]  # identity, yaw, walk; then only those again
    monkeypatch.setattr(tiny_engine.dit, "camera_memo", CameraMemo(0))
    computed_off, latents_off = run()
    assert computed_off == [3, 3, 3]
    torch.testing.assert_close(latents, latents_off, rtol=1e-4, atol=1e-5)
