"""Where the finished MP4 goes: S3 (boto3; AWS, R2, MinIO, ...) with a presigned SigV4 GET URL, else a local dir.

Rules this module keeps:
- Nothing is lost: if the upload fails (after botocore's retries) the MP4 is kept in the local output directory
  and the result carries `upload_error` instead of raising.
- No secrets in errors or logs: messages are scrubbed of credentials and of URL query strings; the presigned URL
  only ever appears as the returned `url`.
- A failed multipart upload is aborted: s3transfer (behind `upload_file`) registers AbortMultipartUpload as a
  failure clean-up right after CreateMultipartUpload and runs it before `upload_file` raises
  (s3transfer.tasks.CreateMultipartUploadTask); tests/test_storage.py checks this against a real server.

Environment (read by `StorageConfig.from_env`; defaults in brackets):
  LINGBOT_S3_BUCKET                 default bucket; unset -> local directory unless the request gives an s3_uri
  LINGBOT_S3_PREFIX                 key prefix for the default bucket ["" ]; a trailing "/" is added
  LINGBOT_OUTPUT_DIR                local directory for kept files [./outputs]
  LINGBOT_PRESIGN_EXPIRES_S         presigned GET lifetime, 1..604800 s (SigV4 maximum: 7 days) [3600]
  LINGBOT_S3_MAX_ATTEMPTS           botocore attempts per request, "standard" retry mode, first try included [5]
  LINGBOT_S3_CONNECT_TIMEOUT_S      [10]
  LINGBOT_S3_READ_TIMEOUT_S         [60]
  LINGBOT_S3_MULTIPART_THRESHOLD    bytes; files at least this big go multipart [16777216]
  LINGBOT_S3_MULTIPART_CHUNKSIZE    bytes per part; s3transfer raises anything below S3's 5 MiB minimum [16777216]
  LINGBOT_S3_MAX_CONCURRENCY        parallel part uploads [4]
  LINGBOT_S3_ADDRESSING_STYLE       auto | path | virtual [path with a custom endpoint (MinIO, rclone), else auto]
  LINGBOT_S3_CHECKSUM               when_supported | when_required: botocore's request checksum policy
                                    [when_supported]; older S3-compatible servers may need when_required
  AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL   custom endpoint (R2, MinIO); the S3-specific one wins
  AWS_REGION, AWS_DEFAULT_REGION    signing region (R2: "auto"); unset -> botocore's default
  AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN
                                    explicit credentials; unset -> boto3's default chain (profile, IAM role, ...)
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config

from worker.media import CONTENT_TYPES, sha256_file
from worker.schema import MAX_PRESIGN_S  # SigV4 presigned URLs live at most 7 days

log = logging.getLogger(__name__)

# botocore logs request internals at DEBUG: the SigV4 canonical request, string to sign and signature (for a
# presigned URL these ARE its X-Amz-Credential and X-Amz-Signature), and every request's headers (Authorization
# with the access key id and signature, X-Amz-Security-Token). A worker run with DEBUG logging must not leak
# them, so these loggers get a filter: signing dumps are dropped, other records are scrubbed.
_SIGNING_DUMPS = ("CanonicalRequest", "StringToSign", "Signature")
_LOG_SECRETS = (
    (re.compile(r"(?i)(credential=)[^\s,&'\"]+"), r"\1***"),
    (re.compile(r"(?i)(signature=)[^\s,&'\"]+"), r"\1***"),
    (re.compile(r"(?i)(x-amz-security-token['\"]?\s*[:=]\s*b?['\"]?)[^\s,&'\"]+"), r"\1***"),
)


class _RedactBotocore(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "botocore.auth" and str(record.msg).startswith(_SIGNING_DUMPS):
            return False
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a record that cannot be formatted is dropped, not shown raw
            return False
        scrubbed = message
        for pattern, repl in _LOG_SECRETS:
            scrubbed = pattern.sub(repl, scrubbed)
        if scrubbed != message:
            record.msg, record.args = scrubbed, None
        return True


def _install_log_redaction() -> None:
    for name in ("botocore.auth", "botocore.endpoint", "botocore.parsers", "botocore.hooks", "botocore.retryhandler",
                 "botocore.awsrequest", "botocore.httpsession", "urllib3.connectionpool"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _RedactBotocore) for f in logger.filters):
            logger.addFilter(_RedactBotocore())


_install_log_redaction()

MIB = 1024 * 1024

# S3 bucket names: 3..63 of lowercase letters, digits, dots, hyphens; start and end alphanumeric.
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")


@dataclass(frozen=True)
class StorageConfig:
    bucket: str | None = None
    prefix: str = ""
    output_dir: Path = Path("outputs")
    endpoint_url: str | None = None
    region: str | None = None
    # repr=False: a logged or printed config never shows credentials.
    access_key_id: str | None = field(default=None, repr=False)
    secret_access_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    max_attempts: int = 5
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0
    multipart_threshold: int = 16 * MIB
    multipart_chunksize: int = 16 * MIB
    max_concurrency: int = 4
    presign_expires_s: int = 3600
    addressing_style: str | None = None  # None -> path with a custom endpoint, else auto
    checksum: str = "when_supported"

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "StorageConfig":
        def get(name: str) -> str | None:
            v = env.get(name, "").strip()
            return v or None

        def num(name: str, default: float, kind: type, lo: float, hi: float | None = None) -> Any:
            raw = get(name)
            if raw is None:
                return default
            try:
                v = kind(raw)
            except ValueError:
                raise ValueError(f"{name}={raw!r} is not a valid {kind.__name__}") from None
            if v < lo or (hi is not None and v > hi):
                raise ValueError(f"{name}={raw!r} is out of range [{lo}, {hi if hi is not None else 'inf'}]")
            return v

        def choice(name: str, default: str | None, allowed: tuple[str, ...]) -> str | None:
            raw = get(name)
            if raw is None:
                return default
            if raw not in allowed:
                raise ValueError(f"{name}={raw!r} must be one of {', '.join(allowed)}")
            return raw

        bucket = get("LINGBOT_S3_BUCKET")
        if bucket is not None:
            _check_bucket(bucket, "LINGBOT_S3_BUCKET")
        return cls(
            bucket=bucket,
            prefix=_normalise_prefix(get("LINGBOT_S3_PREFIX") or ""),
            output_dir=Path(get("LINGBOT_OUTPUT_DIR") or "outputs"),
            endpoint_url=get("AWS_ENDPOINT_URL_S3") or get("AWS_ENDPOINT_URL"),
            region=get("AWS_REGION") or get("AWS_DEFAULT_REGION"),
            access_key_id=get("AWS_ACCESS_KEY_ID"),
            secret_access_key=get("AWS_SECRET_ACCESS_KEY"),
            session_token=get("AWS_SESSION_TOKEN"),
            max_attempts=num("LINGBOT_S3_MAX_ATTEMPTS", 5, int, 1, 20),
            connect_timeout_s=num("LINGBOT_S3_CONNECT_TIMEOUT_S", 10.0, float, 0.1),
            read_timeout_s=num("LINGBOT_S3_READ_TIMEOUT_S", 60.0, float, 0.1),
            multipart_threshold=num("LINGBOT_S3_MULTIPART_THRESHOLD", 16 * MIB, int, 1),
            multipart_chunksize=num("LINGBOT_S3_MULTIPART_CHUNKSIZE", 16 * MIB, int, 1),
            max_concurrency=num("LINGBOT_S3_MAX_CONCURRENCY", 4, int, 1, 64),
            presign_expires_s=num("LINGBOT_PRESIGN_EXPIRES_S", 3600, int, 1, MAX_PRESIGN_S),
            addressing_style=choice("LINGBOT_S3_ADDRESSING_STYLE", None, ("auto", "path", "virtual")),
            checksum=choice("LINGBOT_S3_CHECKSUM", "when_supported", ("when_supported", "when_required")),
        )

    @property
    def s3_enabled(self) -> bool:
        return self.bucket is not None


def _normalise_prefix(prefix: str) -> str:
    prefix = prefix.strip("/")
    return prefix + "/" if prefix else ""


def _check_bucket(bucket: str, where: str) -> None:
    if not _BUCKET_RE.match(bucket) or ".." in bucket:
        raise ValueError(
            f"{where}: invalid bucket name {bucket!r} (3-63 characters: lowercase letters, digits, '.', '-')"
        )


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """'s3://bucket/some/key.mp4' -> ('bucket', 'some/key.mp4'). The key may be empty or end in '/': then it
    is a prefix and store_video appends the file name."""
    if not isinstance(uri, str) or not uri.startswith("s3://"):
        raise ValueError(f"not an S3 URI (expected s3://bucket/key): {uri!r}")
    rest = uri[len("s3://"):]
    if "?" in rest or "#" in rest:
        raise ValueError(f"S3 URI must not contain '?' or '#': {uri!r}")
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise ValueError(f"S3 URI has no bucket: {uri!r}")
    _check_bucket(bucket, "s3_uri")
    if key.startswith("/") or "//" in key or any(part in (".", "..") for part in key.split("/")):
        raise ValueError(f"S3 key must not start with '/' or contain '//', '.' or '..' segments: {uri!r}")
    if len(key.encode()) > 1024:
        raise ValueError("S3 key is longer than 1024 bytes")
    return bucket, key


def make_s3_client(config: StorageConfig) -> Any:
    """A boto3 S3 client: SigV4, bounded standard-mode retries, explicit timeouts."""
    style = config.addressing_style or ("path" if config.endpoint_url else "auto")
    botocore_config = Config(
        signature_version="s3v4",
        # total_max_attempts counts the first try; the legacy "max_attempts" key would count retries only.
        retries={"mode": "standard", "total_max_attempts": config.max_attempts},
        connect_timeout=config.connect_timeout_s,
        read_timeout=config.read_timeout_s,
        s3={"addressing_style": style},
        request_checksum_calculation=config.checksum,
        max_pool_connections=max(10, config.max_concurrency),
    )
    # A fresh Session per client: boto3's default session is not thread-safe, and the env mapping given to
    # from_env (not only os.environ) decides the credentials; None lets boto3 fall back to its default chain.
    session = boto3.session.Session(
        aws_access_key_id=config.access_key_id,
        aws_secret_access_key=config.secret_access_key,
        aws_session_token=config.session_token,
        region_name=config.region,
    )
    return session.client("s3", endpoint_url=config.endpoint_url, config=botocore_config)


def _scrub(message: str, config: StorageConfig) -> str:
    """Remove anything secret from an error message: credentials and URL query strings (signatures)."""
    for secret in (config.secret_access_key, config.session_token):
        if secret:
            message = message.replace(secret, "***")
    message = re.sub(r"(https?://[^\s\"'?]*)\?[^\s\"']*", r"\1?***", message)
    message = re.sub(r"(?i)(signature|credential|x-amz-security-token)=[^\s&\"']+", r"\1=***", message)
    return message


def _move_to_output_dir(path: Path, output_dir: Path) -> Path:
    """Keep the file in the output directory (moving it there if needed) without overwriting another file."""
    output_dir.mkdir(parents=True, exist_ok=True)
    if path.resolve().parent == output_dir.resolve():
        return path.resolve()
    target = output_dir / path.name
    n = 1
    while target.exists():
        target = output_dir / f"{path.stem}-{n}{path.suffix}"
        n += 1
    return Path(shutil.move(str(path), str(target))).resolve()


def _result(
    *, size: int, digest: str, url: str | None = None, s3_uri: str | None = None, path: str | None = None,
    upload_error: str | None = None,
) -> dict[str, Any]:
    return {"url": url, "s3_uri": s3_uri, "path": path, "upload_error": upload_error, "bytes": size, "sha256": digest}


def store_video(
    local_path: Path,
    *,
    s3_uri: str | None,
    presign_expires_s: int | None,
    config: StorageConfig,
    keep_local: bool = False,
) -> dict[str, Any]:
    """Upload the finished MP4 to S3 (or keep it locally) and describe where it is.

    Destination: `s3_uri` if given (a key ending in '/' or empty is a prefix: the file name is appended), else
    the configured bucket with key prefix + file name, else the local output directory.
    Returns a dict with always the same keys (they match schema.VideoResult): url, s3_uri, path, upload_error,
    bytes, sha256. Exactly one of s3_uri / path is set:
      uploaded        s3_uri, url = presigned SigV4 GET; the local copy is deleted unless keep_local
      no S3           path (in the output dir), url None
      upload failed   path (in the output dir), url None, upload_error = the reason (no secrets)
    Raises ValueError (before touching the file) for a malformed s3_uri or expiry, FileNotFoundError for a
    missing file.
    """
    local_path = Path(local_path)
    if not local_path.is_file():
        raise FileNotFoundError(f"video file not found: {local_path}")
    expires = config.presign_expires_s if presign_expires_s is None else presign_expires_s
    if isinstance(expires, bool) or not isinstance(expires, int) or not 1 <= expires <= MAX_PRESIGN_S:
        raise ValueError(f"presign_expires_s must be an integer in 1..{MAX_PRESIGN_S}, got {expires!r}")
    if s3_uri is not None:
        bucket, key = parse_s3_uri(s3_uri)
        if key == "" or key.endswith("/"):
            key += local_path.name
    elif config.bucket is not None:
        bucket, key = config.bucket, config.prefix + local_path.name
    else:
        bucket = key = None

    size = local_path.stat().st_size
    digest = sha256_file(local_path)
    if bucket is None or key is None:
        kept = _move_to_output_dir(local_path, config.output_dir)
        log.info("stored video locally at %s (%d bytes; no S3 bucket configured)", kept, size)
        return _result(path=str(kept), size=size, digest=digest)

    target = f"s3://{bucket}/{key}"
    try:
        client = make_s3_client(config)
        transfer = TransferConfig(
            multipart_threshold=config.multipart_threshold,
            multipart_chunksize=config.multipart_chunksize,
            max_concurrency=config.max_concurrency,
        )
        extra = {"ContentType": CONTENT_TYPES.get(local_path.suffix.lstrip(".").lower(), "application/octet-stream"),
                 "Metadata": {"sha256": digest}}
        client.upload_file(str(local_path), bucket, key, ExtraArgs=extra, Config=transfer)
        url = client.generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=expires
        )
    except Exception as e:  # anything at all: the video must survive a failed upload
        reason = _scrub(f"upload to {target} failed: {type(e).__name__}: {e}", config)
        kept = _move_to_output_dir(local_path, config.output_dir)
        log.error("%s; video kept at %s", reason, kept)
        return _result(path=str(kept), upload_error=reason, size=size, digest=digest)

    log.info("uploaded video to %s (%d bytes, sha256 %s)", target, size, digest)
    if not keep_local:
        local_path.unlink(missing_ok=True)  # serverless disks are small and reused across jobs
    return _result(s3_uri=target, url=url, size=size, digest=digest)
