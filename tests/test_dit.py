"""The DiT: official tensor names at full size, and the KV cache against a block-causal full forward."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from worker.config import CHUNK_LATENT_FRAMES, FULL, PRESETS
from worker.models.dit import LingBotDiT, build_dit
from worker.models.kv_cache import KVCache
from worker.schedule import dmd_schedule

# A copy of shared/reference/official_fast_keys.txt (the official WanModelFast names and shapes), kept with the
# tests so the check runs wherever the repository is cloned.
REFERENCE = Path(__file__).resolve().parent / "data" / "official_fast_keys.txt"
TINY = PRESETS["tiny"].dit


def official_keys() -> dict[str, list[int]]:
    keys, in_list = {}, False
    for line in REFERENCE.read_text().splitlines():
        if line.startswith("## ---- full key list"):
            in_list = True
            continue
        if in_list and line.strip() and not line.startswith("#"):
            name, shape = line.split("\t")[:2]
            keys[name] = [int(s) for s in shape.strip("[]").split(",")]
    return keys


def test_full_size_state_dict_matches_official_names_and_shapes():
    model = build_dit(FULL.dit, seed=None)  # meta device: no memory
    mine = {k: list(v.shape) for k, v in model.state_dict().items()}
    ref = official_keys()
    assert len(ref) == 1421
    assert mine == ref
    assert sum(v.numel() for v in model.state_dict().values()) == 18_544_332_864
    assert not list(model.buffers())


def test_schedule_matches_official_table():
    s = dmd_schedule()
    assert s.timesteps == (999, 978, 947, 825)
    assert s.x0_sigmas == pytest.approx((0.999900, 0.978971, 0.947909, 0.825853), abs=2e-6)
    assert s.renoise_sigmas == pytest.approx((0.978830, 0.947693, 0.825193), abs=2e-6)
    assert dmd_schedule(5.0).timesteps == (999, 957, 899, 702)


def _inputs(num_chunks: int, h: int = 4, w: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    f = CHUNK_LATENT_FRAMES * num_chunks
    x = torch.randn(1, 16, f, h, w, generator=g)
    y = torch.randn(1, 20, f, h, w, generator=g)
    cam = torch.randn(1, 384, f, h, w, generator=g)
    text = torch.randn(1, 5, TINY.text_dim, generator=g)
    return x, y, cam, text


def _chunked(model: LingBotDiT, x, y, cam, text, *, sink: int, window: int, t: float = 500.0):
    n_frames = x.shape[2]
    frame_tokens = (x.shape[3] // 2) * (x.shape[4] // 2)
    cache = KVCache(num_layers=TINY.num_layers, frame_tokens=frame_tokens, total_frames=n_frames, sink=sink,
                    window=window, heads=TINY.num_heads, head_dim=TINY.head_dim, dtype=torch.float32, device="cpu")
    kv = model.encode_text(text)
    outs, seen = [], []
    for f0 in range(0, n_frames, CHUNK_LATENT_FRAMES):
        sl = slice(f0, f0 + CHUNK_LATENT_FRAMES)
        ctx = model.prepare_chunk(cam[:, :, sl], f0, cache)
        outs.append(model(x[:, :, sl], y[:, :, sl], t, kv, ctx))
        seen.append(cache.frames_in_cache(f0 + CHUNK_LATENT_FRAMES))
    return torch.cat(outs, dim=2), seen


def _full_masked(model: LingBotDiT, x, y, cam, text, seen, t: float = 500.0):
    n_frames = x.shape[2]
    frame_tokens = (x.shape[3] // 2) * (x.shape[4] // 2)
    allowed = torch.zeros(n_frames, n_frames, dtype=torch.bool)  # [query frame, key frame]
    for c, frames in enumerate(seen):
        for q in range(c * CHUNK_LATENT_FRAMES, (c + 1) * CHUNK_LATENT_FRAMES):
            allowed[q, frames] = True
    mask = allowed.repeat_interleave(frame_tokens, 0).repeat_interleave(frame_tokens, 1)
    ctx = model.prepare_chunk(cam, 0, None, attn_mask=mask)
    return model(x, y, t, model.encode_text(text), ctx)


@pytest.mark.parametrize("sink,window,expect_last", [(0, 100, list(range(12))), (3, 6, [0, 1, 2, 6, 7, 8, 9, 10, 11])])
def test_kv_cached_chunks_equal_block_causal_full_forward(sink, window, expect_last):
    torch.manual_seed(0)
    model = build_dit(TINY, dtype=torch.float32, seed=1)
    x, y, cam, text = _inputs(num_chunks=4)
    chunked, seen = _chunked(model, x, y, cam, text, sink=sink, window=window)
    assert seen[-1] == expect_last  # the eviction rule: sink frames + the most recent window
    full = _full_masked(model, x, y, cam, text, seen)
    # fp32 on both sides; only the summation order inside attention differs.
    torch.testing.assert_close(chunked, full, rtol=1e-4, atol=1e-4)
    # and the check can fail: a plain (non-causal) full forward differs.
    ctx = model.prepare_chunk(cam, 0, None)
    assert not torch.allclose(model(x, y, 500.0, model.encode_text(text), ctx), chunked, atol=1e-3)


def test_self_attention_asks_for_the_wave_split_on_one_rank(monkeypatch):
    """One rank's self-attention offers FA4's last wave to wave_split (where it was measured to pay); the
    cross-attention never does (worker/models/wave_split.py)."""
    from worker.models import dit

    asked = []
    real = dit.attention
    monkeypatch.setattr(dit, "attention", lambda *a, **kw: asked.append(kw.get("wave_split", False)) or real(*a, **kw))
    model = build_dit(TINY, dtype=torch.float32, seed=1)
    _chunked(model, *_inputs(1), sink=1, window=3)
    assert asked.count(True) == TINY.num_layers and asked.count(False) == TINY.num_layers


def test_official_eviction_examples():
    # reference fast_rollout.md section 5: L=12,S=3 -> after chunk 4 [0,1,2,6..14]; after chunk 6 [0,1,2,12..20]
    c = KVCache(num_layers=1, frame_tokens=1, total_frames=21, sink=3, window=9, heads=1, head_dim=2,
                dtype=torch.float32, device="cpu")
    assert c.frames_in_cache(15) == [0, 1, 2, *range(6, 15)]
    assert c.frames_in_cache(21) == [0, 1, 2, *range(12, 21)]
    # L=18,S=9 -> after chunk 6 [0..8, 12..20]
    c = KVCache(num_layers=1, frame_tokens=1, total_frames=21, sink=9, window=9, heads=1, head_dim=2,
                dtype=torch.float32, device="cpu")
    assert c.frames_in_cache(21) == [*range(0, 9), *range(12, 21)]


def test_chunk_slots_are_one_block_or_none():
    """The slots a chunk's K/V can be received into in place: one contiguous run, or None where its frames wrap."""
    def cache(window):
        return KVCache(num_layers=1, frame_tokens=2, total_frames=30, sink=3, window=window, heads=1, head_dim=2,
                       dtype=torch.float32, device="cpu")

    c = cache(6)
    for start in range(0, 30, 3):
        c.begin_chunk(start, 3)
        k, v = c.chunk_slots(0)
        slot = c.slot(start) * 2
        assert k.data_ptr() == c.k[0][:, slot:].data_ptr() and k.shape == (1, 6, 1, 2) and k.is_contiguous()
        assert v.data_ptr() == c.v[0][:, slot:].data_ptr()
    c = cache(7)
    wrapped = []
    for start in range(0, 30, 3):
        c.begin_chunk(start, 3)
        wrapped.append(c.chunk_slots(0) is None)
    assert any(wrapped) and not all(wrapped)  # frames 3+7k.. wrap around the 7-slot window in some chunks


