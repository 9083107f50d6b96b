"""worker/camera.py against the worked values of shared/reference/camera_and_actions.md (sections a.1-a.5, b.1-b.2)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from worker import camera
from worker.camera import CameraError
from worker.config import ACTION_FOCAL, CHUNK_LATENT_FRAMES, total_pixel_frames

EX00_K = [502.9116, 503.1081, 415.7779, 239.7778]  # example 00 intrinsics (for 480x832)


def rot_y(deg: float) -> np.ndarray:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def rot_x(deg: float) -> np.ndarray:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def pose(rot: np.ndarray | None = None, t=(0.0, 0.0, 0.0)) -> np.ndarray:
    p = np.eye(4)
    if rot is not None:
        p[:3, :3] = rot
    p[:3, 3] = t
    return p


def walk(n: int, step=(0.0, 0.0, 0.05)) -> np.ndarray:
    """n pixel-frame poses: turning 1 deg/frame about y while moving, so every frame differs."""
    return np.stack([pose(rot_y(i), np.multiply(step, i)) for i in range(n)])


# --- a.4 Pluecker table -----------------------------------------------------------------------------------------

PLUCKER_TABLE = [
    ((239, 415), [0, 0, 0, -0.001, -0.001, 0.999999]),
    ((240, 416), [0, 0, 0, 0.001, 0.001, 0.999999]),
    ((0, 0), [0, 0, 0, -0.599722, -0.345688, 0.721687]),
    ((479, 831), [0, 0, 0, 0.599722, 0.345688, 0.721687]),
    ((239, 0), [0, 0, 0, -0.639124, -0.000769, 0.769103]),
]


def test_plucker_worked_values():
    k = np.array([500.0, 500.0, 416.0, 240.0])
    field = camera.plucker_field(np.stack([np.eye(4), pose(rot_y(6.0))]), k, 480, 832)
    assert field.shape == (2, 480, 832, 6) and field.dtype == np.float32
    for (row, col), want in PLUCKER_TABLE:
        np.testing.assert_allclose(field[0, row, col], want, atol=1e-5, err_msg=f"pixel {(row, col)}")
    np.testing.assert_allclose(field[1, 239, 415], [0, 0, 0, 0.103534, -0.001, 0.994625], atol=1e-5)


def test_plucker_origin_is_translation_and_directions_unit():
    k = np.array([500.0, 500.0, 32.0, 16.0])
    rel = pose(rot_x(10.0), (0.1, -0.2, 0.3))[None]
    field = camera.plucker_field(rel, k, 32, 64)
    np.testing.assert_allclose(field[0, ..., :3], np.broadcast_to([0.1, -0.2, 0.3], (32, 64, 3)), atol=1e-7)
    np.testing.assert_allclose(np.linalg.norm(field[0, ..., 3:], axis=-1), 1.0, atol=1e-6)


def test_plucker_per_frame_intrinsics():
    ks = np.array([[500.0, 500.0, 416.0, 240.0], [250.0, 250.0, 416.0, 240.0]])
    field = camera.plucker_field(np.stack([np.eye(4)] * 2), ks, 480, 832)
    np.testing.assert_allclose(field[0, 0, 0, 3:], [-0.599722, -0.345688, 0.721687], atol=1e-5)
    assert not np.allclose(field[1, 0, 0], field[0, 0, 0])


# --- a.3 relative poses --------------------------------------------------------------------------------------------


def test_relative_poses_worked_example():
    rel = camera.relative_poses(np.stack([pose(), pose(t=(0, 0, 0.05)), pose(t=(0, 0, 0.10))]))
    np.testing.assert_allclose(rel[0], np.eye(4), atol=1e-12)
    np.testing.assert_allclose(rel[1], pose(t=(0, 0, 1)), atol=1e-12)
    np.testing.assert_allclose(rel[2], pose(t=(0, 0, 1)), atol=1e-12)


def test_relative_poses_are_in_previous_camera_frame_and_still_camera_stays_zero():
    # Turned 90 deg right (+x world is now camera forward), then a world +x step is a camera +z step.
    rel = camera.relative_poses(np.stack([pose(rot_y(90)), pose(rot_y(90), (0.2, 0, 0)), pose(rot_y(90), (0.3, 0, 0))]))
    np.testing.assert_allclose(rel[1, :3, 3], [0, 0, 1], atol=1e-12)  # 0.2 is the max step
    np.testing.assert_allclose(rel[2, :3, 3], [0, 0, 0.5], atol=1e-12)
    still = camera.relative_poses(np.stack([pose(rot_y(0)), pose(rot_y(5)), pose(rot_y(10))]))
    assert np.all(np.isfinite(still)) and np.all(still[:, :3, 3] == 0)
    np.testing.assert_allclose(still[2, :3, :3], rot_y(5), atol=1e-12)


# --- b.1 / b.2 actions ---------------------------------------------------------------------------------------------


def test_actions_forward_gives_unit_steps():
    rel = camera.relative_poses(camera.actions_to_c2ws([["w"]] * 3))
    np.testing.assert_allclose(rel[0], np.eye(4), atol=1e-12)
    np.testing.assert_allclose(rel[1], pose(t=(0, 0, 1)), atol=1e-9)
    np.testing.assert_allclose(rel[2], pose(t=(0, 0, 1)), atol=1e-9)


def test_actions_yaw_right():
    want = np.array([[0.99452, 0, 0.10453], [0, 1, 0], [-0.10453, 0, 0.99452]])
    rel = camera.relative_poses(camera.actions_to_c2ws([["l"]] * 3))
    np.testing.assert_allclose(rel[0], np.eye(4), atol=1e-12)
    for i in (1, 2):
        np.testing.assert_allclose(rel[i, :3, :3], want, atol=1e-5)
        np.testing.assert_allclose(rel[i, :3, 3], 0, atol=1e-12)


def test_actions_history_sets_normaliser():
    rel = camera.relative_poses(camera.actions_to_c2ws([["w", "d"]] * 3 + [["w"]] * 3))
    norms = np.linalg.norm(rel[:, :3, 3], axis=1)
    np.testing.assert_allclose(norms[3:6], 1 / math.sqrt(2), atol=1e-4)  # chunk 1
    np.testing.assert_allclose(norms[1:3], 1.0, atol=1e-9)


def test_pitch_limit_drops_step_at_84_deg():
    c2ws = camera.actions_to_c2ws([["i"]] * 22)
    np.testing.assert_allclose(c2ws[20, :3, :3], rot_x(84.0), atol=1e-9)  # 21 steps of 4 deg
    np.testing.assert_allclose(c2ws[21, :3, :3], rot_x(84.0), atol=1e-9)  # the 22nd (88 > 85) is dropped
    # pitch 'i' looks up in OpenCV axes (y down): the forward axis gains a negative y
    assert c2ws[0, 1, 2] < 0


def test_actions_rotate_first_then_move_horizontally():
    c2ws = camera.actions_to_c2ws([["l", "w"], ["i"], ["w"], ["j", "k"], ["s", "a"]])
    # 'l'+'w': the step already uses the turned heading
    np.testing.assert_allclose(c2ws[0, :3, 3], 0.05 / (1 + 1e-6) * np.array([math.sin(math.radians(6)), 0, math.cos(math.radians(6))]), atol=1e-12)
    # pitched up 4 deg, 'w' still walks horizontally (y stays 0); the flattened heading has length cos(4 deg),
    # so SGLang's +1e-6 in the normaliser gives 0.05 * c / (c + 1e-6)
    step = c2ws[2, :3, 3] - c2ws[1, :3, 3]
    c = math.cos(math.radians(4))
    assert step[1] == 0 and abs(np.linalg.norm(step) - 0.05 * c / (c + 1e-6)) < 1e-15
    # yaw is about world y (left), pitch about camera x (right)
    np.testing.assert_allclose(c2ws[1, :3, :3], rot_y(6) @ rot_x(4), atol=1e-12)
    np.testing.assert_allclose(c2ws[3, :3, :3], np.eye(3), atol=1e-12)
    # opposing keys cancel; s+a moves back-left
    assert camera.actions_to_c2ws([["w", "s", "i", "k", "j", "l"]])[0].tolist() == np.eye(4).tolist()
    np.testing.assert_allclose(c2ws[4, :3, 3] - c2ws[3, :3, 3], 0.05 / (1 + 1e-6) * np.array([-1, 0, -1]), atol=1e-12)


# --- actions: parse / validate ----------------------------------------------------------------------------------


def test_parse_actions():
    assert camera.parse_actions("w,w,wd,,l") == [["w"], ["w"], ["w", "d"], [], ["l"]]
    assert camera.parse_actions(" w , i k ,") == [["w"], ["i", "k"], []]
    assert camera.parse_actions("  ") == []
    with pytest.raises(CameraError) as e:
        camera.parse_actions("w,wx")
    assert e.value.field == "camera_actions[1]"


def test_unknown_token_names_entry_and_allowed_keys():
    with pytest.raises(CameraError) as e:
        camera.validate_actions([["w"], [], ["w"], ["d"], ["x"]])
    assert e.value.field == "camera_actions[4]"
    assert "camera_actions[4]" in str(e.value) and "'x'" in str(e.value) and "adijklsw" in str(e.value)


@pytest.mark.parametrize(
    "bad, field",
    [("w,w", "camera_actions"), (["wd"], "camera_actions[0]"), ([["wd"]], "camera_actions[0]"), ([[], [1]], "camera_actions[1]"), ([["W"]], "camera_actions[0]")],
)
def test_validate_actions_rejects(bad, field):
    with pytest.raises(CameraError) as e:
        camera.validate_actions(bad)
    assert e.value.field == field


def test_validate_actions_returns_clean_copy():
    src = [("w", "d"), []]
    assert camera.validate_actions(src) == [["w", "d"], []]


# --- a.1 intrinsics ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "width, height, want",
    [
        (832, 480, EX00_K),
        (1280, 720, [773.7101, 754.6622, 639.6583, 359.6667]),
        (832, 464, [502.9116, 486.3379, 415.7779, 231.7852]),
    ],
)
def test_scale_intrinsics(width, height, want):
    np.testing.assert_allclose(camera.scale_intrinsics(EX00_K, width, height), want, atol=1e-4)


def test_scale_intrinsics_takes_row_zero():
    rows = [EX00_K, [476.909, 477.095, 415.778, 239.778]]
    np.testing.assert_allclose(camera.scale_intrinsics(rows, 832, 464), [502.9116, 486.3379, 415.7779, 231.7852], atol=1e-4)


@pytest.mark.parametrize("bad", [[1.0, 2.0, 3.0], [[1.0, 2.0]], [0.0, 500.0, 1.0, 1.0], [500.0, float("nan"), 1.0, 1.0], "abc"])
def test_scale_intrinsics_rejects(bad):
    with pytest.raises(CameraError) as e:
        camera.scale_intrinsics(bad, 832, 480)
    assert e.value.field == "intrinsics"


# --- a.2 pose selection ------------------------------------------------------------------------------------------


def test_select_latent_poses_81_picks_every_4th():
    poses = walk(81)
    sel = camera.select_latent_poses(poses, 21)
    assert sel.shape == (21, 4, 4)
    np.testing.assert_array_equal(sel, poses[0:81:4])


def test_select_latent_poses_truncates_extra_poses():
    poses = walk(100)
    np.testing.assert_array_equal(camera.select_latent_poses(poses, 6), poses[0:21:4])


def test_interpolate_poses_slerp_and_linear_translation():
    poses = np.stack([pose(np.eye(3), (0, 0, 0)), pose(rot_y(90), (1, 2, 4))])
    mid = camera.interpolate_poses(poses, [0.5, 0.25])
    np.testing.assert_allclose(mid[0], pose(rot_y(45), (0.5, 1, 2)), atol=1e-12)
    np.testing.assert_allclose(mid[1], pose(rot_y(22.5), (0.25, 0.5, 1)), atol=1e-12)


def rodrigues(axis, deg: float) -> np.ndarray:
    a = np.asarray(axis, dtype=np.float64) / np.linalg.norm(axis)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    th = math.radians(deg)
    return np.eye(3) + math.sin(th) * k + (1 - math.cos(th)) * k @ k


def rot_angle_deg(r: np.ndarray) -> float:
    return math.degrees(math.acos(np.clip((np.trace(r) - 1) / 2, -1, 1)))


def test_interpolate_poses_takes_short_arc_across_hemispheres():
    # Two nearby ~180 deg rotations whose matrix->quaternion conversions land in opposite hemispheres (the largest
    # diagonal entry switches between x and y). Without the sign-continuity flip the slerp goes the long way round.
    r1, r2 = rodrigues((1, -0.98, 0), 179), rodrigues((0.98, -1, 0), 179)
    out = camera.interpolate_poses(np.stack([pose(r1), pose(r2)]), [0.5])[0, :3, :3]
    gap = rot_angle_deg(r1.T @ r2)
    assert 0.5 < gap < 5
    assert abs(rot_angle_deg(r1.T @ out) - gap / 2) < 1e-6
    assert abs(rot_angle_deg(r2.T @ out) - gap / 2) < 1e-6
    # and across the +-180 deg seam about y
    poses = np.stack([pose(rot_y(179)), pose(rot_y(-179)), pose(rot_y(-170))])
    seam = camera.interpolate_poses(poses, [0.5, 1.5])
    np.testing.assert_allclose(seam[0, :3, :3], rot_y(180), atol=1e-12)
    np.testing.assert_allclose(seam[1, :3, :3], rot_y(-174.5), atol=1e-12)


def test_bad_poses_raise_naming_poses():
    good = walk(9)
    cases = {
        "shape": good[:, :3, :],
        "nan": np.where(np.arange(4) == 0, np.nan, good),
        "last row": good + np.array([[0, 0, 0, 0]] * 3 + [[0, 0, 0.5, 0]]),
        "not orthonormal": good * np.array([1.1, 1, 1, 1])[:, None],
        "reflection": good @ np.diag([-1.0, 1, 1, 1]),
    }
    for name, bad in cases.items():
        with pytest.raises(CameraError) as e:
            camera.select_latent_poses(bad, 3)
        assert e.value.field == "poses", name
    with pytest.raises(CameraError, match="at least 9") as e:
        camera.select_latent_poses(walk(8), 3)
    assert e.value.field == "poses"


# --- a.5 pack -----------------------------------------------------------------------------------------------------


def test_pack_closed_form_and_dit_patch():
    n, height, width = 2, 32, 48
    f, r, c, p = np.meshgrid(np.arange(n), np.arange(height), np.arange(width), np.arange(6), indexing="ij")
    code = (((f * 6 + p) * height + r) * width + c).astype(np.float32)  # exact in float32 at these sizes
    packed = camera.pack_latent_grid(code)
    assert packed.shape == (384, n, height // 8, width // 8) and packed.dtype == torch.float32

    rng = np.random.default_rng(0)
    for _ in range(200):  # stage 1: channel = p*64 + dy*8 + dx
        pp, dy, dx = rng.integers(6), rng.integers(8), rng.integers(8)
        ff, hh, ww = rng.integers(n), rng.integers(height // 8), rng.integers(width // 8)
        assert packed[pp * 64 + dy * 8 + dx, ff, hh, ww].item() == code[ff, hh * 8 + dy, ww * 8 + dx, pp]

    # stage 2, done the way the DiT does it: '1 c (f 1) (h 2) (w 2) -> (f h w) (c 1 2 2)'
    x = packed[None]
    lh, lw = height // 16, width // 16
    tokens = x.reshape(1, 384, n, 1, lh, 2, lw, 2).permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(n * lh * lw, 384 * 4)
    for _ in range(200):
        pp, dy, dx, py, px = rng.integers(6), rng.integers(8), rng.integers(8), rng.integers(2), rng.integers(2)
        ff, th, tw = rng.integers(n), rng.integers(lh), rng.integers(lw)
        ch = (pp * 64 + dy * 8 + dx) * 4 + py * 2 + px
        row, col = (2 * th + py) * 8 + dy, (2 * tw + px) * 8 + dx
        assert tokens[(ff * lh + th) * lw + tw, ch].item() == code[ff, row, col, pp]


def test_pack_rejects_non_multiple_of_8():
    with pytest.raises(CameraError) as e:
        camera.pack_latent_grid(np.zeros((1, 12, 16, 6), np.float32))
    assert e.value.field == "size"


# --- entry points ---------------------------------------------------------------------------------------------------


def test_camera_condition_actions_matches_pipeline():
    acts = [["w"], ["l"], ["w", "d"], ["i"]]
    got = camera.camera_condition(width=64, height=32, num_chunks=2, actions=acts)
    assert got.shape == (1, 384, 6, 4, 8) and got.dtype == torch.float32
    padded = acts + [[], []]
    rel = camera.relative_poses(camera.actions_to_c2ws(padded))
    k = np.array([ACTION_FOCAL, ACTION_FOCAL, 32.0, 16.0])
    want = camera.pack_latent_grid(camera.plucker_field(rel, k, 32, 64))[None]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-7)  # fast packed path == reference field + pack
    # the chunked iterator gives the same tensor
    chunks = list(camera.iter_camera_condition(width=64, height=32, num_chunks=2, actions=acts))
    assert len(chunks) == 2 and all(ch.field.shape == (1, 384, 3, 4, 8) for ch in chunks)
    assert torch.equal(torch.cat([ch.field for ch in chunks], dim=2), got)
    assert all(len(ch.frame_keys) == 3 for ch in chunks)


def test_camera_condition_truncates_and_pads():
    long = [["w"]] * 3 + [["l"]] * 5
    cut = camera.camera_condition(width=32, height=16, num_chunks=1, actions=long)
    assert torch.equal(cut, camera.camera_condition(width=32, height=16, num_chunks=1, actions=[["w"]] * 3))
    still = camera.camera_condition(width=32, height=16, num_chunks=1)
    assert torch.equal(still, camera.camera_condition(width=32, height=16, num_chunks=1, actions=[]))
    assert torch.all(still[0, :192] == 0)  # identity everywhere: zero origins


def test_camera_condition_poses_official_semantics():
    n_chunks, width, height = 2, 64, 32
    poses = walk(total_pixel_frames(n_chunks) + 7)
    got = camera.camera_condition(width=width, height=height, num_chunks=n_chunks, poses=poses, intrinsics=[EX00_K] * 3)
    rel = camera.relative_poses(poses[: total_pixel_frames(n_chunks) : 4])
    k = camera.scale_intrinsics(EX00_K, width, height)
    want = camera.pack_latent_grid(camera.plucker_field(rel, k, height, width))[None]
    assert got.shape == (1, 384, 3 * n_chunks, 4, 8)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    # every latent step moves 4 pixel frames at constant speed -> unit translation after frame 0
    np.testing.assert_allclose(np.linalg.norm(rel[1:, :3, 3], axis=1), 1.0, atol=1e-12)


def test_camera_condition_errors_name_fields():
    with pytest.raises(CameraError) as e:
        camera.camera_condition(width=64, height=32, num_chunks=1, poses=walk(9))
    assert e.value.field == "intrinsics"
    with pytest.raises(CameraError) as e:
        camera.camera_condition(width=64, height=32, num_chunks=2, poses=walk(20), intrinsics=EX00_K)
    assert e.value.field == "poses" and "21" in str(e.value)
    with pytest.raises(CameraError) as e:
        camera.camera_condition(width=64, height=32, num_chunks=1, actions=[["q"]])
    assert e.value.field == "camera_actions[0]"
    with pytest.raises(CameraError) as e:
        camera.camera_condition(width=60, height=32, num_chunks=1)
    assert e.value.field == "size"
    with pytest.raises(CameraError) as e:
        camera.camera_condition(width=64, height=32, num_chunks=0)
    assert e.value.field == "num_chunks"
    with pytest.raises(CameraError) as e:
        camera.camera_condition(width=64, height=32, num_chunks=1, actions=[], poses=walk(9), intrinsics=EX00_K)
    assert e.value.field == "poses"


def test_chunks_for_path():
    assert camera.chunks_for_path() == 1
    assert camera.chunks_for_path(actions=[]) == 1
    assert camera.chunks_for_path(actions=[["w"]] * 3) == 1
    assert camera.chunks_for_path(actions=[["w"]] * 4) == 2
    assert camera.chunks_for_path(poses=walk(81)) == 7  # 21 latent frames
    assert camera.chunks_for_path(poses=walk(161)) == 13  # 41 -> 39 latent frames
    assert camera.chunks_for_path(poses=walk(9)) == 1
    with pytest.raises(CameraError) as e:
        camera.chunks_for_path(poses=walk(8))
    assert e.value.field == "poses"
    # the default chunk count always has enough poses
    for n in (9, 20, 33, 81, 100):
        chunks = camera.chunks_for_path(poses=walk(n))
        assert camera.select_latent_poses(walk(n), CHUNK_LATENT_FRAMES * chunks).shape[0] == 3 * chunks


def test_full_size_condition_shape():
    got = camera.camera_condition(width=832, height=480, num_chunks=1, actions=[["w"], ["w"], ["l"]])
    assert got.shape == (1, 384, 3, 60, 104)
    # latent 2 turned right 6 deg: channel of direction x at pixel (239,415) = p 3, dy 7, dx 7 of cell (29, 51)
    assert abs(got[0, 3 * 64 + 7 * 8 + 7, 2, 29, 51].item() - 0.103534) < 1e-5
