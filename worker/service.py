"""One job end to end: validate -> first frame -> rollout -> streamed chunks + MP4 -> storage -> final result.

`JobRunner.run(raw)` is a generator of JSON-ready dicts, the same on every platform:
    {"type": "chunk", ...} per chunk (split into parts under RunPod's 1 MB item limit) or
    {"type": "progress", ...} with stream.format == "none", then
    {"type": "video", ...} last, or {"error": ..., "field": ...} instead of the rest.
It never raises for a bad job: the worker stays warm for the next one. A consumer that stops iterating
(cancel) closes the generator; the rollout releases its state and the unfinished MP4 is deleted.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import secrets
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import msgspec
import torch

from worker import media, schema
from worker.camera import CameraError
from worker.config import FPS
from worker.inputs import image_to_tensor, input_dir_from_env, load_image
from worker.netguard import allow_private_from_env
from worker.parallel import pool
from worker.rollout import ChunkOutput, RolloutJob
from worker.storage import StorageConfig, store_video

log = logging.getLogger("worker.service")

# RunPod rejects streamed items over 1 MB; keep the frames well inside it and leave room for the other fields.
STREAM_ITEM_LIMIT = 1_000_000
STREAM_FRAME_BUDGET = STREAM_ITEM_LIMIT - 4_096


class Generator(Protocol):
    """What the service needs from the model side: an Engine, or a RankPool in front of one."""

    def rollout(self, job: RolloutJob) -> Iterator[ChunkOutput]: ...


@dataclass
class JobRunner:
    generator: Generator
    limits: schema.Limits
    storage: StorageConfig
    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    on_fatal: Any = None  # called when the worker must be replaced (a rank died); set by the platform adapter

    @classmethod
    def from_env(cls, generator: Generator, preset, env: Mapping[str, str] | None = None) -> "JobRunner":
        env = dict(os.environ if env is None else env)
        return cls(generator, schema.Limits.for_preset(preset, env), StorageConfig.from_env(env), env)

    # --- health -----------------------------------------------------------------------------------------
    def unhealthy_reason(self) -> str | None:
        """Why this worker must be replaced (a rank pool that lost a rank), or None."""
        if getattr(self.generator, "healthy", True):
            return None
        return getattr(self.generator, "unhealthy_reason", None) or "rank pool unhealthy"

    def _retire_if_unhealthy(self) -> None:
        reason = self.unhealthy_reason()
        if reason and self.on_fatal is not None:
            self.on_fatal(reason)

    # --- the job --------------------------------------------------------------------------------------------
    def run(self, raw: Any, job_id: str | None = None) -> Iterator[dict[str, Any]]:
        """The job's items. A worker that must be replaced refuses at once; the platform hook (on_fatal) is
        called before the last item is yielded, since a platform may stop reading at an error."""
        reason = self.unhealthy_reason()
        if reason:
            self._retire_if_unhealthy()
            yield _error(f"worker unavailable ({reason}); it is being replaced, retry the job", None)
            return
        for item in self._run(raw, job_id):
            if "error" in item or item.get("type") == "video":
                self._retire_if_unhealthy()
            yield item

    def _run(self, raw: Any, job_id: str | None) -> Iterator[dict[str, Any]]:
        job_id = _safe_id(job_id)
        t_start = time.perf_counter()
        mp4: media.Mp4Writer | None = None
        try:
            req = schema.parse_request(raw, self.limits)
            job = self._prepare(req)
            path = self._video_path(job_id)
            mp4 = media.Mp4Writer(path, req.width, req.height)
            stream = req.request.stream
            timings: list[schema.ChunkStats] = []
            first_chunk_s = None
            t_loop = time.perf_counter()
            t_prev = t_loop
            for chunk in self.generator.rollout(job):
                t_enc = time.perf_counter()
                frames = chunk.frames
                mp4.write(frames)
                parts = self._encode_parts(frames, stream)
                now = time.perf_counter()
                stats = schema.ChunkStats(dit_ms=chunk.stats["dit_ms"], decode_ms=chunk.stats["decode_ms"],
                                          encode_ms=(now - t_enc) * 1e3, chunk_ms=(now - t_prev) * 1e3)
                t_prev = now
                timings.append(stats)
                if first_chunk_s is None:
                    first_chunk_s = now - t_start
                for item in self._chunk_items(chunk, frames.shape[0], parts, req, stats):
                    yield schema.to_builtins(item)
            info = mp4.close()
            mp4 = None
            t_gen = time.perf_counter() - t_loop
            out = req.request.output
            stored = store_video(info.path, s3_uri=out.s3_uri, presign_expires_s=out.presign_expires_s,
                                 config=self.storage)
            total_s = time.perf_counter() - t_start
            result = schema.VideoResult(
                url=stored["url"], s3_uri=stored["s3_uri"], path=stored["path"], upload_error=stored["upload_error"],
                bytes=stored["bytes"], num_frames=info.num_frames, fps=FPS, width=req.width, height=req.height,
                sha256=stored["sha256"], stats=_summary(timings, first_chunk_s, total_s, t_gen, info.num_frames, job.seed),
            )
            yield schema.to_builtins(result)
        except (schema.RequestError, CameraError) as exc:
            yield _error(str(exc), getattr(exc, "field", None))
        except torch.OutOfMemoryError:
            _free_memory(self.generator)
            yield _error("out of GPU memory during the rollout; retry with a smaller size, fewer kv_window/"
                         "kv_sink frames, or on a worker with more GPUs", None)
        except Exception as exc:  # noqa: BLE001 - the worker must survive any job
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                # The MP4 could not be written; the partial file is deleted below and the next job may fit.
                log.error("job %s failed: local disk full under %s (%s)", job_id, self.storage.output_dir, exc)
                yield _error(f"the worker's local disk is full ({exc.strerror}) under LINGBOT_OUTPUT_DIR; the "
                             "video was not kept, retry the job", None)
                return
            log.exception("job %s failed", job_id)
            yield _error(f"internal error: {type(exc).__name__}: {exc}", None)
        finally:
            if mp4 is not None:
                mp4.abort()  # failed or cancelled: no half-written file is left behind

    # --- steps ------------------------------------------------------------------------------------------
    def _prepare(self, req: schema.ValidRequest) -> RolloutJob:
        r = req.request
        img = load_image(
            req.image, field="image", max_bytes=self.limits.max_image_bytes, max_pixels=self.limits.max_image_pixels,
            input_dir=input_dir_from_env(dict(self.env)), allow_private=allow_private_from_env(self.env),
        )
        seed = r.seed if r.seed is not None else secrets.randbelow(2**31)
        return RolloutJob(
            prompt=r.prompt, image=image_to_tensor(img, req.width, req.height), num_chunks=req.num_chunks,
            width=req.width, height=req.height, seed=seed, kv_window=r.kv_window, kv_sink=r.kv_sink,
            camera_actions=req.camera_actions, poses=r.poses, intrinsics=r.intrinsics,
        )

    def _video_path(self, job_id: str) -> Path:
        folder = self.storage.output_dir / "work"
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f"{job_id}.mp4"

    def _encode_parts(self, frames, stream) -> list[list[bytes]] | None:
        """Encoded frames grouped so that each streamed item stays under RunPod's 1 MB (None: format none)."""
        if stream.format == "none":
            return None
        encoded = media.encode_frames(frames, stream.format, stream.quality)
        try:
            return media.split_by_budget(encoded, STREAM_FRAME_BUDGET)
        except ValueError as exc:
            raise schema.RequestError("stream.quality", str(exc)) from None

    def _chunk_items(self, chunk: ChunkOutput, num_frames: int, parts, req: schema.ValidRequest,
                     stats: schema.ChunkStats) -> list[msgspec.Struct]:
        if parts is None:
            return [schema.ProgressResult(chunk_index=chunk.index, frame_start=chunk.frame_start,
                                          num_frames=num_frames, stats=stats)]
        items, start = [], chunk.frame_start
        content_type = media.CONTENT_TYPES[req.request.stream.format]
        for i, part in enumerate(parts):
            items.append(schema.ChunkResult(
                chunk_index=chunk.index, part=i, num_parts=len(parts), frame_start=start, num_frames=len(part),
                width=req.width, height=req.height, content_type=content_type, frames=media.b64encode_all(part),
                stats=stats,
            ))
            start += len(part)
        return items