def test_packed_norm_rope_is_the_exchange_send_layout():
    """q/k for the sequence-parallel path: the fused kernel's output is exactly pack_heads(rms_norm_rope(...))."""
    from worker.models.fused import rms_norm_rope, rms_norm_rope_packed
    from worker.parallel.sp import SequenceParallel

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(1, 5, 4 * 6, generator=g), torch.rand(4 * 6, generator=g) + 0.5
    cos, sin = torch.rand(5, 3, generator=g), torch.rand(5, 3, generator=g)
    sp = SequenceParallel(0, 2, leader_head_share=0.25)  # head groups [1, 3]
    assert sp.split_heads(4) == (1, 3)
    want = sp.pack_heads(rms_norm_rope(x, w, 1e-6, cos, sin, 4))
    assert torch.equal(rms_norm_rope_packed(x, w, 1e-6, cos, sin, (1, 3)), want)
    assert not torch.equal(rms_norm_rope_packed(x, w, 1e-6, cos, sin, (2, 2)), want)


def test_window_smaller_than_chunk_is_refused():
    with pytest.raises(ValueError, match="kv_window"):
        KVCache(num_layers=1, frame_tokens=1, total_frames=9, sink=0, window=2, heads=1, head_dim=2,
                dtype=torch.float32, device="cpu")


