"""First-frame loading: URL policy (SSRF), byte/pixel caps, sources, decoding, and the input tensor.

A real HTTP server runs on 127.0.0.1 in a thread. Redirect re-checks use two seams of load_image: a
resolver that maps a fake public name to a public address, and a dialer that sends the connection for that
address to the loopback server, so the first hop passes the real policy and a loopback redirect must not.
"""

from __future__ import annotations

import base64
import io
import ipaddress
import math
import os
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest
import torch
from PIL import Image

from worker import inputs, netguard
from worker.inputs import ImageError, decode_image, image_to_tensor, load_image
from worker.netguard import NetguardError, check_url
from worker.schema import RequestError

MAX_BYTES = 256 * 1024
MAX_PIXELS = 4_000_000
PUBLIC_NAME = "img.public.test"
PUBLIC_IP = "93.184.216.34"  # a public address; the dialer sends it to the loopback server


def png_bytes(w=48, h=32, mode="RGB") -> bytes:
    img = Image.new(mode, (w, h))
    img.putdata([((x * 5) % 256, (y * 7) % 256, (x + y) % 256)[: len(mode)] for y in range(h) for x in range(w)])
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


PNG = png_bytes()


# --- loopback HTTP server ---------------------------------------------------------------------------------


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # close-delimited bodies: lets /stream send with no Content-Length

    def log_message(self, *a):  # keep pytest output clean
        pass

    def _send(self, status, body=b"", headers=()):
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        if body:
            self.wfile.write(body)

    def do_GET(self):
        u = urlsplit(self.path)
        q = {k: v[0] for k, v in parse_qs(u.query).items()}
        self.server.hosts.append(self.headers.get("Host"))
        if u.path == "/img.png":
            self._send(200, PNG, [("Content-Type", "image/png"), ("Content-Length", str(len(PNG)))])
        elif u.path == "/big":  # honest Content-Length over the cap
            body = b"\0" * (MAX_BYTES + 1)
            self._send(200, body, [("Content-Length", str(len(body)))])
        elif u.path == "/stream":  # no Content-Length; keeps sending past the cap
            self._send(200)
            try:
                for _ in range(64):
                    self.wfile.write(b"\0" * 65536)
            except OSError:
                pass
        elif u.path == "/gzip":
            self._send(200, zlib.compress(PNG), [("Content-Encoding", "gzip")])
        elif u.path == "/redirect":
            self._send(int(q.get("code", 302)), b"", [("Location", q["to"])])
        elif u.path == "/loop":
            self._send(302, b"", [("Location", "/loop")])
        elif u.path == "/slow":
            time.sleep(1.5)
            self._send(200, PNG)
        else:
            self._send(404, b"nope")


@pytest.fixture(scope="module")
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    srv.hosts = []
    srv.handle_error = lambda request, client_address: None  # clients hang up on purpose (caps, timeouts)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def local(server, path="/img.png"):
    return f"http://127.0.0.1:{server.server_address[1]}{path}"


def public(server, path="/img.png"):
    return f"http://{PUBLIC_NAME}:{server.server_address[1]}{path}"


def seams(server):
    """resolver: the fake public name -> a public IP, other names -> real getaddrinfo;
    dialer: that public IP -> the loopback server (only the socket; the policy saw the public IP)."""

    def resolver(host, port):
        return [PUBLIC_IP] if host == PUBLIC_NAME else netguard.default_resolver(host, port)

    def dialer(ip, port):
        return ("127.0.0.1", server.server_address[1]) if ip == PUBLIC_IP else (ip, port)

    return dict(resolver=resolver, dialer=dialer, schemes=("https", "http"))


def load(source, **kw):
    kw.setdefault("max_bytes", MAX_BYTES)
    kw.setdefault("max_pixels", MAX_PIXELS)
    kw.setdefault("input_dir", None)
    kw.setdefault("allow_private", False)
    return load_image(source, **kw)


# --- URLs -------------------------------------------------------------------------------------------------


def test_loopback_refused_by_default(server):
    with pytest.raises(ImageError, match="scheme 'http' is not allowed"):
        load(local(server))
    # even with http allowed, the loopback address is refused by the address policy
    with pytest.raises(ImageError, match=r"non-public address \(127.0.0.1\)"):
        load(local(server), schemes=("https", "http"))


