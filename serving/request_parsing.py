"""HTTP request intake of the service: parsing and validating request bodies, and the upload size limit.

Request bodies are parsed here rather than by BentoML's serde, because BentoML 1.4 answers some plain user
mistakes with a 500: a multipart field with the wrong name holding binary data (it ``json.loads`` every non-file
field), or a text value where a file is expected (it tries to download it as a URL). Its own 4xx bodies also have
another shape. A bad request never raises out of an input spec: the error travels to the API method in
:attr:`ParsedRequest.error` and is answered there (:mod:`serving.http_errors`).
"""
from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, ClassVar

import bentoml
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.datastructures import Headers, UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.responses import JSONResponse

from .errors import PayloadTooLargeError, PromptclipError, RequestError, UnsupportedMediaTypeError
from .http_errors import error_response
from .schemas import ClassifyParams, ClassNamesRequest, EmptyRequest, ImageClassParams
from .settings import max_upload_bytes_from_env

__all__ = ["ParsedRequest", "InputSpec", "ClassifyInput", "ClassifyBatchInput", "ClassNamesInput",
           "AddClassesInput", "EmptyInput", "UploadLimitMiddleware"]


# -- request parsing -------------------------------------------------------------------------------


class ParsedRequest:
    """What an input spec hands to an API method: validated params and uploads, or the parse error."""

    __slots__ = ("params", "files", "error")

    def __init__(self, params: BaseModel | None = None, files: list[bytes] | None = None,
                 error: PromptclipError | None = None) -> None:
        self.params = params
        self.files = files or []
        self.error = error


def _media_type(headers: Headers) -> str:
    return headers.get("content-type", "").split(";")[0].strip().lower()


def _validation_error(exc: ValidationError, model: type[BaseModel]) -> RequestError:
    """The first pydantic error as a :class:`RequestError` naming the field."""
    errors = exc.errors(include_url=False)
    # A misspelt field shows up as "extra" plus "missing": name the misspelling first.
    err = next((e for e in errors if e.get("type") == "extra_forbidden"), errors[0])
    loc = [str(x) for x in err.get("loc", ())]
    field = ".".join(loc) or None
    expected = ", ".join(model.model_fields) or "no fields"
    kind = err.get("type")
    if kind == "json_invalid":
        return RequestError(f"request body is not valid JSON ({err.get('msg')}); send a JSON object with "
                            "Content-Type: application/json")
    if kind == "model_type" or kind == "model_attributes_type":
        return RequestError(f"request body must be a JSON object with field(s): {expected}")
    if kind == "extra_forbidden":
        return RequestError(f"unknown field {field!r}; this endpoint accepts: {expected}", field=field)
    if kind == "missing":
        return RequestError(f"field {field!r} is required", field=field)
    return RequestError(f"field {field!r}: {err.get('msg')}", field=loc[0] if loc else None)


