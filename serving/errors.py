"""Exceptions of the torch-free serving stack.

Every error a *user* can cause (a bad bundle, a bad image, a bad class name) is a subclass of
:class:`PromptclipError` with a message that says what to fix. The HTTP layer maps them to 4xx
responses; the CLI prints them without a traceback.
"""
from __future__ import annotations


class PromptclipError(Exception):
    """Base class of all user-facing promptclip errors."""

    #: HTTP status the service answers with when this error reaches the HTTP layer.
    http_status: int = 400
    #: Request field the error is about (``None`` when not tied to a field).
    field: str | None = None

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        if field is not None:
            self.field = field

    def to_dict(self) -> dict:
        """JSON body of the HTTP error response."""
        out = {"error": type(self).__name__, "message": str(self)}
        if self.field is not None:
            out["field"] = self.field
        return out


class BundleError(PromptclipError):
    """A deploy bundle is missing, malformed, too new for this reader, or fails a hash check."""

    http_status = 500


class ImageDecodeError(PromptclipError):
    """An uploaded file is not a decodable image (or is truncated, or too large)."""

    http_status = 400
    field = "image"


class ClassNameError(PromptclipError):
    """A class name is empty, duplicated, too long for the text context, or has control characters."""

    http_status = 422
    field = "names"


class UnknownClassError(PromptclipError):
    """A class to remove is not registered."""

    http_status = 404
    field = "names"


class RequestError(PromptclipError):
    """A request parameter is out of range (e.g. ``top_k``) or too large."""

    http_status = 422


class AuthError(PromptclipError):
    """A mutating request lacks the configured bearer token."""

    http_status = 401


class RuntimeUnavailableError(PromptclipError):
    """The requested inference runtime (onnxruntime / TensorRT) is not installed or usable here."""

    http_status = 500


class ServiceConfigError(PromptclipError):
    """The service's environment configuration is missing or invalid."""

    http_status = 500


class UnsupportedMediaTypeError(RequestError):
    """The request body has the wrong Content-Type for the endpoint."""

    http_status = 415


class PayloadTooLargeError(RequestError):
    """The request body exceeds ``PROMPTCLIP_MAX_UPLOAD_BYTES``."""

    http_status = 413
