"""Whole-object reads for one manifest row: local paths, file://, s3:// and whatever fsspec knows.

A nightly job reads hundreds of thousands of objects from one bucket prefix, so S3 will throttle it
(SlowDown / 503) and the network will drop a few connections. Those are retried here with exponential
backoff and jitter, on top of the client's own per-request retries (see `pipeline.io.storage`), because a
transient failure must not turn a good recording into an error row. A missing object or a denied one
will not get better by asking again, so it fails at once. Every failure ends as `InputError`, which the
prepare stage turns into an error row whose message names the uri and the cause.

A read can also block: a FIFO or a device named as a local path, a stalled NFS/FUSE mount (where even
`stat` hangs), an HTTP or S3 endpoint that accepts a connection and never answers. So:
- each fetch runs on a thread of its own (`start_fetch`), and its caller waits for it only until the
  fetch's deadline (`timeout_s`, retries included): past it the row becomes an error and the caller
  moves on. Python cannot interrupt a thread stuck in a system call, so that thread is left behind, as a
  daemon; at most `MAX_STALLED_READS` fetches are in flight per process, stalled ones included, and a
  fetch beyond that is an error row at once instead of one more stuck thread;
- a local path is read only when it is a regular file (`stat`, then `open(O_NONBLOCK)` and `fstat`, so a
  FIFO swapped in between is still never read);
- S3 and HTTP clients get connect and read timeouts (`pipeline.io.storage.StorageOptions`), so most stalls
  end as a retryable timeout well before the deadline;
- with `rules` (`schemas.config.InputsConfig`), a uri whose scheme or location the operator did not allow
  is refused before anything is opened.
"""
from __future__ import annotations

import errno
import logging
import os
import stat
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_before_delay,
    wait_exponential,
    wait_random_exponential,
)

from pipeline.core.errors import InputError
from pipeline.io.storage import StorageOptions, fsspec_filesystem, local_path, protocol_of
from schemas.config import InputsConfig

__all__ = ["fetch_bytes", "start_fetch", "PendingFetch", "check_allowed", "MAX_STALLED_READS",
           "DEFAULT_FETCH_TIMEOUT_S"]

log = logging.getLogger(__name__)

DEFAULT_FETCH_TIMEOUT_S = 300.0
MAX_STALLED_READS = 64
"""Fetches one process may have in flight, stalled ones (left behind past their deadline) included."""

_READ_SLOTS = threading.BoundedSemaphore(MAX_STALLED_READS)
# local folders never read as inputs, whatever `allowed_prefixes` says: kernel and device files
_SYSTEM_ROOTS = ("/proc", "/sys", "/dev")

# S3 error codes (and the HTTP statuses) that mean "try again later".
_TRANSIENT_CODES = frozenset({
    "SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout",
    "Throttling", "ThrottlingException", "ThrottledException", "RequestLimitExceeded",
    "TooManyRequestsException", "RequestThrottled", "BandwidthLimitExceeded",
    "500", "502", "503", "504",
})
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NoSuchBucket", "NotFound", "404"})
_DENIED_CODES = frozenset({"AccessDenied", "AllAccessDisabled", "InvalidAccessKeyId",
                           "SignatureDoesNotMatch", "InvalidObjectState", "403"})
_TRANSIENT_ERRNOS = frozenset({errno.EBUSY, errno.EAGAIN, errno.ETIMEDOUT, errno.ECONNRESET,
                               errno.ECONNABORTED, errno.ECONNREFUSED, errno.EPIPE,
                               getattr(errno, "EREMOTEIO", errno.EIO)})


def _transient_types() -> tuple[type[BaseException], ...]:
    """Exception types that are network trouble whatever their message (client libraries optional)."""
    types: list[type[BaseException]] = [TimeoutError, ConnectionError]
    try:
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import HTTPClientError
        from botocore.parsers import ResponseParserError

        # endpoint unreachable / connect timeout; read timeout, connection closed; garbled throttle XML
        types += [BotoConnectionError, HTTPClientError, ResponseParserError]
    except ImportError:
        pass
    try:
        from urllib3.exceptions import IncompleteRead, ProtocolError

        types += [IncompleteRead, ProtocolError]
    except ImportError:
        pass
    try:
        from aiohttp import ClientConnectionError, ClientPayloadError

        types += [ClientConnectionError, ClientPayloadError]
    except ImportError:
        pass
    try:
        from fsspec.exceptions import FSTimeoutError

        types.append(FSTimeoutError)
    except ImportError:
        pass
    return tuple(types)


_TRANSIENT_TYPES = _transient_types()


