"""Command line: `python -m worker generate ...` (one job, writes an MP4), `python -m worker bench ...` and
`python -m worker convert ...` (a bf16 copy of a checkpoint)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from pathlib import Path

from worker.bench import CAMERA_PATHS
from worker.config import DEFAULT_KV_SINK, DEFAULT_KV_WINDOW, DEFAULT_SIZE
from worker.parallel.sp import DEFAULT_DECODE_COST, DEFAULT_DECODE_COST_4_RANKS

EXAMPLE_IMAGE = Path(__file__).resolve().parent.parent / "examples" / "first_frame.jpg"


GENERATE_MODEL_HELP = ("preset (tiny, lingbot-world-fast), model folder, or cached hub id; default: $LINGBOT_MODEL, "
                       "else robbyant/lingbot-world-fast-diffusers from the local cache, else the tiny random model")
BENCH_MODEL_HELP = "preset, folder or cached hub id (default: lingbot-world-fast, full size with random bf16 weights)"


def _add_model_args(p: argparse.ArgumentParser, model_help: str) -> None:
    p.add_argument("--model", default=None, help=model_help)
    p.add_argument("--device", default=None, help="cpu or cuda (default: $LINGBOT_DEVICE, else cuda if present)")
    p.add_argument("--ranks", type=int, default=None, help="ranks (GPUs) for the rollout (default: $LINGBOT_NUM_GPUS or 1)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m worker", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="run one request and write the MP4")
    _add_model_args(g, GENERATE_MODEL_HELP)
    g.add_argument("--request", type=Path, help="a JSON request (the RunPod job input); flags below override it")
    g.add_argument("--prompt", help="scene and motion description")
    g.add_argument("--image", help=f"first frame: a local file, URL, s3:// or data: URI (default: {EXAMPLE_IMAGE.name})")
    g.add_argument("--actions", help='one action set per latent frame, comma-separated, e.g. "w,w,wd,,l" '
                                     "(w/s forward/back, a/d strafe, i/k pitch, j/l yaw; empty = hold)")
    g.add_argument("--chunks", type=int, help="chunks to generate (default: from the path length)")
    g.add_argument("--size", help=f"WIDTHxHEIGHT, multiples of 16 (default {DEFAULT_SIZE[0]}x{DEFAULT_SIZE[1]})")
    g.add_argument("--seed", type=int)
    g.add_argument("--kv-window", type=int, help=f"attention window in latent frames (default {DEFAULT_KV_WINDOW})")
    g.add_argument("--kv-sink", type=int, help=f"sink latent frames (default {DEFAULT_KV_SINK})")
    g.add_argument("--stream-format", choices=["jpeg", "webp", "none"], default="none",
                   help="also encode streamed frames, as a service would (default none)")
    g.add_argument("--out", type=Path, default=Path("video.mp4"), help="where to write the MP4")
    g.add_argument("--upload", action="store_true", help="upload to the configured S3 bucket instead of --out")

    b = sub.add_parser("bench", help="benchmark a warm rollout (full size with random weights by default)")
    _add_model_args(b, BENCH_MODEL_HELP)
    b.add_argument("--size", default="832x480", help="WIDTHxHEIGHT (default 832x480)")
    b.add_argument("--chunks", type=int, default=10, help="chunks per rollout (8+ reaches the 18-frame span)")
    b.add_argument("--kv-window", type=int, default=DEFAULT_KV_WINDOW)
    b.add_argument("--kv-sink", type=int, default=DEFAULT_KV_SINK)
    b.add_argument("--warmup-chunks", type=int, default=2, help="chunks of a first, untimed rollout")
    b.add_argument("--fp8", action="store_true", help="FP8 linears in the DiT blocks (same as LINGBOT_FP8=1)")
    b.add_argument("--no-decode", action="store_true", help="DiT only: skip VAE decode and frame encoding")
    b.add_argument("--camera", choices=CAMERA_PATHS, default="keys",
                   help="camera path: keys (a cycle of 5 key motions), held (one key), distinct (no motion repeats, "
                        "so the camera memo computes every frame) (default keys)")
    b.add_argument("--decode-cost", help="the leader's frame decode as a fraction of one GPU's DiT time: how much "
                   "less of the DiT's tokens rank 0 takes with 2+ ranks (0 = even; default $LINGBOT_SP_DECODE_COST, "
                   "else 0 when every rank decodes a band, and with --decode-split leader "
                   f"{DEFAULT_DECODE_COST}, {DEFAULT_DECODE_COST_4_RANKS} from 4 ranks on); a comma-separated list "
                   "runs one bench per value in one process")
    b.add_argument("--decode-split", help="who decodes with 2+ ranks: bands (every rank a band of rows, between "
                   "chunks) or leader (whole frames beside the DiT); default $LINGBOT_DECODE_SPLIT, else bands; a "
                   "comma-separated list runs one bench per value in one process")
    b.add_argument("--cuda-graphs", help="CUDA graphs of the DiT forwards: auto (warm from 4 ranks on), 0, 1 or warm (every "
                   "span, kept across jobs; see LINGBOT_CUDA_GRAPHS in docs/PLATFORMS.md); default "
                   "$LINGBOT_CUDA_GRAPHS, else auto; a comma-separated list runs one bench per value in one process "
                   "(with lists of several settings: every combination)")
    b.add_argument("--decode-priority", help="the leader's decode stream for chunks after the first: low (fills "
                   "the DiT's idle SMs) or high (ahead of the DiT); default $LINGBOT_DECODE_PRIORITY, else low; a "
                   "comma-separated list runs one bench per value in one process")
    b.add_argument("--save-latents", type=Path, help="write the rollout's latents (torch.save) for cross-run checks")
    b.add_argument("--json", type=Path, help="write the full results as JSON here")
    c = sub.add_parser("convert", help="write a bf16 copy of a checkpoint's DiT (half the bytes to read at every "
                       "cold start; the same weights the loader would make)")
    c.add_argument("--model", required=True, help="the checkpoint: a local folder or a locally cached hub id")
    c.add_argument("--out", type=Path, required=True, help="the new folder (must not exist); serve it with "
                   "LINGBOT_MODEL=OUT, or write it to $LINGBOT_MODEL_DIR/ORG/NAME to be found before the HF cache")
    return ap


def cmd_convert(a: argparse.Namespace) -> int:
    from worker.models.convert import convert_checkpoint
    from worker.models.loading import WeightsError, resolve_model

    try:
        out = convert_checkpoint(resolve_model(a.model), a.out)
    except (WeightsError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"bf16 checkpoint written to {out}")
    return 0


def _request_from_args(a: argparse.Namespace) -> dict:
    from worker.camera import parse_actions

    req = json.loads(a.request.read_text()) if a.request else {}
    if a.prompt is not None:
        req["prompt"] = a.prompt
    req.setdefault("prompt", "a first-person walk through a quiet forest path, soft morning light")
    if a.image is not None:
        req["image"] = a.image
    req.setdefault("image", str(EXAMPLE_IMAGE))
    if a.actions is not None:
        req["camera_actions"] = parse_actions(a.actions)
    for key, val in (("num_chunks", a.chunks), ("size", a.size), ("seed", a.seed), ("kv_window", a.kv_window),
                     ("kv_sink", a.kv_sink)):
        if val is not None:
            req[key] = val
    req.setdefault("stream", {"format": a.stream_format})
    # The CLI user owns the machine: a local file is read here rather than confined to LINGBOT_INPUT_DIR.
    img = req["image"]
    if isinstance(img, str) and "://" not in img and not img.startswith("data:") and Path(img).is_file():
        req["image"] = Path(img).read_bytes()
    return req


def cmd_generate(a: argparse.Namespace) -> int:
    from worker.parallel import early

    early.start(a.ranks)  # with 2+ ranks: the followers import the worker beside this process
    from worker.parallel.pool import load_generator
    from worker.service import JobRunner

    request = _request_from_args(a)
    gen = load_generator(a.model, a.device, a.ranks)
    engine = getattr(gen, "engine", gen)
    env = dict(os.environ)
    if not a.upload:
        env.pop("LINGBOT_S3_BUCKET", None)
        env["LINGBOT_OUTPUT_DIR"] = str(a.out.resolve().parent)
    runner = JobRunner.from_env(gen, engine.preset, env)
    code = 1
    try:
        for item in runner.run(request):
            kind = item.get("type")
            if kind in ("chunk", "progress"):
                s = item["stats"]
                if item.get("part", 0) == 0:
                    print(f"chunk {item['chunk_index']}: frames {item['frame_start']}..{item['frame_start'] + item['num_frames'] - 1}"
                          f"  dit {s['dit_ms']:.0f} ms  decode {s['decode_ms']:.0f} ms  encode {s['encode_ms']:.0f} ms",
                          file=sys.stderr)
            elif kind == "video":
                if item["path"] and not a.upload:
                    a.out.parent.mkdir(parents=True, exist_ok=True)
                    shutil.move(item["path"], a.out)
                    item["path"] = str(a.out.resolve())
                print(json.dumps(item, indent=2))
                if engine.info.random_weights:
                    print(f"WARNING: random '{engine.info.name}' weights: {a.out} shows noise, not a world.",
                          file=sys.stderr)
                code = 0
            else:
                print(f"error: {item.get('error')}", file=sys.stderr)
    finally:
        if hasattr(gen, "close"):
            gen.close()
    return code


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("LINGBOT_LOG_LEVEL", "INFO"), format="%(levelname)s %(name)s: %(message)s")
    a = build_parser().parse_args(argv)
    if a.command == "generate":
        return cmd_generate(a)
    if a.command == "convert":
        return cmd_convert(a)
    from worker.bench import cmd_bench

    return cmd_bench(a)


if __name__ == "__main__":
    sys.exit(main())
