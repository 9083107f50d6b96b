"""Batch jobs with a callback: validate the batch, sign each result, POST it with bounded retries.

Platform-free (modal_app.py is the only caller today), so it is tested without Modal.

Signature (what a receiver checks; see `verify`):
    X-Lingbot-Timestamp: <unix seconds>
    X-Lingbot-Signature: sha256=<hex HMAC-SHA256(secret, "<timestamp>." + raw body)>
    X-Lingbot-Delivery:  <id, the same on every retry of one delivery: de-duplicate on it>
The timestamp is inside the signed bytes, so a captured request cannot be replayed with a fresh timestamp; a
receiver refuses timestamps older than its tolerance (default 5 minutes). Each retry is signed anew.

Delivery: the callback URL passes the same address policy as image URLs (worker.netguard: https only, public
addresses only unless LINGBOT_ALLOW_PRIVATE_URLS=1), is checked again before every attempt, and the connection is
pinned to the checked address (no second DNS lookup, so DNS rebinding cannot redirect it). Redirects are not
followed. Retried: connection errors, timeouts, 408, 425, 429 and 5xx; any other status is final. Backoff doubles
from `backoff_s` up to `max_backoff_s`, with jitter, for at most `attempts` tries.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import random
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from worker import netguard, schema

log = logging.getLogger("worker.webhook")

SIGNATURE_HEADER = "X-Lingbot-Signature"
TIMESTAMP_HEADER = "X-Lingbot-Timestamp"
DELIVERY_HEADER = "X-Lingbot-Delivery"
DEFAULT_TOLERANCE_S = 300
MAX_BATCH_JOBS = 100
RETRY_STATUSES = frozenset({408, 425, 429}) | frozenset(range(500, 600))


class BatchError(ValueError):
    """A batch request outside the contract; `.field` names the field (e.g. `jobs[2].size`, `callback_url`)."""

    def __init__(self, field: str | None, detail: str) -> None:
        self.field = field
        super().__init__(f"{field}: {detail}" if field else detail)


# --- signing ----------------------------------------------------------------------------------------------


def _as_bytes(secret: str | bytes) -> bytes:
    return secret.encode() if isinstance(secret, str) else secret


def sign(body: bytes, secret: str | bytes, timestamp: int) -> str:
    """`sha256=<hex>` over `b"<timestamp>." + body`."""
    if not secret:
        raise ValueError("webhook secret is empty")
    mac = hmac.new(_as_bytes(secret), f"{int(timestamp)}.".encode() + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify(
    body: bytes,
    secret: str | bytes,
    signature: str | None,
    timestamp: str | int | None,
    *,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
    now: float | None = None,
) -> bool:
    """True if `signature` is ours for this raw body and timestamp, and the timestamp is fresh."""
    if not signature or timestamp is None:
        return False
    try:
        ts = int(timestamp)
    except (TypeError, ValueError):
        return False
    now = time.time() if now is None else now
    if abs(now - ts) > tolerance_s:
        return False
    return hmac.compare_digest(sign(body, secret, ts), signature.strip())


def signed_headers(body: bytes, secret: str | bytes, *, delivery_id: str, timestamp: int | None = None) -> dict:
    ts = int(time.time()) if timestamp is None else int(timestamp)
    return {
        "Content-Type": "application/json",
        TIMESTAMP_HEADER: str(ts),
        SIGNATURE_HEADER: sign(body, secret, ts),
        DELIVERY_HEADER: delivery_id,
        "User-Agent": "lingbot-worker-webhook/0.1",
    }


# --- the batch request ------------------------------------------------------------------------------------


def check_callback_url(url: Any, *, allow_private: bool, resolver: netguard.Resolver | None = None) -> str:
    if not isinstance(url, str) or not url:
        raise BatchError("callback_url", "must be a non-empty https:// URL")
    if len(url) > 2048:
        raise BatchError("callback_url", f"{len(url)} chars; at most 2048")
    try:
        netguard.check_url(url, allow_private=allow_private, field="callback_url", resolver=resolver)
    except netguard.NetguardError as exc:
        raise BatchError("callback_url", exc.detail) from None
    return url


def parse_batch(
    body: Any,
    *,
    env: Mapping[str, str],
    max_jobs: int = MAX_BATCH_JOBS,
    resolver: netguard.Resolver | None = None,
) -> tuple[list[dict[str, Any]], str | None]:
    """{"jobs": [request, ...], "callback_url": "https://..."} -> (jobs, callback_url or None).

    Each job is validated against the request contract now (shape and values; the image is fetched later, on
    the GPU), so a malformed batch is refused before anything is spawned.
    """
    if not isinstance(body, Mapping):
        raise BatchError("request", "expected a JSON object {\"jobs\": [...], \"callback_url\": ...}")
    unknown = sorted(set(body) - {"jobs", "callback_url"})
    if unknown:
        raise BatchError(unknown[0], "unknown field (allowed: jobs, callback_url)")
    jobs = body.get("jobs")
    if not isinstance(jobs, list) or not jobs:
        raise BatchError("jobs", f"must be a non-empty list of requests (at most {max_jobs})")
    if len(jobs) > max_jobs:
        raise BatchError("jobs", f"{len(jobs)} jobs; at most {max_jobs} per batch")
    limits = schema.Limits.from_env(env)
    for i, job in enumerate(jobs):
        try:
            schema.parse_request(job, limits)
        except schema.RequestError as exc:
            raise BatchError(f"jobs[{i}].{exc.field}" if exc.field else f"jobs[{i}]", exc.detail) from None
    callback = body.get("callback_url")
    if callback is not None:
        callback = check_callback_url(
            callback, allow_private=netguard.allow_private_from_env(env), resolver=resolver
        )
    return [dict(j) for j in jobs], callback


# --- delivery ---------------------------------------------------------------------------------------------


@dataclass
class Delivery:
    ok: bool
    attempts: int
    status: int | None  # last HTTP status, None if no answer
    error: str | None  # why it failed (no URL query, no secret)
    delivery_id: str


def _post_pinned(url: str, addrs: list, body: bytes, headers: dict, timeout_s: float) -> int:
    import urllib3

    parts = urlsplit(url)
    scheme, host = parts.scheme.lower(), parts.hostname
    port = parts.port or (443 if scheme == "https" else 80)
    host_header = (f"[{host}]" if ":" in host else host) + (f":{parts.port}" if parts.port else "")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    timeout = urllib3.Timeout(connect=timeout_s, read=timeout_s)
    last: Exception | None = None
    for addr in addrs:  # the checked addresses only, never the name again
        if scheme == "https":
            import certifi

            pool = urllib3.HTTPSConnectionPool(
                str(addr), port, timeout=timeout, retries=False, maxsize=1, cert_reqs="CERT_REQUIRED",
                ca_certs=certifi.where(), assert_hostname=host, server_hostname=host,
            )
        else:
            pool = urllib3.HTTPConnectionPool(str(addr), port, timeout=timeout, retries=False, maxsize=1)
        try:
            resp = pool.urlopen("POST", target, body=body, headers={**headers, "Host": host_header},
                                redirect=False, retries=False, assert_same_host=False)
            return resp.status
        except urllib3.exceptions.NewConnectionError as exc:
            last = exc
        finally:
            pool.close()
    raise ConnectionError(f"cannot connect ({type(last).__name__ if last else 'no address'})")


def post_signed(
    url: str,
    payload: Mapping[str, Any],
    secret: str | bytes,
    *,
    allow_private: bool = False,
    attempts: int = 5,
    backoff_s: float = 1.0,
    max_backoff_s: float = 30.0,
    timeout_s: float = 10.0,
    delivery_id: str | None = None,
    resolver: netguard.Resolver | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> Delivery:
    """POST `payload` as JSON to `url`, signed; retry transient failures. Never raises for delivery problems."""
    if not secret:
        raise ValueError("webhook secret is empty: set LINGBOT_WEBHOOK_SECRET")
    body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
    delivery_id = delivery_id or uuid.uuid4().hex
    shown = netguard.redact_url(url)
    status: int | None = None
    error: str | None = None
    for attempt in range(1, max(1, attempts) + 1):
        try:
            addrs = netguard.check_url(url, allow_private=allow_private, field="callback_url", resolver=resolver)
        except netguard.NetguardError as exc:
            return Delivery(False, attempt, None, str(exc), delivery_id)  # policy refusals are final
        try:
            status = _post_pinned(url, addrs, body, signed_headers(body, secret, delivery_id=delivery_id),
                                  timeout_s)
            error = None if 200 <= status < 300 else f"HTTP {status} from {shown}"
        except Exception as exc:  # noqa: BLE001 - connection, timeout, TLS: all retried
            status, error = None, f"{type(exc).__name__} posting to {shown}"
        if error is None:
            return Delivery(True, attempt, status, None, delivery_id)
        if status is not None and status not in RETRY_STATUSES:
            break
        if attempt < attempts:
            delay = min(max_backoff_s, backoff_s * 2 ** (attempt - 1))
            log.warning("callback delivery %s attempt %d failed (%s); retrying in %.1f s",
                        delivery_id, attempt, error, delay)
            sleep(delay * random.uniform(0.8, 1.2))
    log.error("callback delivery %s failed after %d attempt(s): %s", delivery_id, attempt, error)
    return Delivery(False, attempt, status, error, delivery_id)