def test_loopback_allowed_with_allow_private(server):
    img = load(local(server), allow_private=True)
    assert img.mode == "RGB" and img.size == (48, 32)
    assert img.tobytes() == Image.open(io.BytesIO(PNG)).convert("RGB").tobytes()


def test_public_name_is_pinned_and_host_header_kept(server):
    img = load(public(server), **seams(server))
    assert img.size == (48, 32)
    assert server.hosts[-1] == f"{PUBLIC_NAME}:{server.server_address[1]}"


def test_byte_cap(server):
    with pytest.raises(ImageError, match=f"is {MAX_BYTES + 1} bytes; at most {MAX_BYTES}"):
        load(local(server, "/big"), allow_private=True)
    with pytest.raises(ImageError, match=f"sent more than {MAX_BYTES} bytes"):
        load(local(server, "/stream"), allow_private=True)
    with pytest.raises(ImageError, match="Content-Encoding 'gzip'"):
        load(local(server, "/gzip"), allow_private=True)


def test_http_errors_and_timeouts(server):
    with pytest.raises(ImageError, match="HTTP 404"):
        load(local(server, "/missing"), allow_private=True)
    t0 = time.monotonic()
    with pytest.raises(ImageError, match="read timed out"):
        load(local(server, "/slow"), allow_private=True, timeout_s=0.3)
    assert time.monotonic() - t0 < 1.2
    with pytest.raises(ImageError, match="cannot connect"):  # nothing listens on port 1
        load("http://127.0.0.1:1/x.png", allow_private=True, timeout_s=1)


def test_redirects_are_rechecked(server):
    port = server.server_address[1]
    s = seams(server)
    # a redirect to a public name is followed
    img = load(public(server, f"/redirect?to=http://{PUBLIC_NAME}:{port}/img.png"), **s)
    assert img.size == (48, 32)
    # a relative redirect stays on the (checked) public name
    assert load(public(server, "/redirect?to=/img.png&code=307"), **s).size == (48, 32)
    # redirects into loopback are refused on the hop that leads there
    for target in (f"http://127.0.0.1:{port}/img.png", f"http://localhost:{port}/img.png",
                   f"http://2130706433:{port}/img.png", f"http://[::1]:{port}/img.png"):
        with pytest.raises(ImageError, match="non-public address.*redirect 1"):
            load(public(server, f"/redirect?to={target}"), **s)
    with pytest.raises(ImageError, match="scheme 'file'"):
        load(public(server, "/redirect?to=file:///etc/passwd"), **s)
    with pytest.raises(ImageError, match="more than 3 redirects"):
        load(public(server, "/loop"), **s)


def _make_tls(tmp: Path, name: str) -> tuple[str, str, str]:
    """A throwaway CA and a leaf certificate for `name`; returns (ca.pem, leaf.pem, leaf.key)."""
    x509 = pytest.importorskip("cryptography.x509")
    import datetime

    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(1).not_valid_before(now - datetime.timedelta(hours=1))
          .not_valid_after(now + datetime.timedelta(hours=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    leaf = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_name).public_key(leaf_key.public_key()).serial_number(2)
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = (tmp / "ca.pem", tmp / "leaf.pem", tmp / "leaf.key")
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(leaf_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption()))
    return tuple(str(p) for p in paths)


def test_https_pinned_to_checked_address_verifies_the_name(tmp_path):
    """The production path: https only, no private addresses; the socket goes to the checked IP while TLS
    verifies the certificate for the URL's name (SNI + hostname check)."""
    import ssl

    ca, cert, key = _make_tls(tmp_path, PUBLIC_NAME)
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads, srv.hosts = True, []
    srv.handle_error = lambda request, client_address: None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        port = srv.server_address[1]
        s = {**seams(srv), "schemes": ("https",)}
        img = load(f"https://{PUBLIC_NAME}:{port}/img.png", ca_certs=ca, **s)
        assert img.size == (48, 32)
        # the same server reached under another (public) name fails certificate verification
        other = dict(s, resolver=lambda h, p: [PUBLIC_IP])
        with pytest.raises(ImageError, match="TLS error"):
            load(f"https://other.public.test:{port}/img.png", ca_certs=ca, **other)
        # and without our CA (the default certifi bundle) the self-made certificate is not trusted
        with pytest.raises(ImageError, match="TLS error"):
            load(f"https://{PUBLIC_NAME}:{port}/img.png", **s)
    finally:
        srv.shutdown()
        srv.server_close()


