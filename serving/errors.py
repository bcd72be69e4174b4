"""Exceptions of the torch-free serving stack, and the base of every promptclip error.

Every error a *user* can cause (a bad bundle, a bad image, a bad class name) is a subclass of
:class:`PromptclipError` with a message that says what to fix. The errors carry no transport
semantics: the HTTP layer maps them to status codes (:mod:`serving.http_errors`); the CLI prints
them without a traceback.
"""
from __future__ import annotations


class PromptclipError(Exception):
    """Base class of all user-facing promptclip errors: a message, and optionally the input at fault."""

    #: Input the error is about (a request field, a config key); ``None`` when not tied to one.
    field: str | None = None

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        if field is not None:
            self.field = field


class BundleError(PromptclipError):
    """A deploy bundle is missing, malformed, too new for this reader, or fails a hash check."""


class ImageDecodeError(PromptclipError):
    """An uploaded file is not a decodable image (or is truncated, or too large)."""

    field = "image"


class ClassNameError(PromptclipError):
    """A class name is empty, duplicated, too long for the text context, or has control characters."""

    field = "names"


class UnknownClassError(PromptclipError):
    """A class to remove is not registered."""

    field = "names"


class RequestError(PromptclipError):
    """A request parameter is out of range (e.g. ``top_k``) or too large."""


class AuthError(PromptclipError):
    """A mutating request lacks the configured bearer token."""


class RuntimeUnavailableError(PromptclipError):
    """The requested inference runtime (onnxruntime / TensorRT) is not installed or usable here."""


class ServiceConfigError(PromptclipError):
    """The service's environment configuration is missing or invalid."""


class UnsupportedMediaTypeError(RequestError):
    """The request body has the wrong Content-Type for the endpoint."""


class PayloadTooLargeError(RequestError):
    """The request body exceeds ``PROMPTCLIP_MAX_UPLOAD_BYTES``."""
