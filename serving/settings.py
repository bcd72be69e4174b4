"""The HTTP service's configuration, read from ``PROMPTCLIP_*`` environment variables.

* ``PROMPTCLIP_BUNDLE`` (required): deploy bundle directory written by ``promptclip export``.
* ``PROMPTCLIP_STATE_DIR``: directory persisting runtime class changes (shared by all workers);
  unset = changes live in memory of each worker and are lost on restart.
* ``PROMPTCLIP_API_TOKEN``: ``/add_classes`` and ``/remove_classes`` need ``Authorization: Bearer <token>``;
  reads stay open. Without a token, class changes are refused (401) unless ``PROMPTCLIP_OPEN_WRITES=1`` opens them
  to every client on purpose (logged as a warning at every start).
* ``PROMPTCLIP_BUNDLE_DIGEST``: the bundle digest ``export`` printed (``sha256:...``); the service refuses to start
  on a bundle with any other (:func:`serving.manifest.bundle_digest`: the manifest and every file).
* ``PROMPTCLIP_START_EMPTY`` (``1``/``true``): start again from the bundle's classes when the state directory once
  held a state file that is now missing (refused otherwise).
* ``PROMPTCLIP_MAX_UPLOAD_BYTES``: largest request body (default 32 MiB; answered with 413).
* ``PROMPTCLIP_MAX_ADD_NAMES`` (default 256): names per ``/add_classes`` request; ``PROMPTCLIP_MAX_ADHOC_CLASSES``
  (default 256): ad-hoc ``classes`` per classify request; both answered with 413 before anything is encoded.
* ``PROMPTCLIP_MAX_REQUEST_PIXELS`` (default 40,000,000): decoded pixels of one request's images together (JPEGs
  count at the reduced scale they are decoded at); 413 from the headers, before decoding.
* ``PROMPTCLIP_MAX_CLASSES`` (default 10,000): most classes the registered list may hold.
* ``PROMPTCLIP_MAX_CLASS_IMAGES`` (default 32): example images one ``/add_classes`` multipart request may build a
  class from (413 above it).
* ``PROMPTCLIP_REQUEST_DEADLINE_S`` (default 110, under BentoML's 120 s request timeout): a request's encoder
  work stops (504) once this many seconds have passed since it started, instead of running on after the client
  had its answer.
* ``PROMPTCLIP_BATCHING`` (default ``1``): adaptive micro-batching of concurrent requests' images in one worker
  (:mod:`serving.batching`); ``0`` runs each request's images alone.
* ``PROMPTCLIP_MAX_BATCH_IMAGES`` (default 32), ``PROMPTCLIP_RUNTIME`` (``auto``/``ort``),
  ``PROMPTCLIP_THREADS`` (request threads per worker, read when the service module is imported; default 4).
* ``PROMPTCLIP_OPEN_SET_RULE`` (``max_cosine`` / ``msp``) and ``PROMPTCLIP_KEEP_RATE`` (0 < r <= 1): server-wide
  defaults of the open-set answers (:mod:`serving.open_set`); unset = the bundle's calibration defaults. A request
  may override both (form fields ``open_set_rule``, ``keep_rate``).
* ``PROMPTCLIP_WORKERS``: worker processes (read when the service module is imported; default 1); all of them
  share one class list through ``PROMPTCLIP_STATE_DIR``.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .errors import ServiceConfigError
from .format import OPEN_SET_RULES

__all__ = ["ServiceSettings", "DEFAULT_MAX_UPLOAD_BYTES", "DEFAULT_MAX_BATCH_IMAGES", "DEFAULT_THREADS",
           "max_upload_bytes_from_env", "threads_from_env", "workers_from_env"]

logger = logging.getLogger(__name__)

DEFAULT_MAX_UPLOAD_BYTES = 32 * 1024 * 1024
DEFAULT_MAX_BATCH_IMAGES = 32
DEFAULT_THREADS = 4


def _env_int(environ: Mapping[str, str], name: str, default: int, *, minimum: int = 1) -> int:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ServiceConfigError(
            f"{name}={raw!r} is not an integer; set it to a whole number (e.g. {default})") from None
    if value < minimum:
        raise ServiceConfigError(f"{name}={value} must be >= {minimum}")
    return value


def _env_bool(environ: Mapping[str, str], name: str, default: bool = False) -> bool:
    raw = environ.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("0", "false", "no"):
        return False
    if raw in ("1", "true", "yes"):
        return True
    raise ServiceConfigError(f"{name}={raw!r} is not a boolean; set it to 1 or 0")


@dataclass(frozen=True)
class ServiceSettings:
    """Service configuration, normally from ``PROMPTCLIP_*`` environment variables."""

    bundle: Path
    state_dir: Path | None = None
    api_token: str | None = None
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    max_batch_images: int = DEFAULT_MAX_BATCH_IMAGES
    runtime: str = "auto"
    start_empty: bool = False
    open_writes: bool = False
    micro_batching: bool = True
    request_deadline_s: int = 110
    bundle_digest: str | None = None
    max_add_names: int = 256
    max_adhoc_classes: int = 256
    max_request_pixels: int = 40_000_000
    max_classes: int = 10_000
    max_class_images: int = 32
    open_set_rule: str | None = None
    keep_rate: float | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ServiceSettings:
        """Read the settings; raises :class:`ServiceConfigError` when ``PROMPTCLIP_BUNDLE`` is unset or a value is
        bad."""
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
            start_empty=_env_bool(env, "PROMPTCLIP_START_EMPTY"),
            open_writes=_env_bool(env, "PROMPTCLIP_OPEN_WRITES"),
            micro_batching=_env_bool(env, "PROMPTCLIP_BATCHING", default=True),
            request_deadline_s=_env_int(env, "PROMPTCLIP_REQUEST_DEADLINE_S", cls.request_deadline_s),
            bundle_digest=env.get("PROMPTCLIP_BUNDLE_DIGEST", "").strip() or None,
            max_add_names=_env_int(env, "PROMPTCLIP_MAX_ADD_NAMES", cls.max_add_names),
            max_adhoc_classes=_env_int(env, "PROMPTCLIP_MAX_ADHOC_CLASSES", cls.max_adhoc_classes),
            max_request_pixels=_env_int(env, "PROMPTCLIP_MAX_REQUEST_PIXELS", cls.max_request_pixels),
            max_classes=_env_int(env, "PROMPTCLIP_MAX_CLASSES", cls.max_classes),
            max_class_images=_env_int(env, "PROMPTCLIP_MAX_CLASS_IMAGES", cls.max_class_images),
            open_set_rule=_env_rule(env),
            keep_rate=_env_keep_rate(env),
        )


def _env_rule(env: Mapping[str, str]) -> str | None:
    raw = env.get("PROMPTCLIP_OPEN_SET_RULE", "").strip()
    if raw and raw not in OPEN_SET_RULES:
        raise ServiceConfigError(f"PROMPTCLIP_OPEN_SET_RULE={raw!r} is not a rule; set it to one of "
                                 f"{', '.join(OPEN_SET_RULES)} (or leave it unset for the bundle's default)")
    return raw or None


def _env_keep_rate(env: Mapping[str, str]) -> float | None:
    raw = env.get("PROMPTCLIP_KEEP_RATE", "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 1:  # also refuses nan
        raise ServiceConfigError(f"PROMPTCLIP_KEEP_RATE={raw!r} must be a number with 0 < rate <= 1 (e.g. 0.95: keep "
                                 "95% of images of listed classes), or unset for the bundle's default")
    return value


def max_upload_bytes_from_env(environ: Mapping[str, str] | None = None) -> int:
    """``PROMPTCLIP_MAX_UPLOAD_BYTES`` (default 32 MiB)."""
    env = os.environ if environ is None else environ
    return _env_int(env, "PROMPTCLIP_MAX_UPLOAD_BYTES", DEFAULT_MAX_UPLOAD_BYTES)


def threads_from_env(environ: Mapping[str, str] | None = None) -> int:
    """``PROMPTCLIP_THREADS``: request threads per worker (default 4)."""
    env = os.environ if environ is None else environ
    return _env_int(env, "PROMPTCLIP_THREADS", DEFAULT_THREADS)


def workers_from_env(environ: Mapping[str, str] | None = None) -> int:
    """``PROMPTCLIP_WORKERS``: worker processes of ``bentoml serve`` (default 1)."""
    env = os.environ if environ is None else environ
    return _env_int(env, "PROMPTCLIP_WORKERS", 1)