TRICKS = [
    "http://2130706433/", "http://0x7f000001/", "http://0x7f.1/", "http://017700000001/", "http://127.1/",
    "http://[::1]/", "http://[::ffff:127.0.0.1]/", "http://localhost/", "http://0.0.0.0/",
    "http://169.254.169.254/latest/meta-data/", "http://10.0.0.1/", "http://100.64.0.1/",
    "http://[fe80::1]/", "http://[fc00::1]/", "http://[2002:7f00:1::]/", "http://[64:ff9b::a00:1]/",
    "http://224.0.0.1/",
]


@pytest.mark.parametrize("url", TRICKS)
def test_url_tricks_refused(url):
    https = "https" + url[4:]
    with pytest.raises(NetguardError, match="non-public address"):
        check_url(https, allow_private=False, field="image")
    with pytest.raises(NetguardError, match="scheme 'http' is not allowed"):
        check_url(url, allow_private=False, field="image")
    with pytest.raises(ImageError) as ei:
        load(https)
    assert ei.value.field == "image"


def test_literal_forms_normalised():
    # getaddrinfo turns the numeric spellings into the address they reach
    for url in ("https://2130706433/", "https://0x7f000001/", "https://0x7f.1/", "https://127.1/"):
        assert check_url(url, allow_private=True) == [ipaddress.ip_address("127.0.0.1")]


@pytest.mark.parametrize("source", ["file:///etc/passwd", "gopher://127.0.0.1:70/_x", "ftp://example.com/a.png",
                                    "FILE:///etc/passwd", "jar:http://x/y!/z"])
def test_other_schemes_refused(source):
    with pytest.raises(ImageError, match="unsupported scheme"):
        load(source, allow_private=True, input_dir=Path("/"))


def test_policy_details():
    pub = lambda s: netguard.is_public(ipaddress.ip_address(s))  # noqa: E731
    assert pub("8.8.8.8") and pub("2606:4700:4700::1111")
    for bad in ("127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "100.64.0.1", "169.254.169.254",
                "0.0.0.0", "255.255.255.255", "240.0.0.1", "224.0.0.251", "::", "::1", "::ffff:10.0.0.1",
                "fe80::1", "fd00::1", "ff02::1", "2001:db8::1", "2002:a00:1::", "fec0::1"):
        assert not pub(bad), bad
    # every address of a name must be public: one private record poisons it
    with pytest.raises(NetguardError, match="10.0.0.1"):
        check_url("https://mixed.test/", allow_private=False, resolver=lambda h, p: [PUBLIC_IP, "10.0.0.1"])
    assert check_url("https://ok.test/", allow_private=False, resolver=lambda h, p: [PUBLIC_IP]) == [
        ipaddress.ip_address(PUBLIC_IP)]
    with pytest.raises(NetguardError, match="cannot resolve"):
        check_url("https://no-such-host.invalid/", allow_private=False)
    with pytest.raises(NetguardError, match="whitespace"):
        check_url("https://exa mple.com/", allow_private=False)
    with pytest.raises(NetguardError, match="no host"):
        check_url("https:///path", allow_private=False)


def test_messages_hide_credentials():
    url = "https://alice:s3cret@127.0.0.1:8443/img.png?X-Amz-Signature=abcdef#frag"
    with pytest.raises(NetguardError) as ei:
        check_url(url, allow_private=False, field="webhook")
    msg = str(ei.value)
    assert msg.startswith("webhook: ") and ei.value.field == "webhook"
    assert "127.0.0.1:8443/img.png" in msg
    for secret in ("alice", "s3cret", "Signature", "abcdef", "frag"):
        assert secret not in msg
    assert isinstance(ei.value, ValueError)


def test_allow_private_env():
    assert netguard.allow_private_from_env({"LINGBOT_ALLOW_PRIVATE_URLS": "1"})
    assert not netguard.allow_private_from_env({"LINGBOT_ALLOW_PRIVATE_URLS": "0"})
    assert not netguard.allow_private_from_env({})


# --- data:, base64, bytes ---------------------------------------------------------------------------------


