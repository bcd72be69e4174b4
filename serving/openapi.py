"""The service's OpenAPI 3.0 document, written from the same models the service uses (served at ``GET /docs.json``
and ``GET /openapi.json``; BentoML's own document listed 200/400/404/500 only and typed uploads ``type: file``).

Every operation lists every status it can answer with the real error body (:class:`~serving.schemas.ErrorResponse`),
uploads are ``type: string, format: binary`` in a ``multipart/form-data`` body, and what the service refuses
outright (``names: []``, unknown fields) is refused by the schema too. Limits set by the environment (names per
request, images per batch, pixels) are not in the schema; their refusals (413, 422) are.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from .schemas import (
    AddClassesResponse,
    ClassifyBatchResponse,
    ClassifyResponse,
    ClassListResponse,
    ErrorResponse,
    HealthResponse,
    RemoveClassesResponse,
)

__all__ = ["openapi_document", "ERROR_STATUSES"]

#: Why each error status is answered (the body is always ErrorResponse).
ERROR_STATUSES: dict[int, str] = {
    400: "An upload is not a decodable image (ImageDecodeError).",
    401: "Class changes need `Authorization: Bearer <token>` (AuthError); without a configured token they are "
         "refused unless the server opened writes on purpose.",
    404: "A class to remove is not registered (UnknownClassError).",
    413: "The request is too large: body bytes, names or ad-hoc classes per request, images or decoded pixels per "
         "request (PayloadTooLargeError).",
    415: "Wrong Content-Type for this endpoint (UnsupportedMediaTypeError).",
    422: "A field is missing, unknown or out of range, or a class name is invalid (RequestError, ClassNameError).",
    500: "A server-side fault (BundleError, RuntimeUnavailableError, ServiceConfigError); no server detail is "
         "included.",
    503: "The class list is unreadable on the server (ClassStateError); readiness fails until it is fixed.",
    504: "The request ran past its deadline and its work was abandoned (DeadlineExceededError), or past BentoML's "
         "timeout (BentoML's body: `error` only).",
}
#: BentoML's body for a request past ``traffic.timeout``.
_TIMEOUT_BODY = {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}

_CLASSIFY_ERRORS = (400, 413, 415, 422, 500, 503, 504)
_WRITE_ERRORS = (401, 413, 415, 422, 500, 503, 504)
_ADD_ERRORS = (400, *_WRITE_ERRORS)
_READ_ERRORS = (413, 415, 422, 500, 503, 504)

_TOP_K = {"type": "integer", "minimum": 1,
          "description": "Classes to return per image, 1..number of classes (default: min(5, number of classes))."}
_CLASSES = {"type": "string",
            "description": "Ad-hoc class list for this request only: a JSON array of names in one field, one "
                           "comma-separated value (`red circle,blue square`), or the field repeated once per name."}
_KEEP_RATE = {"type": "number", "minimum": 0, "exclusiveMinimum": True, "maximum": 1,
              "description": "Open-set answers: share of images of listed classes to keep (1 never answers "
                             "none_of_these); default: PROMPTCLIP_KEEP_RATE, else the bundle's calibration."}
_RULE = {"type": "string", "enum": ["max_cosine", "msp"],
         "description": "Open-set score: best class's cosine or its softmax probability; default: "
                        "PROMPTCLIP_OPEN_SET_RULE, else the bundle's calibration."}
_IMAGE = {"type": "string", "format": "binary", "description": "An image file (JPEG, PNG, WebP, GIF, BMP, TIFF)."}


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _json_body(schema: dict[str, Any], *, required: bool) -> dict[str, Any]:
    return {"required": required, "content": {"application/json": {"schema": schema}}}


def _multipart(properties: dict[str, Any], required: list[str], file_field: str) -> dict[str, Any]:
    return {"required": True, "content": {"multipart/form-data": {
        "schema": {"type": "object", "properties": properties, "required": required, "additionalProperties": False},
        "encoding": {file_field: {"contentType": "image/*, application/octet-stream"}},
    }}}


def _responses(ok: type[BaseModel], errors: tuple[int, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {"200": {"description": "OK", "content": {"application/json": {"schema": _ref(ok)}}}}
    for status in errors:
        schema = _TIMEOUT_BODY if status == 504 else _ref(ErrorResponse)
        out[str(status)] = {"description": ERROR_STATUSES[status], "content": {"application/json": {"schema": schema}}}
    return out


def _components() -> dict[str, Any]:
    schemas: dict[str, Any] = {}
    for model in (ClassifyResponse, ClassifyBatchResponse, ClassListResponse, AddClassesResponse,
                  RemoveClassesResponse, HealthResponse, ErrorResponse):
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    return {"schemas": _openapi30(schemas),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "The server's PROMPTCLIP_API_TOKEN."}}}


def _openapi30(node: Any) -> Any:
    """pydantic writes JSON Schema 2020-12 (``anyOf: [X, {type: null}]``); OpenAPI 3.0 says ``nullable: true``."""
    if isinstance(node, list):
        return [_openapi30(n) for n in node]
    if not isinstance(node, dict):
        return node
    node = {k: _openapi30(v) for k, v in node.items()}
    options = node.get("anyOf")
    if isinstance(options, list) and any(o == {"type": "null"} for o in options):
        rest = [o for o in options if o != {"type": "null"}]
        node.pop("anyOf")
        if len(rest) == 1 and "$ref" not in rest[0]:
            node.update(rest[0])
        else:
            node["anyOf"] = rest
        node["nullable"] = True
    return node


def openapi_document(title: str = "promptclip", version: str = "1") -> dict[str, Any]:
    """The OpenAPI 3.0.3 document of the service."""
    empty = {"type": "object", "additionalProperties": False, "description": "No parameters: `{}` or an empty body."}
    names = {"type": "object", "additionalProperties": False, "required": ["names"], "properties": {
        "names": {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1},
                  "description": "Class names (NFC; underscores and runs of whitespace become one space; case is "
                                 "kept but ignored when comparing)."}}}
    bearer = [{"bearer": []}]
    paths: dict[str, Any] = {
        "/classify": {"post": {
            "summary": "Classify one image", "operationId": "classify",
            "requestBody": _multipart({"image": _IMAGE, "top_k": _TOP_K, "classes": _CLASSES, "keep_rate": _KEEP_RATE,
                                       "open_set_rule": _RULE}, ["image"], "image"),
            "responses": _responses(ClassifyResponse, _CLASSIFY_ERRORS)}},
        "/classify_batch": {"post": {
            "summary": "Classify several images", "operationId": "classify_batch",
            "requestBody": _multipart({"images": {"type": "array", "minItems": 1, "items": _IMAGE}, "top_k": _TOP_K,
                                       "classes": _CLASSES, "keep_rate": _KEEP_RATE, "open_set_rule": _RULE},
                                      ["images"], "images"),
            "responses": _responses(ClassifyBatchResponse, _CLASSIFY_ERRORS)}},
        "/classes": {"post": {
            "summary": "The registered class list and its version", "operationId": "classes",
            "requestBody": _json_body(empty, required=False),
            "responses": _responses(ClassListResponse, _READ_ERRORS)}},
        "/add_classes": {"post": {
            "summary": "Register classes by name (JSON) or one class from example images (multipart); needs the "
                       "bearer token", "operationId": "add_classes", "security": bearer,
            "requestBody": {"required": True, "content": {
                **_json_body(names, required=True)["content"],
                **_multipart({"name": {"type": "string", "minLength": 1, "description": "The class name."},
                              "images": {"type": "array", "minItems": 1, "items": _IMAGE,
                                         "description": "1..N example images (PROMPTCLIP_MAX_CLASS_IMAGES, default "
                                                        "32)."},
                              "text_weight": {"type": "number", "minimum": 0, "maximum": 1,
                                              "description": "Blend weight of the name's text embedding (0 = images "
                                                             "only, the default; 1 = name only)."},
                              "modality_shift": {"type": "boolean",
                                                 "description": "Shift the images' prototype into the text cone "
                                                                "with the bundle's calibration images (default "
                                                                "true)."}},
                             ["name", "images"], "images")["content"]}},
            "responses": _responses(AddClassesResponse, _ADD_ERRORS)}},
        "/remove_classes": {"post": {
            "summary": "Unregister classes (needs the bearer token)", "operationId": "remove_classes",
            "security": bearer, "requestBody": _json_body(names, required=True),
            "responses": _responses(RemoveClassesResponse, (404, *_WRITE_ERRORS))}},
        "/healthz": {"post": {
            "summary": "Health details (JSON)", "operationId": "healthz",
            "requestBody": _json_body(empty, required=False),
            "responses": _responses(HealthResponse, _READ_ERRORS)}},
        "/info": {"get": {
            "summary": "Health details (JSON), over GET", "operationId": "info",
            "responses": _responses(HealthResponse, (500, 503))}},
        "/readyz": {"get": {
            "summary": "Readiness: bundle loaded, runtime warm, class state readable", "operationId": "readyz",
            "responses": {"200": {"description": "Ready", "content": {"text/plain": {"schema": {"type": "string"}}}},
                          "503": {"description": "Not ready (e.g. the class state is unreadable)",
                                  "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
        "/livez": {"get": {
            "summary": "Liveness", "operationId": "livez",
            "responses": {"200": {"description": "Alive", "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
    }
    description = ("Open-vocabulary image classification (promptclip). Try the model in a browser: [/ui](/ui), "
                   "a page served by this service.")
    return {"openapi": "3.0.3", "info": {"title": title, "version": version, "description": description},
            "paths": paths, "components": _components()}