def serve_from_env(env: Mapping[str, str] | None = None) -> JobRunner:
    """The warm worker both platforms run: model, device and GPU count from LINGBOT_MODEL, LINGBOT_DEVICE and
    LINGBOT_NUM_GPUS (docs/PLATFORMS.md); the model loads now, once."""
    env = dict(os.environ if env is None else env)
    ranks = env.get("LINGBOT_NUM_GPUS", "").strip()
    generator = pool.load_generator(env.get("LINGBOT_MODEL") or None, env.get("LINGBOT_DEVICE") or None,
                                    int(ranks) if ranks else None)
    return JobRunner.from_env(generator, getattr(generator, "engine", generator).preset, env)


def _summary(timings: list[schema.ChunkStats], first_chunk_s, total_s, gen_s, num_frames, seed) -> dict[str, float]:
    def median(key: str) -> float:
        vals = sorted(getattr(t, key) for t in timings)
        return vals[len(vals) // 2] if vals else 0.0

    return {
        "first_chunk_s": round(first_chunk_s or 0.0, 4),
        "total_s": round(total_s, 4),
        "generated_fps": round(num_frames / gen_s, 3) if gen_s > 0 else 0.0,
        "chunks": len(timings),
        "dit_ms_median": round(median("dit_ms"), 2),
        "decode_ms_median": round(median("decode_ms"), 2),
        "encode_ms_median": round(median("encode_ms"), 2),
        "chunk_ms_median": round(median("chunk_ms"), 2),
        "seed": seed,
    }


def _error(message: str, field_name: str | None) -> dict[str, Any]:
    return schema.to_builtins(schema.ErrorResult(error=message, field=field_name))


def _free_memory(generator) -> None:
    """The leader's caches (Engine.free_memory; follower ranks keep their camera memos, each within what its own
    GPU's peak allocation leaves: CameraMemo._cap), or the allocator's alone for a generator without them."""
    engine = getattr(generator, "engine", generator)
    if hasattr(engine, "free_memory"):
        engine.free_memory()
        return
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


_ID_RE = re.compile(r"[^A-Za-z0-9_.-]")


def _safe_id(job_id: str | None) -> str:
    """Job ids name files: keep them to a safe alphabet and length."""
    if not job_id:
        return uuid.uuid4().hex
    return _ID_RE.sub("_", str(job_id))[:80].lstrip(".") or uuid.uuid4().hex
