"""The request contract (DESIGN.md section 3): every bad request names its field and the limit."""

from __future__ import annotations

import copy
import json

import msgspec
import pytest

from worker import config
from worker.schema import (
    ChunkResult,
    ChunkStats,
    ErrorResult,
    Limits,
    ProgressResult,
    Request,
    RequestError,
    VideoResult,
    parse_request,
    to_builtins,
)

LIMITS = Limits.from_env({}, config.FULL.max_size, dit=config.FULL.dit)
MAX_CHUNKS = config.max_chunks(config.FULL.dit)
GOOD = {"prompt": "a quiet street at dusk", "image": "https://example.com/frame.png"}
POSE = [[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]]
K = [502.9, 503.1, 415.8, 239.8]


def _set(path: str, value):
    """Mutation: set a (dotted) key of a copy of GOOD."""

    def apply(d):
        *parents, last = path.split(".")
        for p in parents:
            d = d.setdefault(p, {})
        d[last] = value

    return apply


def _del(key: str):
    return lambda d: d.pop(key)


def _multi(**kv):
    def apply(d):
        d.update(kv)

    return apply


# (id, mutation, expected field, fragment of the message)
BAD = [
    ("unknown-top", _set("promt", "x"), "promt", "unknown field"),
    ("unknown-stream", _set("stream.fmt", "jpeg"), "stream.fmt", "unknown field"),
    ("unknown-output", _set("output.bucket", "b"), "output.bucket", "unknown field"),
    ("missing-prompt", _del("prompt"), "prompt", "required"),
    ("missing-image", _del("image"), "image", "required"),
    ("prompt-blank", _set("prompt", "   "), "prompt", "blank"),
    ("prompt-empty", _set("prompt", ""), "prompt", "1..4000"),
    ("prompt-long", _set("prompt", "x" * 4001), "prompt", "at most 4000"),
    ("prompt-type", _set("prompt", 5), "prompt", "expected `str`"),
    ("image-empty", _set("image", ""), "image", "empty"),
    ("image-type", _set("image", 12), "image", "expected a string"),
    ("image-huge", _set("image", "A" * (LIMITS.max_image_b64_chars + 2000)), "image", str(LIMITS.max_image_bytes)),
    ("size-word", _set("size", "large"), "size", "WIDTHxHEIGHT"),
    ("size-sep", _set("size", "832*480"), "size", "WIDTHxHEIGHT"),
    ("size-neg", _set("size", "-832x480"), "size", "WIDTHxHEIGHT"),
    ("size-3d", _set("size", "832x480x3"), "size", "WIDTHxHEIGHT"),
    ("size-16", _set("size", "830x480"), "size", "830x480 is not a multiple of 16"),
    ("size-zero", _set("size", "0x480"), "size", "multiple of 16"),
    ("size-big", _set("size", "1296x480"), "size", "at most 1280x1280"),
    ("size-type", _set("size", [832, 480]), "size", "expected `str`"),
    ("action-unknown", _set("camera_actions", [[], ["w"], [], ["x"]]), "camera_actions[3]",
     "unknown action 'x' (allowed: a d i j k l s w"),
    ("action-multi-letter", _set("camera_actions", [["wd"]]), "camera_actions[0]", "unknown action 'wd'"),
    ("action-upper", _set("camera_actions", [["W"]]), "camera_actions[0]", "unknown action 'W'"),
    ("action-dup", _set("camera_actions", [["w", "w"]]), "camera_actions[0]", "duplicate"),
    ("action-flat", _set("camera_actions", ["w", "d"]), "camera_actions[0]", "expected `array`"),
    ("action-deep", _set("camera_actions", [[["w"]]]), "camera_actions[0][0]", "expected `str`"),
    ("action-too-long", _set("camera_actions", [["w"]] * (MAX_CHUNKS * 3 + 1)), "camera_actions",
     f"at most {MAX_CHUNKS * 3} entries"),
    ("actions-and-poses", _multi(camera_actions=[["w"]], poses=[POSE], intrinsics=K), "camera_actions",
     "not both"),
    ("poses-no-k", _set("poses", [POSE]), "intrinsics", "required with poses"),
    ("k-no-poses", _set("intrinsics", K), "intrinsics", "only used with poses"),
    ("pose-shape", _multi(poses=[POSE[:3]], intrinsics=K), "poses[0]", "4x4"),
    ("pose-nan", _multi(poses=[[[float("nan")] * 4] * 4], intrinsics=K), "poses[0][0][0]", "finite"),
    ("k-len", _multi(poses=[POSE], intrinsics=[500.0, 500.0, 416.0]), "intrinsics", "[fx, fy, cx, cy]"),
    ("k-mixed", _multi(poses=[POSE], intrinsics=[500.0, K]), "intrinsics", "mixes"),
    ("k-rows", _multi(poses=[POSE] * 3, intrinsics=[K, K]), "intrinsics", "one per pose"),
    ("k-focal", _multi(poses=[POSE], intrinsics=[0.0, 500.0, 1.0, 1.0]), "intrinsics", "> 0"),
    ("chunks-0", _set("num_chunks", 0), "num_chunks", f"1..{MAX_CHUNKS}"),
    ("chunks-big", _set("num_chunks", MAX_CHUNKS + 1), "num_chunks", f"1..{MAX_CHUNKS}"),
    ("chunks-float", _set("num_chunks", 2.0), "num_chunks", "expected `int | null`"),
    ("chunks-short", _multi(camera_actions=[["w"]] * 7, num_chunks=2), "camera_actions", "spans 3 chunks"),
    ("seed-neg", _set("seed", -1), "seed", "0..9223372036854775807"),
    ("seed-big", _set("seed", 2**63), "seed", "0..9223372036854775807"),
    ("seed-bool", _set("seed", True), "seed", "got `bool`"),
    ("kv-window", _set("kv_window", 2), "kv_window", f"at least {config.CHUNK_LATENT_FRAMES}"),
    ("kv-sink", _set("kv_sink", -1), "kv_sink", "negative"),
    ("kv-span", _multi(kv_window=70, kv_sink=3), "kv_window", f"at most {LIMITS.max_kv_frames}"),
    ("quality-0", _set("stream.quality", 0), "stream.quality", "1..100"),
    ("quality-101", _set("stream.quality", 101), "stream.quality", "1..100"),
    ("quality-str", _set("stream.quality", "high"), "stream.quality", "expected `int`"),
    ("format", _set("stream.format", "gif"), "stream.format", "'gif'"),
    ("stream-type", _set("stream", "jpeg"), "stream", "expected `object`"),
    ("s3-scheme", _set("output.s3_uri", "https://bucket/key.mp4"), "output.s3_uri", "s3://bucket/key.mp4"),
    ("s3-nokey", _set("output.s3_uri", "s3://bucket"), "output.s3_uri", "s3://bucket/key.mp4"),
    ("s3-ext", _set("output.s3_uri", "s3://bucket/out.mov"), "output.s3_uri", ".mp4"),
    ("s3-bucket", _set("output.s3_uri", "s3://Bad_Bucket/a.mp4"), "output.s3_uri", "bucket"),
    ("presign-0", _set("output.presign_expires_s", 0), "output.presign_expires_s", "1..604800"),
    ("presign-8d", _set("output.presign_expires_s", 8 * 86400), "output.presign_expires_s", "1..604800"),
]


