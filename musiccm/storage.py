"""One storage API over local paths and `s3://bucket/key` URIs (checkpoints, audio, Parquet shards).

S3 settings come only from the standard AWS environment: `AWS_ENDPOINT_URL` (or
`AWS_ENDPOINT_URL_S3`), `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION` /
`AWS_DEFAULT_REGION`. On Ray, pass them to every worker with `runtime_env={"env_vars": ...}`.
The client, URI checks and error mapping live in :mod:`musiccm.s3`.

- Writes are atomic: a reader sees the old object or the whole new one, never a part; a retried
  write overwrites the same final key. Temporaries end in `.tmp-<32 hex>` and are never listed.
- Transient S3 errors (throttling, 5xx, timeouts, refused or dropped connections) are retried inside
  every operation for up to the retry budget (10 minutes by default; :mod:`musiccm.retry`); boto3's
  own retries are off.
- Permanent errors (no bucket, access denied, bad credentials, missing file) raise `StorageError`
  at once, naming the URI and the cause in one line, never a credential. A URI that carries
  credentials (`s3://KEY:SECRET@bucket`) is refused, and shown masked.
- Conditional writes (`create_exclusive`, `replace_if_unchanged`) for one-owner records: S3's
  `If-None-Match` / `If-Match`, and an flock on the directory on local disks.
- Parquet: `fs, path = pyarrow_fs(uri)` then `pq.write_table(t, path, filesystem=fs)` or
  `ray.data.read_parquet(path, filesystem=fs)`: for S3 a filesystem whose every call follows the same
  retry budget (:mod:`musiccm.arrow_fs`), so Ray Data reads and Ray Train checkpoints ride out outages too.
"""

from __future__ import annotations

import contextlib
import email.utils
import fcntl
import hashlib
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import pyarrow.fs as pafs
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import ClientError

from musiccm import arrow_fs
from musiccm.retry import redact  # noqa: F401  (storage.redact: masks credentials in any message)
from musiccm.s3 import StorageError, check_uri, is_s3
from musiccm.s3 import call as _call
from musiccm.s3 import client as _client
from musiccm.s3 import head as _head
from musiccm.s3 import local_path as _local
from musiccm.s3 import op as _op
from musiccm.s3 import settings as _settings
from musiccm.s3 import split as _split

P = ParamSpec("P")
R = TypeVar("R")

_TMP_RE = re.compile(r"\.tmp-[0-9a-f]{32}$")
_COPY_LIMIT = 5 * 1024**3  # single-request CopyObject limit; larger objects use multipart copy
_MiB = 1024**2
_TRANSFER = TransferConfig(
    multipart_threshold=64 * _MiB, multipart_chunksize=64 * _MiB, max_concurrency=8, num_download_attempts=1
)


# ---------------------------------------------------------------- keys


def _part_problem(part: object) -> str | None:
    """Why `part` is unsafe as a key/path part, or None if it is fine."""
    if not isinstance(part, str) or not part:
        return "is empty or not a string"
    if part.startswith("/"):
        return "is absolute"
    if "\\" in part:
        return "contains a backslash"
    if any(ord(c) < 32 or ord(c) == 127 for c in part):
        return "contains a control character"
    if {"", ".", ".."} & set(part.split("/")):
        return "has an empty, '.' or '..' segment"
    return None


def join(base: str, *parts: str) -> str:
    """Join `/`-separated key parts under `base`, rejecting anything that could escape it."""
    if not base:
        raise ValueError("join: empty base; expected a directory path or s3://bucket[/prefix]")
    for part in parts:
        if problem := _part_problem(part):
            raise ValueError(
                f"join: part {part!r} {problem}; allowed: non-empty '/'-separated names without"
                " '.'/'..' segments, leading '/', backslashes or control characters"
            )
    if not parts:
        return base
    return (base if base.endswith("/") else base + "/") + "/".join(parts)


