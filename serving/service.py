"""BentoML 1.4 HTTP service for open-vocabulary image classification (torch-free).

Run with ``PROMPTCLIP_BUNDLE=/path/to/bundle bentoml serve serving.service:PromptclipService``; the
configuration (``PROMPTCLIP_*`` environment variables, read when a worker starts) is documented in
:mod:`serving.settings`.

Endpoints (BentoML API routes are all ``POST``):

* ``/classify``: multipart ``image`` (one file), optional ``top_k``, optional ``classes``, optional open-set
  overrides ``keep_rate`` and ``open_set_rule`` (:mod:`serving.open_set`); answers ``none_of_these`` and each
  prediction's ``confidence``.
* ``/classify_batch``: multipart ``images`` (repeated), optional ``top_k`` and ``classes``.
* ``/classes``: the active class list, with each class's provenance. ``/add_classes``, ``/remove_classes``: JSON
  ``{"names": [...]}``, with ``Authorization: Bearer <token>`` (refused without a configured token unless writes
  were opened on purpose). ``/add_classes`` also takes a multipart form: ``name`` + 1..N ``images`` (+ optional
  ``text_weight``, ``modality_shift``) builds one class from example images (:mod:`serving.image_classes`).
* ``GET /ui``: a self-contained page to try the model in a browser (:data:`UI_PAGE`, no external resources).
* ``/healthz``: method, number of classes, runtime and providers; the same JSON at ``GET /info``. (``GET /healthz``
  and ``/livez`` are BentoML's built-in probes; ``GET /readyz`` fails (503) while the class state is unreadable.)

Requests are parsed by our own input specs (:mod:`serving.request_parsing`, which says why). Errors: every
:class:`~serving.errors.PromptclipError` is answered with the status and JSON body of :mod:`serving.http_errors`.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import re
import threading
import time
from collections.abc import Callable
from functools import lru_cache
from importlib import resources
from typing import Any

import bentoml
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse
from starlette.routing import Route

from .classes import ClassStateError
from .classifier import Classifier, ClassifyResult, deadline_scope
from .errors import AuthError, PromptclipError, RequestError, ServiceConfigError
from .http_errors import http_status, public_error_response
from .metrics import ServiceMetrics
from .openapi import openapi_document
from .request_parsing import (
    AddClassesInput,
    ClassifyBatchInput,
    ClassifyInput,
    ClassNamesInput,
    EmptyInput,
    ParsedRequest,
    UploadLimitMiddleware,
)
from .schemas import (
    AddClassesResponse,
    ClassifyBatchResponse,
    ClassifyParams,
    ClassifyResponse,
    ClassListResponse,
    HealthResponse,
    ImageClassParams,
    RemoveClassesResponse,
)
from .settings import ServiceSettings, threads_from_env, workers_from_env

__all__ = ["PromptclipService", "ServiceSettings", "ServiceConfigError", "UploadLimitMiddleware"]

logger = logging.getLogger(__name__)


# -- the service -----------------------------------------------------------------------------------


@bentoml.service(
    name="promptclip",
    traffic={"timeout": 120},
    threads=threads_from_env(),
    workers=workers_from_env(),
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
        self.metrics = ServiceMetrics.get()
        self._classifier: Classifier | None = None
        self._load_lock = threading.Lock()
        self._next_load = 0.0
        try:
            self._classifier = self._load()
        except ClassStateError as exc:
            # No crash loop (BentoML would restart the worker forever while every request hangs): the worker runs
            # not ready, answers 503, and loads again once the state is fixed. (`promptclip serve` refuses to start
            # on such a state before the server starts.)
            logger.critical("class state unreadable at start-up; not ready until it is fixed: %s", exc)
            self._next_load = time.monotonic() + self.RELOAD_INTERVAL_S
        if s.api_token is None and s.open_writes:
            logger.warning("!!! PROMPTCLIP_OPEN_WRITES is set and PROMPTCLIP_API_TOKEN is not: /add_classes and "
                           "/remove_classes are OPEN to every client that can reach this service !!!")
        elif s.api_token is None:
            logger.warning("PROMPTCLIP_API_TOKEN is not set: /add_classes and /remove_classes are refused (set a "
                           "token, or PROMPTCLIP_OPEN_WRITES=1 to open them to every client)")
        elif s.open_writes:
            logger.warning("PROMPTCLIP_OPEN_WRITES is ignored: PROMPTCLIP_API_TOKEN is set, writes need it")
        if s.state_dir is None:
            logger.warning("PROMPTCLIP_STATE_DIR is not set: class changes are per worker and lost on restart")
        if self._classifier is not None:
            info = self._classifier.info()
            logger.info("promptclip service ready: method=%s, %d classes, runtime=%s %s", info["method"],
                        info["num_classes"], info["runtime"], info["providers"])

    #: Seconds between attempts to load a classifier whose class state was unreadable at start-up.
    RELOAD_INTERVAL_S = 5.0

    def _load(self) -> Classifier:
        s = self.settings
        return Classifier.from_bundle(
            s.bundle, state_dir=s.state_dir, runtime=s.runtime, max_image_bytes=s.max_upload_bytes,
            start_empty=s.start_empty, expected_digest=s.bundle_digest, max_add_names=s.max_add_names,
            max_adhoc_classes=s.max_adhoc_classes, max_request_pixels=s.max_request_pixels,
            max_classes=s.max_classes, max_class_images=s.max_class_images, micro_batching=s.micro_batching,
            on_image_batch=self.metrics.on_image_batch, on_text_encode=self.metrics.on_text_encode,
            open_set_rule=s.open_set_rule, keep_rate=s.keep_rate)

    @property
    def classifier(self) -> Classifier:
        """The classifier; while the class state is unreadable since start-up, a new load is tried at most every
        :attr:`RELOAD_INTERVAL_S` and :class:`ClassStateError` (503) is raised meanwhile."""
        clf = self._classifier
        if clf is not None:
            return clf
        with self._load_lock:
            if self._classifier is None:
                if time.monotonic() < self._next_load:
                    raise ClassStateError("class state unreadable since start-up (see the log)")
                try:
                    self._classifier = self._load()
                except ClassStateError:
                    self._next_load = time.monotonic() + self.RELOAD_INTERVAL_S
                    raise
                logger.info("class state readable again: the service is ready")
            return self._classifier

    def __is_ready__(self) -> bool:
        """Readiness (BentoML's ``GET /readyz``): bundle loaded, runtime warm (both done in ``__init__``) and the
        class state readable right now; a corrupt state file makes it fail (503) until it is fixed."""
        try:
            self.classifier.registry.refresh()
        except PromptclipError as exc:
            logger.error("not ready: %s", exc)
            return False
        return True

    def __metrics__(self, content: str) -> str:
        """BentoML's ``GET /metrics`` hook: refresh the class-count gauge, pass the text through."""
        try:
            self.metrics.classes.set(len(self.classifier.registry))
        except Exception:  # noqa: BLE001 - metrics never fail the scrape
            logger.exception("cannot update promptclip_classes")
        return content

    # -- plumbing ------------------------------------------------------------------------------

    def _respond(self, ctx: bentoml.Context, parsed: ParsedRequest, handler: Callable[[ParsedRequest], Any], *,
                 mutating: bool = False) -> Any:
        """Run ``handler``; answer a :class:`PromptclipError` with its status and JSON body."""
        try:
            if mutating:
                self._check_auth(ctx)
            if parsed.error is not None:
                raise parsed.error
            with deadline_scope(time.monotonic() + self.settings.request_deadline_s):
                return handler(parsed)
        except PromptclipError as exc:
            status = http_status(exc)
            if status >= 500:
                logger.error("%s %s -> %d %s: %s", ctx.request.method, ctx.request.url.path, status,
                             type(exc).__name__, exc)
            else:  # the access log already records the status
                logger.debug("%s %s -> %d %s: %s", ctx.request.method, ctx.request.url.path, status,
                             type(exc).__name__, exc)
            self.metrics.on_error(type(exc).__name__, status)
            ctx.response.status_code = status  # BentoML copies the context status onto the response
            return public_error_response(exc)

    def _check_auth(self, ctx: bentoml.Context) -> None:
        token = self.settings.api_token
        if token is None:
            if self.settings.open_writes:
                return
            raise AuthError("class changes are disabled on this server: it has no API token. Its operator can set "
                            "one (PROMPTCLIP_API_TOKEN, `promptclip serve --token`) or open writes to every client "
                            "on purpose (PROMPTCLIP_OPEN_WRITES=1, `promptclip serve --open-writes`)")
        header = ctx.request.headers.get("authorization", "")
        if not header:
            raise AuthError("this endpoint changes the class list and needs the header "
                            "'Authorization: Bearer <token>' (the server's PROMPTCLIP_API_TOKEN)")
        scheme, _, value = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise AuthError("malformed Authorization header: send 'Authorization: Bearer <token>'")
        if not hmac.compare_digest(value.strip().encode("utf-8"), token.encode("utf-8")):
            raise AuthError("invalid API token in the Authorization header")

    def _classify(self, parsed: ParsedRequest) -> ClassifyResult:
        params = parsed.params
        assert isinstance(params, ClassifyParams)
        return self.classifier.classify_bytes_detailed(parsed.files, top_k=params.top_k, class_names=params.classes,
                                                       keep_rate=params.keep_rate, open_set_rule=params.open_set_rule)

    # -- endpoints -----------------------------------------------------------------------------

    @bentoml.api(route="/classify", input_spec=ClassifyInput)
    def classify(self, parsed: ParsedRequest, ctx: bentoml.Context) -> ClassifyResponse:
        """Classify one image (multipart field ``image``; optional ``top_k``, ``classes``)."""
        def handler(p: ParsedRequest) -> ClassifyResponse:
            r = self._classify(p)
            return ClassifyResponse(predictions=r.predictions[0], classes_version=r.classes_version,
                                    none_of_these=r.none_of_these[0], open_set=r.open_set)

        return self._respond(ctx, parsed, handler)

    @bentoml.api(route="/classify_batch", input_spec=ClassifyBatchInput)
    def classify_batch(self, parsed: ParsedRequest, ctx: bentoml.Context) -> ClassifyBatchResponse:
        """Classify several images (multipart field ``images``, repeated; optional ``top_k``, ``classes``)."""

        def handler(p: ParsedRequest) -> ClassifyBatchResponse:
            limit = self.settings.max_batch_images
            if len(p.files) > limit:
                raise RequestError(f"{len(p.files)} images uploaded; one request may carry at most {limit} "
                                   "(PROMPTCLIP_MAX_BATCH_IMAGES) -- split the batch", field="images")
            r = self._classify(p)
            return ClassifyBatchResponse(results=r.predictions, classes_version=r.classes_version,
                                         none_of_these=r.none_of_these, open_set=r.open_set)

        return self._respond(ctx, parsed, handler)

    @bentoml.api(route="/classes", input_spec=EmptyInput)
    def classes(self, parsed: ParsedRequest, ctx: bentoml.Context) -> ClassListResponse:
        """The active class list and its version."""
        return self._respond(ctx, parsed, lambda p: ClassListResponse(**self.classifier.list_classes()))

    @bentoml.api(route="/add_classes", input_spec=AddClassesInput)
    def add_classes(self, parsed: ParsedRequest, ctx: bentoml.Context) -> AddClassesResponse:
        """Register new classes: JSON ``{"names": [...]}``, or one class from example images (multipart ``name`` +
        ``images``); needs the bearer token when one is configured. BentoML routes one body type per API, so this
        input spec reads either and the Content-Type decides."""
        def handler(p: ParsedRequest) -> AddClassesResponse:
            params = p.params
            if isinstance(params, ImageClassParams):
                return AddClassesResponse(**self.classifier.add_image_class(
                    params.name, p.files, text_weight=params.text_weight, modality_shift=params.modality_shift))
            return AddClassesResponse(**self.classifier.add_classes(params.names))

        return self._respond(ctx, parsed, handler, mutating=True)

    @bentoml.api(route="/remove_classes", input_spec=ClassNamesInput)
    def remove_classes(self, parsed: ParsedRequest, ctx: bentoml.Context) -> RemoveClassesResponse:
        """Unregister classes: JSON ``{"names": [...]}`` (needs the bearer token when one is configured)."""
        return self._respond(
            ctx, parsed, lambda p: RemoveClassesResponse(**self.classifier.remove_classes(p.params.names)),
            mutating=True)

    @bentoml.api(route="/healthz", input_spec=EmptyInput)
    async def healthz(self, parsed: ParsedRequest, ctx: bentoml.Context) -> HealthResponse:
        """Readiness details: bundle method, number of classes, runtime providers."""
        return self._respond(ctx, parsed, lambda p: HealthResponse(**self.classifier.info()))


# -- GET routes beside BentoML's POST APIs ----------------------------------------------------------


async def _info(request: Request) -> JSONResponse:
    """``GET /info``: the JSON health of ``POST /healthz`` (BentoML's ``GET /healthz`` is an empty probe)."""
    service = bentoml.get_current_service()
    try:
        body = await run_in_threadpool(service.classifier.info)
    except PromptclipError as exc:
        logger.error("GET /info -> %d %s: %s", http_status(exc), type(exc).__name__, exc)
        return public_error_response(exc)
    return JSONResponse(HealthResponse(**body).model_dump())


async def _openapi(request: Request) -> JSONResponse:
    """``GET /docs.json`` (what BentoML's UI at ``/`` reads) and ``GET /openapi.json``: :mod:`serving.openapi`."""
    return JSONResponse(openapi_document())


#: The browser page (package data of ``serving``): classify, see and change the class list. Inline CSS and JS only.
UI_PAGE = ("static", "index.html")


@lru_cache(maxsize=1)
def ui_page() -> tuple[str, str]:
    """The page's HTML and its Content-Security-Policy: only its own inline ``<style>`` and ``<script>`` (by hash)
    run, requests go to this origin only, images may be local ``blob:``/``data:`` URLs (the preview).

    Raises:
        ServiceConfigError: the page is missing from the installed package (a broken install).
    """
    try:
        html = resources.files(__package__).joinpath(*UI_PAGE).read_text(encoding="utf-8")
    except (FileNotFoundError, OSError) as exc:
        raise ServiceConfigError(f"the browser page {'/'.join(UI_PAGE)} is missing from the installed serving "
                                 f"package ({exc}): reinstall promptclip") from exc

    def hashes(tag: str) -> str:
        bodies = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.S)
        return " ".join("'sha256-" + base64.b64encode(hashlib.sha256(b.encode("utf-8")).digest()).decode() + "'"
                        for b in bodies)

    csp = (f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; "
           "img-src 'self' blob: data:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
           "frame-ancestors 'none'")
    return html, csp


async def _ui(request: Request) -> HTMLResponse:
    """``GET /ui``: the page to try the model (:func:`ui_page`)."""
    try:
        html, csp = ui_page()
    except PromptclipError as exc:
        logger.error("GET /ui -> %d %s: %s", http_status(exc), type(exc).__name__, exc)
        return public_error_response(exc)
    return HTMLResponse(html, headers={"Content-Security-Policy": csp, "X-Content-Type-Options": "nosniff",
                                       "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"})


#: Mounted passively at "/": only these paths are taken, every other path stays BentoML's (this mount comes before
#: BentoML's own ``/docs.json`` route, so the true document replaces BentoML's).
EXTRA_ROUTES = Starlette(routes=[Route("/info", _info, methods=["GET"]),
                                 Route("/ui", _ui, methods=["GET"]),
                                 Route("/docs.json", _openapi, methods=["GET"]),
                                 Route("/openapi.json", _openapi, methods=["GET"])])

PromptclipService.mount_asgi_app(EXTRA_ROUTES, path="/", name="promptclip-extra")
PromptclipService.add_asgi_middleware(UploadLimitMiddleware)
