"""One live job per output: a lease in `{output}/_OWNER.json`, taken with a conditional write and kept renewed.

Guarantee: while a job holds the lease, a second job on the same `--output` refuses to start (exit 2, naming
the owner and since when), so the work is never done twice and `_RUN.json`, `errors/` and `_SUMMARY.json` have
one writer. It rests on the store's conditional writes: S3's `If-None-Match: *` to create the lease and
`If-Match: <ETag>` to renew, take over or release it (AWS S3, and SeaweedFS, honour both); on a local disk an
`flock` on the output directory around each compare-and-replace. A store that ignores the conditions is detected
when the lease is taken (a second exclusive create succeeds) and reported: there two jobs are not kept apart.

A crashed owner never locks the output for ever: its lease is stale once it has not been renewed for
`lease_s` seconds (by the store's clock), or at once when its driver ran on this host and is gone; `--takeover`
replaces a live one. An owner whose lease was taken over notices at its next renewal and stops writing.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime

import psutil

from musiccm import storage

LEASE_NAME = "_OWNER.json"


class OutputBusy(ValueError):
    """Another live job owns the output."""


class OwnershipLost(RuntimeError):
    """Another job took the output over while this one ran."""


def _process_started(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def _record(token: str, run_name: str, attempt: str, since: str) -> bytes:
    pid = os.getpid()
    return json.dumps({
        "token": token, "run_name": run_name, "attempt": attempt, "host": socket.gethostname(), "pid": pid,
        "pid_started": _process_started(pid), "since": since, "renewed_at": datetime.now(UTC).isoformat(),
    }, indent=2).encode()


def stale_reason(owner: dict, age_s: float, lease_s: float) -> str | None:
    """Why an owner's lease no longer holds (expired, or its driver on this host is gone), or None if it is live."""
    if age_s > lease_s:
        return f"its lease expired ({age_s:.0f} s since the last renewal; leases last {lease_s:.0f} s)"
    if owner.get("host") == socket.gethostname() and isinstance(owner.get("pid"), int):
        started = _process_started(owner["pid"])
        if started is None or (owner.get("pid_started") is not None and abs(started - owner["pid_started"]) > 1):
            return f"its driver (pid {owner['pid']} on this host) is no longer running"
    return None


@dataclass
class Lease:
    """The held lease of one job on one output; renew it in the background with :meth:`keep_renewed`."""

    uri: str
    token: str
    tag: str
    run_name: str
    attempt: str
    since: str
    lease_s: float
    notes: list[str] = field(default_factory=list)
    lost: threading.Event = field(default_factory=threading.Event)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def keep_renewed(self) -> None:
        """Renew every lease_s / 4 seconds in a daemon thread until :meth:`release`."""
        self._thread = threading.Thread(target=self._renew_loop, name="output-lease", daemon=True)
        self._thread.start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.lease_s / 4):
            try:
                tag = storage.replace_if_unchanged(self.uri, _record(self.token, self.run_name, self.attempt,
                                                                     self.since), self.tag)
            except (storage.StorageError, OSError):
                continue  # an outage: the next tick tries again (the lease may expire meanwhile)
            if tag is None:
                self.lost.set()
                return
            self.tag = tag

    def check(self) -> None:
        """Raise :class:`OwnershipLost` if another job has taken the output over."""
        if self.lost.is_set():
            raise OwnershipLost(f"{storage.redact(self.uri)}: another job took this output over; this one stops "
                                "(what it wrote is kept, and the new owner skips it)")

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if not self.lost.is_set():
            try:
                storage.delete_if_unchanged(self.uri, self.tag)
            except (storage.StorageError, OSError):
                pass  # it expires by itself


def acquire(output: str, run_name: str, attempt: str, lease_s: float, takeover: bool = False) -> Lease:
    """Take the output's lease, or raise :class:`OutputBusy` naming the live owner."""
    uri = storage.join(output, LEASE_NAME)
    token, since = uuid.uuid4().hex, datetime.now(UTC).isoformat()
    lease = Lease(uri, token, "", run_name, attempt, since, lease_s)
    for _ in range(5):  # a lease that vanishes or changes under us: look again
        mine = _record(token, run_name, attempt, since)
        tag = storage.create_exclusive(uri, mine)
        if tag is not None:
            lease.tag = tag
            if storage.create_exclusive(uri, mine) is not None:  # the store ignored If-None-Match
                lease.tag = storage.read_versioned(uri).tag  # type: ignore[union-attr]
                lease.notes.append("this store ignores conditional writes: a second job on this output would not "
                                   "be refused")
            return lease
        current = storage.read_versioned(uri)
        if current is None:
            continue
        try:
            owner = json.loads(current.data)
        except ValueError:
            owner = {}
        if owner.get("token") == token:  # our own create, retried after a lost reply
            lease.tag = current.tag
            return lease
        reason = stale_reason(owner, current.age_s, lease_s)
        if reason is None and not takeover:
            raise OutputBusy(
                f"{storage.redact(output)} is in use by run {owner.get('run_name')!r} (attempt {owner.get('attempt')}, "
                f"host {owner.get('host')}, pid {owner.get('pid')}) since {owner.get('since')}, lease renewed "
                f"{current.age_s:.0f} s ago. Wait for it to finish; if it is dead, its lease expires "
                f"{max(0.0, lease_s - current.age_s):.0f} s after its last renewal, or pass --takeover")
        tag = storage.replace_if_unchanged(uri, mine, current.tag)
        if tag is not None:
            lease.tag = tag
            lease.notes.append(f"took the output over from attempt {owner.get('attempt')}: "
                               f"{reason or '--takeover'}")
            return lease
    raise OutputBusy(f"{storage.redact(output)}: its owner record keeps changing; another job is starting on it")
