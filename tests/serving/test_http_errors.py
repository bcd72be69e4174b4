"""serving.http_errors: the one table from error type to HTTP status, and the JSON error body."""
from __future__ import annotations

import json

import pytest

from serving.classes import ClassStateError
from serving.errors import (
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
from serving.http_errors import DEFAULT_STATUS, error_body, error_response, http_status
from training.errors import ArtifactError, DatasetError, RegistryError


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (PromptclipError, 400),
        (ImageDecodeError, 400),
        (AuthError, 401),
        (UnknownClassError, 404),
        (PayloadTooLargeError, 413),  # a RequestError, but the more specific class wins
        (UnsupportedMediaTypeError, 415),
        (ClassNameError, 422),
        (RequestError, 422),
        (BundleError, 500),
        (ClassStateError, 503),  # issue 16: the service is not ready while its class state is unreadable
        (RuntimeUnavailableError, 500),
        (ServiceConfigError, 500),
    ],
)
def test_status_of_each_error_type(error, status):
    assert http_status(error("x")) == status


def test_unknown_subclasses_fall_back_to_their_nearest_mapped_base():
    class Custom(PromptclipError):
        pass

    class TooBig(PayloadTooLargeError):
        pass

    assert http_status(Custom("x")) == DEFAULT_STATUS == 400
    assert http_status(TooBig("x")) == 413
    for training_error in (ArtifactError, DatasetError, RegistryError):
        assert http_status(training_error("x")) == 400


def test_errors_have_no_http_semantics():
    for cls in (PromptclipError, BundleError, RequestError, PayloadTooLargeError, ClassStateError):
        assert not hasattr(cls, "http_status") and not hasattr(cls, "to_dict")


def test_error_body_and_response():
    assert error_body(RequestError("top_k must be >= 1", field="top_k")) == {
        "error": "RequestError", "message": "top_k must be >= 1", "field": "top_k"}
    assert error_body(BundleError("bad hash")) == {"error": "BundleError", "message": "bad hash"}
    assert error_body(ImageDecodeError("not an image"))["field"] == "image"  # the class's default field
    resp = error_response(AuthError("no token"))
    assert resp.status_code == 401 and resp.headers["WWW-Authenticate"] == 'Bearer realm="promptclip"'
    assert json.loads(resp.body) == {"error": "AuthError", "message": "no token"}
    resp = error_response(PayloadTooLargeError("too big"))
    assert resp.status_code == 413 and "WWW-Authenticate" not in resp.headers
