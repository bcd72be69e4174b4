"""How promptclip errors are answered over HTTP: one table from error type to status code, and the JSON body.

The errors themselves (:mod:`serving.errors`) know nothing about HTTP. :func:`http_status` looks the error's
class up in :data:`STATUS_BY_ERROR`, most specific class first (a :class:`~serving.errors.PayloadTooLargeError`
is a :class:`~serving.errors.RequestError` but answers 413, not 422); an error type the table does not name
(e.g. a training error) answers :data:`DEFAULT_STATUS`. Every error body has the
:class:`~serving.schemas.ErrorResponse` shape. A server-side fault (5xx) is answered by :func:`public_error_response`:
the body names the error type and what the client can do, never the server's paths or file contents (the full
message goes to the server log).
"""
from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from starlette.responses import JSONResponse

from .classes import ClassStateError
from .classifier import DeadlineExceededError
from .errors import (
    AuthError,
    BundleError,
    ClassNameError,
    ImageDecodeError,
    PayloadTooLargeError,
    PromptclipError,
    RequestError,
    RuntimeUnavailableError,
    ServiceConfigError,
    UnknownClassError,
    UnsupportedMediaTypeError,
)

__all__ = ["STATUS_BY_ERROR", "DEFAULT_STATUS", "http_status", "error_body", "error_response",
           "public_error_response", "SERVER_FAULT_MESSAGES"]

#: Status of a :class:`~serving.errors.PromptclipError` subclass the table does not name: the client's input is wrong.
DEFAULT_STATUS = 400

#: Error type -> HTTP status. Server-side faults (a broken bundle, state file or configuration) are 5xx; an unreadable
#: class state is 503 (the service is not ready until the operator fixes it, and readiness says so).
STATUS_BY_ERROR: Mapping[type[PromptclipError], int] = MappingProxyType({
    PromptclipError: DEFAULT_STATUS,
    ImageDecodeError: 400,
    AuthError: 401,
    UnknownClassError: 404,
    PayloadTooLargeError: 413,
    UnsupportedMediaTypeError: 415,
    ClassNameError: 422,
    RequestError: 422,
    BundleError: 500,
    ClassStateError: 503,
    DeadlineExceededError: 504,
    RuntimeUnavailableError: 500,
    ServiceConfigError: 500,
})


def http_status(exc: PromptclipError) -> int:
    """The status ``exc`` is answered with: its most specific class in :data:`STATUS_BY_ERROR`."""
    for cls in type(exc).__mro__:
        status = STATUS_BY_ERROR.get(cls)
        if status is not None:
            return status
    return DEFAULT_STATUS


def error_body(exc: PromptclipError) -> dict[str, str]:
    """JSON body of the error response: ``{"error": <type name>, "message": ..., "field": ...}`` (``field`` when
    the error names the input at fault)."""
    out = {"error": type(exc).__name__, "message": str(exc)}
    if exc.field is not None:
        out["field"] = exc.field
    return out


def error_response(exc: PromptclipError) -> JSONResponse:
    """The complete HTTP answer to ``exc``: status, JSON body, and ``WWW-Authenticate`` for an :class:`AuthError`."""
    headers = {"WWW-Authenticate": 'Bearer realm="promptclip"'} if isinstance(exc, AuthError) else None
    return JSONResponse(error_body(exc), status_code=http_status(exc), headers=headers)


#: What a client is told about a server-side fault (5xx), by error type; the details are in the server log.
SERVER_FAULT_MESSAGES: Mapping[type[PromptclipError], str] = MappingProxyType({
    ClassStateError: "the server's class list is unreadable or corrupt; the service is not ready until its operator "
                     "fixes it (details in the server log) -- retry later",
    BundleError: "the server's model bundle cannot be used (details in the server log)",
    RuntimeUnavailableError: "the server's inference runtime is unavailable (details in the server log)",
    ServiceConfigError: "the server is misconfigured (details in the server log)",
})


def public_error_response(exc: PromptclipError) -> JSONResponse:
    """:func:`error_response` for answering a client: a 5xx body carries no server detail (no paths), only the
    error type and :data:`SERVER_FAULT_MESSAGES`' sentence; a 4xx answer is :func:`error_response` itself."""
    status = http_status(exc)
    if status < 500:
        return error_response(exc)
    message = next((SERVER_FAULT_MESSAGES[c] for c in type(exc).__mro__ if c in SERVER_FAULT_MESSAGES),
                   "internal server error (details in the server log)")
    return JSONResponse({"error": type(exc).__name__, "message": message}, status_code=status)
