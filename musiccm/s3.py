"""S3 plumbing under :mod:`musiccm.storage`: the client of this process, URI checks, error mapping, retried calls.

Settings come only from the standard AWS environment (`AWS_ENDPOINT_URL[_S3]`, keys, `AWS_REGION`); one boto3
client per process and environment, boto3's own retries off (:mod:`musiccm.retry` is the policy). Every failure
that reaches a caller is a one-line :class:`StorageError` naming the URI and the cause, never a credential.
"""

from __future__ import annotations

import functools
import hashlib
import os
import threading
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

import boto3
from boto3.exceptions import Boto3Error, S3UploadFailedError
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from musiccm import retry
from musiccm.retry import redact

P = ParamSpec("P")
R = TypeVar("R")

_CLIENTS: dict[tuple[Any, ...], Any] = {}
_BUCKETS_SEEN: set[tuple[Any, ...]] = set()
_LOCK = threading.Lock()


class StorageError(RuntimeError):
    """A permanent storage failure, or one that outlasted the retry budget: `<uri>: <cause>` in one line."""




def is_s3(uri: str) -> bool:
    """True for `s3://bucket/key` URIs."""
    return uri.startswith("s3://")


def check_uri(uri: str) -> str:
    """`uri` unchanged, or ValueError for one with credentials in it (shown masked: they belong in AWS_*)."""
    if retry.has_userinfo(uri):
        raise ValueError(f"{redact(uri)}: credentials in a URI are not accepted (they would be logged and "
                         "recorded); set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY instead")
    return uri


def split(uri: str) -> tuple[str, str]:
    """`s3://bucket/key` -> (bucket, key)."""
    bucket, _, key = check_uri(uri)[len("s3://") :].partition("/")
    if not bucket:
        raise ValueError(f"{uri!r}: no bucket; expected s3://bucket/key")
    return bucket, key


def local_path(uri: str) -> str:
    """Local path of a non-S3 URI (a plain path or `file://` URI)."""
    return uri.removeprefix("file://")


def settings() -> tuple[str | None, str]:
    """(endpoint URL or None, region) from the AWS environment."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    return endpoint, region


def cache_key() -> tuple[Any, ...]:
    """Client cache key: process, endpoint, region and a digest of the credentials in the environment."""
    names = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
    creds = "\0".join(os.environ.get(k, "") for k in names)
    return (os.getpid(), *settings(), hashlib.sha256(creds.encode()).hexdigest())


def client() -> Any:
    """The boto3 S3 client of this process for the current environment (created lazily, never pickled)."""
    key = cache_key()
    client = _CLIENTS.get(key)
    if client is None:
        with _LOCK:  # boto3 sessions are not thread-safe; clients are
            client = _CLIENTS.get(key)
            if client is None:
                endpoint, region = settings()
                config = Config(
                    region_name=region,
                    retries={"total_max_attempts": 1, "mode": "standard"},  # `retry` is the policy
                    connect_timeout=10,
                    read_timeout=60,
                    max_pool_connections=32,
                    s3={"addressing_style": "path" if endpoint else "auto"},
                    request_checksum_calculation="when_required",  # S3-compatible servers vary here
                    response_checksum_validation="when_required",
                )
                client = boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)
                _CLIENTS[key] = client
    return client


def error_for(uri: str, exc: BaseException) -> StorageError:
    """One-line StorageError for a boto/OS failure; never echoes credentials."""
    if isinstance(exc, S3UploadFailedError) and isinstance(exc.__context__, ClientError):
        exc = exc.__context__
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        bucket = split(uri)[0] if is_s3(uri) else ""
        if code == "NoSuchBucket":
            cause = f"bucket {bucket!r} does not exist"
        elif code in ("NoSuchKey", "404", "NotFound"):
            cause = f"bucket {bucket!r} does not exist" if bucket_missing(bucket) else "no such object"
        elif code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken"):
            cause = f"invalid credentials ({code}); check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"
        elif code in ("AccessDenied", "403", "Forbidden", "AllAccessDisabled"):
            cause = f"access denied to bucket {bucket!r}"
        else:
            cause = f"{code or 'error'} (HTTP {status})"
    elif isinstance(exc, NoCredentialsError):
        cause = "no S3 credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
    elif isinstance(exc, FileNotFoundError):
        cause = "no such file or directory"
    elif isinstance(exc, OSError):
        cause = exc.strerror or type(exc).__name__
    else:
        cause = f"{type(exc).__name__}: {exc}".splitlines()[0]
    if retry.is_transient(exc):
        cause = f"still failing after the {retry.budget_s():.0f} s retry budget: {cause}"
    return StorageError(redact(f"{uri}: {cause}"))


def call(uri: str, fn: Callable[[], R]) -> R:
    """Run `fn()` under the retry budget, mapping what still fails to a StorageError on `uri`."""
    try:
        return retry.call(fn, redact(uri))
    except (BotoCoreError, ClientError, OSError, Boto3Error) as exc:
        raise error_for(uri, exc) from exc


def op(fn: Callable[P, R]) -> Callable[P, R]:
    """Decorator form of `call` for functions whose first argument is the URI."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        return call(str(args[0]), lambda: fn(*args, **kwargs))

    return wrapper


def bucket_missing(bucket: str) -> bool:
    """True if HEAD on `bucket` says 404 (a HEAD object 404 has no body to tell bucket from key)."""
    if not bucket:
        return False
    seen = (*cache_key(), bucket)
    if seen in _BUCKETS_SEEN:
        return False
    try:
        client().head_bucket(Bucket=bucket)
    except ClientError as exc:
        return exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404
    except (BotoCoreError, OSError):
        return False  # unknown: report the object as missing
    _BUCKETS_SEEN.add(seen)
    return False


def head(uri: str) -> dict[str, Any] | None:
    """HEAD an object: its metadata, or None if the key is missing (StorageError if the bucket is)."""
    bucket, key = split(uri)
    try:
        return client().head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") != 404:
            raise
        if bucket_missing(bucket):
            raise StorageError(f"{uri}: bucket {bucket!r} does not exist") from exc
        return None