class InputSpec(bentoml.IODescriptor):
    """BentoML input spec that parses and validates the HTTP request itself (see the module docstring).

    Never raises for a bad request: the error travels to the API method in ``ParsedRequest.error``
    so that it is answered with its own status and JSON body.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    parsed: Any = None

    #: pydantic model of the JSON body / the non-file form fields.
    params_model: ClassVar[type[BaseModel]] = EmptyRequest
    #: multipart field holding the image(s); ``None`` for JSON endpoints.
    file_field: ClassVar[str | None] = None
    #: whether ``file_field`` holds exactly one file.
    single_file: ClassVar[bool] = True
    #: form fields that are lists (repeated field, or one JSON array).
    list_fields: ClassVar[tuple[str, ...]] = ()
    #: form fields taken as text verbatim (a class name "123" or "true" stays a string).
    text_fields: ClassVar[tuple[str, ...]] = ()
    #: the curl example in multipart error messages (``None``: the classify endpoints').
    example: ClassVar[str | None] = None

    @classmethod
    def model_json_schema(cls, *args: Any, **kwargs: Any) -> dict[str, Any]:
        schema = cls.params_model.model_json_schema(*args, **kwargs)
        schema["title"] = cls.__name__.lstrip("_")
        if cls.file_field is not None:
            file_schema = {"type": "string", "format": "binary"}  # OpenAPI 3 (``type: file`` is Swagger 2)
            schema.setdefault("properties", {})[cls.file_field] = (
                file_schema if cls.single_file else {"type": "array", "items": file_schema})
            schema["required"] = [cls.file_field, *schema.get("required", [])]
        return schema

    @classmethod
    def mime_type(cls) -> str:
        return "multipart/form-data" if cls.file_field is not None else "application/json"

    @classmethod
    async def from_http_request(cls, request: Any, serde: Any) -> InputSpec:
        try:
            parsed = await cls._parse(request)
        except PromptclipError as exc:
            parsed = ParsedRequest(error=exc)
        return cls.model_construct(parsed=parsed)

    @classmethod
    async def _parse(cls, request: Any) -> ParsedRequest:
        """The request's body: the multipart form of an endpoint with files, else JSON."""
        if cls.file_field is not None:
            return await cls._parse_multipart(request)
        return await cls._parse_json(request)

    @classmethod
    async def _parse_json(cls, request: Any) -> ParsedRequest:
        if _media_type(request.headers) == "multipart/form-data":
            raise UnsupportedMediaTypeError(
                f"this endpoint takes a JSON body (Content-Type: application/json) with field(s) "
                f"{', '.join(cls.params_model.model_fields) or 'none'}, not a multipart form")
        body = await request.body()
        try:
            params = cls.params_model.model_validate_json(body if body.strip() else b"{}")
        except ValidationError as exc:
            raise _validation_error(exc, cls.params_model) from None
        return ParsedRequest(params=params)

    @classmethod
    async def _parse_multipart(cls, request: Any) -> ParsedRequest:
        field = cls.file_field
        assert field is not None
        endpoint = "classify" if cls.single_file else "classify_batch"
        example = cls.example or f"curl -F {field}=@photo.jpg -F top_k=3 http://HOST/{endpoint}"
        media = _media_type(request.headers)
        if media != "multipart/form-data":
            raise UnsupportedMediaTypeError(
                f"send the image{'' if cls.single_file else 's'} as multipart/form-data field {field!r} "
                f"(got Content-Type {media or 'none'!r}), e.g. `{example}`", field=field)
        try:
            form = await request.form()
        except (MultiPartException, HTTPException) as exc:
            detail = getattr(exc, "message", None) or getattr(exc, "detail", None) or str(exc)
            raise RequestError(f"malformed multipart body: {detail}") from None
        allowed = tuple(cls.params_model.model_fields)
        files: list[bytes] = []
        values: dict[str, list[str]] = {}
        for key, value in form.multi_items():
            if key == field:
                if not isinstance(value, UploadFile):
                    raise RequestError(
                        f"form field {field!r} must be a file upload, got a text value; e.g. `{example}`", field=field)
                files.append(await value.read())
            elif key in allowed:
                if isinstance(value, UploadFile):
                    raise RequestError(f"form field {key!r} must be a text value, got a file", field=key)
                values.setdefault(key, []).append(value)
            else:
                raise RequestError(
                    f"unknown form field {key!r}; this endpoint accepts {field!r} (file"
                    f"{'' if cls.single_file else 's'}) and {', '.join(map(repr, allowed))}", field=key)
        if not files:
            raise RequestError(f"no image uploaded: send it as multipart file field {field!r}, e.g. `{example}`",
                               field=field)
        if cls.single_file and len(files) > 1:
            raise RequestError(f"this endpoint classifies one image but {len(files)} were uploaded; use "
                               "/classify_batch with field 'images' for several", field=field)
        data: dict[str, Any] = {}
        for key, items in values.items():
            if key in cls.list_fields:
                data[key] = _form_list(items)
            elif len(items) > 1:
                raise RequestError(f"form field {key!r} was given {len(items)} times; give it once", field=key)
            elif key in cls.text_fields:
                data[key] = items[0]
            else:
                data[key] = _form_scalar(items[0])
        try:
            params = cls.params_model.model_validate(data)
        except ValidationError as exc:
            raise _validation_error(exc, cls.params_model) from None
        return ParsedRequest(params=params, files=files)