def test_cache_refresh_only_writes_kv():
    model = build_dit(TINY, dtype=torch.float32, seed=2)
    x, y, cam, text = _inputs(num_chunks=2)
    kv = model.encode_text(text)

    def run(refresh: bool):
        cache = KVCache(num_layers=TINY.num_layers, frame_tokens=6, total_frames=6, sink=0, window=6,
                        heads=TINY.num_heads, head_dim=TINY.head_dim, dtype=torch.float32, device="cpu")
        ctx = model.prepare_chunk(cam[:, :, :3], 0, cache)
        model(x[:, :, :3], y[:, :, :3], 999.0, kv, ctx)
        if refresh:
            assert model(x[:, :, :3] * 0.5, y[:, :, :3], 0.0, kv, ctx, cache_only=True) is None
        ctx = model.prepare_chunk(cam[:, :, 3:], 3, cache)
        return model(x[:, :, 3:], y[:, :, 3:], 999.0, kv, ctx)

    # The refresh rewrote chunk 0's K/V from other inputs, so the next chunk sees different context.
    assert not torch.allclose(run(True), run(False))

    # The refresh's last block projects k (and v, written into its cache slot by addmm, no module call) and not
    # q: nothing reads it (nor, on several ranks, exchanges it).
    calls = []
    for i, blk in enumerate(model.blocks):
        for name in ("q", "k"):
            getattr(blk.self_attn, name).register_forward_hook(lambda *_, i=i, n=name: calls.append((i, n)))
    cache = KVCache(num_layers=TINY.num_layers, frame_tokens=6, total_frames=6, sink=0, window=6,
                    heads=TINY.num_heads, head_dim=TINY.head_dim, dtype=torch.float32, device="cpu")
    model(x[:, :, :3], y[:, :, :3], 0.0, kv, model.prepare_chunk(cam[:, :, :3], 0, cache), cache_only=True)
    last = TINY.num_layers - 1
    assert [n for i, n in calls if i == last] == ["k"]
    assert all([n for i, n in calls if i == j] == ["q", "k"] for j in range(last))


def test_text_encoder_offload_policy():
    from worker.engine import offload_text_encoder
    from worker.parallel.sp import SequenceParallel

    cpu = torch.device("cpu")
    assert offload_text_encoder(cpu, SequenceParallel(), {}) is False
    assert offload_text_encoder(cpu, SequenceParallel(), {"LINGBOT_OFFLOAD_TEXT_ENCODER": "1"}) is True
    assert offload_text_encoder(cpu, SequenceParallel(0, 2), {"LINGBOT_OFFLOAD_TEXT_ENCODER": "0"}) is False


def test_fp8_linears_track_bf16_and_keep_running():
    from worker.models.fp8 import Fp8Linear, convert_blocks_to_fp8

    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(64, 48)
    x = torch.randn(3, 37, 64, generator=g)  # 111 rows: not a multiple of 16
    ref = lin(x)
    out = Fp8Linear(lin)(x)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert 1e-4 < rel < 0.05  # e4m3 with row-wise scales: percent-level, and not a silent bf16 pass-through

    model = build_dit(TINY, dtype=torch.float32, seed=3)
    xx, y, cam, text = _inputs(num_chunks=1)
    ctx = model.prepare_chunk(cam, 0, None)
    ref = model(xx, y, 500.0, model.encode_text(text), ctx)
    assert convert_blocks_to_fp8(model) == TINY.num_layers * 14  # self 4 + cross 4 + FFN 2 + camera 4
    ctx = model.prepare_chunk(cam, 0, None)
    got = model(xx, y, 500.0, model.encode_text(text), ctx)
    assert ((got - ref).norm() / ref.norm()).item() < 0.1


