"""The first frame: fetch or decode `Request.image` safely, and turn it into the model's input tensor.

Sources accepted by `load_image` (how a string is classified, in this order):
  bytes                     raw encoded image (Modal passes bytes)
  "data:image/...;base64,"  data URI
  "https://..."             fetched with the connection pinned to the address netguard checked
                            ("http://" only when private addresses are allowed: tests, on-prem)
  "s3://bucket/key"         boto3 (client passed in, or built from the standard AWS_* environment)
  "<scheme>:..."            any other scheme (file:, gopher:, ftp:, ...) is refused
  base64 text               only base64 characters (and whitespace), at least 32 long, that decodes
  anything else             a path under `input_dir` (LINGBOT_INPUT_DIR); refused when input_dir is None

Every source is capped at `max_bytes` before it is fully read or decoded, and the decoded image at
`max_pixels` before its pixels are loaded. Only common still-image formats are opened (a smaller decoder
attack surface; Pillow's EPS plugin, for one, shells out to Ghostscript).
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from worker import netguard
from worker.schema import RequestError

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")  # "JPEG" also opens MPO (multi-picture) files
MAX_REDIRECTS = 3
_READ_BLOCK = 64 * 1024
_REDIRECTS = (301, 302, 303, 307, 308)
_B64_CHARS = re.compile(r"[A-Za-z0-9+/=_\-\s]+")
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]+):")  # 2+ chars: leaves room for nothing Windows-like
# Test seam: where to really connect for a checked (address, port). Production connects to the address.
Dialer = Callable[[str, int], tuple[str, int]]


class ImageError(RequestError):
    """The first frame could not be fetched or decoded; `.field` is the request field ("image")."""


def input_dir_from_env(env: dict[str, str] | None = None) -> Path | None:
    raw = (os.environ if env is None else env).get("LINGBOT_INPUT_DIR", "").strip()
    return Path(raw) if raw else None


def load_image(
    source: str | bytes,
    *,
    field: str = "image",
    max_bytes: int,
    max_pixels: int,
    input_dir: Path | None,
    allow_private: bool,
    timeout_s: float = 15.0,
    s3_client: Any = None,
    schemes: Iterable[str] = ("https",),
    resolver: netguard.Resolver | None = None,
    dialer: Dialer | None = None,
    ca_certs: str | None = None,
) -> Image.Image:
    """Returns the first frame as an RGB image (EXIF orientation applied). Raises ImageError."""
    if isinstance(source, (bytearray, memoryview)):
        source = bytes(source)
    if isinstance(source, bytes):
        data = source
        if len(data) > max_bytes:
            raise ImageError(field, f"{len(data)} bytes; at most {max_bytes}")
    elif isinstance(source, str):
        data = _read_source(
            source, field=field, max_bytes=max_bytes, input_dir=input_dir, allow_private=allow_private,
            timeout_s=timeout_s, s3_client=s3_client, schemes=schemes, resolver=resolver, dialer=dialer,
            ca_certs=ca_certs,
        )
    else:
        raise ImageError(field, f"expected str or bytes, got {type(source).__name__}")
    return decode_image(data, field=field, max_pixels=max_pixels)


def _read_source(source: str, *, field: str, max_bytes: int, input_dir: Path | None, **net: Any) -> bytes:
    s = source.strip()
    if not s:
        raise ImageError(field, "is empty")
    if s[:5].lower() == "data:":
        return _read_data_uri(s, field=field, max_bytes=max_bytes)
    m = _SCHEME.match(s)
    if m:
        scheme = m.group(1).lower()
        if scheme in ("http", "https"):
            return fetch_url(s, field=field, max_bytes=max_bytes, **net)
        if scheme == "s3":
            return _read_s3(s, field=field, max_bytes=max_bytes, client=net.get("s3_client"))
        raise ImageError(
            field,
            f"unsupported scheme {scheme!r} (use https://, s3://, a data: URI, base64 or a path under the input dir)",
        )
    if len(s) >= 32 and _B64_CHARS.fullmatch(s):
        try:
            return _b64decode(s, field=field, max_bytes=max_bytes)
        except ImageError:
            if input_dir is None:
                raise  # it was meant as base64: report the base64 problem
    return _read_local(s, field=field, max_bytes=max_bytes, input_dir=input_dir)


# --- base64 / data: ---------------------------------------------------------------------------------------


def _b64decode(text: str, *, field: str, max_bytes: int) -> bytes:
    # Bound the text before any copy or decode: 4 chars per 3 bytes, plus slack for line breaks.
    limit = 4 * -(-max_bytes // 3)
    if len(text) > limit + limit // 64 + 16:
        raise ImageError(field, f"base64 of {len(text)} chars decodes to more than {max_bytes} bytes")
    compact = re.sub(r"\s+", "", text)
    if len(compact) > limit:
        raise ImageError(field, f"base64 of {len(compact)} chars decodes to more than {max_bytes} bytes")
    compact += "=" * (-len(compact) % 4)  # tolerate missing padding
    try:
        if "-" in compact or "_" in compact:
            data = base64.urlsafe_b64decode(compact)
        else:
            data = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError(field, "invalid base64") from None
    if len(data) > max_bytes:
        raise ImageError(field, f"{len(data)} bytes; at most {max_bytes}")
    if not data:
        raise ImageError(field, "base64 decodes to no bytes")
    return data


def _read_data_uri(uri: str, *, field: str, max_bytes: int) -> bytes:
    header, sep, payload = uri.partition(",")
    if not sep:
        raise ImageError(field, "data: URI without ',' (expected data:image/png;base64,...)")
    params = [p.strip().lower() for p in header[5:].split(";")]
    if "base64" not in params[1:]:
        raise ImageError(field, "data: URI must be base64 (data:image/png;base64,...)")
    if params[0] and not params[0].startswith("image/"):
        raise ImageError(field, f"data: URI media type {params[0][:40]!r} is not image/*")
    return _b64decode(payload, field=field, max_bytes=max_bytes)


# --- https ------------------------------------------------------------------------------------------------


def fetch_url(
    url: str,
    *,
    field: str = "image",
    max_bytes: int,
    allow_private: bool,
    timeout_s: float = 15.0,
    schemes: Iterable[str] = ("https",),
    resolver: netguard.Resolver | None = None,
    dialer: Dialer | None = None,
    ca_certs: str | None = None,
    **_: Any,
) -> bytes:
    """GET with netguard on every hop, the socket pinned to a checked address, and byte/time caps.

    ca_certs: a PEM bundle to trust instead of certifi's (a private CA on-prem; tests).
    Pinning: urllib3 connects to the checked IP; TLS still verifies the certificate for the URL's host name
    (server_hostname for SNI, assert_hostname for the check) and the Host header carries the name, so a DNS
    answer that changes after the check cannot redirect the connection. Redirects are followed by hand
    (at most MAX_REDIRECTS), each target checked again. timeout_s bounds connect and each read, and the
    whole download must finish within 2 * timeout_s.
    """
    import urllib3  # requests' transport; imported here so the worker starts without touching it

    schemes = tuple(schemes)
    deadline = time.monotonic() + 2 * timeout_s
    current = url
    for hop in range(MAX_REDIRECTS + 1):
        try:
            addrs = netguard.check_url(
                current, allow_private=allow_private, schemes=schemes, field=field, resolver=resolver
            )
        except netguard.NetguardError as e:
            where = f" (redirect {hop} from {netguard.redact_url(url)})" if hop else ""
            raise ImageError(field, e.detail + where) from None
        parts = urlsplit(current)
        status, location, body = _get_pinned(
            urllib3, parts, addrs, field=field, max_bytes=max_bytes, timeout_s=timeout_s, deadline=deadline,
            dialer=dialer, ca_certs=ca_certs,
        )
        if status in _REDIRECTS:
            if not location:
                raise ImageError(field, f"HTTP {status} without Location from {netguard.redact_url(current)}")
            current = urljoin(current, location)
            continue
        if status != 200:
            raise ImageError(field, f"HTTP {status} from {netguard.redact_url(current)}")
        return body
    raise ImageError(field, f"more than {MAX_REDIRECTS} redirects from {netguard.redact_url(url)}")


def _get_pinned(urllib3: Any, parts: Any, addrs: list, *, field: str, max_bytes: int, timeout_s: float,
                deadline: float, dialer: Dialer | None, ca_certs: str | None) -> tuple[int, str | None, bytes]:
    scheme = parts.scheme.lower()
    host = parts.hostname
    port = parts.port or (443 if scheme == "https" else 80)
    host_header = f"[{host}]" if ":" in host else host
    if parts.port:
        host_header += f":{parts.port}"
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    headers = {
        "Host": host_header,
        "User-Agent": "lingbot-worker/0.1",
        "Accept": "image/*",
        "Accept-Encoding": "identity",  # compressed transfer would need its own decompression-bomb cap
    }
    shown = netguard.redact_url(parts.geturl())
    last_error: Exception | None = None
    for addr in addrs:  # try each checked address; never the name again
        ip, ip_port = (dialer or (lambda a, p: (a, p)))(str(addr), port)
        timeout = urllib3.Timeout(connect=timeout_s, read=timeout_s)
        if scheme == "https":
            if ca_certs is None:
                import certifi  # the CA bundle requests uses

                ca_certs = certifi.where()
            pool = urllib3.HTTPSConnectionPool(
                ip, ip_port, timeout=timeout, retries=False, maxsize=1, cert_reqs="CERT_REQUIRED",
                ca_certs=ca_certs, assert_hostname=host, server_hostname=host,
            )
        else:
            pool = urllib3.HTTPConnectionPool(ip, ip_port, timeout=timeout, retries=False, maxsize=1)
        try:
            resp = pool.urlopen(
                "GET", target, headers=headers, redirect=False, retries=False, preload_content=False,
                decode_content=False, assert_same_host=False,
            )
        except urllib3.exceptions.NewConnectionError as e:
            last_error = e
            pool.close()
            continue
        except urllib3.exceptions.HTTPError as e:
            pool.close()
            raise ImageError(field, f"cannot fetch {shown} ({_reason(e)})") from None
        try:
            if resp.status in _REDIRECTS or resp.status != 200:
                return resp.status, resp.headers.get("Location"), b""
            enc = resp.headers.get("Content-Encoding", "identity").strip().lower()
            if enc not in ("", "identity"):
                raise ImageError(field, f"{shown} sent Content-Encoding {enc[:20]!r}; only identity is accepted")
            length = resp.headers.get("Content-Length")
            if length is not None and length.strip().isdigit() and int(length) > max_bytes:
                raise ImageError(field, f"{shown} is {int(length)} bytes; at most {max_bytes}")
            buf = bytearray()
            while True:
                if time.monotonic() > deadline:
                    raise ImageError(field, f"download of {shown} took longer than {2 * timeout_s:g} s")
                block = resp.read(_READ_BLOCK)
                if not block:
                    break
                buf += block
                if len(buf) > max_bytes:
                    raise ImageError(field, f"{shown} sent more than {max_bytes} bytes")
            return 200, None, bytes(buf)
        except urllib3.exceptions.HTTPError as e:
            raise ImageError(field, f"cannot fetch {shown} ({_reason(e)})") from None
        finally:
            resp.release_conn()
            resp.close()
            pool.close()
    raise ImageError(field, f"cannot connect to {shown} ({_reason(last_error)})")


def _reason(e: BaseException | None) -> str:
    # urllib3 messages can embed the request target (with its query); report the kind of failure only.
    name = type(e).__name__ if e else "no address"
    return {"NewConnectionError": "connection failed", "ConnectTimeoutError": "connect timed out",
            "ReadTimeoutError": "read timed out", "SSLError": "TLS error"}.get(name, name)


# --- s3 ---------------------------------------------------------------------------------------------------


def _read_s3(uri: str, *, field: str, max_bytes: int, client: Any) -> bytes:
    m = re.fullmatch(r"s3://([^/]+)/(.+)", uri)
    if not m:
        raise ImageError(field, "expected s3://bucket/key")
    bucket, key = m.groups()
    if client is None:
        import boto3  # reads AWS_* (AWS_ENDPOINT_URL included) from the environment

        client = boto3.client("s3")
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        size = int(client.head_object(Bucket=bucket, Key=key)["ContentLength"])
        if size > max_bytes:
            raise ImageError(field, f"{uri} is {size} bytes; at most {max_bytes}")
        # Ranged read: the object may grow between HEAD and GET; never read more than the cap + 1.
        body = client.get_object(Bucket=bucket, Key=key, Range=f"bytes=0-{max_bytes}")["Body"]
        try:
            data = body.read(max_bytes + 1)
        finally:
            body.close()
    except ClientError as e:
        code = e.response.get("Error", {}).get("Code", "error")
        raise ImageError(field, f"cannot read {uri} (S3 {code})") from None
    except BotoCoreError as e:
        raise ImageError(field, f"cannot read {uri} ({type(e).__name__})") from None
    if len(data) > max_bytes:
        raise ImageError(field, f"{uri} is more than {max_bytes} bytes")
    return data


# --- local files ------------------------------------------------------------------------------------------


def _read_local(path: str, *, field: str, max_bytes: int, input_dir: Path | None) -> bytes:
    if input_dir is None:
        raise ImageError(
            field, "local paths are disabled on this worker (set LINGBOT_INPUT_DIR to allow a directory)"
        )
    root = Path(os.path.realpath(input_dir))
    # realpath resolves '..' and every symlink, so the containment check is on the file really opened.
    # (A symlink swapped in between this check and open() is out of scope: input_dir is operator-owned.)
    real = Path(os.path.realpath(root / path))
    if real != root and root not in real.parents:
        raise ImageError(field, "path is outside the input directory")
    if not real.exists():
        raise ImageError(field, "no such file in the input directory")
    if not real.is_file():  # checked before open(): opening a FIFO would block the worker
        raise ImageError(field, "path is not a regular file")
    try:
        with open(real, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise ImageError(field, f"cannot read file ({type(e).__name__})") from None
    if len(data) > max_bytes:
        raise ImageError(field, f"file is more than {max_bytes} bytes")
    return data


# --- decoding ---------------------------------------------------------------------------------------------


def decode_image(data: bytes, *, field: str = "image", max_pixels: int) -> Image.Image:
    """Encoded bytes -> RGB image, pixel count checked from the header before pixels are decoded."""
    fmts = "PNG, JPEG, WebP, BMP, GIF"
    try:
        img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError:
        raise ImageError(field, f"image dimensions exceed {max_pixels} pixels") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise ImageError(field, f"not a readable image (supported: {fmts})") from None
    w, h = img.size
    if w < 1 or h < 1 or w * h > max_pixels:
        raise ImageError(field, f"{w}x{h} = {w * h} pixels; at most {max_pixels}")
    try:
        img.load()
    except Image.DecompressionBombError:
        raise ImageError(field, f"image dimensions exceed {max_pixels} pixels") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise ImageError(field, f"corrupt or truncated {img.format} image ({str(e)[:80]})") from None
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # a malformed EXIF block is metadata trouble, not a bad frame: keep the pixels as stored
        pass
    return img.convert("RGB")


def image_to_tensor(img: Image.Image, width: int, height: int) -> torch.Tensor:
    """RGB image -> [3, height, width] float32, the official Wan I2V preprocessing.

    Official (wan/image2video.py): `TF.to_tensor(img).sub_(0.5).div_(0.5)` then
    `F.interpolate(img[None], size=(h, w), mode="bicubic")`: a plain bicubic resize to the generation size,
    no crop or aspect fit, align_corners default (False), no antialias, no clamp. Values are in [-1, 1] before
    the resize; bicubic overshoot at sharp edges can leave them slightly outside, as in the official code.
    """
    rgb = img.convert("RGB")
    w, h = rgb.size
    x = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).view(h, w, 3)
    x = x.permute(2, 0, 1).to(torch.float32).div(255.0)  # to_tensor
    x = x.sub(0.5).div(0.5)
    x = torch.nn.functional.interpolate(x[None], size=(height, width), mode="bicubic")
    return x[0].contiguous()
