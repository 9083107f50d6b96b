from __future__ import annotations

import io
import struct
import threading
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from worker import media
from worker.config import FPS, pixel_frames_for_chunk

W, H = 320, 192  # multiples of 16, like the worker's sizes


def synthetic_frames(t: int, h: int = H, w: int = W) -> np.ndarray:
    """Smooth moving gradients plus a moving square: easy for H.264, so PSNR reflects the pipeline, not content."""
    tt = np.arange(t, dtype=np.float64)[:, None, None]
    yy = np.arange(h, dtype=np.float64)[None, :, None]
    xx = np.arange(w, dtype=np.float64)[None, None, :]
    r = 40 + 170 * (xx / w) + 3 * tt + 0 * yy
    g = 40 + 170 * (yy / h) + 0 * xx + 0 * tt
    b = 128 + 80 * np.sin((xx + yy) / 40.0 + tt / 4.0)
    frames = np.stack([r, g, b], axis=-1).clip(0, 255).astype(np.uint8)
    for i in range(t):
        x0 = 20 + 6 * i
        frames[i, 60:124, x0:x0 + 64] = (230, 40, 40)
    return frames


def top_level_boxes(path: Path) -> list[str]:
    """Top-level ISO-BMFF box types in file order (32-bit sizes, 64-bit 'largesize', size 0 = to end)."""
    boxes, data = [], path.read_bytes()
    pos = 0
    while pos + 8 <= len(data):
        size, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if size == 1:
            size = struct.unpack(">Q", data[pos + 8:pos + 16])[0]
        elif size == 0:
            size = len(data) - pos
        assert size >= 8, f"corrupt box at {pos}"
        boxes.append(kind.decode("latin-1"))
        pos += size
    assert pos == len(data)
    return boxes


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / mse))


def test_frames_to_uint8_mapping() -> None:
    x = torch.tensor([-1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0])
    video = x.view(1, 7, 1, 1).expand(3, 7, 1, 1)  # [3, T, H, W]
    out = media.frames_to_uint8(video)
    assert out.shape == (7, 1, 1, 3) and out.dtype == np.uint8
    expected = np.round((np.clip(x.numpy(), -1, 1) + 1) * 127.5).astype(np.uint8)
    assert out[:, 0, 0, 0].tolist() == expected.tolist() == [0, 0, 64, 128, 191, 255, 255]
    # channel order and layout: [3, T, H, W] -> [T, H, W, 3]
    v = torch.rand(3, 2, 4, 6) * 2 - 1
    u = media.frames_to_uint8(v.to(torch.bfloat16))
    assert u.shape == (2, 4, 6, 3)
    assert media.frames_to_uint8(v[None]).shape == (2, 4, 6, 3)  # a batch of one is accepted
    ref = ((v.to(torch.bfloat16).float() + 1) * 127.5).round().permute(1, 2, 3, 0).to(torch.uint8).numpy()
    np.testing.assert_array_equal(u, ref)
    with pytest.raises(ValueError):
        media.frames_to_uint8(torch.zeros(4, 2, 4, 4))


def test_mp4_writer_roundtrip(tmp_path: Path) -> None:
    chunks = [pixel_frames_for_chunk(0), pixel_frames_for_chunk(1)]  # 9 + 12 = 21 frames, as the model streams
    frames = synthetic_frames(sum(chunks))
    out = tmp_path / "video.mp4"
    with media.Mp4Writer(out, W, H) as writer:
        writer.write(frames[: chunks[0]])
        assert not out.exists()  # only the temp file while writing
        writer.write(frames[chunks[0]:])
        info = writer.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["video.mp4"]  # temp file renamed away
    assert info.num_frames == 21 and info.bytes == out.stat().st_size
    assert info.sha256 == media.sha256_file(out) and (info.width, info.height, info.fps) == (W, H, FPS)

    boxes = top_level_boxes(out)
    assert boxes[0] == "ftyp" and "moov" in boxes and "mdat" in boxes
    assert boxes.index("moov") < boxes.index("mdat"), f"not faststart: {boxes}"

    with av.open(str(out)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert stream.codec_context.pix_fmt == "yuv420p"
        assert (stream.codec_context.width, stream.codec_context.height) == (W, H)
        assert stream.average_rate == FPS
        decoded = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])
    assert decoded.shape == frames.shape
    assert psnr(decoded, frames) > 30.0
    # per frame too: no frame dropped, duplicated or reordered
    assert all(psnr(decoded[i], frames[i]) > 30.0 for i in range(len(frames)))


