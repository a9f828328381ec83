"""The one exception type for bad inputs.

A bad input (undecodable bytes, silent audio, an oversized image) must become an error *row* with a
message a person can act on, never a failed job. Stages raise `InputError` for those and only those, so
the pipeline can tell "this input is bad" (write status=error, move on) from "our code is broken"
(let Ray retry / fail loudly). It subclasses ValueError because a bad input is a bad value.
"""
from __future__ import annotations

__all__ = ["InputError", "OutputError"]


class InputError(ValueError):
    """A bad input. `str(err)` is a sentence naming the input and the cause.

    Example: "calls/0042.wav: cannot decode audio (Format not recognised)".

    `source` (the uri or id) and `reason` (the cause alone) are kept as attributes for callers that
    want to format their own message. The exception pickles with its attributes (Ray ships exceptions
    between processes): `args` stays `(message,)` and BaseException's pickling carries `__dict__`.
    """

    def __init__(self, message: str, *, source: str | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.source = source
        self.reason = reason if reason is not None else message

    @classmethod
    def about(cls, source: str | None, reason: str) -> "InputError":
        """Build the standard message "<source>: <reason>" (source "<input>" when unknown)."""
        name = source if source else "<input>"
        return cls(f"{name}: {reason}", source=source, reason=reason)


class OutputError(ValueError):
    """The output cannot be written: `str(err)` names the output path and the cause. Raised on the
    driver, before any actor starts (the probe) or when a write fails, and printed by the command line
    as one `phi4mm:` line instead of a Ray traceback."""
