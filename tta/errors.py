"""The small exception hierarchy of the core.

The core raises these; only the serving edge (handlers/, the CLI) maps them to HTTP status codes
or exit codes, so `tta` stays free of any server framework.
"""

from __future__ import annotations


class TTAError(Exception):
    """Base class: every error the core raises on purpose."""

    code = "tta_error"


class BadRequest(TTAError):
    """The caller sent something we cannot serve (bad image, unknown method, bad option, ...)."""

    code = "bad_request"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class PixelsRequired(BadRequest):
    """A method (or these options) needs the image itself, but the request carried only its embedding."""

    code = "needs_pixels"

    def __init__(self, message: str) -> None:
        super().__init__(message, code=self.code)


class ModelUnavailable(TTAError):
    """Weights or another required asset cannot be had (offline, missing file, bad checkpoint)."""

    code = "model_unavailable"


class Unavailable(TTAError):
    """A component is temporarily unable to serve (e.g. generator disabled or over budget)."""

    code = "unavailable"
