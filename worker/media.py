"""Frame encoding (JPEG/WebP for streaming) and incremental MP4 writing (H.264 via PyAV).

Everything here works on uint8 RGB frames shaped [T, H, W, 3]; `frames_to_uint8` is the single place that turns
the VAE decoder's [-1, 1] floats into pixels, so streamed frames and the MP4 always agree.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import queue
import secrets
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import TracebackType
from typing import Literal

import av
import numpy as np
import torch
from av.video.reformatter import ColorPrimaries, ColorRange, Colorspace, ColorTrc
from PIL import Image

from worker.config import FPS
from worker.transfer import to_host

ImageFormat = Literal["jpeg", "webp"]

CONTENT_TYPES: dict[str, str] = {"jpeg": "image/jpeg", "webp": "image/webp", "mp4": "video/mp4"}

# H.264 encoders in order of preference. libx264 is in PyAV's bundled FFmpeg wheels; the hardware ones
# (nvenc etc.) are listed by `av.codecs_available` even without a GPU, so they are not used as a fallback:
# an encoder that exists on paper but fails at open time is worse than a clear error.
_H264_ENCODERS = ("libx264", "libopenh264")

# CRF 18 is visually near-lossless for x264 and keeps a 10 s 832x480 clip at a few MB; "veryfast" encodes
# 832x480 at several hundred fps on one core, well above the 16 fps the model produces, so the writer never
# becomes the bottleneck. Both are constructor arguments.
DEFAULT_CRF = 18
DEFAULT_PRESET = "veryfast"

# Writes (chunks) queued for the encoder thread before `write` blocks: a writer slower than the model slows the
# caller instead of holding frames without limit.
_QUEUE_WRITES = 4

# JSON array overhead per streamed frame: the two quotes and the comma around each base64 string.
_JSON_PER_ITEM = 3


def frames_to_uint8(video: torch.Tensor) -> np.ndarray:
    """Decoder output [3, T, H, W] (or [1, 3, T, H, W]) float in [-1, 1] -> uint8 [T, H, W, 3] on the CPU.

    Mapping: pixel = round((clamp(x, -1, 1) + 1) * 127.5), so -1 -> 0, 0 -> 127.5 -> 128 (round half to even
    gives 128), 1 -> 255. The arithmetic runs on the tensor's device in fp32 and only the uint8 result (a
    quarter of the fp32 bytes) crosses to the host.
    """
    return to_host(pixels_to_uint8(video)).numpy()


def pixels_to_uint8(video: torch.Tensor) -> torch.Tensor:
    """frames_to_uint8 without the copy to the host: uint8 [T, H, W, 3] on the video's device."""
    if video.dim() == 5 and video.shape[0] == 1:
        video = video[0]
    if video.dim() != 4 or video.shape[0] != 3:
        raise ValueError(f"expected a decoded video shaped [3, T, H, W], got {tuple(video.shape)}")
    x = video.detach().float().clamp(-1.0, 1.0).add(1.0).mul(127.5).round()
    return x.to(torch.uint8).permute(1, 2, 3, 0).contiguous()


def _check_frames(frames: np.ndarray) -> None:
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8:
        raise TypeError("frames must be a uint8 numpy array shaped [T, H, W, 3]")
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be shaped [T, H, W, 3], got {frames.shape}")


def _encode_one(frame: np.ndarray, fmt: ImageFormat, quality: int) -> bytes:
    buf = io.BytesIO()
    img = Image.fromarray(np.ascontiguousarray(frame))
    if fmt == "jpeg":
        img.save(buf, format="JPEG", quality=quality)
    else:
        # method=2 (of 0..6) trades a little size for ~2x the speed of the default 4: a chunk of 12 frames must
        # encode in a small fraction of the 750 ms real-time budget.
        img.save(buf, format="WEBP", quality=quality, method=2)
    return buf.getvalue()


def encode_frames(frames: np.ndarray, fmt: ImageFormat, quality: int) -> list[bytes]:
    """Encode uint8 [T, H, W, 3] RGB frames to JPEG or WebP, one bytes object per frame, in order.

    Frames are encoded on a small thread pool: Pillow releases the GIL while encoding.
    """
    _check_frames(frames)
    if fmt not in ("jpeg", "webp"):
        raise ValueError(f"unknown image format {fmt!r}: expected 'jpeg' or 'webp'")
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
        raise ValueError(f"quality must be an integer in 1..100, got {quality!r}")
    if len(frames) <= 1:
        return [_encode_one(f, fmt, quality) for f in frames]
    with ThreadPoolExecutor(max_workers=min(len(frames), os.cpu_count() or 1, 8)) as pool:
        return list(pool.map(lambda f: _encode_one(f, fmt, quality), frames))


