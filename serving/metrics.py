"""Prometheus metrics of the service, beside BentoML's own (request counts, latencies) at ``GET /metrics``.

* ``promptclip_classes``: registered classes (the largest over live workers);
* ``promptclip_errors_total{error, status}``: answered errors by kind;
* ``promptclip_text_encode_seconds``: seconds per text-encoding call; ``promptclip_text_encoded_names_total``;
* ``promptclip_image_batch_size``: images per image-graph run (with micro-batching, several requests' images).

``prometheus_client`` is imported when the first service starts: BentoML sets ``PROMETHEUS_MULTIPROC_DIR`` before,
so the values of every worker are collected. The metrics are created once per process (a second registration of a
name would fail).
"""
from __future__ import annotations

import threading
from typing import Any

__all__ = ["ServiceMetrics"]

_lock = threading.Lock()
_instance: ServiceMetrics | None = None


class ServiceMetrics:
    """The service's metric objects (one per process: :meth:`get`)."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.classes: Any = Gauge("promptclip_classes", "Registered classes", multiprocess_mode="livemax")
        self.errors: Any = Counter("promptclip_errors", "Error answers by error type and HTTP status",
                                   ["error", "status"])
        self.text_encode_seconds: Any = Histogram(
            "promptclip_text_encode_seconds", "Seconds per text-encoding call (runtime classes, ad-hoc classes)",
            buckets=(0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0))
        self.text_encoded: Any = Counter("promptclip_text_encoded_names", "Class names run through the text graph")
        self.image_batch: Any = Histogram("promptclip_image_batch_size", "Images per image-graph run",
                                          buckets=(1, 2, 4, 8, 16, 32))

    @classmethod
    def get(cls) -> ServiceMetrics:
        global _instance
        with _lock:
            if _instance is None:
                _instance = cls()
            return _instance

    def on_text_encode(self, names: int, seconds: float) -> None:
        self.text_encode_seconds.observe(seconds)
        self.text_encoded.inc(names)

    def on_image_batch(self, images: int) -> None:
        self.image_batch.observe(images)

    def on_error(self, error: str, status: int) -> None:
        self.errors.labels(error=error, status=str(status)).inc()