def test_fp8_inputs_quantised_once_per_reader_group(monkeypatch):
    """q, k and v read one quantisation of their input and the FFN's GELU comes quantised for the down projection:
    the same numbers as quantising at every linear, with 6 quantisations a block instead of 8."""
    from worker.models import fp8

    g = torch.Generator().manual_seed(1)
    a, b = fp8.Fp8Linear(torch.nn.Linear(64, 96)), fp8.Fp8Linear(torch.nn.Linear(96, 48))
    x = torch.randn(2, 9, 64, generator=g)
    shared = fp8.shared_input(x, a)
    assert isinstance(shared, fp8.Fp8Input) and fp8.shared_input(x, torch.nn.Linear(64, 96)) is x
    assert torch.equal(a(shared), a(x))
    got = b(a.forward_gelu(x))
    assert got.shape == (2, 9, 48)
    assert torch.equal(got, b(torch.nn.functional.gelu(a(x), approximate="tanh")))

    model = build_dit(TINY, dtype=torch.float32, seed=3)
    xx, y, cam, text = _inputs(num_chunks=1)
    fp8.convert_blocks_to_fp8(model)
    ctx, text_kv = model.prepare_chunk(cam, 0, None), model.encode_text(text)
    calls = {"rows": 0, "gelu": 0}
    quantize, gelu_quantize = fp8.quantize_rows, fp8.gelu_quantize_rows

    def counted(key, fn):
        def run(*args):
            calls[key] += 1
            return fn(*args)
        return run

    monkeypatch.setattr(fp8, "quantize_rows", counted("rows", quantize))
    monkeypatch.setattr(fp8, "gelu_quantize_rows", counted("gelu", gelu_quantize))
    model(xx, y, 500.0, text_kv, ctx)
    # per block: q/k/v, o, cross-attention q and o, the FFN's up and (with its GELU) down projections
    assert calls == {"rows": 6 * TINY.num_layers, "gelu": TINY.num_layers}


