"""`python -m worker bench` on the tiny model (CPU): every figure the issue asks for is there and consistent."""

from __future__ import annotations

import statistics

import json
import math
import subprocess
import sys

import pytest
import torch

from worker.bench import dit_chunk_flops, run_bench
from worker.config import PRESETS

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_bench_reports_every_figure(tiny_engine, tmp_path) -> None:
    chunks = 12
    tiny_engine.dit.camera_memo.clear()  # the camera memo is the engine's: other tests' frames may be in it
    res = run_bench(tiny_engine, width=64, height=48, chunks=chunks, window=6, sink=3, warmup_chunks=0,
                    save_latents=tmp_path / "lat.pt")
    rows = res["rows"]
    # The keys path's 5 motions: chunk 0 holds the identity (frame 0), "w" and "w"+"l"; chunk 1 "l", the identity
    # again ([]) and "d"; then nothing new. Only computed frames count toward a chunk's FLOPs.
    assert [r["camera_frames_computed"] for r in rows] == [3, 2] + [0] * (chunks - 2)
    assert res["camera"] == "keys"
    assert [r["chunk"] for r in rows] == list(range(chunks))
    assert [r["kv_frames"] for r in rows][:4] == [3, 6, 9, 9]  # span grows to sink + window, then stays
    assert res["steady_chunks"] == list(range(2, chunks))
    for r in rows:
        assert r["dit_ms"] > 0 and r["decode_ms"] > 0 and r["encode_ms"] > 0 and r["chunk_ms"] > 0
    for key in ("dit_ms", "decode_ms", "encode_ms", "chunk_ms", "host_ms"):
        assert math.isfinite(res["median"][key])
    assert all(0 < r["host_ms"] for r in rows)
    assert res["first_chunk_s"] > 0 and res["total_s"] >= res["first_chunk_s"]
    frames = 9 + 12 * (chunks - 1)
    assert res["overall_fps"] == pytest.approx(frames / res["total_s"])
    # End to end per chunk: the steady chunks' delivery gaps without the last one, where the pipeline drains.
    flowing = sorted(r["chunk_ms"] for r in rows[2:-1])
    assert len(flowing) == 9 and res["end_to_end_chunk_ms"] == pytest.approx(flowing[4])
    assert res["steady_mean_chunk_ms"] == pytest.approx(sum(flowing) / len(flowing))
    assert res["generated_fps"] == pytest.approx(12 / (res["end_to_end_chunk_ms"] / 1e3))
    # MFU = counted FLOPs / DiT time / measured matmul peak
    flops = dit_chunk_flops(PRESETS["tiny"].dit, 6, 8, 9, camera_frames=0)["total"]
    assert res["mfu"] == pytest.approx(flops / (res["median"]["dit_ms"] / 1e3) / (res["matmul_peak_tflops"] * 1e12))
    # A chunk's DiT time holds the chunk before's cache refresh (run after that chunk's frames), over that chunk's
    # span: none in chunk 0, chunk 1's over 3 frames, chunk 2's over 6; from chunk 3 on every chunk's DiT time is a
    # steady one, the last chunk's too.
    tiny = PRESETS["tiny"].dit
    assert rows[0]["dit_tflop"] * 1e12 == pytest.approx(dit_chunk_flops(tiny, 6, 8, 3, refresh=False)["total"])
    assert rows[1]["dit_tflop"] * 1e12 == pytest.approx(
        dit_chunk_flops(tiny, 6, 8, 6, refresh_kv_frames=3, camera_frames=2)["total"])
    assert rows[2]["dit_tflop"] * 1e12 == pytest.approx(
        dit_chunk_flops(tiny, 6, 8, 9, refresh_kv_frames=6, camera_frames=0)["total"])
    camera = dit_chunk_flops(tiny, 6, 8, 9)["camera"]
    assert camera > 0 and dit_chunk_flops(tiny, 6, 8, 9, camera_frames=1)["camera"] == pytest.approx(camera / 3)
    tflop = [r["dit_tflop"] for r in rows]
    assert tflop[2] < tflop[3] == tflop[-1]
    assert res["median"]["dit_ms"] == pytest.approx(statistics.median(r["dit_ms"] for r in rows[2:]))
    # The condition encoder reaches its fixed point within the rollout and stays there.
    cached = [r["condition_cached"] for r in rows]
    first = cached.index(True)
    assert 2 <= first < chunks and all(cached[first:]) and not any(cached[:first])
    assert res["condition_cached_chunks"] == list(range(first, chunks))
    assert math.isfinite(res["median_condition_cached"]["dit_ms"])
    # Before it, the encoder runs fewer layers as its first ones reach their own fixed point.
    layers = [r["condition_layers"] for r in rows]
    assert layers[:first] == sorted(layers[:first], reverse=True) and layers[0] > layers[first - 1] > 0, layers
    assert layers[first:] == [0] * (chunks - first)
    assert res["graph_replay_chunks"] == []  # CUDA graphs are for 4+ GPU ranks (LINGBOT_CUDA_GRAPHS=auto)
    json.dumps(res)  # the --json output
    lat = torch.load(tmp_path / "lat.pt")
    assert lat.shape == (16, 3 * chunks, 6, 8)


