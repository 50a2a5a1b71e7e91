"""A pyarrow S3 filesystem whose every call rides out outages under the project's retry budget.

Ray Data reads (`read_parquet`), pyarrow footers and Ray Train checkpoints (`RunConfig(storage_filesystem=...)`)
talk to S3 through a pyarrow filesystem, not through :mod:`musiccm.storage`'s boto3 calls. pyarrow's own retry
strategies count attempts with back-off that either gives up within seconds or grows without bound, so this
module wraps an `S3FileSystem` in a `PyFileSystem` whose handler runs each call under :func:`musiccm.retry.call`:

- metadata calls (info, listings, deletes, moves, directory creation) are retried as they are;
- a file opened for reading reads through a retried, positioned reader: a read that fails mid-way reopens the
  object and reads the same range again, so readers (Parquet row groups, checkpoint files) see no error and only
  the ranges they ask for are fetched;
- a file opened for writing is spooled the same way and uploaded on close, the upload retried whole.

The handler pickles with its settings (endpoint, region, budget), not its connection, so Ray tasks and
workers rebuild the S3 client in their own process.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.fs as pafs

from musiccm import retry

R = TypeVar("R")
_SPOOL_BYTES = 64 * 1024**2
_CHUNK = 8 * 1024**2


class RetryingS3Handler(pafs.FileSystemHandler):
    """`pafs.FileSystemHandler` over an `S3FileSystem(**s3_kwargs)`, each call retried for `budget_s` seconds."""

    def __init__(self, s3_kwargs: dict[str, Any], budget_s: float) -> None:
        self.s3_kwargs, self.budget_s = dict(s3_kwargs), budget_s
        self._fs: pafs.S3FileSystem | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"s3_kwargs": self.s3_kwargs, "budget_s": self.budget_s}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["s3_kwargs"], state["budget_s"])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RetryingS3Handler) and other.__getstate__() == self.__getstate__()

    def __ne__(self, other: object) -> bool:
        return not self == other

    @property
    def fs(self) -> pafs.S3FileSystem:
        if self._fs is None:
            self._fs = pafs.S3FileSystem(**self.s3_kwargs)
        return self._fs

    def _call(self, what: str, fn: Callable[[], R]) -> R:
        return retry.call(fn, f"s3://{what}", self.budget_s)

    # ------------------------------------------------------------ metadata
    def get_type_name(self) -> str:
        return "musiccm-retrying-s3"

    def normalize_path(self, path: str) -> str:
        return self.fs.normalize_path(path)

    def get_file_info(self, paths: list[str]) -> list[pafs.FileInfo]:
        return self._call(paths[0] if paths else "", lambda: self.fs.get_file_info(paths))

    def get_file_info_selector(self, selector: pafs.FileSelector) -> list[pafs.FileInfo]:
        return self._call(selector.base_dir, lambda: self.fs.get_file_info(selector))

    def create_dir(self, path: str, recursive: bool) -> None:
        self._call(path, lambda: self.fs.create_dir(path, recursive=recursive))

    def delete_dir(self, path: str) -> None:
        self._call(path, lambda: self.fs.delete_dir(path))

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self._call(path, lambda: self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok))

    def delete_root_dir_contents(self) -> None:
        raise OSError("refusing to delete every bucket's contents")

    def delete_file(self, path: str) -> None:
        self._call(path, lambda: self.fs.delete_file(path))

    def move(self, src: str, dest: str) -> None:
        self._call(src, lambda: self.fs.move(src, dest))

    def copy_file(self, src: str, dest: str) -> None:
        self._call(src, lambda: self.fs.copy_file(src, dest))

    # ------------------------------------------------------------ streams
    def open_input_file(self, path: str) -> pa.NativeFile:
        reader = _RetryingReader(self, path)
        reader.size()  # a missing object fails here, as pyarrow's own open does
        return pa.PythonFile(reader, mode="r")

    def open_input_stream(self, path: str) -> pa.NativeFile:
        return pa.PythonFile(_RetryingReader(self, path), mode="r")

    def open_output_stream(self, path: str, metadata: dict[str, str] | None = None) -> pa.NativeFile:
        return pa.PythonFile(_UploadOnClose(self, path, metadata), mode="w")

    def open_append_stream(self, path: str, metadata: dict[str, str] | None = None) -> pa.NativeFile:
        raise OSError(f"s3://{path}: S3 objects cannot be appended to")


class _RetryingReader:
    """A seekable reader of one object whose every read is retried: a failed read reopens the object."""

    def __init__(self, handler: RetryingS3Handler, path: str) -> None:
        self.handler, self.path = handler, path
        self.pos, self.closed = 0, False
        self._file: pa.NativeFile | None = None
        self._size: int | None = None

    def _read_at(self, n: int) -> bytes:
        if self._file is None:
            self._file = self.handler.fs.open_input_file(self.path)
        try:
            self._file.seek(self.pos)
            return self._file.read(n) if n >= 0 else self._file.read()
        except BaseException:
            self._file = None  # a broken connection: the next attempt opens the object again
            raise

    def read(self, n: int = -1) -> bytes:
        data = self.handler._call(self.path, lambda: self._read_at(n))
        self.pos += len(data)
        return data

    def size(self) -> int:
        if self._size is None:
            info = self.handler.get_file_info([self.path])[0]
            if info.type != pafs.FileType.File:
                raise FileNotFoundError(f"s3://{self.path}: no such object")
            self._size = int(info.size)
        return self._size

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: self.size() if whence == 2 else 0}[whence]
        self.pos = base + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    def close(self) -> None:
        self.closed = True
        if self._file is not None:
            self._file.close()
            self._file = None


class _UploadOnClose:
    """A writable file that spools its bytes and uploads them whole, retried, when closed."""

    def __init__(self, handler: RetryingS3Handler, path: str, metadata: dict[str, str] | None) -> None:
        self.handler, self.path, self.metadata = handler, path, metadata
        self._spool = tempfile.SpooledTemporaryFile(max_size=_SPOOL_BYTES)
        self.closed = False

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False

    def write(self, data: bytes) -> int:
        return self._spool.write(data)

    def tell(self) -> int:
        return self._spool.tell()

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.handler._call(self.path, self._upload)
        finally:
            self._spool.close()

    def _upload(self) -> None:
        self._spool.seek(0)
        with self.handler.fs.open_output_stream(self.path, metadata=self.metadata) as out:
            shutil.copyfileobj(self._spool, out, _CHUNK)


def retrying_s3(s3_kwargs: dict[str, Any]) -> pafs.FileSystem:
    """A `PyFileSystem` over `S3FileSystem(**s3_kwargs)` that retries for this process's budget."""
    return pafs.PyFileSystem(RetryingS3Handler(s3_kwargs, retry.budget_s()))
