"""How storage calls ride out outages: which errors are transient, the retry budget, and what a log line may show.

A job that runs for hours on many GPUs meets object-store trouble of minutes: an endpoint that stops answering,
5xx and throttling answers, connection resets. Every storage operation (boto3 calls, pyarrow's S3 filesystem, Ray
Data reads and Ray Train checkpoints through :func:`musiccm.storage.pyarrow_fs`) retries such errors with
exponential back-off and full jitter (base 0.2 s, doubling, each wait at most 15 s) until a time **budget** runs
out: 600 s by default, `--storage-retry-s` in the jobs, `MUSICCM_STORAGE_RETRY_S` in the environment. While it
waits it prints a throttled `[storage] waiting on ...` line, and a `... reachable again` line once it recovers.
Permanent errors (no bucket, no such key, access denied, bad credentials, invalid parameters) are never retried.

Nothing here may print a credential: :func:`redact` masks the user-info part of any URI in a message.
"""

from __future__ import annotations

import functools
import os
import random
import re
import sys
import threading
import time
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from boto3.exceptions import S3UploadFailedError
from botocore.exceptions import ClientError, HTTPClientError, IncompleteReadError
from botocore.exceptions import ConnectionError as BotoConnectionError

P = ParamSpec("P")
R = TypeVar("R")

BUDGET_ENV = "MUSICCM_STORAGE_RETRY_S"
DEFAULT_BUDGET_S = 600.0
MAX_BUDGET_S = 24 * 3600.0
BASE_S, CAP_S = 0.2, 15.0
NOTICE_EVERY_S = 10.0  # at most one "waiting on storage" line per process this often

_TRANSIENT_CODES = frozenset(
    "Throttling ThrottlingException ThrottledException SlowDown RequestTimeout RequestTimeoutException"
    " RequestLimitExceeded TooManyRequests TooManyRequestsException InternalError ServiceUnavailable"
    " PriorRequestNotComplete OperationAborted".split()
)
# pyarrow's S3 filesystem raises OSError("... AWS Error <CODE> ..."): these codes and HTTP statuses are transient.
_ARROW_TRANSIENT = re.compile(
    r"AWS Error (NETWORK_CONNECTION|SLOW_DOWN|SERVICE_UNAVAILABLE|INTERNAL_FAILURE|THROTTLING|REQUEST_TIMEOUT"
    r"|REQUEST_TIME_TOO_SKEWED)|HTTP status (5\d\d|429)|curlCode: (6|7|28|52|55|56)\b|Connection reset|timed out"
)
_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@")
_budget: float | None = None
_lock = threading.Lock()
_last_notice = 0.0


def redact(text: str) -> str:
    """`text` with the user-info of every URI masked: `s3://KEY:SECRET@bucket/k` → `s3://***@bucket/k`."""
    return _USERINFO.sub(r"\1***@", text)


def has_userinfo(uri: str) -> bool:
    """True for a URI that carries credentials (`scheme://user[:secret]@...`)."""
    return bool(_USERINFO.match(uri))


def check_budget(seconds: float) -> float:
    """`seconds` as a valid budget (0 = no retries), else ValueError saying what is allowed."""
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not 0 <= seconds <= MAX_BUDGET_S:
        raise ValueError(f"storage retry budget {seconds!r} s is invalid; allowed: 0..{MAX_BUDGET_S:.0f} seconds")
    return float(seconds)


def budget_s() -> float:
    """This process's retry budget: :func:`set_budget`'s value, else `MUSICCM_STORAGE_RETRY_S`, else 600 s."""
    if _budget is not None:
        return _budget
    raw = os.environ.get(BUDGET_ENV, "").strip()
    if not raw:
        return DEFAULT_BUDGET_S
    try:
        return check_budget(float(raw))
    except ValueError:
        raise ValueError(f"{BUDGET_ENV}={raw!r} is invalid; allowed: 0..{MAX_BUDGET_S:.0f} seconds") from None


def set_budget(seconds: float | None) -> None:
    """Set this process's retry budget (None: back to the environment / default). Jobs call it in every worker."""
    global _budget
    _budget = None if seconds is None else check_budget(seconds)


def is_transient(exc: BaseException) -> bool:
    """True for errors worth retrying: throttling, 5xx, timeouts, refused or dropped connections."""
    if isinstance(exc, S3UploadFailedError) and exc.__context__ is not None:
        return is_transient(exc.__context__)  # s3transfer wraps the real error and loses its type
    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return exc.response.get("Error", {}).get("Code") in _TRANSIENT_CODES or status >= 500 or status == 429
    # botocore's network errors only: ParamValidationError, NoCredentialsError... are BotoCoreErrors too.
    if isinstance(exc, BotoConnectionError | HTTPClientError | IncompleteReadError):
        return True
    if isinstance(exc, FileNotFoundError | PermissionError):
        return False
    if isinstance(exc, ConnectionError | TimeoutError):
        return True
    return isinstance(exc, OSError) and bool(_ARROW_TRANSIENT.search(str(exc)))


def _notice(line: str) -> None:
    """Print one storage line to stderr, at most every NOTICE_EVERY_S per process (recoveries always)."""
    global _last_notice
    with _lock:
        now = time.monotonic()
        if not line.startswith("[storage] reachable") and now - _last_notice < NOTICE_EVERY_S:
            return
        _last_notice = now
    print(redact(line), file=sys.stderr, flush=True)


def _cause(exc: BaseException) -> str:
    return redact(f"{type(exc).__name__}: {exc}".splitlines()[0])[:200]


def call(fn: Callable[[], R], what: str, budget: float | None = None,
         transient: Callable[[BaseException], bool] = is_transient, base_s: float = BASE_S,
         cap_s: float = CAP_S) -> R:
    """`fn()`, retrying transient failures until `budget` seconds (default :func:`budget_s`) have passed.

    Waits are jittered exponential back-off, base_s · 2^i capped at cap_s, never past the deadline. `what`
    (a URI, say) names the operation in the waiting lines. The last error is raised once the budget is spent.
    """
    budget = budget_s() if budget is None else budget
    start = time.monotonic()
    waited = False
    for attempt in range(1_000_000):
        try:
            result = fn()
        except Exception as exc:
            elapsed = time.monotonic() - start
            if not transient(exc) or elapsed >= budget:
                raise
            delay = min(random.uniform(0.5, 1.0) * min(cap_s, base_s * 2**attempt), budget - elapsed)
            if attempt >= 1:
                waited = True
                _notice(f"[storage] waiting on {what}: {_cause(exc)}; retry {attempt + 1} in {delay:.1f} s "
                        f"({elapsed:.0f} s of the {budget:.0f} s retry budget used)")
            time.sleep(max(delay, 0.0))
            continue
        if waited:
            _notice(f"[storage] reachable again: {what} after {time.monotonic() - start:.0f} s "
                    f"({attempt} retries)")
        return result
    raise AssertionError("unreachable")


def retry(budget: float | None = None, base_s: float = BASE_S, cap_s: float = CAP_S,
          transient: Callable[[BaseException], bool] = is_transient) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorator form of :func:`call` (the function's name stands for the operation in waiting lines)."""

    def decorate(fn: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(fn)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            return call(lambda: fn(*args, **kwargs), fn.__name__, budget, transient, base_s, cap_s)

        return wrapper

    return decorate