@pytest.mark.parametrize("mutate, field, fragment", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_request(mutate, field, fragment):
    raw = copy.deepcopy(GOOD)
    mutate(raw)
    forms = [raw]
    try:
        forms.append(json.dumps(raw, allow_nan=False).encode())  # NaN has no JSON form: dict only
    except ValueError:
        pass
    for form in forms:
        with pytest.raises(RequestError) as ei:
            parse_request(form, LIMITS)
        assert ei.value.field == field, str(ei.value)
        assert fragment in str(ei.value), str(ei.value)
        assert str(ei.value).startswith(f"{field}: ")
        assert "$" not in str(ei.value)  # msgspec paths are converted, not leaked


def test_not_an_object():
    for raw in (b"[]", b"{not json", "null"):
        with pytest.raises(RequestError) as ei:
            parse_request(raw, LIMITS)
        assert ei.value.field == "request"
    with pytest.raises(RequestError):
        parse_request(["prompt"], LIMITS)  # type: ignore[arg-type]


def test_defaults_come_from_config():
    v = parse_request(GOOD, LIMITS)
    r = v.request
    assert (v.width, v.height) == config.DEFAULT_SIZE
    assert r.size == f"{config.DEFAULT_SIZE[0]}x{config.DEFAULT_SIZE[1]}"
    assert r.kv_window == config.DEFAULT_KV_WINDOW and r.kv_sink == config.DEFAULT_KV_SINK
    assert (r.stream.format, r.stream.quality) == ("jpeg", 85)
    assert r.output.s3_uri is None and r.output.presign_expires_s is None
    assert r.seed is None
    assert v.camera_actions == []  # no path: hold the camera
    assert v.num_chunks == v.path_chunks == 1


def test_good_requests_round_trip():
    full = {
        **GOOD,
        "size": "464x832",
        "camera_actions": [[], ["w"], ["w", "d"], ["l"], [], ["i", "a"], ["k"]],
        "num_chunks": 4,
        "seed": 2**63 - 1,
        "kv_window": 21,
        "kv_sink": 0,
        "stream": {"format": "webp", "quality": 1},
        "output": {"s3_uri": "s3://my-bucket/runs/a b/out.mp4", "presign_expires_s": 604800},
    }
    v = parse_request(full, LIMITS)
    assert (v.width, v.height) == (464, 832)
    assert v.path_chunks == 3 and v.num_chunks == 4
    assert msgspec.to_builtins(v.request) == {**full, "poses": None, "intrinsics": None}
    # the JSON and dict forms agree, and the encoded Request decodes to the same value
    assert parse_request(json.dumps(full), LIMITS) == v
    assert parse_request(msgspec.json.encode(v.request), LIMITS) == v


def test_path_decides_num_chunks():
    assert parse_request({**GOOD, "camera_actions": [["w"]] * 3}, LIMITS).num_chunks == 1
    assert parse_request({**GOOD, "camera_actions": [["w"]] * 4}, LIMITS).num_chunks == 2
    cap = [["w"]] * (MAX_CHUNKS * config.CHUNK_LATENT_FRAMES)
    assert parse_request({**GOOD, "camera_actions": cap}, LIMITS).num_chunks == MAX_CHUNKS
    # poses: official rule, latent frames = (N - 1) // 4 + 1 rounded down to whole chunks
    for n, chunks in ((1, 1), (9, 1), (21, 2), (81, 7), (161, 13)):
        v = parse_request({**GOOD, "poses": [POSE] * n, "intrinsics": K}, LIMITS)
        assert v.num_chunks == chunks and v.camera_actions is None, n
    v = parse_request({**GOOD, "poses": [POSE] * 2, "intrinsics": [K, K], "num_chunks": 3}, LIMITS)
    assert v.num_chunks == 3


def test_bytes_image_and_int_floats():
    raw = {**GOOD, "image": bytearray(b"\x89PNG"), "poses": [[[1, 0, 0, 0]] * 4], "intrinsics": [500, 500, 1, 1]}
    v = parse_request(raw, LIMITS)
    assert v.image == b"\x89PNG"
    assert v.request.intrinsics == [500.0, 500.0, 1.0, 1.0]
    with pytest.raises(RequestError, match="image: .* at most 10"):
        parse_request({**GOOD, "image": b"x" * 11}, msgspec.structs.replace(LIMITS, max_image_bytes=10))


def test_limits_from_env():
    lim = Limits.from_env({"LINGBOT_MAX_CHUNKS": "5", "LINGBOT_MAX_IMAGE_BYTES": "1000"}, (512, 512))
    assert (lim.max_chunks, lim.max_image_bytes, lim.max_width, lim.max_height) == (5, 1000, 512, 512)
    # the env can lower max_chunks but never lift it past the RoPE table
    assert Limits.from_env({"LINGBOT_MAX_CHUNKS": "100000"}).max_chunks == MAX_CHUNKS
    tiny = Limits.for_preset(config.TINY, {})
    assert (tiny.max_width, tiny.max_height) == config.TINY.max_size
    assert tiny.max_chunks == config.max_chunks(config.TINY.dit)
    with pytest.raises(RequestError, match="size: 1296x480 is larger.*at most 1280x1280"):
        parse_request({**GOOD, "size": "1296x480"}, tiny)
    with pytest.raises(RequestError, match="num_chunks: 6 is out of range"):
        parse_request({**GOOD, "size": "512x512", "num_chunks": 6}, lim)
    with pytest.raises(ValueError, match="LINGBOT_MAX_CHUNKS"):
        Limits.from_env({"LINGBOT_MAX_CHUNKS": "lots"})


def test_results_serialise():
    stats = ChunkStats(dit_ms=1.0, decode_ms=2.0, encode_ms=3.0, chunk_ms=6.5)
    chunk = ChunkResult(
        chunk_index=0, part=0, num_parts=1, frame_start=0, num_frames=1, width=832, height=480,
        content_type="image/jpeg", frames=["AAAA"], stats=stats,
    )
    d = to_builtins(chunk)
    assert d["type"] == "chunk" and d["stats"] == {"dit_ms": 1.0, "decode_ms": 2.0, "encode_ms": 3.0, "chunk_ms": 6.5}
    assert to_builtins(ProgressResult(chunk_index=1, frame_start=9, num_frames=12, stats=stats))["type"] == "progress"
    video = VideoResult(
        url="https://x/y.mp4", s3_uri="s3://b/y.mp4", path=None, upload_error=None, bytes=10, num_frames=21,
        fps=config.FPS, width=832, height=480, sha256="0" * 64, stats={"total_s": 1.5},
    )
    d = to_builtins(video)
    assert d["type"] == "video" and d["bytes"] == 10 and d["path"] is None
    json.dumps(d)
    err = ErrorResult.from_exception(RequestError("size", "bad"))
    assert to_builtins(err) == {"error": "size: bad", "field": "size"}
    assert to_builtins(ErrorResult.from_exception(RuntimeError("boom"))) == {"error": "boom", "field": None}


def test_request_struct_rejects_unknown_fields_directly():
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({**GOOD, "extra": 1}, Request)
