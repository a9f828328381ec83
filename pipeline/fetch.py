"""Whole-object reads for one manifest row: local paths, file://, s3:// and whatever fsspec knows.

A nightly job reads hundreds of thousands of objects from one bucket prefix, so S3 will throttle it
(SlowDown / 503) and the network will drop a few connections. Those are retried here with exponential
backoff and jitter, on top of the client's own per-request retries (see `pipeline.storage`), because a
transient failure must not turn a good recording into an error row. A missing object or a denied one
will not get better by asking again, so it fails at once. Every failure ends as `InputError`, which the
prepare stage turns into an error row whose message names the uri and the cause.
"""
from __future__ import annotations

import errno
import logging

from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
    wait_random_exponential,
)

from pipeline.errors import InputError
from pipeline.storage import StorageOptions, fsspec_filesystem

__all__ = ["fetch_bytes"]

log = logging.getLogger(__name__)

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


def fetch_bytes(uri: str, options: StorageOptions | None = None, *, attempts: int = 4,
                base_delay_s: float = 0.5, max_delay_s: float = 20.0) -> bytes:
    """The whole object at `uri`; `InputError` ("<uri>: <cause>") when it cannot be had.

    Transient failures (throttling, 5xx, connection errors, timeouts) are tried `attempts` times in all
    (tenacity), sleeping base_delay_s * 2**n (capped at max_delay_s) with +-50 % jitter in between, so
    many workers throttled at once do not come back in lockstep. Not-found and permission errors (and
    anything else `_classify` calls final) are not retried.
    """
    if not uri or not uri.strip():
        raise InputError.about(None, "empty uri")
    try:
        fs, path = fsspec_filesystem(uri, options)
    except (ValueError, ImportError) as exc:  # unknown protocol, or its fsspec package not installed
        raise InputError.about(uri, f"cannot open this kind of uri ({exc})") from exc

    attempts = max(1, attempts)
    retrying = Retrying(
        stop=stop_after_attempt(attempts),
        # d * uniform(0.5, 1.5) with d = min(max_delay_s, base_delay_s * 2**n): half of d, plus 0..d
        wait=wait_exponential(multiplier=base_delay_s / 2, max=max_delay_s / 2)
        + wait_random_exponential(multiplier=base_delay_s, max=max_delay_s),
        retry=retry_if_exception(_is_transient),
        before_sleep=lambda state: _log_retry(uri, attempts, state),
        reraise=True,  # the last error itself, classified below, not tenacity's RetryError
    )
    try:
        return retrying(fs.cat_file, path)
    except Exception as exc:  # noqa: BLE001 - classified here; never a bare crash for one row
        reason, transient = _classify(exc)
        if transient:  # only a transient error is retried, so this one used up every attempt
            raise InputError.about(uri, f"still failing after {attempts} attempts ({reason})") from exc
        raise InputError.about(uri, reason) from exc


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
