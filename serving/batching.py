"""Adaptive micro-batching of image-encoder calls across concurrent requests of one worker.

Requests hand their preprocessed pixels to one :class:`MicroBatcher`; its thread runs the image graph on everything
that queued up while the previous batch ran (at most ``max_batch`` images), then hands each request its rows. There
is no fixed wait: an idle worker runs a lone request at once (no added latency), a busy one batches as many requests
as arrived meanwhile, so the batch size follows the load.
"""
from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future

import numpy as np

__all__ = ["MicroBatcher", "ImageOutputs"]

logger = logging.getLogger(__name__)

#: What the image graph gives for a batch: embeddings ``[B, D]`` and expert weights ``[B, S]`` (or ``None``).
ImageOutputs = tuple[np.ndarray, "np.ndarray | None"]


class MicroBatcher:
    """Runs ``encode(pixels [B, 3, H, W]) -> (embeds [B, D], weights [B, S] | None)`` for concurrent callers in
    shared batches of at most ``max_batch`` images. ``on_batch(num_images)`` is called for every batch run."""

    def __init__(self, encode: Callable[[np.ndarray], ImageOutputs], *, max_batch: int = 32,
                 on_batch: Callable[[int], None] | None = None) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self._encode = encode
        self.max_batch = int(max_batch)
        self._on_batch = on_batch
        self._queue: queue.SimpleQueue[tuple[np.ndarray, Future] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="promptclip-image-batcher", daemon=True)
        self._thread.start()

    def encode(self, pixels: np.ndarray) -> ImageOutputs:
        """The image graph's outputs for ``pixels`` (blocks until its batch has run; re-raises its error)."""
        fut: Future = Future()
        self._queue.put((pixels, fut))
        return fut.result()

    def close(self) -> None:
        """Stop the batching thread once the calls already queued have run."""
        self._queue.put(None)

    def _loop(self) -> None:
        pending: tuple[np.ndarray, Future] | None = None
        closing = False
        while not closing:
            first = pending or self._queue.get()
            pending = None
            if first is None:
                return
            items = [first]
            size = len(first[0])
            while size < self.max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:  # run what is queued, then stop
                    closing = True
                    break
                if size + len(item[0]) > self.max_batch:
                    pending = item  # starts the next batch
                    break
                items.append(item)
                size += len(item[0])
            self._run(items, size)

    def _run(self, items: list[tuple[np.ndarray, Future]], size: int) -> None:
        try:
            pixels = items[0][0] if len(items) == 1 else np.concatenate([p for p, _ in items], axis=0)
            embeds, weights = self._encode(pixels)
        except BaseException as exc:  # every waiting request gets the error (it is re-raised in its own thread)
            for _, fut in items:
                fut.set_exception(exc)
            return
        if self._on_batch is not None:
            try:
                self._on_batch(size)
            except Exception:  # noqa: BLE001 - metrics never break a batch
                logger.exception("batch callback failed")
        start = 0
        for p, fut in items:
            end = start + len(p)
            fut.set_result((embeds[start:end], None if weights is None else weights[start:end]))
            start = end