class PendingFetch:
    """A fetch running on its own thread. `result()` waits for it until the fetch's deadline."""

    def __init__(self, uri: str, future: Future, deadline: float, timeout_s: float):
        self.uri, self._future, self._deadline, self._timeout_s = uri, future, deadline, timeout_s

    def result(self) -> bytes:
        """The bytes, or InputError: the fetch's own failure, or that it passed its deadline."""
        try:
            return self._future.result(timeout=max(0.0, self._deadline - time.monotonic()))
        except FutureTimeout:
            raise InputError.about(self.uri, f"no answer within {self._timeout_s:g} s (the fetch timeout, "
                                             "inputs.fetch_timeout_s); the read was abandoned") from None


def fetch_bytes(uri: str, options: StorageOptions | None = None, *, attempts: int = 4,
                base_delay_s: float = 0.5, max_delay_s: float = 20.0,
                timeout_s: float = DEFAULT_FETCH_TIMEOUT_S, rules: InputsConfig | None = None) -> bytes:
    """The whole object at `uri`; `InputError` ("<uri>: <cause>") when it cannot be had.

    Transient failures (throttling, 5xx, connection errors, timeouts) are tried `attempts` times in all
    (tenacity), sleeping base_delay_s * 2**n (capped at max_delay_s) with +-50 % jitter in between, so
    many workers throttled at once do not come back in lockstep. Not-found and permission errors (and
    anything else `_classify` calls final) are not retried. The whole fetch, retries included, gets
    `timeout_s`; `rules` restrict what may be read (see `check_allowed`).
    """
    return start_fetch(uri, options, attempts=attempts, base_delay_s=base_delay_s, max_delay_s=max_delay_s,
                       timeout_s=timeout_s, rules=rules).result()


def start_fetch(uri: str, options: StorageOptions | None = None, *, attempts: int = 4,
                base_delay_s: float = 0.5, max_delay_s: float = 20.0,
                timeout_s: float = DEFAULT_FETCH_TIMEOUT_S, rules: InputsConfig | None = None) -> PendingFetch:
    """Start fetching `uri` on a thread of its own and return at once (see `fetch_bytes`), so that many
    rows' fetches run side by side and none waits behind another's stall."""
    deadline = time.monotonic() + timeout_s
    future: Future = Future()
    future.set_running_or_notify_cancel()
    if not _READ_SLOTS.acquire(blocking=False):
        future.set_exception(InputError.about(
            uri, f"not read: {MAX_STALLED_READS} reads on this worker are still in flight, waiting on their "
                 "storage (a stalled mount or endpoint?)"))
        return PendingFetch(uri, future, deadline, timeout_s)

    def run() -> None:
        try:
            future.set_result(_fetch(uri, options, rules, deadline, attempts, base_delay_s, max_delay_s))
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting caller
            future.set_exception(exc)
        finally:
            _READ_SLOTS.release()

    try:
        threading.Thread(target=run, name="phi4mm-fetch", daemon=True).start()
    except RuntimeError as exc:  # cannot start a thread (process limits)
        _READ_SLOTS.release()
        future.set_exception(InputError.about(uri, f"not read: no thread to read it on ({exc})"))
    return PendingFetch(uri, future, deadline, timeout_s)


def check_allowed(uri: str, rules: InputsConfig) -> None:
    """InputError naming the rule when `rules` do not let a manifest make a worker read `uri`.

    Local paths are resolved (symlinks, "..") before they are compared, so a link or a relative uri
    cannot lead out of an allowed folder; this touches the filesystem, so it runs on the fetch thread.
    """
    scheme = protocol_of(uri)
    if scheme not in rules.allowed_schemes:
        raise InputError.about(uri, f"uri scheme {scheme!r} is not allowed (inputs.allowed_schemes: "
                                    f"{', '.join(rules.allowed_schemes) or 'none'})")
    if scheme == "file":
        where = os.path.realpath(local_path(uri))
        system = next((root for root in _SYSTEM_ROOTS if _under(where, root)), None)
        if system:
            raise InputError.about(uri, f"is a system path (under {system}), never read as an input")
    else:
        where = uri.split("://", 1)[1]
        if rules.allowed_prefixes is not None and any(p in (".", "..") for p in where.split("/")):
            raise InputError.about(uri, "has '.' or '..' path segments, which inputs.allowed_prefixes refuses")
    if rules.allowed_prefixes is None:
        return
    for prefix in rules.allowed_prefixes:
        p_scheme = protocol_of(prefix)
        if p_scheme == "file":
            root = os.path.realpath(local_path(prefix))
        else:
            root = prefix.split("://", 1)[1]
        if _same_scheme(scheme, p_scheme) and _under(where, root):
            return
    raise InputError.about(uri, f"is outside the allowed locations (inputs.allowed_prefixes: "
                                f"{', '.join(rules.allowed_prefixes) or 'none'})")


def _same_scheme(a: str, b: str) -> bool:
    aliases = {"s3a": "s3", "gcs": "gs"}
    return aliases.get(a, a) == aliases.get(b, b)


