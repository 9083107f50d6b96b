"""The public contract (DESIGN.md section 3): request validation and result types.

Request side
    `Request` is the one msgspec Struct a job arrives as (RunPod `job["input"]`, a Modal argument, a CLI
    `--request job.json`). Unknown keys are rejected at every level. msgspec checks the *shape* (types,
    nesting); `parse_request` then checks the *values* against `Limits`, which come from the model preset
    and the environment at start-up (they are not compile-time constants, so they cannot be msgspec
    `Meta` constraints). Every failure is a `RequestError` whose `.field` is a clean path
    (`stream.quality`, `camera_actions[3][0]`) and whose message names the field and the limit.

    `parse_request` returns a `ValidRequest`: the Request plus the derived values the service needs
    (width, height, the resolved number of chunks, the normalised camera path), so no later stage
    re-parses strings or re-derives defaults.

Result side
    Streamed items are msgspec Structs tagged with a `"type"` field (msgspec `tag_field="type"`), so
    `msgspec.to_builtins(item)` gives exactly the documented dict, `{"type": "chunk", ...}`. `ErrorResult`
    is untagged on purpose: the contract for a failed job is `{"error": "<message>", "field": ...}`.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from typing import Any, Literal

import msgspec

from worker import config

# --- Request ----------------------------------------------------------------------------------------------

DEFAULT_SIZE_STR = f"{config.DEFAULT_SIZE[0]}x{config.DEFAULT_SIZE[1]}"
SIZE_MULTIPLE = 16  # VAE stride 8 x patch 2: each side must map to whole DiT tokens
ALLOWED_ACTIONS = "".join(sorted(config.ACTION_KEYS))  # for messages: "a d i j k l s w"


class StreamOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    format: Literal["jpeg", "webp", "none"] = "jpeg"
    quality: int = 85


class OutputOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    s3_uri: str | None = None
    presign_expires_s: int | None = None


class Request(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    prompt: str
    # str (URL, s3://, data: URI, base64, local path) or bytes (Modal passes raw bytes). msgspec cannot
    # express `str | bytes` (two str-like types in one union), so the type is checked in parse_request.
    image: Any
    size: str = DEFAULT_SIZE_STR
    camera_actions: list[list[str]] | None = None
    poses: list[list[list[float]]] | None = None
    # [fx, fy, cx, cy] or one such row per pose. msgspec cannot union two array types either, so the
    # element is `float | list[float]` and homogeneity is checked in parse_request.
    intrinsics: list[float | list[float]] | None = None
    num_chunks: int | None = None
    seed: int | None = None
    kv_window: int = config.DEFAULT_KV_WINDOW
    kv_sink: int = config.DEFAULT_KV_SINK
    stream: StreamOptions = msgspec.field(default_factory=StreamOptions)
    output: OutputOptions = msgspec.field(default_factory=OutputOptions)


class RequestError(ValueError):
    """A request value outside the contract. `str(e)` is "<field>: <detail>"; `.field` is the clean path."""

    def __init__(self, field: str | None, detail: str) -> None:
        self.field = field
        self.detail = detail
        super().__init__(f"{field}: {detail}" if field else detail)


# --- Limits -----------------------------------------------------------------------------------------------

MAX_PROMPT_CHARS = 4000  # DESIGN.md section 3; UMT5 truncates at 512 tokens anyway
MAX_IMAGE_BYTES = 20 * 1024 * 1024  # 20 MiB: a 4K PNG fits; a RunPod /run payload is capped lower than this
MAX_IMAGE_PIXELS = 40_000_000  # 40 MP: above any camera still; ~160 MB as RGBA, a decompression-bomb guard
# Attention span cap (kv_window + kv_sink, latent frames): 4x the default 15+3. At 832x480 (1560 tokens per
# latent frame) 72 frames are 112k tokens, ~92 GB of bf16 K/V over 40 layers before sequence parallel splits
# it by rank; more than that fits no supported machine. Lowered or raised by LINGBOT_MAX_KV_FRAMES.
MAX_KV_FRAMES = 4 * (config.DEFAULT_KV_WINDOW + config.DEFAULT_KV_SINK)
MAX_PRESIGN_S = 7 * 24 * 3600  # SigV4 presigned URLs are valid for at most 7 days
MAX_SEED = 2**63 - 1  # fits torch.Generator.manual_seed and a signed 64-bit JSON consumer


def _env_int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer") from None
    if value < 1:
        raise ValueError(f"{name}={raw!r} must be >= 1")
    return value


class Limits(msgspec.Struct, frozen=True, kw_only=True):
    """Per-worker request limits. Build with `Limits.from_env` (or `Limits.for_preset`)."""

    max_prompt_chars: int = MAX_PROMPT_CHARS
    max_width: int = config.FULL.max_size[0]
    max_height: int = config.FULL.max_size[1]
    max_chunks: int = config.max_chunks(config.DiTConfig())  # RoPE table / chunk size: 1024 // 3 = 341
    max_image_bytes: int = MAX_IMAGE_BYTES
    max_image_pixels: int = MAX_IMAGE_PIXELS
    min_kv_window: int = config.CHUNK_LATENT_FRAMES  # the window must at least hold the chunk being generated
    max_kv_frames: int = MAX_KV_FRAMES  # kv_window + kv_sink
    max_presign_s: int = MAX_PRESIGN_S

    @classmethod
    def from_env(
        cls,
        env: Mapping[str, str] | None = None,
        preset_max_size: tuple[int, int] = config.FULL.max_size,
        *,
        dit: config.DiTConfig | None = None,
    ) -> "Limits":
        """Limits for a preset. Environment overrides (all optional, positive integers):

        LINGBOT_MAX_CHUNKS       lowers max_chunks; it can never exceed the RoPE bound of the DiT
        LINGBOT_MAX_IMAGE_BYTES  encoded first-frame size (default 20 MiB)
        LINGBOT_MAX_IMAGE_PIXELS decoded first-frame pixels (default 40 MP)
        LINGBOT_MAX_KV_FRAMES    kv_window + kv_sink cap (default 72), never above the RoPE bound
        """
        env = os.environ if env is None else env
        dit = dit or config.DiTConfig()
        rope_chunks = config.max_chunks(dit)
        return cls(
            max_width=preset_max_size[0],
            max_height=preset_max_size[1],
            max_chunks=min(rope_chunks, _env_int(env, "LINGBOT_MAX_CHUNKS", rope_chunks)),
            max_image_bytes=_env_int(env, "LINGBOT_MAX_IMAGE_BYTES", MAX_IMAGE_BYTES),
            max_image_pixels=_env_int(env, "LINGBOT_MAX_IMAGE_PIXELS", MAX_IMAGE_PIXELS),
            max_kv_frames=min(dit.rope_max_positions, _env_int(env, "LINGBOT_MAX_KV_FRAMES", MAX_KV_FRAMES)),
        )

    @classmethod
    def for_preset(cls, preset: config.ModelPreset, env: Mapping[str, str] | None = None) -> "Limits":
        return cls.from_env(env, preset.max_size, dit=preset.dit)

    @property
    def max_image_b64_chars(self) -> int:
        """Longest base64 text that can decode to max_image_bytes (checked before decoding)."""
        return 4 * math.ceil(self.max_image_bytes / 3)


# --- Validated request ------------------------------------------------------------------------------------


class ValidRequest(msgspec.Struct, frozen=True, kw_only=True):
    """A Request whose values passed `parse_request`, plus what the service derives from it.

    camera_actions: the action path (one list of keys per latent frame), [] when the camera holds; None
        when the request gives poses. Not padded: camera.py pads to num_chunks * CHUNK_LATENT_FRAMES.
    path_chunks: chunks the given path spans (actions: ceil(len / 3); poses: the official
        latent-frame count of the pixel-frame poses rounded down to whole chunks); at least 1.
    num_chunks: request.num_chunks, or path_chunks when absent.
    """

    request: Request
    width: int
    height: int
    num_chunks: int
    path_chunks: int
    camera_actions: list[list[str]] | None
    image: Any  # str or bytes (bytearray/memoryview normalised to bytes)


def _field_from_msgspec(err: msgspec.ValidationError) -> tuple[str | None, str]:
    """'Expected `int`, got `str` - at `$.stream.quality`' -> ('stream.quality', 'expected `int`, got `str`')."""
    msg = str(err)
    path = None
    m = re.search(r" - at `\$(.*)`$", msg)
    if m:
        path = m.group(1).lstrip(".") or None
        msg = msg[: m.start()]
    m = re.match(r"Object (contains unknown|missing required) field `(.+)`$", msg)
    if m:
        name = m.group(2)
        field = f"{path}.{name}" if path else name
        if m.group(1) == "contains unknown":
            return field, "unknown field (not part of the request contract)"
        return field, "required field is missing"
    if path is None:
        return "request", msg[:1].lower() + msg[1:]
    return path, msg[:1].lower() + msg[1:]


def _decode(raw: Mapping[str, Any] | bytes | str) -> Request:
    try:
        if isinstance(raw, (bytes, bytearray, memoryview, str)):
            return msgspec.json.decode(raw, type=Request)
        if not isinstance(raw, Mapping):
            raise RequestError("request", f"expected a JSON object, got {type(raw).__name__}")
        return msgspec.convert(dict(raw), Request)
    except msgspec.ValidationError as e:
        raise RequestError(*_field_from_msgspec(e)) from None
    except msgspec.DecodeError as e:
        raise RequestError("request", f"not valid JSON ({e})") from None


def _int_range(field: str, value: int, lo: int, hi: int, what: str = "") -> None:
    if not lo <= value <= hi:
        raise RequestError(field, f"{value} is out of range ({what}{lo}..{hi})")


def _parse_size(size: str, limits: Limits) -> tuple[int, int]:
    rule = (
        f"WIDTHxHEIGHT, each a multiple of {SIZE_MULTIPLE}, at most {limits.max_width}x{limits.max_height}"
    )
    m = re.fullmatch(r"(\d{1,6})x(\d{1,6})", size.strip().lower())
    if not m:
        raise RequestError("size", f"{size[:40]!r} is not WIDTHxHEIGHT ({rule})")
    w, h = int(m.group(1)), int(m.group(2))
    if w < SIZE_MULTIPLE or h < SIZE_MULTIPLE or w % SIZE_MULTIPLE or h % SIZE_MULTIPLE:
        raise RequestError("size", f"{w}x{h} is not a multiple of {SIZE_MULTIPLE} ({rule})")
    if w > limits.max_width or h > limits.max_height:
        raise RequestError("size", f"{w}x{h} is larger than this model allows ({rule})")
    return w, h


def _check_actions(actions: list[list[str]], limits: Limits) -> None:
    cap = limits.max_chunks * config.CHUNK_LATENT_FRAMES
    if len(actions) > cap:
        raise RequestError(
            "camera_actions",
            f"{len(actions)} entries need {math.ceil(len(actions) / config.CHUNK_LATENT_FRAMES)} chunks; "
            f"at most {cap} entries ({limits.max_chunks} chunks x {config.CHUNK_LATENT_FRAMES} latent frames)",
        )
    for i, keys in enumerate(actions):
        seen: set[str] = set()
        for j, tok in enumerate(keys):
            if tok not in config.ACTION_KEYS:
                raise RequestError(
                    f"camera_actions[{i}]",
                    f"unknown action {tok[:20]!r} (allowed: {' '.join(ALLOWED_ACTIONS)}; one key per "
                    f"token, e.g. [\"w\", \"d\"])",
                )
            if tok in seen:
                raise RequestError(f"camera_actions[{i}]", f"duplicate action {tok!r}")
            seen.add(tok)


def _finite(field: str, x: float) -> None:
    if not math.isfinite(x):
        raise RequestError(field, f"{x} is not a finite number")


def _check_poses(req: Request, limits: Limits) -> int:
    """Validates poses + intrinsics; returns the chunks the poses span (official frame-count rule)."""
    poses = req.poses or []
    max_poses = config.total_pixel_frames(limits.max_chunks)
    if not 1 <= len(poses) <= max_poses:
        raise RequestError(
            "poses", f"{len(poses)} poses; need 1..{max_poses} (one 4x4 camera-to-world per pixel frame)"
        )
    for i, p in enumerate(poses):
        if len(p) != 4 or any(len(row) != 4 for row in p):
            raise RequestError(f"poses[{i}]", "must be a 4x4 camera-to-world matrix")
        for r, row in enumerate(p):
            for c, x in enumerate(row):
                _finite(f"poses[{i}][{r}][{c}]", x)
    if req.intrinsics is None:
        raise RequestError("intrinsics", "required with poses ([fx, fy, cx, cy] in pixels)")
    intr = req.intrinsics
    if all(isinstance(x, float) for x in intr):
        rows = [("intrinsics", intr)]
    elif all(isinstance(x, list) for x in intr):
        if len(intr) not in (1, len(poses)):
            raise RequestError("intrinsics", f"{len(intr)} rows; need 1 or one per pose ({len(poses)})")
        rows = [(f"intrinsics[{i}]", row) for i, row in enumerate(intr)]
    else:
        raise RequestError("intrinsics", "mixes numbers and rows; use [fx, fy, cx, cy] or a list of such rows")
    for name, row in rows:
        if len(row) != 4:
            raise RequestError(name, f"{len(row)} values; need [fx, fy, cx, cy]")
        for x in row:
            _finite(name, x)
        if row[0] <= 0 or row[1] <= 0:
            raise RequestError(name, "focal lengths fx, fy must be > 0")
    # Official rule: latent frames = (N - 1) // 4 + 1, rounded down to whole chunks.
    lat = (len(poses) - 1) // config.VAE_STRIDE[0] + 1
    return max(1, lat // config.CHUNK_LATENT_FRAMES)


def _check_s3_uri(uri: str) -> None:
    m = re.fullmatch(r"s3://([^/]+)/(.+)", uri)
    rule = "s3://bucket/key.mp4"
    if not m:
        raise RequestError("output.s3_uri", f"must look like {rule}")
    bucket, key = m.groups()
    if not re.fullmatch(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]", bucket):
        raise RequestError("output.s3_uri", f"bucket {bucket[:70]!r} is not a valid S3 bucket name ({rule})")
    if not key.endswith(".mp4") or len(key) > 1024 or key.endswith("/.mp4"):
        raise RequestError("output.s3_uri", f"key must end with .mp4 and be at most 1024 chars ({rule})")


def parse_request(raw: Mapping[str, Any] | bytes | str | Request, limits: Limits) -> ValidRequest:
    """Decode and validate one request. Raises RequestError (field + limit) on the first problem."""
    req = raw if isinstance(raw, Request) else _decode(raw)

    if not req.prompt.strip():
        raise RequestError("prompt", f"must not be blank (1..{limits.max_prompt_chars} chars)")
    if len(req.prompt) > limits.max_prompt_chars:
        raise RequestError("prompt", f"{len(req.prompt)} chars; at most {limits.max_prompt_chars}")

    image = req.image
    if isinstance(image, (bytearray, memoryview)):
        image = bytes(image)
    if isinstance(image, str):
        # data: header + base64 text; the exact check (after the header) is in inputs.load_image.
        if not image.strip():
            raise RequestError("image", "must not be empty")
        if len(image) > limits.max_image_b64_chars + 1024:
            raise RequestError(
                "image", f"{len(image)} chars; the image may be at most {limits.max_image_bytes} bytes"
            )
    elif isinstance(image, bytes):
        if not image:
            raise RequestError("image", "must not be empty")
        if len(image) > limits.max_image_bytes:
            raise RequestError("image", f"{len(image)} bytes; at most {limits.max_image_bytes}")
    else:
        raise RequestError(
            "image",
            f"expected a string (URL, s3://, data: URI, base64, path) or bytes, got {type(image).__name__}",
        )

    width, height = _parse_size(req.size, limits)

    if req.camera_actions is not None and req.poses is not None:
        raise RequestError("camera_actions", "give either camera_actions or poses, not both")
    if req.intrinsics is not None and req.poses is None:
        raise RequestError("intrinsics", "only used with poses (actions use the fixed action intrinsics)")
    actions: list[list[str]] | None
    if req.poses is not None:
        path_chunks = _check_poses(req, limits)
        actions = None
    else:
        actions = req.camera_actions if req.camera_actions is not None else []  # absent: hold the camera
        _check_actions(actions, limits)
        path_chunks = max(1, math.ceil(len(actions) / config.CHUNK_LATENT_FRAMES))

    num_chunks = req.num_chunks if req.num_chunks is not None else path_chunks
    if req.num_chunks is not None:
        _int_range("num_chunks", num_chunks, 1, limits.max_chunks)
        if num_chunks < path_chunks:
            field = "camera_actions" if actions is not None else "poses"
            raise RequestError(
                field, f"the path spans {path_chunks} chunks but num_chunks is {num_chunks}; shorten the path "
                "or raise num_chunks",
            )
    elif path_chunks > limits.max_chunks:  # poses can span more than max_chunks within max_poses rounding
        raise RequestError("poses", f"the path spans {path_chunks} chunks; at most {limits.max_chunks}")

    if req.seed is not None:
        _int_range("seed", req.seed, 0, MAX_SEED)

    if req.kv_window < limits.min_kv_window:
        raise RequestError(
            "kv_window", f"{req.kv_window} latent frames; at least {limits.min_kv_window} (one chunk)"
        )
    if req.kv_sink < 0:
        raise RequestError("kv_sink", f"{req.kv_sink} is negative (latent frames, >= 0)")
    if req.kv_window + req.kv_sink > limits.max_kv_frames:
        raise RequestError(
            "kv_window",
            f"kv_window + kv_sink = {req.kv_window + req.kv_sink} latent frames; at most {limits.max_kv_frames}",
        )

    _int_range("stream.quality", req.stream.quality, 1, 100)
    if req.output.s3_uri is not None:
        _check_s3_uri(req.output.s3_uri)
    if req.output.presign_expires_s is not None:
        _int_range("output.presign_expires_s", req.output.presign_expires_s, 1, limits.max_presign_s, "seconds, ")

    return ValidRequest(
        request=req, width=width, height=height, num_chunks=num_chunks, path_chunks=path_chunks,
        camera_actions=actions, image=image,
    )


# --- Results ----------------------------------------------------------------------------------------------


class ChunkStats(msgspec.Struct, kw_only=True):
    dit_ms: float
    decode_ms: float
    encode_ms: float
    chunk_ms: float


class ChunkResult(msgspec.Struct, kw_only=True, tag_field="type", tag="chunk"):
    """Frames of one chunk; a chunk over RunPod's 1 MB item limit is split into parts (part 0..num_parts-1)."""

    chunk_index: int
    part: int
    num_parts: int
    frame_start: int  # index of frames[0] in the whole video
    num_frames: int  # len(frames)
    width: int
    height: int
    content_type: str  # "image/jpeg" | "image/webp"
    frames: list[str]  # base64 of each encoded frame
    stats: ChunkStats


class ProgressResult(msgspec.Struct, kw_only=True, tag_field="type", tag="progress"):
    """stream.format == "none": one per chunk, no frames (keeps webhook aggregates small)."""

    chunk_index: int
    frame_start: int
    num_frames: int
    stats: ChunkStats


class VideoResult(msgspec.Struct, kw_only=True, tag_field="type", tag="video"):
    """The last item: where the MP4 went. One of s3_uri / path is set; upload_error says why S3 failed."""

    url: str | None
    s3_uri: str | None
    path: str | None
    upload_error: str | None
    bytes: int
    num_frames: int
    fps: int
    width: int
    height: int
    sha256: str
    stats: dict[str, int | float]  # first_chunk_s, total_s, generated_fps, chunks, seed, ...


class ErrorResult(msgspec.Struct, kw_only=True):
    error: str
    field: str | None = None

    @classmethod
    def from_exception(cls, e: BaseException) -> "ErrorResult":
        return cls(error=str(e), field=getattr(e, "field", None))


def to_builtins(result: msgspec.Struct) -> dict[str, Any]:
    """The JSON-ready dict of a result (tagged results carry their "type")."""
    return msgspec.to_builtins(result)
