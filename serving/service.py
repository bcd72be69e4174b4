"""BentoML 1.4 HTTP service for open-vocabulary image classification (torch-free).

Run with ``PROMPTCLIP_BUNDLE=/path/to/bundle bentoml serve serving.service:PromptclipService``.

Configuration (environment, read when a worker starts):

* ``PROMPTCLIP_BUNDLE`` (required): deploy bundle directory written by ``promptclip export``.
* ``PROMPTCLIP_STATE_DIR``: directory persisting runtime class changes (shared by all workers);
  unset = changes live in memory of each worker and are lost on restart.
* ``PROMPTCLIP_API_TOKEN``: when set, ``/add_classes`` and ``/remove_classes`` need
  ``Authorization: Bearer <token>``; reads stay open.
* ``PROMPTCLIP_MAX_UPLOAD_BYTES``: largest request body (default 32 MiB; answered with 413).
* ``PROMPTCLIP_MAX_BATCH_IMAGES`` (default 32), ``PROMPTCLIP_RUNTIME`` (``auto``/``ort``),
  ``PROMPTCLIP_THREADS`` (request threads per worker, read at import; default 4).

Endpoints (BentoML API routes are all ``POST``):

* ``/classify``: multipart ``image`` (one file), optional ``top_k``, optional ``classes``.
* ``/classify_batch``: multipart ``images`` (repeated), optional ``top_k`` and ``classes``.
* ``/classes``: the active class list. ``/add_classes``, ``/remove_classes``: JSON ``{"names": [...]}``.
* ``/healthz``: method, number of classes, runtime and providers. (``GET /healthz``, ``/livez`` and
  ``/readyz`` are BentoML's built-in probes and answer an empty 200.)

Errors: every :class:`~serving.errors.PromptclipError` is answered with its ``http_status`` and
``to_dict()`` JSON body. Request bodies are parsed here rather than by BentoML's serde, because
BentoML 1.4 answers some plain user mistakes with a 500: a multipart field with the wrong name
holding binary data (it ``json.loads`` every non-file field), or a text value where a file is
expected (it tries to download it as a URL). Its own 4xx bodies also have another shape.
"""
from __future__ import annotations

import hmac
import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import bentoml
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.datastructures import Headers, UploadFile
from starlette.responses import JSONResponse

from .classifier import Classifier
from .errors import (AuthError, PayloadTooLargeError, PromptclipError, RequestError, ServiceConfigError,
                     UnsupportedMediaTypeError)
from .schemas import (
    AddClassesResponse,
    ClassifyBatchResponse,
    ClassifyParams,
    ClassifyResponse,
    ClassListResponse,
    ClassNamesRequest,
    EmptyRequest,
    HealthResponse,
    RemoveClassesResponse,
)

__all__ = ["PromptclipService", "ServiceSettings", "ServiceConfigError", "UploadLimitMiddleware"]

logger = logging.getLogger(__name__)

DEFAULT_MAX_UPLOAD_BYTES = 32 * 1024 * 1024
DEFAULT_MAX_BATCH_IMAGES = 32


# -- configuration ---------------------------------------------------------------------------------


def _env_int(environ: Mapping[str, str], name: str, default: int, *, minimum: int = 1) -> int:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ServiceConfigError(f"{name}={raw!r} is not an integer; set it to a whole number (e.g. {default})") from None
    if value < minimum:
        raise ServiceConfigError(f"{name}={value} must be >= {minimum}")
    return value


@dataclass(frozen=True)
class ServiceSettings:
    """Service configuration, normally from ``PROMPTCLIP_*`` environment variables."""

    bundle: Path
    state_dir: Path | None = None
    api_token: str | None = None
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    max_batch_images: int = DEFAULT_MAX_BATCH_IMAGES
    runtime: str = "auto"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ServiceSettings:
        """Read the settings; raises :class:`ServiceConfigError` when ``PROMPTCLIP_BUNDLE`` is unset or a value is bad."""
        env = os.environ if environ is None else environ
        bundle = env.get("PROMPTCLIP_BUNDLE", "").strip()
        if not bundle:
            raise ServiceConfigError(
                "PROMPTCLIP_BUNDLE is not set: point it at the deploy bundle directory written by `promptclip export` "
                "(e.g. PROMPTCLIP_BUNDLE=/models/my-bundle bentoml serve serving.service:PromptclipService)")
        token = env.get("PROMPTCLIP_API_TOKEN")
        if token is not None and not token.strip():
            logger.warning("PROMPTCLIP_API_TOKEN is set but empty: treating it as unset")
            token = None
        state_dir = env.get("PROMPTCLIP_STATE_DIR", "").strip()
        return cls(
            bundle=Path(bundle),
            state_dir=Path(state_dir) if state_dir else None,
            api_token=token.strip() if token else None,
            max_upload_bytes=max_upload_bytes_from_env(env),
            max_batch_images=_env_int(env, "PROMPTCLIP_MAX_BATCH_IMAGES", DEFAULT_MAX_BATCH_IMAGES),
            runtime=env.get("PROMPTCLIP_RUNTIME", "auto").strip() or "auto",
        )


