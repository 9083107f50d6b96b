"""Outbound address policy for URLs that come from requests (image URLs, webhook callbacks).

A worker runs inside a cloud network: a request must not make it fetch from (or post to) the metadata
service, the VPC, loopback, or anything else that is not on the public internet (SSRF).

Policy of `check_url`:
- scheme: only `schemes` (default https). Plain `http` is also accepted when `allow_private` is set; that is
  for loopback test servers and on-prem deployments, where TLS may be absent. Anything else (file, gopher,
  ftp, ...) is refused.
- host: resolved with getaddrinfo (the resolver is a parameter so tests can map names). getaddrinfo also
  normalises literal forms (`2130706433`, `0x7f.1`, `017700000001`, `[::ffff:127.0.0.1]`), so the numeric
  tricks are judged by the address they really reach.
- address: EVERY resolved address must be public (a name with one public and one private record is refused,
  because the connection could pick either). Public means `is_global` and none of private, loopback,
  link-local, multicast, reserved, unspecified, site-local; CGNAT 100.64/10 is not global. Addresses that embed
  IPv4 (IPv4-mapped, 6to4, Teredo, NAT64 64:ff9b::/96) are judged by the embedded IPv4 address as well.
- `allow_private=True` (env LINGBOT_ALLOW_PRIVATE_URLS=1) skips the address check.

The caller must connect to one of the returned addresses (not re-resolve the name), otherwise a DNS answer
that changes between check and connect (rebinding) defeats the check; see inputs.py.
Messages never echo userinfo, query or fragment of a URL (they may carry credentials or signatures).
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Callable, Iterable, Mapping
from urllib.parse import SplitResult, urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# (host, port) -> address strings. The default is getaddrinfo; tests pass a mapping.
Resolver = Callable[[str, int], list[str]]

_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_DEFAULT_PORTS = {"https": 443, "http": 80}


class NetguardError(ValueError):
    """A URL the policy refuses. `str(e)` is "<field>: <detail>"; `.field` names the request field."""

    def __init__(self, field: str, detail: str) -> None:
        self.field = field
        self.detail = detail
        super().__init__(f"{field}: {detail}")


def allow_private_from_env(env: Mapping[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    return env.get("LINGBOT_ALLOW_PRIVATE_URLS", "").strip().lower() in ("1", "true", "yes", "on")


def redact_url(url: str) -> str:
    """scheme://host[:port]/path, without userinfo, query and fragment; at most ~120 chars."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        port = f":{parts.port}" if parts.port else ""
        out = f"{parts.scheme}://{host}{port}{parts.path}" if parts.scheme else "<not a URL>"
    except ValueError:
        out = "<unparsable URL>"
    return out if len(out) <= 120 else out[:117] + "..."


def default_resolver(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [info[4][0] for info in infos]


def _embedded_v4(addr: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    out = []
    if addr.ipv4_mapped is not None:
        out.append(addr.ipv4_mapped)
    if addr.sixtofour is not None:
        out.append(addr.sixtofour)
    if addr.teredo is not None:
        out.extend(addr.teredo)
    if addr in _NAT64:
        out.append(ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF))
    return out


def is_public(addr: IPAddress) -> bool:
    """True only for addresses on the public internet (see the module docstring)."""
    if (
        not addr.is_global
        or addr.is_private
        or addr.is_loopback
        or addr.is_link_local
        or addr.is_multicast  # 224/4 counts as "global" in ipaddress
        or addr.is_reserved
        or addr.is_unspecified
    ):
        return False
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.is_site_local:
            return False
        return all(is_public(v4) for v4 in _embedded_v4(addr))
    return True


def parse_address(text: str) -> IPAddress:
    # getaddrinfo returns IPv6 link-local addresses with a zone ("fe80::1%eth0"); the zone does not matter here.
    return ipaddress.ip_address(text.split("%", 1)[0])


def split_url(url: str, *, field: str, allowed: Iterable[str]) -> SplitResult:
    """Parses and checks scheme and host; refuses whitespace/control characters (parser differentials)."""
    allowed = tuple(allowed)
    if any(ord(c) <= 0x20 or c in "\\\x7f" for c in url):
        raise NetguardError(field, f"URL {redact_url(url)} contains whitespace, control characters or '\\'")
    try:
        parts = urlsplit(url)
        parts.port  # raises ValueError for a bad port
    except ValueError:
        raise NetguardError(field, f"URL {redact_url(url)} cannot be parsed") from None
    scheme = parts.scheme.lower()
    if scheme not in allowed:
        hint = "" if "http" in allowed else " (http only with LINGBOT_ALLOW_PRIVATE_URLS=1)"
        raise NetguardError(
            field, f"URL scheme {scheme or '(none)'!r} is not allowed (allowed: {', '.join(allowed)}){hint}"
        )
    if not parts.hostname:
        raise NetguardError(field, f"URL {redact_url(url)} has no host")
    return parts


def check_url(
    url: str,
    *,
    allow_private: bool,
    schemes: Iterable[str] = ("https",),
    field: str = "url",
    resolver: Resolver | None = None,
) -> list[IPAddress]:
    """Checks `url` against the policy; returns its resolved addresses (connect to one of these)."""
    allowed = tuple(s.lower() for s in schemes)
    if allow_private and "http" not in allowed:
        allowed += ("http",)
    parts = split_url(url, field=field, allowed=allowed)
    host = parts.hostname  # lower-cased, brackets stripped
    port = parts.port or _DEFAULT_PORTS.get(parts.scheme.lower(), 443)
    try:
        raw = (resolver or default_resolver)(host, port)
    except (OSError, UnicodeError) as e:
        raise NetguardError(field, f"cannot resolve host of {redact_url(url)} ({e.__class__.__name__})") from None
    addrs: list[IPAddress] = []
    for text in raw:
        try:
            addr = parse_address(text)
        except ValueError:
            raise NetguardError(field, f"host of {redact_url(url)} resolved to a non-IP {text!r}") from None
        if addr not in addrs:
            addrs.append(addr)
    if not addrs:
        raise NetguardError(field, f"host of {redact_url(url)} has no addresses")
    if not allow_private:
        bad = [a for a in addrs if not is_public(a)]
        if bad:
            raise NetguardError(
                field,
                f"{redact_url(url)} resolves to a non-public address ({bad[0]}); only public internet hosts "
                "are allowed (LINGBOT_ALLOW_PRIVATE_URLS=1 lifts this for tests and on-prem)",
            )
    return addrs