@pytest.mark.parametrize("traced", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b,tokens,dim", [(1, 5, 24), (2, 7, 64), (1, 3, 5120)])
def test_gated_residual_modulated_norm_is_the_two_chains_in_sequence(request, traced, dtype, b, tokens, dim):
    """LINGBOT_GATED_NORM's kernel: gated_residual, then modulated_norm of its result, bit for bit; the FFN output
    arrives in the weights' dtype, the residual stream and the modulation in fp32."""
    from worker.models import prewarm
    from worker.models.fused import gated_residual, gated_residual_modulated_norm, modulated_norm

    if traced:
        request.getfixturevalue("dynamo_eager")
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(b, tokens, dim, generator=g) * 3
    y = torch.randn(b, tokens, dim, generator=g).to(dtype)
    gate, shift, scale = (torch.randn(b, 1, dim, generator=g) for _ in range(3))
    graphs = prewarm.graphs_compiled()
    want_x = gated_residual.eager(x, y, gate)
    want_h = modulated_norm.eager(want_x, shift, scale, 1e-6, dtype)
    got_x, got_h = gated_residual_modulated_norm(x, y, gate, shift, scale, 1e-6, dtype)
    assert got_x.dtype == torch.float32 and got_h.dtype == dtype
    assert torch.equal(got_x, want_x) and torch.equal(got_h, want_h)
    assert not torch.equal(got_x, x)  # the residual was added
    assert prewarm.graphs_compiled() == graphs + traced  # traced as one graph (fullgraph), not run eagerly
    assert "worker.models.fused.gated_residual_modulated_norm" in prewarm.REGISTRY  # traced at start-up too


def _refreshed_chunks(model: LingBotDiT, cfg, num_chunks: int = 3):
    """Per chunk, as a rollout runs it: a denoising forward into a K/V cache, then the cache refresh (cache_only)
    from other latents. Returns every forward's output and the cache's visible K/V after every forward."""
    x, y, cam, text = _inputs(num_chunks=num_chunks)
    cache = KVCache(num_layers=cfg.num_layers, frame_tokens=6, total_frames=x.shape[2], sink=1, window=3,
                    heads=cfg.num_heads, head_dim=cfg.head_dim, dtype=torch.float32, device="cpu")
    kv = model.encode_text(text)
    outs, caches = [], []
    for f0 in range(0, x.shape[2], CHUNK_LATENT_FRAMES):
        sl = slice(f0, f0 + CHUNK_LATENT_FRAMES)
        ctx = model.prepare_chunk(cam[:, :, sl], f0, cache)
        outs.append(model(x[:, :, sl], y[:, :, sl], 999.0, kv, ctx))
        caches.append([t.clone() for layer in range(cfg.num_layers) for t in cache.visible(layer)])
        assert model(x[:, :, sl] * 0.5, y[:, :, sl], 0.0, kv, ctx, cache_only=True) is None
        caches.append([t.clone() for layer in range(cfg.num_layers) for t in cache.visible(layer)])
    return outs, caches


def test_gated_norm_gives_the_same_forwards_and_cache_refreshes(monkeypatch):
    """LINGBOT_GATED_NORM (on by default) against it off, on a 3-block model (one block both takes and hands on a
    pending residual): the same outputs and, after each cache refresh (whose last block writes only K/V, from the
    residual still pending from the block before it), the same K/V cache, bit for bit over a few chunks (the second
    wraps around the window, so its K/V go through cache.write). fp32 on the CPU: the fused kernel is the same math
    as the two chains it replaces."""
    import dataclasses

    from worker.models import dit
    from worker.models.dit import gated_norm_setting

    cfg = dataclasses.replace(TINY, num_layers=3)
    model = build_dit(cfg, dtype=torch.float32, seed=4)
    assert model.gated_norm is True  # the default
    model.gated_norm = False
    calls = []
    fused = dit.gated_residual_modulated_norm
    monkeypatch.setattr(dit, "gated_residual_modulated_norm", lambda *a: calls.append(1) or fused(*a))
    ref_outs, ref_caches = _refreshed_chunks(model, cfg)
    assert not calls
    model.gated_norm = True
    outs, caches = _refreshed_chunks(model, cfg)
    assert all(torch.equal(a, b) for a, b in zip(outs, ref_outs, strict=True))
    assert all(torch.equal(a, b) for c, r in zip(caches, ref_caches, strict=True) for a, b in zip(c, r, strict=True))
    # per chunk: 2 block boundaries + the head in the denoising forward, 2 block boundaries in the refresh
    assert len(calls) == 3 * (3 + 2)
    # The refresh rewrote the chunk's K/V, in every layer: what is compared after it is the refresh's own.
    assert not any(torch.equal(a, b) for a, b in zip(ref_caches[0], ref_caches[1], strict=True))

    monkeypatch.setenv("LINGBOT_GATED_NORM", "0")  # read when the model is built
    assert build_dit(TINY, dtype=torch.float32, seed=4).gated_norm is False
    assert gated_norm_setting({}) is True and gated_norm_setting({"LINGBOT_GATED_NORM": "0"}) is False
    with pytest.raises(ValueError, match="LINGBOT_GATED_NORM"):
        gated_norm_setting({"LINGBOT_GATED_NORM": "on"})


def test_counted_chunk_flops_are_pytorchs_count():
    """worker.bench.dit_chunk_flops (the benchmark's MFU numerator) against PyTorch's FLOP counter over one real
    chunk of the tiny model: its camera modulation, the four denoising forwards and a cache refresh. The counter sees
    every matmul, conv and attention the forwards run, so a projection the count leaves out (or one the model runs
    for nothing, as the refresh's last q once was) fails this."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from worker.bench import dit_chunk_flops

    model = build_dit(TINY, dtype=torch.float32, seed=3)
    x, y, cam, text = _inputs(num_chunks=1)
    lat_h, lat_w = x.shape[3], x.shape[4]
    cache = KVCache(num_layers=TINY.num_layers, frame_tokens=(lat_h // 2) * (lat_w // 2), total_frames=3, sink=0,
                    window=3, heads=TINY.num_heads, head_dim=TINY.head_dim, dtype=torch.float32, device="cpu")
    kv = model.encode_text(text)
    steps = dmd_schedule().timesteps
    emb = {t: model.time_embedding_for(t) for t in (*steps, 0)}  # per job, outside a chunk's count
    # SDPA's math form: its two batched matmuls are what the counter sees (the CPU's fused kernel it does not).
    with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        ctx = model.prepare_chunk(cam, 0, cache)
        for t in steps:
            model(x, y, t, kv, ctx, time_emb=emb[t])
        model(x, y, 0, kv, ctx, cache_only=True, time_emb=emb[0])
    want = dit_chunk_flops(TINY, lat_h, lat_w, kv_frames=3, refresh_kv_frames=3)["total"]
    assert counter.get_total_flops() == want