def _form_scalar(text: str) -> Any:
    """A form value as JSON when it is JSON (``"3"`` -> 3), else the string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _form_list(items: list[str]) -> Any:
    """A list form field: one JSON array (``["red circle", "blue square"]``), one comma-separated value
    (``red circle,blue square``, as the CLI's ``--classes``), or one name per repeated field (a name with a comma
    needs the JSON array or the repeated field)."""
    if len(items) == 1 and items[0].lstrip().startswith("["):
        try:
            return json.loads(items[0])
        except ValueError:
            raise RequestError(f"form value {items[0][:80]!r} starts like a JSON array but is not valid JSON; send "
                               "a JSON array of strings or repeat the field once per name", field="classes") from None
    if len(items) == 1:
        return items[0].split(",")
    return list(items)


class ClassifyInput(InputSpec):
    params_model = ClassifyParams
    file_field = "image"
    single_file = True
    list_fields = ("classes",)


class ClassifyBatchInput(InputSpec):
    params_model = ClassifyParams
    file_field = "images"
    single_file = False
    list_fields = ("classes",)


class ClassNamesInput(InputSpec):
    params_model = ClassNamesRequest


class _ImageClassForm(InputSpec):
    """The multipart form of ``/add_classes``: ``name``, 1..N ``images``, optional ``text_weight``, ``modality_shift``.
    """

    params_model = ImageClassParams
    file_field = "images"
    single_file = False
    text_fields = ("name",)
    example = ("curl -H 'Authorization: Bearer TOKEN' -F name='my part' -F images=@a.jpg -F images=@b.jpg "
               "http://HOST/add_classes")


class AddClassesInput(InputSpec):
    """``/add_classes`` takes either body: JSON ``{"names": [...]}`` (classes by name) or a multipart form
    (one class from example images, :class:`_ImageClassForm`); the Content-Type says which. The API method tells
    them apart by the type of ``ParsedRequest.params`` (:class:`ClassNamesRequest` or :class:`ImageClassParams`)."""

    params_model = ClassNamesRequest

    @classmethod
    async def _parse(cls, request: Any) -> ParsedRequest:
        if _media_type(request.headers) == "multipart/form-data":
            return await _ImageClassForm._parse_multipart(request)
        return await cls._parse_json(request)


class EmptyInput(InputSpec):
    params_model = EmptyRequest


# -- upload limit ----------------------------------------------------------------------------------


class UploadLimitMiddleware:
    """ASGI middleware answering 413 for request bodies over ``PROMPTCLIP_MAX_UPLOAD_BYTES``.

    Checks ``Content-Length`` up front; a body without one (chunked) is read up to the limit
    before the app sees it. With ``max_bytes=None`` the limit is read from the environment per
    request (a cheap lookup; the service validates the variable at startup).
    """

    def __init__(self, app: Any, max_bytes: int | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _limit(self) -> int:
        return max_upload_bytes_from_env() if self.max_bytes is None else int(self.max_bytes)

    @staticmethod
    def _too_large(size: str, limit: int) -> JSONResponse:
        err = PayloadTooLargeError(
            f"request body is {size} bytes; this server accepts at most {limit:,} "
            "(PROMPTCLIP_MAX_UPLOAD_BYTES): send smaller images or fewer per request")
        return error_response(err)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        limit = self._limit()
        length = Headers(scope=scope).get("content-length")
        if length is not None:
            if length.strip().isdigit() and int(length) > limit:
                await self._too_large(f"{int(length):,}", limit)(scope, receive, send)
                return
            await self.app(scope, receive, send)
            return
        # No Content-Length (chunked): buffer up to the limit, then replay to the app.
        chunks: list[bytes] = []
        total = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                await self.app(scope, _replay([message]), send)
                return
            body = message.get("body", b"")
            total += len(body)
            if total > limit:
                await self._too_large(f"more than {limit:,}", limit)(scope, receive, send)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay([{"type": "http.request", "body": b"".join(chunks), "more_body": False}],
                                      receive), send)


def _replay(messages: list[dict], then: Callable | None = None) -> Callable:
    pending = list(messages)

    async def receive() -> dict:
        if pending:
            return pending.pop(0)
        if then is not None:
            return await then()
        return {"type": "http.disconnect"}

    return receive