def test_data_uri_and_base64_round_trip():
    ref = Image.open(io.BytesIO(PNG)).convert("RGB").tobytes()
    b64 = base64.b64encode(PNG).decode()
    assert load(f"data:image/png;base64,{b64}").tobytes() == ref
    assert load(b64).tobytes() == ref  # bare base64
    assert load(b64.rstrip("=")).tobytes() == ref  # missing padding tolerated
    wrapped = "\n".join(b64[i : i + 76] for i in range(0, len(b64), 76))
    assert load(wrapped).tobytes() == ref  # MIME line breaks
    assert load(PNG).tobytes() == ref  # bytes (Modal)
    jpeg = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(jpeg, "JPEG")
    jb64 = base64.b64encode(jpeg.getvalue()).decode()
    assert jb64.startswith("/9j/")  # looks like an absolute path, but is base64
    assert load(jb64).size == (16, 16)
    with pytest.raises(ImageError, match="not image/"):
        load(f"data:text/html;base64,{b64}")
    with pytest.raises(ImageError, match="must be base64"):
        load("data:image/png,rawbytes")
    with pytest.raises(ImageError, match="invalid base64"):
        load("data:image/png;base64,@@@@")


def test_huge_base64_refused_before_decode(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("decoded an over-limit payload")

    monkeypatch.setattr(inputs.base64, "b64decode", boom)
    monkeypatch.setattr(inputs.base64, "urlsafe_b64decode", boom)
    huge = "A" * (4 * MAX_BYTES // 3 + 100_000)
    for source in (huge, "data:image/png;base64," + huge):
        with pytest.raises(ImageError, match=f"more than {MAX_BYTES} bytes"):
            load(source)
    with pytest.raises(ImageError, match=f"at most {MAX_BYTES}"):
        load(b"\0" * (MAX_BYTES + 1))


# --- decoding ---------------------------------------------------------------------------------------------


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(w: int, h: int) -> bytes:
    """A ~60-byte PNG that declares w x h RGB pixels (its IDAT is empty: nothing behind the header)."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    idat = _png_chunk(b"IDAT", zlib.compress(b""))
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + idat + _png_chunk(b"IEND", b"")


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("w, h", [(2100, 2000), (10_000, 10_000), (100_000, 100_000)])
def test_decompression_bomb_refused(w, h):
    data = bomb_png(w, h)
    assert len(data) < 100
    t0 = time.monotonic()
    with pytest.raises(ImageError, match="pixels"):
        load(data)
    assert time.monotonic() - t0 < 1.0  # refused from the header, nothing decoded


def test_truncated_and_garbage():
    with pytest.raises(ImageError, match="corrupt or truncated PNG"):
        load(PNG[: len(PNG) // 2])
    with pytest.raises(ImageError, match="not a readable image"):
        load(b"GIF89a" + b"\0" * 10)
    with pytest.raises(ImageError, match="not a readable image"):
        load(b"%!PS-Adobe-3.0 EPSF-3.0\n")  # formats outside the allow-list are never opened
    tiff = io.BytesIO()
    Image.new("RGB", (8, 8)).save(tiff, "TIFF")
    with pytest.raises(ImageError, match="not a readable image"):
        load(tiff.getvalue())


def test_exif_orientation_applied():
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif.tobytes())
    assert Image.open(io.BytesIO(buf.getvalue())).size == (40, 20)
    assert load(buf.getvalue()).size == (20, 40)


def test_modes_convert_to_rgb():
    for mode in ("L", "RGBA", "P", "1"):
        buf = io.BytesIO()
        Image.new(mode, (8, 8)).save(buf, "PNG")
        assert decode_image(buf.getvalue(), max_pixels=100).mode == "RGB"


# --- local paths ------------------------------------------------------------------------------------------


def test_local_paths(tmp_path):
    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "frame.png").write_bytes(PNG)
    outside = tmp_path / "secret.png"
    outside.write_bytes(PNG)
    os.symlink(outside, root / "escape.png")
    os.symlink(root / "sub" / "frame.png", root / "alias.png")
    os.symlink(tmp_path, root / "updir")

    assert load("sub/frame.png", input_dir=root).size == (48, 32)
    assert load(str(root / "sub" / "frame.png"), input_dir=root).size == (48, 32)
    assert load("alias.png", input_dir=root).size == (48, 32)  # a link that stays inside is fine
    for bad in ("../secret.png", "sub/../../secret.png", str(outside), "escape.png", "updir/secret.png",
                "/etc/passwd"):
        with pytest.raises(ImageError, match="outside the input directory"):
            load(bad, input_dir=root)
    with pytest.raises(ImageError, match="no such file"):
        load("missing.png", input_dir=root)
    with pytest.raises(ImageError, match="not a regular file"):
        load("sub", input_dir=root)
    with pytest.raises(ImageError, match="local paths are disabled"):
        load("sub/frame.png", input_dir=None)
    (root / "big.png").write_bytes(b"\0" * (MAX_BYTES + 1))
    with pytest.raises(ImageError, match=f"more than {MAX_BYTES} bytes"):
        load("big.png", input_dir=root)
    assert inputs.input_dir_from_env({"LINGBOT_INPUT_DIR": str(root)}) == root
    assert inputs.input_dir_from_env({}) is None


# --- s3 ---------------------------------------------------------------------------------------------------


class FakeS3:
    def __init__(self, objects):
        self.objects = objects
        self.ranges = []

    def head_object(self, Bucket, Key):
        from botocore.exceptions import ClientError

        if (Bucket, Key) not in self.objects:
            raise ClientError({"Error": {"Code": "404"}}, "HeadObject")
        return {"ContentLength": len(self.objects[Bucket, Key])}

    def get_object(self, Bucket, Key, Range):
        self.ranges.append(Range)
        end = int(Range.split("-")[1])
        return {"Body": io.BytesIO(self.objects[Bucket, Key][: end + 1])}


def test_s3_source():
    s3 = FakeS3({("bkt", "a/frame.png"): PNG, ("bkt", "big.png"): b"\0" * (MAX_BYTES + 1)})
    assert load("s3://bkt/a/frame.png", s3_client=s3).size == (48, 32)
    assert s3.ranges == [f"bytes=0-{MAX_BYTES}"]
    with pytest.raises(ImageError, match=f"at most {MAX_BYTES}"):
        load("s3://bkt/big.png", s3_client=s3)
    with pytest.raises(ImageError, match="S3 404"):
        load("s3://bkt/nope.png", s3_client=s3)
    with pytest.raises(ImageError, match="s3://bucket/key"):
        load("s3://bkt", s3_client=s3)


def test_errors_are_request_errors():
    with pytest.raises(RequestError) as ei:
        load("gopher://x/", field="image")
    assert ei.value.field == "image" and str(ei.value).startswith("image: ")


# --- tensor -----------------------------------------------------------------------------------------------


def _cubic_weights(t: float, a: float = -0.75) -> list[float]:
    """Keys cubic convolution weights for taps at offsets -1, 0, 1, 2 (the kernel PyTorch's bicubic uses)."""

    def k(x):
        x = abs(x)
        if x <= 1:
            return (a + 2) * x**3 - (a + 3) * x**2 + 1
        if x < 2:
            return a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a
        return 0.0

    return [k(t + 1), k(t), k(1 - t), k(2 - t)]


def _resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """Dense [n_out, n_in] bicubic resampling matrix, align_corners=False, edge taps clamped."""
    m = np.zeros((n_out, n_in))
    scale = n_in / n_out
    for i in range(n_out):
        src = (i + 0.5) * scale - 0.5
        x0 = math.floor(src)
        for off, wgt in zip((-1, 0, 1, 2), _cubic_weights(src - x0)):
            m[i, min(max(x0 + off, 0), n_in - 1)] += wgt
    return m


@pytest.mark.parametrize("size", [(64, 48), (40, 24), (48, 32)])
def test_image_to_tensor_matches_independent_bicubic(size):
    img = Image.open(io.BytesIO(PNG)).convert("RGB")
    w, h = size
    x = image_to_tensor(img, w, h)
    assert x.shape == (3, h, w) and x.dtype == torch.float32
    arr = np.asarray(img, dtype=np.float64).transpose(2, 0, 1) / 255.0 * 2 - 1  # [3, H, W] in [-1, 1]
    ref = np.einsum("oh,chw,pw->cop", _resize_matrix(img.height, h), arr, _resize_matrix(img.width, w))
    np.testing.assert_allclose(x.numpy(), ref, atol=1e-4)
    if size == img.size:
        np.testing.assert_allclose(x.numpy(), arr, atol=1e-6)  # same size: identity


def test_image_to_tensor_range():
    grad = Image.linear_gradient("L").convert("RGB")  # 256x256, smooth: no bicubic overshoot
    x = image_to_tensor(grad, 832 // 8, 480 // 8)
    assert x.shape == (3, 60, 104)
    assert x.min() >= -1.0 and x.max() <= 1.0
    assert x.min() < -0.95 and x.max() > 0.95
    black = image_to_tensor(Image.new("RGB", (10, 10)), 16, 16)
    assert torch.all(black == -1.0)