def max_upload_bytes_from_env(environ: Mapping[str, str] | None = None) -> int:
    """``PROMPTCLIP_MAX_UPLOAD_BYTES`` (default 32 MiB)."""
    env = os.environ if environ is None else environ
    return _env_int(env, "PROMPTCLIP_MAX_UPLOAD_BYTES", DEFAULT_MAX_UPLOAD_BYTES)


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


class _InputSpec(bentoml.IODescriptor):
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

    @classmethod
    def model_json_schema(cls, *args: Any, **kwargs: Any) -> dict[str, Any]:
        schema = cls.params_model.model_json_schema(*args, **kwargs)
        schema["title"] = cls.__name__.lstrip("_")
        if cls.file_field is not None:
            file_schema = {"type": "file", "format": "image"}
            schema.setdefault("properties", {})[cls.file_field] = (
                file_schema if cls.single_file else {"type": "array", "items": file_schema})
            schema["required"] = [cls.file_field, *schema.get("required", [])]
        return schema

    @classmethod
    def mime_type(cls) -> str:
        return "multipart/form-data" if cls.file_field is not None else "application/json"

    @classmethod
    async def from_http_request(cls, request: Any, serde: Any) -> _InputSpec:
        try:
            if cls.file_field is not None:
                parsed = await cls._parse_multipart(request)
            else:
                parsed = await cls._parse_json(request)
        except PromptclipError as exc:
            parsed = ParsedRequest(error=exc)
        return cls.model_construct(parsed=parsed)

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
        from starlette.exceptions import HTTPException
        from starlette.formparsers import MultiPartException

        field = cls.file_field
        assert field is not None
        example = f"curl -F {field}=@photo.jpg -F top_k=3 http://HOST/{'classify' if cls.single_file else 'classify_batch'}"
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
                    raise RequestError(f"form field {field!r} must be a file upload, got a text value; e.g. `{example}`",
                                       field=field)
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
    """A list form field: one JSON array, or one name per repeated field."""
    if len(items) == 1 and items[0].lstrip().startswith("["):
        try:
            return json.loads(items[0])
        except ValueError:
            raise RequestError(f"form value {items[0][:80]!r} starts like a JSON array but is not valid JSON; send "
                               "a JSON array of strings or repeat the field once per name", field="classes") from None
    return list(items)


class _ClassifyInput(_InputSpec):
    params_model = ClassifyParams
    file_field = "image"
    single_file = True
    list_fields = ("classes",)


class _ClassifyBatchInput(_InputSpec):
    params_model = ClassifyParams
    file_field = "images"
    single_file = False
    list_fields = ("classes",)


class _ClassNamesInput(_InputSpec):
    params_model = ClassNamesRequest


class _EmptyInput(_InputSpec):
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
        return JSONResponse(err.to_dict(), status_code=err.http_status)

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


# -- the service -----------------------------------------------------------------------------------