def base64_len(n: int) -> int:
    """Length of the standard (padded) base64 encoding of n bytes."""
    return 4 * ((n + 2) // 3)


def b64encode_all(items: list[bytes]) -> list[str]:
    return [base64.b64encode(b).decode("ascii") for b in items]


def split_by_budget(items: list[bytes], budget_bytes: int) -> list[list[bytes]]:
    """Group consecutive encoded frames so each group, sent as a JSON array of base64 strings, fits the budget.

    A group's cost is sum(base64_len(frame) + 3) (quotes and comma per array element); the caller reserves the
    rest of the streamed item (other fields, braces) by passing a budget below RunPod's 1 MB per-item limit.
    Order and every frame are preserved. A single frame that alone exceeds the budget cannot be streamed at all:
    that is a ValueError (never a silently dropped frame), which tells the caller to lower the quality or size.
    """
    if budget_bytes <= 0:
        raise ValueError(f"budget_bytes must be positive, got {budget_bytes}")
    groups: list[list[bytes]] = []
    current: list[bytes] = []
    used = 0
    for i, item in enumerate(items):
        cost = base64_len(len(item)) + _JSON_PER_ITEM
        if cost > budget_bytes:
            raise ValueError(
                f"encoded frame {i} needs {cost} bytes as base64, more than the {budget_bytes}-byte budget of one "
                "streamed item; lower stream.quality, use a smaller size, or stream format 'none'"
            )
        if current and used + cost > budget_bytes:
            groups.append(current)
            current, used = [], 0
        current.append(item)
        used += cost
    if current:
        groups.append(current)
    return groups


def pick_h264_encoder() -> str:
    """The first usable H.264 software encoder of PyAV's FFmpeg, or a RuntimeError that says what is missing."""
    available = av.codecs_available
    for name in _H264_ENCODERS:
        if name not in available:
            continue
        try:
            av.codec.Codec(name, "w")
        except Exception:  # listed but not an encoder in this build
            continue
        return name
    raise RuntimeError(
        "no H.264 encoder in PyAV's FFmpeg build (looked for "
        f"{', '.join(_H264_ENCODERS)}); install the PyPI 'av' wheel, which bundles libx264"
    )


@dataclass(frozen=True)
class Mp4Info:
    path: Path
    num_frames: int
    bytes: int
    sha256: str
    width: int
    height: int
    fps: int


def sha256_file(path: Path, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


class Mp4Writer:
    """Append RGB frames to an H.264 MP4 as they arrive; the file appears under `path` only when complete.

    yuv420p, BT.709 (converted and tagged, limited range: what players assume for HD video), `movflags=+faststart`
    (moov before mdat, so a browser can start playing a presigned URL before the download ends), FPS from config.
    Frames go to a hidden temporary file in the same directory, which `close()` renames atomically onto `path`;
    `abort()` (or an exception inside a `with` block) deletes it, so a crash never leaves a half file under the
    final name.

    Frames are encoded on the writer's own thread (PyAV releases the GIL in the codec): `write` checks and queues
    them and returns, so a streaming caller hands its chunk on without waiting for x264. An encoding error is
    raised by the next `write` or by `close`. The writer keeps each array until it is encoded: do not change it.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        width: int,
        height: int,
        *,
        fps: int = FPS,
        crf: int = DEFAULT_CRF,
        preset: str = DEFAULT_PRESET,
    ) -> None:
        if width <= 0 or height <= 0 or width % 2 or height % 2:
            raise ValueError(f"MP4 width and height must be positive and even (yuv420p), got {width}x{height}")
        self.path = Path(path)
        self.width, self.height, self.fps = width, height, fps
        self.num_frames = 0
        self._closed = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Same directory -> same filesystem -> os.replace is atomic. The name is hidden and unique per writer.
        self._tmp = self.path.with_name(f".{self.path.stem}.{secrets.token_hex(4)}.part.mp4")
        codec = pick_h264_encoder()
        # faststart rewrites the file by name at close (FFmpeg reopens it to move moov), so we give a path,
        # never a Python file object.
        self._container = av.open(str(self._tmp), mode="w", format="mp4", options={"movflags": "+faststart"})
        try:
            self._stream = self._container.add_stream(codec, rate=fps)
            self._stream.width, self._stream.height = width, height
            self._stream.pix_fmt = "yuv420p"
            # Frame pts count frames in 1/fps. Kept separately: the muxer replaces the stream's time_base with its
            # own (e.g. 1/16384) once the header is written, and stamping frames with that would break the pts.
            self._time_base = Fraction(1, fps)
            self._stream.time_base = self._time_base
            cc = self._stream.codec_context
            cc.color_range = ColorRange.MPEG
            cc.colorspace = Colorspace.ITU709
            cc.color_primaries = ColorPrimaries.BT709
            cc.color_trc = ColorTrc.BT709
            if codec == "libx264":
                self._stream.options = {"crf": str(crf), "preset": preset}
        except BaseException:
            self._discard()
            raise
        self._queue: queue.Queue = queue.Queue(maxsize=_QUEUE_WRITES)
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._encoded = 0
        self._thread = threading.Thread(target=self._encode_queued, name="mp4-writer", daemon=True)
        self._thread.start()

    def write(self, frames: np.ndarray) -> None:
        """Queue uint8 RGB frames shaped [T, H, W, 3] (or one frame [H, W, 3]) for encoding."""
        if self._closed:
            raise RuntimeError("Mp4Writer is closed")
        if isinstance(frames, np.ndarray) and frames.ndim == 3:
            frames = frames[None]
        _check_frames(frames)
        if frames.shape[1:3] != (self.height, self.width):
            raise ValueError(f"frame size {frames.shape[2]}x{frames.shape[1]} != writer size {self.width}x{self.height}")
        self._hand_over(frames)
        self.num_frames += len(frames)

    def close(self) -> Mp4Info:
        """Encode what is queued, flush the encoder, finish the file (faststart), rename it onto `path`; returns
        what was written."""
        if self._closed:
            raise RuntimeError("Mp4Writer is already closed")
        if self.num_frames == 0:
            self.abort()
            raise ValueError("no frames were written; nothing to close into an MP4")
        try:
            self._hand_over(None)
            self._thread.join()
            self._raise_error()
            self._container.mux(self._stream.encode(None))
            self._container.close()
            with open(self._tmp, "rb+") as f:  # durable before it becomes visible under the final name
                os.fsync(f.fileno())
            info = Mp4Info(
                path=self.path, num_frames=self._encoded, bytes=self._tmp.stat().st_size,
                sha256=sha256_file(self._tmp), width=self.width, height=self.height, fps=self.fps,
            )
            os.replace(self._tmp, self.path)
        except BaseException:
            self._discard()
            raise
        self._closed = True
        return info

    def _hand_over(self, item: np.ndarray | None) -> None:
        """Queue frames (None: no more) for the encoder thread; raise its error instead if it has failed."""
        while True:
            self._raise_error()
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error
        if not self._thread.is_alive() and not self._stop.is_set():
            raise RuntimeError("the MP4 encoder thread has stopped")

    def _encode_queued(self) -> None:
        try:
            while not self._stop.is_set():
                frames = self._queue.get()
                if frames is None:
                    self._stop.set()
                    return
                for rgb in frames:
                    if self._stop.is_set():
                        return
                    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
                    # Explicit conversion so the pixels really are BT.709 limited range, matching the stream's
                    # tags (swscale's implicit default is BT.601).
                    frame = frame.reformat(
                        format="yuv420p", dst_colorspace=Colorspace.ITU709, dst_color_range=ColorRange.MPEG
                    )
                    frame.pts = self._encoded
                    frame.time_base = self._time_base
                    self._container.mux(self._stream.encode(frame))
                    self._encoded += 1
        except BaseException as exc:  # noqa: BLE001 - handed to the caller by its next write or close
            self._error = exc

    def abort(self) -> None:
        """Drop everything written so far; no file is left behind. Safe to call more than once."""
        if not self._closed:
            self._discard()

    def _discard(self) -> None:
        self._closed = True
        thread = getattr(self, "_thread", None)
        if thread is not None and thread is not threading.current_thread():
            self._stop.set()
            while thread.is_alive():  # unblock its get, then wait for the frame it is on
                try:
                    self._queue.put_nowait(None)
                except queue.Full:
                    try:
                        self._queue.get_nowait()
                    except queue.Empty:
                        pass
                thread.join(timeout=0.05)
        try:
            self._container.close()
        except Exception:
            pass  # the container may be half-initialised or already failed; the temp file goes regardless
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> "Mp4Writer":
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.close()
