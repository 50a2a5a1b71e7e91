"""musiccm.storage against the local filesystem and a real S3 server (SeaweedFS)."""

from __future__ import annotations

import os
import pickle
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import ClientError

from musiccm import retry, storage
from musiccm.storage import StorageError
from musiccm.testing.seaweed import SeaweedFS, _ephemeral_low, free_ports, worker_port_ranges


@pytest.fixture(scope="module")
def s3() -> Iterator[SeaweedFS]:
    """A SeaweedFS server with bucket `test`; the AWS env vars point at it for the module."""
    with SeaweedFS() as server:
        server.make_bucket("test")
        saved = {k: os.environ.get(k) for k in server.env}
        os.environ.update(server.env)
        try:
            yield server
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


@pytest.fixture(params=["local", "s3"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty directory URI on each backend."""
    if request.param == "local":
        return str(tmp_path / "root")
    request.getfixturevalue("s3")
    return f"s3://test/{request.node.name.replace('[', '-').rstrip(']')}-{time.time_ns()}"


def test_round_trip_bytes_and_overwrite(root: str) -> None:
    uri = storage.join(root, "clips", "clip-001.flac")
    data = os.urandom(100_000)
    storage.write_bytes(uri, data)
    assert storage.read_bytes(uri) == data
    storage.write_bytes(uri, b"second")  # a retry overwrites the same key
    assert storage.read_bytes(uri) == b"second"
    assert storage.size(uri) == 6


def test_atomic_write_leaves_no_temporaries(root: str, s3: SeaweedFS) -> None:
    for i in range(3):
        storage.write_bytes(storage.join(root, f"a/{i}.bin"), b"x" * i)
    if storage.is_s3(root):
        bucket, prefix = root[len("s3://") :].split("/", 1)
        keys = [o["Key"] for o in s3.client().list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]]
    else:
        keys = [str(p) for p in Path(root).rglob("*") if p.is_file()]
    assert len(keys) == 3
    assert not [k for k in keys if ".tmp-" in k]


def test_failed_overwrite_keeps_old_content(root: str, monkeypatch: pytest.MonkeyPatch) -> None:
    uri = storage.join(root, "ckpt.pt")
    storage.write_bytes(uri, b"old")
    if storage.is_s3(root):  # fail the copy from the temporary to the final key

        def fail(**kwargs: object) -> None:
            raise ClientError({"Error": {"Code": "AccessDenied"}}, "CopyObject")  # type: ignore[arg-type]

        monkeypatch.setattr(storage._client(), "copy_object", fail)
    else:  # fail the fsync of the temporary file

        def fail(fd: int) -> None:
            raise OSError(5, "Input/output error")

        monkeypatch.setattr(storage.os, "fsync", fail)
    with pytest.raises(StorageError, match="ckpt.pt"):
        storage.write_bytes(uri, b"new")
    monkeypatch.undo()
    assert storage.read_bytes(uri) == b"old"
    assert storage.list_files(root) == [uri]
    if not storage.is_s3(root):
        assert [p.name for p in Path(root).iterdir()] == ["ckpt.pt"]


def test_list_files_recursive_sorted_filtered(root: str) -> None:
    # Mixing '/', '-' and '.' after a common prefix is where SeaweedFS's order differs from byte order.
    names = ["a/b/c.txt", "a/b-c.txt", "a/b.txt", "a/b0.bin", "z.txt", "a/b/d/e.txt", "a/b/d/f"]
    for name in names:
        storage.write_bytes(storage.join(root, name), name.encode())
    got = storage.list_files(root)
    assert got == sorted(storage.join(root, n) for n in names)
    assert storage.list_files(root, suffix=".txt") == [u for u in got if u.endswith(".txt")]
    assert storage.list_files(storage.join(root, "a/b")) == [
        storage.join(root, "a/b/c.txt"),
        storage.join(root, "a/b/d/e.txt"),
        storage.join(root, "a/b/d/f"),
    ]
    assert storage.list_files(storage.join(root, "missing")) == []


def test_list_files_paginates(s3: SeaweedFS) -> None:
    root = f"s3://test/pages-{time.time_ns()}"
    client = s3.client()
    for i in range(1005):  # ListObjectsV2 returns at most 1000 keys per page
        client.put_object(Bucket="test", Key=f"{root[10:]}/{i:04d}", Body=b"")
    assert storage.list_files(root) == [f"{root}/{i:04d}" for i in range(1005)]


def test_exists_size_delete(root: str) -> None:
    uri = storage.join(root, "x.bin")
    assert not storage.exists(uri)
    storage.write_bytes(uri, b"12345")
    assert storage.exists(uri) and storage.size(uri) == 5
    storage.delete(uri)
    assert not storage.exists(uri)
    storage.delete(uri)  # idempotent
    with pytest.raises(StorageError, match="x.bin"):
        storage.read_bytes(uri)
    with pytest.raises(StorageError, match="x.bin"):
        storage.size(uri)


def test_write_file_download_file(root: str, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(300_000))
    uri = storage.join(root, "f/src.bin")
    storage.write_file(uri, str(src))
    dst = tmp_path / "out" / "dst.bin"
    storage.download_file(uri, str(dst))
    assert dst.read_bytes() == src.read_bytes()
    assert not list(dst.parent.glob("*.tmp-*"))


def test_multipart_upload_and_copy(s3: SeaweedFS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Shrink the limits so a 11 MiB file takes the multipart upload and multipart copy paths.
    small = TransferConfig(multipart_threshold=5 << 20, multipart_chunksize=5 << 20)
    monkeypatch.setattr(storage, "_TRANSFER", small)
    monkeypatch.setattr(storage, "_COPY_LIMIT", 1)
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(11 << 20))
    storage.write_file("s3://test/multipart/big.bin", str(src))
    assert storage.read_bytes("s3://test/multipart/big.bin") == src.read_bytes()
    assert storage.list_files("s3://test/multipart") == ["s3://test/multipart/big.bin"]


def test_upload_dir_download_dir_round_trip(root: str, tmp_path: Path) -> None:
    model = tmp_path / "model"
    files = {"config.json": b"{}", "unet/weights.safetensors": os.urandom(50_000), "vae/a/b.bin": b"b"}
    for rel, data in files.items():
        (model / rel).parent.mkdir(parents=True, exist_ok=True)
        (model / rel).write_bytes(data)
    storage.upload_dir(str(model), storage.join(root, "exported"))
    out = tmp_path / "fetched"
    assert storage.download_dir(storage.join(root, "exported"), str(out)) == str(out)
    got = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert got == files


def test_check_writable(root: str) -> None:
    storage.check_writable(root)
    assert storage.list_files(root) == []


@pytest.mark.parametrize("bad", ["..", "/abs", "a/../b", "", "a\\b", "a\0b", "./a", "a//b", "a/", "a\nb"])
def test_join_rejects_escapes(bad: str) -> None:
    with pytest.raises(ValueError, match="allowed"):
        storage.join("s3://bucket/run", bad)


def test_join_accepts_ids() -> None:
    assert storage.join("s3://b/run", "clip-001.flac") == "s3://b/run/clip-001.flac"
    assert storage.join("s3://b/run/", "shard_0", "a.b.c") == "s3://b/run/shard_0/a.b.c"
    assert storage.join("/data", "x..y") == "/data/x..y"


def test_missing_bucket_is_permanent_and_fast(s3: SeaweedFS) -> None:
    for op in (
        lambda: storage.write_bytes("s3://nope/x", b"1"),
        lambda: storage.read_bytes("s3://nope/x"),
        lambda: storage.exists("s3://nope/x"),
        lambda: storage.list_files("s3://nope/dir"),
    ):
        start = time.monotonic()
        with pytest.raises(StorageError, match=r"^s3://nope/\S*: bucket 'nope' does not exist$"):
            op()
        assert time.monotonic() - start < 5


def test_missing_object_message(s3: SeaweedFS, tmp_path: Path) -> None:
    with pytest.raises(StorageError, match=r"^s3://test/none/x: no such object$"):
        storage.read_bytes("s3://test/none/x")
    with pytest.raises(StorageError, match="bucket 'nope' does not exist"):
        storage.download_file("s3://nope/x", str(tmp_path / "x"))
    with pytest.raises(StorageError, match="no files"):
        storage.download_dir("s3://test/none", str(tmp_path / "d"))


def test_wrong_credentials(s3: SeaweedFS, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    start = time.monotonic()
    with pytest.raises(StorageError, match="invalid credentials") as info:
        storage.write_bytes("s3://test/creds/x", b"1")
    assert "not-the-secret" not in str(info.value)
    with pytest.raises(StorageError, match="not writable: invalid credentials"):
        storage.check_writable("s3://test/creds")
    assert time.monotonic() - start < 5


def test_unreachable_endpoint_is_retried_for_the_budget_then_fails(monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_ports(1)[0]}")  # connection refused
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    clock = [0.0]
    sleeps: list[float] = []

    def sleep(s: float) -> None:
        sleeps.append(s)
        clock[0] += s

    monkeypatch.setattr(retry.time, "sleep", sleep)
    monkeypatch.setattr(retry.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(retry, "_last_notice", float("-inf"))  # an earlier test's notice must not throttle this one
    retry.set_budget(300)
    try:
        with pytest.raises(StorageError, match="still failing after the 300 s retry budget"):
            storage.read_bytes("s3://test/x")
    finally:
        retry.set_budget(None)
    assert sum(sleeps) == pytest.approx(300, abs=1e-6)  # the whole budget, never past it
    assert max(sleeps) <= retry.CAP_S and sleeps[1] > sleeps[0]  # exponential, capped
    err = capsys.readouterr().err
    assert "[storage] waiting on s3://test/x" in err and "of the 300 s retry budget used" in err


def test_retry_budget_from_the_environment_and_its_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    assert retry.budget_s() == retry.DEFAULT_BUDGET_S == 600
    monkeypatch.setenv(retry.BUDGET_ENV, "42")
    assert retry.budget_s() == 42
    monkeypatch.setenv(retry.BUDGET_ENV, "-1")
    with pytest.raises(ValueError, match="allowed: 0..86400 seconds"):
        retry.budget_s()
    with pytest.raises(ValueError, match="allowed"):
        retry.set_budget(float("nan"))


class FakeTransient(Exception):
    pass


def test_retry_transient_then_success(capsys: pytest.CaptureFixture) -> None:
    calls = []

    @retry.retry(budget=5, base_s=0.001, transient=lambda e: isinstance(e, FakeTransient))
    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise FakeTransient
        return "ok"

    assert flaky() == "ok" and len(calls) == 3
    assert "reachable again: flaky" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("code", "status", "transient"),
    [
        ("SlowDown", 503, True),
        ("InternalError", 500, True),
        ("RequestTimeout", 400, True),
        ("NoSuchBucket", 404, False),
        ("AccessDenied", 403, False),
    ],
)
def test_retry_default_policy_classifies_s3_errors(code: str, status: int, transient: bool) -> None:
    response = {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}
    calls = []

    @retry.retry(budget=0.05, base_s=0.001)
    def fail() -> None:
        calls.append(1)
        raise ClientError(response, "GetObject")  # type: ignore[arg-type]

    with pytest.raises(ClientError):
        fail()
    assert (len(calls) > 1) == transient


def test_validation_errors_are_not_retried_and_credentials_in_uris_are_refused(
        s3: SeaweedFS, monkeypatch: pytest.MonkeyPatch) -> None:
    from botocore.exceptions import ParamValidationError

    assert not retry.is_transient(ParamValidationError(report="bad bucket"))
    secret_uri = "s3://AKIAEXAMPLE:wJalrXUtnFEMI-super-secret@test/x"
    sleeps: list[float] = []
    monkeypatch.setattr(retry.time, "sleep", sleeps.append)
    for call in (lambda: storage.read_bytes(secret_uri), lambda: storage.write_bytes(secret_uri, b"1"),
                 lambda: storage.pyarrow_fs(secret_uri), lambda: storage.check_writable(secret_uri)):
        with pytest.raises(ValueError, match="credentials in a URI are not accepted") as info:
            call()
        assert "super-secret" not in str(info.value) and "AKIAEXAMPLE" not in str(info.value)
        assert "s3://***@test/x" in str(info.value)
    assert sleeps == []
    assert retry.redact("see s3://a:b@bkt/k and https://u@host/p") == "see s3://***@bkt/k and https://***@host/p"


def test_conditional_writes(s3: SeaweedFS, tmp_path: Path) -> None:
    for uri in ("s3://test/cond/owner.json", str(tmp_path / "cond" / "owner.json")):
        assert storage.read_versioned(uri) is None
        tag = storage.create_exclusive(uri, b"one")
        assert tag is not None and storage.create_exclusive(uri, b"two") is None
        current = storage.read_versioned(uri)
        assert current is not None and current.data == b"one" and current.tag == tag and 0 <= current.age_s < 60
        assert storage.replace_if_unchanged(uri, b"x", "stale-tag") is None
        new = storage.replace_if_unchanged(uri, b"three", tag)
        assert new is not None and new != tag and storage.read_bytes(uri) == b"three"
        assert storage.replace_if_unchanged(uri, b"four", tag) is None  # the old tag no longer matches
        assert not storage.delete_if_unchanged(uri, tag) and storage.delete_if_unchanged(uri, new)
        assert storage.read_versioned(uri) is None and storage.replace_if_unchanged(uri, b"5", new) is None


def test_pyarrow_fs_parquet_round_trip(s3: SeaweedFS) -> None:
    table = pa.table({"id": ["a", "b", "c"], "score": [0.5, 1.5, 2.5]})
    fs, path = storage.pyarrow_fs("s3://test/parquet/metrics.parquet")
    pq.write_table(table, path, filesystem=fs)
    assert pq.read_table(path, filesystem=fs).equals(table)
    assert storage.list_files("s3://test/parquet") == ["s3://test/parquet/metrics.parquet"]
    assert s3.secret_key.encode() not in pickle.dumps(fs)  # safe to ship to Ray workers


def test_ray_data_reads_s3_parquet_from_env(s3: SeaweedFS) -> None:
    ray = pytest.importorskip("ray")
    rows = pa.table({"id": list(range(10))})
    fs, path = storage.pyarrow_fs("s3://test/ray/part-0.parquet")
    pq.write_table(rows, path, filesystem=fs)
    ray.init(num_cpus=1, include_dashboard=False, runtime_env={"env_vars": s3.env})
    try:
        ds = ray.data.read_parquet("s3://test/ray/")
        assert sorted(r["id"] for r in ds.take_all()) == list(range(10))
    finally:
        ray.shutdown()


def test_client_is_cached_per_environment(s3: SeaweedFS, monkeypatch: pytest.MonkeyPatch) -> None:
    assert storage._client() is storage._client()
    before = storage._client()
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    assert storage._client() is not before


def test_worker_port_ranges_are_disjoint_free_and_below_the_ephemeral_range() -> None:
    # Ray refuses to start when a port it was given (or picked at random) lies in its worker range;
    # OS-chosen ports all come from the ephemeral range, so worker ranges must stay below it.
    ranges = worker_port_ranges(3, width=50)
    assert len(ranges) == 3
    for lo, hi in ranges:
        assert hi - lo + 1 == 50 and 20000 <= lo and hi < _ephemeral_low()
    spans = sorted(ranges)
    assert all(a[1] < b[0] for a, b in zip(spans, spans[1:], strict=False))
    assert not any(lo <= p <= hi for p in free_ports(20) for lo, hi in ranges)