def test_mp4_writer_abort_and_errors(tmp_path: Path) -> None:
    out = tmp_path / "x.mp4"
    writer = media.Mp4Writer(out, W, H)
    writer.write(synthetic_frames(3))
    writer.abort()
    assert list(tmp_path.iterdir()) == []

    with pytest.raises(RuntimeError, match="boom"):
        with media.Mp4Writer(out, W, H) as w:
            w.write(synthetic_frames(2))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []  # an exception in the with block leaves nothing

    with pytest.raises(ValueError, match="even"):
        media.Mp4Writer(out, 321, 192)
    with media.Mp4Writer(out, W, H) as w:
        with pytest.raises(ValueError, match="size"):
            w.write(synthetic_frames(1, h=H, w=W - 16))
        with pytest.raises(TypeError):
            w.write(synthetic_frames(1).astype(np.float32))
        w.write(synthetic_frames(1)[0])  # a single [H, W, 3] frame
    assert out.exists()  # closed by the with block
    with pytest.raises(ValueError, match="no frames"):
        media.Mp4Writer(tmp_path / "empty.mp4", W, H).close()
    assert not (tmp_path / "empty.mp4").exists()


def test_mp4_writer_encodes_on_its_own_thread_and_reports_its_errors(tmp_path: Path) -> None:
    """write() hands frames to the encoder thread; an encoding error comes back from the next write or from close,
    nothing is left behind, and no encoder thread outlives its writer."""
    def writer_threads() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name == "mp4-writer"]

    class BrokenStream:
        def __init__(self, stream) -> None:
            self.stream, self.calls = stream, 0

        def encode(self, frame):
            self.calls += 1
            if self.calls > 2:
                raise OSError("disk full")
            return self.stream.encode(frame)

    out = tmp_path / "broken.mp4"
    w = media.Mp4Writer(out, W, H)
    w._stream = BrokenStream(w._stream)
    w.write(synthetic_frames(2))  # encoded
    w.write(synthetic_frames(2))  # the encoder thread fails on the first of these
    w._thread.join(timeout=10)
    with pytest.raises(OSError, match="disk full"):
        w.write(synthetic_frames(1))
    with pytest.raises(OSError, match="disk full"):
        w.close()
    assert list(tmp_path.iterdir()) == [] and not writer_threads()

    w = media.Mp4Writer(out, W, H)
    w.write(synthetic_frames(3))
    assert writer_threads()
    w.abort()
    assert list(tmp_path.iterdir()) == [] and not writer_threads()
    with media.Mp4Writer(out, W, H) as w:
        w.write(synthetic_frames(3))
    assert out.exists() and not writer_threads()


def test_h264_encoder_is_available() -> None:
    assert media.pick_h264_encoder() in ("libx264", "libopenh264")


@pytest.mark.parametrize("fmt,pil_format,min_psnr", [("jpeg", "JPEG", 30.0), ("webp", "WEBP", 30.0)])
def test_encode_frames_roundtrip(fmt: str, pil_format: str, min_psnr: float) -> None:
    frames = synthetic_frames(5)
    encoded = media.encode_frames(frames, fmt, 90)  # type: ignore[arg-type]
    assert len(encoded) == 5
    for src, data in zip(frames, encoded):
        img = Image.open(io.BytesIO(data))
        assert img.format == pil_format and img.size == (W, H)
        assert psnr(np.asarray(img.convert("RGB")), src) > min_psnr
    assert media.CONTENT_TYPES[fmt] == f"image/{fmt}"
    low = media.encode_frames(frames[:1], fmt, 10)  # type: ignore[arg-type]
    assert len(low[0]) < len(encoded[0])  # quality is honoured


def test_encode_frames_rejects_bad_args() -> None:
    frames = synthetic_frames(1)
    with pytest.raises(ValueError):
        media.encode_frames(frames, "png", 80)  # type: ignore[arg-type]
    for q in (0, 101, True, 50.0):
        with pytest.raises(ValueError):
            media.encode_frames(frames, "jpeg", q)  # type: ignore[arg-type]


def test_split_by_budget() -> None:
    rng = np.random.default_rng(0)
    items = [bytes(rng.integers(0, 256, int(n), dtype=np.uint8)) for n in rng.integers(1, 3000, 50)]
    budget = 10_000
    groups = media.split_by_budget(items, budget)
    assert [x for g in groups for x in g] == items  # order and every frame kept
    for g in groups:
        b64 = media.b64encode_all(g)
        assert sum(len(s) + 3 for s in b64) <= budget
        assert len(("[" + ",".join(f'"{s}"' for s in b64) + "]").encode()) <= budget
    # greedy: no two consecutive groups could have been merged
    cost = lambda g: sum(media.base64_len(len(x)) + 3 for x in g)  # noqa: E731
    assert all(cost(a) + cost(b) > budget for a, b in zip(groups, groups[1:]))
    assert media.split_by_budget([], budget) == []
    with pytest.raises(ValueError, match="quality"):
        media.split_by_budget([b"x" * 100, b"y" * 9000], 10_000)
    assert all(media.base64_len(n) == len(__import__("base64").b64encode(b"a" * n)) for n in range(20))