# ---------------------------------------------------------------- writes


def _local_atomic(path: str, fill: Callable[[Any], None]) -> None:
    """Write via `fill(fileobj)` into a temp file beside `path`, fsync, then os.replace."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
        with open(tmp, "xb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def _s3_atomic(uri: str, put: Callable[[str, str], None], n_bytes: int) -> None:
    """`put(bucket, tmp_key)`, server-side copy to the final key, then delete the temporary."""
    bucket, key = _split(uri)
    tmp_key = f"{key}.tmp-{uuid.uuid4().hex}"
    client = _client()
    put_done = False
    try:
        _call(uri, lambda: put(bucket, tmp_key))
        put_done = True
        source = {"Bucket": bucket, "Key": tmp_key}
        if n_bytes < _COPY_LIMIT:
            _call(uri, lambda: client.copy_object(CopySource=source, Bucket=bucket, Key=key))
        else:
            _call(uri, lambda: client.copy(source, bucket, key, Config=_TRANSFER))
    finally:
        if put_done:  # a leftover temporary is invisible to list_files; never mask the real error
            with contextlib.suppress(StorageError):
                _call(uri, lambda: client.delete_object(Bucket=bucket, Key=tmp_key))


def write_bytes(uri: str, data: bytes) -> None:
    """Atomically write `data` to `uri` (creating parent directories locally)."""
    if is_s3(uri):
        _s3_atomic(uri, lambda b, k: _client().put_object(Bucket=b, Key=k, Body=data), len(data))
    else:
        _op(_local_atomic)(_local(uri), lambda f: f.write(data))


def write_file(uri: str, local_path: str) -> None:
    """Atomically copy the local file `local_path` to `uri`, streaming (multipart above 64 MiB)."""
    n_bytes = _op(os.path.getsize)(local_path)
    if is_s3(uri):
        _s3_atomic(uri, lambda b, k: _client().upload_file(local_path, b, k, Config=_TRANSFER), n_bytes)
    else:
        _op(_local_atomic)(_local(uri), lambda f: _copy_from(local_path, f))


def _copy_from(local_path: str, f: Any) -> None:
    """Stream the local file `local_path` into the open file `f`."""
    with open(local_path, "rb") as src:
        shutil.copyfileobj(src, f, 1 << 20)


# ---------------------------------------------------------------- reads


@_op
def read_bytes(uri: str) -> bytes:
    """The whole content of `uri`."""
    if not is_s3(uri):
        return Path(_local(uri)).read_bytes()
    bucket, key = _split(uri)
    return _client().get_object(Bucket=bucket, Key=key)["Body"].read()


def download_file(uri: str, local_path: str) -> None:
    """Copy `uri` to the local file `local_path` (atomically, creating parent directories)."""
    if not is_s3(uri):
        _call(uri, lambda: os.stat(_local(uri)))  # name the source, not the destination, if it is missing
        _op(_local_atomic)(local_path, lambda f: _copy_from(_local(uri), f))
        return
    bucket, key = _split(uri)
    _op(_local_atomic)(local_path, lambda f: _call(uri, lambda: _download(bucket, key, f)))


def _download(bucket: str, key: str, f: Any) -> None:
    """Stream one object into the open file `f` (restarting from the beginning on retry)."""
    f.seek(0)
    f.truncate()
    _client().download_fileobj(bucket, key, f, Config=_TRANSFER)


def exists(uri: str) -> bool:
    """True if the file/object `uri` exists (StorageError if its bucket does not)."""
    if not is_s3(uri):
        return os.path.isfile(_local(uri))
    return _op(_head)(uri) is not None


def size(uri: str) -> int:
    """Size of `uri` in bytes."""
    if not is_s3(uri):
        return _op(os.path.getsize)(_local(uri))
    head = _op(_head)(uri)
    if head is None:
        raise StorageError(f"{uri}: no such object")
    return int(head["ContentLength"])


@_op
def delete(uri: str) -> None:
    """Delete the file/object `uri`; a missing one is not an error."""
    if is_s3(uri):
        bucket, key = _split(uri)
        _client().delete_object(Bucket=bucket, Key=key)
    else:
        Path(_local(uri)).unlink(missing_ok=True)


@_op
def _list_page(uri: str, bucket: str, prefix: str, token: str | None) -> dict[str, Any]:
    """One page of ListObjectsV2."""
    kwargs = {"ContinuationToken": token} if token else {}
    return _client().list_objects_v2(Bucket=bucket, Prefix=prefix, **kwargs)


def list_files(prefix_uri: str, suffix: str | None = None) -> list[str]:
    """All files under the directory `prefix_uri` (recursive), as full URIs sorted by URI."""
    out: list[str] = []
    if is_s3(prefix_uri):
        bucket, prefix = _split(prefix_uri)
        prefix = prefix.rstrip("/") + "/" if prefix.strip("/") else ""
        token: str | None = None
        while True:
            page = _list_page(prefix_uri, bucket, prefix, token)
            # Directory markers (keys ending in "/", e.g. from pyarrow) are not files.
            keys = [o["Key"] for o in page.get("Contents", [])]
            out += [f"s3://{bucket}/{k}" for k in keys if not k.endswith("/")]
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                break
    else:
        root = _local(prefix_uri)
        for directory, _, names in os.walk(root):
            out += [os.path.join(directory, n) for n in names]
    # SeaweedFS lists in its own (not byte-wise) order, so always sort here.
    return sorted(u for u in out if not _TMP_RE.search(u) and (suffix is None or u.endswith(suffix)))


def _relative(root_uri: str, uri: str) -> str:
    """Path of `uri` relative to `root_uri`, validated so it cannot escape a local directory."""
    rel = uri[len(root_uri.rstrip("/")) + 1 :]
    join("_", rel)  # raises ValueError for '..', absolute paths, backslashes...
    return rel


def download_dir(uri: str, local_dir: str) -> str:
    """Copy every file under `uri` into `local_dir` (keeping the tree); returns `local_dir`."""
    files = list_files(uri)
    if not files:
        raise StorageError(f"{uri}: no files under this prefix")
    for file_uri in files:
        download_file(file_uri, os.path.join(local_dir, _relative(_local(uri), _local(file_uri))))
    return local_dir


def upload_dir(local_dir: str, uri: str) -> None:
    """Copy every file under `local_dir` to `uri` (keeping the tree), each one atomically."""
    files = list_files(local_dir)
    if not files:
        raise StorageError(f"{local_dir}: no files to upload")
    for path in files:
        write_file(join(uri, _relative(local_dir, path)), path)


# ---------------------------------------------------------------- conditional writes (one-owner records)


@dataclass(frozen=True)
class Versioned:
    """An object's bytes, an opaque version tag for :func:`replace_if_unchanged`, and its age."""

    data: bytes
    tag: str  # S3: the ETag; local: sha256 of the content
    age_s: float  # seconds since it was last written, by the store's own clock