def _under(path: str, root: str) -> bool:
    root = root.rstrip("/")
    return path == root or path.startswith(root + "/") or root == ""


def _fetch(uri: str, options: StorageOptions | None, rules: InputsConfig | None, deadline: float,
           attempts: int, base_delay_s: float, max_delay_s: float) -> bytes:
    """The fetch itself, on its thread: rules, then reads retried until `attempts` or the deadline."""
    if not uri or not uri.strip():
        raise InputError.about(None, "empty uri")
    if rules is not None:
        check_allowed(uri, rules)
    try:
        fs, path = fsspec_filesystem(uri, options)
    except (ValueError, ImportError) as exc:  # unknown protocol, or its fsspec package not installed
        raise InputError.about(uri, f"cannot open this kind of uri ({exc})") from exc
    read = (lambda: _read_local(uri, path)) if protocol_of(uri) == "file" else (lambda: fs.cat_file(path))

    attempts = max(1, attempts)
    retrying = Retrying(
        # no sleep that would end past the deadline: the caller has given up by then
        stop=stop_after_attempt(attempts) | stop_before_delay(max(0.0, deadline - time.monotonic())),
        # d * uniform(0.5, 1.5) with d = min(max_delay_s, base_delay_s * 2**n): half of d, plus 0..d
        wait=wait_exponential(multiplier=base_delay_s / 2, max=max_delay_s / 2)
        + wait_random_exponential(multiplier=base_delay_s, max=max_delay_s),
        retry=retry_if_exception(_is_transient),
        before_sleep=lambda state: _log_retry(uri, attempts, state),
        reraise=True,  # the last error itself, classified below, not tenacity's RetryError
    )
    try:
        return retrying(read)
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - classified here; never a bare crash for one row
        reason, transient = _classify(exc)
        if transient:  # only a transient error is retried, so this one used up its attempts or its time
            tried = retrying.statistics.get("attempt_number", attempts)
            raise InputError.about(uri, f"still failing after {tried} attempt{'s' if tried != 1 else ''} "
                                        f"({reason})") from exc
        raise InputError.about(uri, reason) from exc


_NOT_REGULAR = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _require_regular(uri: str, mode: int) -> None:
    if stat.S_ISREG(mode):
        return
    if stat.S_ISDIR(mode):
        raise InputError.about(uri, "is a directory, not a file")
    what = next((name for test, name in _NOT_REGULAR if test(mode)), "not a regular file")
    raise InputError.about(uri, f"is {what}, not a regular file, so it is never opened (a read could "
                                "block forever)")


def _read_local(uri: str, path: str) -> bytes:
    """A local regular file's bytes. A FIFO, device or socket is refused before it is opened (opening a
    FIFO blocks until a writer comes); the non-blocking open and fstat catch one swapped in after the
    stat."""
    _require_regular(uri, os.stat(path).st_mode)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0))
    try:
        _require_regular(uri, os.fstat(fd).st_mode)
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb") as f:
            fd = -1  # the file object owns it now
            return f.read()
    finally:
        if fd >= 0:
            os.close(fd)


def _is_transient(exc: BaseException) -> bool:
    return isinstance(exc, Exception) and _classify(exc)[1]


def _log_retry(uri: str, attempts: int, state: RetryCallState) -> None:
    reason = _classify(state.outcome.exception())[0]
    delay = state.next_action.sleep
    log.info("%s: %s; attempt %d of %d, retrying in %.2f s", uri, reason, state.attempt_number, attempts,
             delay)


def _classify(exc: BaseException) -> tuple[str, bool]:
    """(the cause in a few words, whether asking again may help)."""
    code, status = _service_code(exc)
    if code in _NOT_FOUND_CODES or isinstance(exc, FileNotFoundError):
        return "not found", False
    if code in _DENIED_CODES or isinstance(exc, PermissionError):
        return "permission denied", False
    if isinstance(exc, IsADirectoryError):
        return "is a directory, not a file", False
    if code in _TRANSIENT_CODES or (status is not None and (status == 429 or status >= 500)):
        return code or f"HTTP {status}", True
    if isinstance(exc, _TRANSIENT_TYPES):
        return _describe(exc), True
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
        return _describe(exc), True
    return _describe(exc), False


def _service_code(exc: BaseException) -> tuple[str | None, int | None]:
    """The S3 error code and HTTP status behind `exc` (s3fs wraps botocore's ClientError in an
    OSError and keeps the original as __cause__); for HTTP clients, the response status."""
    seen = 0
    current: BaseException | None = exc
    while current is not None and seen < 6:
        response = getattr(current, "response", None)
        if isinstance(response, dict) and "Error" in response:
            code = response["Error"].get("Code")
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            return (str(code) if code else None), status
        status = getattr(current, "status", None)
        if isinstance(status, int):
            return None, status
        current = current.__cause__ or current.__context__
        seen += 1
    return None, None


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
