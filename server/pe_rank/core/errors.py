"""The errors every process shares, from Triton's models to the client.

Each kind says whose fault it is, so each transport maps it once: a caller's bad input
(:class:`InvalidRequest`, Triton INVALID_ARG, gRPC INVALID_ARGUMENT, HTTP 422/413), a caller that
left (:class:`WindowCancelled`, CANCELLED), an engine that cannot take work
(:class:`EngineUnavailable`, UNAVAILABLE: another Triton may), a user mistake on the command
line (:class:`UserError`, one ``error:`` line). Anything else is a fault of ours: INTERNAL,
never blamed on the client.
"""
from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix (a flag, a file); the CLI prints it as one line, without a traceback."""


class InvalidRequest(ValueError):
    """A request (or a Triton model's input) refused as sent; ``field`` names the offending field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.reason = field, message


class RequestTooLarge(InvalidRequest):
    """Over a size limit (passages, query length, tokens with truncate=false): HTTP 413, not 422."""


class WindowCancelled(Exception):
    """The window's caller went away; it was dropped before finishing."""


class EngineUnavailable(RuntimeError):
    """The decode engine is closed or has died: the window was not ranked, and may be retried elsewhere."""