def _precondition_failed(exc: ClientError) -> bool:
    code = exc.response.get("Error", {}).get("Code", "")
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    return code in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey") or status in (404, 409, 412)


@contextlib.contextmanager
def _dir_lock(path: str) -> Any:
    """An exclusive flock on the directory holding `path` (local compare-and-swap; released if the process dies)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def read_versioned(uri: str) -> Versioned | None:
    """The object at `uri` with its version tag and age, or None if there is none."""
    if not is_s3(uri):
        path = _local(uri)
        try:
            data, mtime = Path(path).read_bytes(), os.stat(path).st_mtime
        except FileNotFoundError:
            return None
        return Versioned(data, hashlib.sha256(data).hexdigest(), max(0.0, time.time() - mtime))
    bucket, key = _split(uri)

    def get() -> Versioned | None:
        try:
            response = _client().get_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                return None
            raise
        now = response["ResponseMetadata"].get("HTTPHeaders", {}).get("date")
        server_now = email.utils.parsedate_to_datetime(now) if now else datetime.now(UTC)
        age = (server_now - response["LastModified"]).total_seconds()
        return Versioned(response["Body"].read(), response["ETag"], max(0.0, age))

    return _call(uri, get)


def create_exclusive(uri: str, data: bytes) -> str | None:
    """Write `data` to `uri` only if nothing is there: its version tag, or None when another writer was first."""
    if not is_s3(uri):
        path = _local(uri)
        with _dir_lock(path):
            if os.path.exists(path):
                return None
            _op(_local_atomic)(path, lambda f: f.write(data))
        return hashlib.sha256(data).hexdigest()
    return _put_if(uri, data, IfNoneMatch="*")


def replace_if_unchanged(uri: str, data: bytes, tag: str) -> str | None:
    """Replace `uri` with `data` only if its version is still `tag`: the new tag, or None if it changed or went."""
    if not is_s3(uri):
        path = _local(uri)
        with _dir_lock(path):
            try:
                current = hashlib.sha256(Path(path).read_bytes()).hexdigest()
            except FileNotFoundError:
                return None
            if current != tag:
                return None
            _op(_local_atomic)(path, lambda f: f.write(data))
        return hashlib.sha256(data).hexdigest()
    return _put_if(uri, data, IfMatch=tag)


def delete_if_unchanged(uri: str, tag: str) -> bool:
    """Delete `uri` only if its version is still `tag`; False if it changed (or is gone)."""
    if not is_s3(uri):
        path = _local(uri)
        with _dir_lock(path):
            try:
                if hashlib.sha256(Path(path).read_bytes()).hexdigest() != tag:
                    return False
            except FileNotFoundError:
                return False
            os.unlink(path)
        return True
    bucket, key = _split(uri)

    def remove() -> bool:
        try:
            _client().delete_object(Bucket=bucket, Key=key, IfMatch=tag)
        except ClientError as exc:
            if _precondition_failed(exc):
                return False
            raise
        return True

    return _call(uri, remove)


def _put_if(uri: str, data: bytes, **condition: str) -> str | None:
    """One conditional PUT (atomic on its own): the new ETag, or None when the condition failed."""
    bucket, key = _split(uri)

    def put() -> str | None:
        try:
            return _client().put_object(Bucket=bucket, Key=key, Body=data, **condition)["ETag"]
        except ClientError as exc:
            if _precondition_failed(exc):
                return None
            raise

    return _call(uri, put)


def check_writable(uri: str) -> None:
    """Write and delete a small probe under the directory `uri`; StorageError if that fails."""
    probe = join(uri, f".write-probe-{uuid.uuid4().hex}")
    try:
        write_bytes(probe, b"ok")
        delete(probe)
    except StorageError as exc:
        raise StorageError(f"{uri}: not writable: {str(exc).partition(': ')[2]}") from exc


def pyarrow_fs(uri: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path) for `uri`; S3 is configured from the same AWS environment."""
    if not is_s3(uri):
        return pafs.LocalFileSystem(), os.path.abspath(_local(uri))
    endpoint, region = _settings()
    kwargs: dict[str, Any] = {}
    if endpoint:
        scheme, sep, host = endpoint.rstrip("/").partition("://")
        kwargs = {"endpoint_override": host, "scheme": scheme} if sep else {"endpoint_override": scheme}
    # Credentials are left to the AWS SDK's environment chain so they are never pickled into Ray tasks. The
    # SDK's own retries stay short (a blip); the retry budget (musiccm.arrow_fs) covers outages.
    fs = arrow_fs.retrying_s3(dict(
        region=region,
        connect_timeout=10,
        request_timeout=60,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=3),
        **kwargs,
    ))
    return fs, check_uri(uri)[len("s3://") :]