@bentoml.service(
    name="promptclip",
    traffic={"timeout": 120},
    threads=_env_int(os.environ, "PROMPTCLIP_THREADS", 4),
)
class PromptclipService:
    """Open-vocabulary image classification with runtime-extensible classes."""

    def __init__(self) -> None:
        # BentoML's server logging config leaves the root logger at WARNING: show our INFO lines
        # (bundle loaded, runtime providers, class changes) unless the operator configured "serving".
        package_logger = logging.getLogger("serving")
        if package_logger.level == logging.NOTSET:
            package_logger.setLevel(logging.INFO)
        self.settings = ServiceSettings.from_env()
        s = self.settings
        self.classifier = Classifier.from_bundle(
            s.bundle, state_dir=s.state_dir, runtime=s.runtime, max_image_bytes=s.max_upload_bytes)
        if s.api_token is None:
            logger.warning("PROMPTCLIP_API_TOKEN is not set: /add_classes and /remove_classes are open to every "
                           "client that can reach this service")
        if s.state_dir is None:
            logger.warning("PROMPTCLIP_STATE_DIR is not set: class changes are per worker and lost on restart")
        info = self.classifier.info()
        logger.info("promptclip service ready: method=%s, %d classes, runtime=%s %s", info["method"],
                    info["num_classes"], info["runtime"], info["providers"])

    # -- plumbing ------------------------------------------------------------------------------

    def _respond(self, ctx: bentoml.Context, parsed: ParsedRequest, handler: Callable[[ParsedRequest], Any], *,
                 mutating: bool = False) -> Any:
        """Run ``handler``; answer a :class:`PromptclipError` with its status and JSON body."""
        try:
            if mutating:
                self._check_auth(ctx)
            if parsed.error is not None:
                raise parsed.error
            return handler(parsed)
        except PromptclipError as exc:
            status = exc.http_status
            if status >= 500:
                logger.error("%s %s -> %d %s: %s", ctx.request.method, ctx.request.url.path, status,
                             type(exc).__name__, exc)
            else:  # the access log already records the status
                logger.debug("%s %s -> %d %s: %s", ctx.request.method, ctx.request.url.path, status,
                             type(exc).__name__, exc)
            ctx.response.status_code = status  # BentoML copies the context status onto the response
            headers = {"WWW-Authenticate": 'Bearer realm="promptclip"'} if isinstance(exc, AuthError) else None
            return JSONResponse(exc.to_dict(), status_code=status, headers=headers)

    def _check_auth(self, ctx: bentoml.Context) -> None:
        token = self.settings.api_token
        if token is None:
            return
        header = ctx.request.headers.get("authorization", "")
        if not header:
            raise AuthError("this endpoint changes the class list and needs the header "
                            "'Authorization: Bearer <token>' (the server's PROMPTCLIP_API_TOKEN)")
        scheme, _, value = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise AuthError("malformed Authorization header: send 'Authorization: Bearer <token>'")
        if not hmac.compare_digest(value.strip().encode("utf-8"), token.encode("utf-8")):
            raise AuthError("invalid API token in the Authorization header")

    def _classify(self, parsed: ParsedRequest) -> list[list[dict]]:
        params = parsed.params
        assert isinstance(params, ClassifyParams)
        return self.classifier.classify_bytes(parsed.files, top_k=params.top_k, class_names=params.classes)

    # -- endpoints -----------------------------------------------------------------------------

    @bentoml.api(route="/classify", input_spec=_ClassifyInput)
    def classify(self, parsed: ParsedRequest, ctx: bentoml.Context) -> ClassifyResponse:
        """Classify one image (multipart field ``image``; optional ``top_k``, ``classes``)."""
        return self._respond(ctx, parsed, lambda p: ClassifyResponse(predictions=self._classify(p)[0]))

    @bentoml.api(route="/classify_batch", input_spec=_ClassifyBatchInput)
    def classify_batch(self, parsed: ParsedRequest, ctx: bentoml.Context) -> ClassifyBatchResponse:
        """Classify several images (multipart field ``images``, repeated; optional ``top_k``, ``classes``)."""

        def handler(p: ParsedRequest) -> ClassifyBatchResponse:
            limit = self.settings.max_batch_images
            if len(p.files) > limit:
                raise RequestError(f"{len(p.files)} images uploaded; one request may carry at most {limit} "
                                   "(PROMPTCLIP_MAX_BATCH_IMAGES) -- split the batch", field="images")
            return ClassifyBatchResponse(results=self._classify(p))

        return self._respond(ctx, parsed, handler)

    @bentoml.api(route="/classes", input_spec=_EmptyInput)
    def classes(self, parsed: ParsedRequest, ctx: bentoml.Context) -> ClassListResponse:
        """The active class list and its version."""
        return self._respond(ctx, parsed, lambda p: ClassListResponse(**self.classifier.list_classes()))

    @bentoml.api(route="/add_classes", input_spec=_ClassNamesInput)
    def add_classes(self, parsed: ParsedRequest, ctx: bentoml.Context) -> AddClassesResponse:
        """Register new classes: JSON ``{"names": [...]}`` (needs the bearer token when one is configured)."""
        return self._respond(ctx, parsed, lambda p: AddClassesResponse(**self.classifier.add_classes(p.params.names)),
                             mutating=True)

    @bentoml.api(route="/remove_classes", input_spec=_ClassNamesInput)
    def remove_classes(self, parsed: ParsedRequest, ctx: bentoml.Context) -> RemoveClassesResponse:
        """Unregister classes: JSON ``{"names": [...]}`` (needs the bearer token when one is configured)."""
        return self._respond(
            ctx, parsed, lambda p: RemoveClassesResponse(**self.classifier.remove_classes(p.params.names)),
            mutating=True)

    @bentoml.api(route="/healthz", input_spec=_EmptyInput)
    async def healthz(self, parsed: ParsedRequest, ctx: bentoml.Context) -> HealthResponse:
        """Readiness details: bundle method, number of classes, runtime providers."""
        return self._respond(ctx, parsed, lambda p: HealthResponse(**self.classifier.info()))


PromptclipService.add_asgi_middleware(UploadLimitMiddleware)