def test_the_distinct_camera_path_computes_every_frame(tiny_engine) -> None:
    res = run_bench(tiny_engine, width=64, height=48, chunks=3, window=6, sink=3, warmup_chunks=1,
                    camera="distinct")
    # Frame 0, the identity, is the one frame the warm-up left in the memo.
    assert [r["camera_frames_computed"] for r in res["rows"]] == [2, 3, 3] and res["camera"] == "distinct"


def test_bench_says_which_chunks_were_graph_replays(tiny_engine, monkeypatch) -> None:
    monkeypatch.setenv("LINGBOT_CUDA_GRAPHS", "rerun")  # the CPU stand-in for CUDA graphs
    res = run_bench(tiny_engine, width=64, height=48, chunks=5, window=6, sink=3, warmup_chunks=0)
    # the cache is full from chunk 2 on; the graphs are captured after it and replayed from chunk 3
    assert res["graph_replay_chunks"] == [3, 4] and [r["graph_replay"] for r in res["rows"]][:3] == [False] * 3


def test_bench_cli_writes_json(tmp_path) -> None:
    out = tmp_path / "b.json"
    proc = subprocess.run(
        [sys.executable, "-m", "worker", "bench", "--model", "tiny", "--device", "cpu", "--size", "64x48",
         "--chunks", "3", "--kv-window", "6", "--kv-sink", "3", "--warmup-chunks", "0", "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["model"] == "tiny" and res["chunks"] == 3 and len(res["rows"]) == 3
    assert "steady (chunks" in proc.stdout and "first chunk" in proc.stdout


@pytest.mark.slow
def test_bench_cli_compares_decode_costs_in_one_process(tmp_path) -> None:
    """Several --decode-cost and --cuda-graphs values: one rank pool, one bench per combination, each with its own
    split, graph mode and latents; a named decode priority reaches the leader's rollout."""
    out = tmp_path / "b.json"
    proc = subprocess.run(
        [sys.executable, "-m", "worker", "bench", "--model", "tiny", "--device", "cpu", "--size", "64x48",
         "--ranks", "2", "--chunks", "4", "--kv-window", "6", "--kv-sink", "3", "--warmup-chunks", "0",
         "--decode-cost", "0,0.5", "--cuda-graphs", "0,rerun", "--decode-priority", "high",
         "--save-latents", str(tmp_path / "lat.pt"),
         "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = json.loads(out.read_text())
    assert [(r["decode_cost"], r["cuda_graphs"]) for r in runs] == [(0.0, "0"), (0.5, "0"), (0.0, "rerun"),
                                                                     (0.5, "rerun")]
    assert {r["decode_priority"] for r in runs} == {"high"}
    # 36 tokens per chunk at 64x48: even, then the leader at (1 - 0.5) / 2 = 25% of them
    assert [tuple(r["sp_split"]["tokens"]) for r in runs[:2]] == [(18, 18), (9, 27)]
    # the graph mode reached every rank: the replays ran (the cache is full from chunk 2 on; 4 chunks)
    assert [r["graph_replay_chunks"] for r in runs] == [[], [], [3], [3]]
    ref = torch.load(tmp_path / "lat_g0_d0.pt")
    for tag in ("g0_d0.5", "grerun_d0", "grerun_d0.5"):  # the split and the replays move work, not results
        torch.testing.assert_close(torch.load(tmp_path / f"lat_{tag}.pt"), ref, rtol=1e-3, atol=1e-3)


def test_bench_cli_refuses_a_bad_decode_cost_list() -> None:
    from worker.bench import _decode_cost, _modes

    def decode_costs(spec):
        return _modes(spec, "--decode-cost", _decode_cost)

    assert decode_costs("0.04,0.1") == [0.04, 0.1] and decode_costs(None) == [None]
    for bad in ("0.1,x", "1.5"):
        with pytest.raises(SystemExit, match="--decode-cost"):
            decode_costs(bad)


def test_decode_priority_setting(monkeypatch) -> None:
    from worker.rollout import decode_priority

    monkeypatch.delenv("LINGBOT_DECODE_PRIORITY", raising=False)
    assert decode_priority(None) == "low"
    monkeypatch.setenv("LINGBOT_DECODE_PRIORITY", "HIGH")
    assert decode_priority(None) == "high" and decode_priority("low") == "low"  # an engine's own setting wins
    with pytest.raises(ValueError, match="must be one of low, high"):
        decode_priority("urgent")
