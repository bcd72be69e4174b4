"""Embeddings of the classes added at runtime, persisted next to the class list so a restart does not re-encode them.

``state_dir/class_embeddings.npz`` holds ``names`` (the runtime-added classes it covers), ``embeddings``
``[M, S, D]`` float32 (one row per prompt set) and ``key``: a SHA-256 over everything that determines a class's
text embedding (every text graph's hash, every template, the vocabulary's hash and the context length, see
:func:`text_encoder_key`). A file with another key (the bundle's text side changed) is ignored and rewritten: the
classes are re-encoded once, and only then.

It is derived data: the class list (``classes.json``) stays the truth. A missing file or a name it does not cover
means "encode it"; an unreadable file is logged and re-encoded over, never trusted. Writes are atomic (temp file in
the same directory, fsync, ``os.replace``), done under the class registry's file lock by the caller; leftover temp
files of a killed writer are removed when a registry opens the directory
(:func:`serving.classes.remove_stale_temp_files`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from .bundle import Bundle
from .classes import file_signature, replace_file

__all__ = ["EmbeddingStore", "EMBEDDINGS_FILE", "text_encoder_key"]

logger = logging.getLogger(__name__)

EMBEDDINGS_FILE = "class_embeddings.npz"


def text_encoder_key(bundle: Bundle) -> str:
    """SHA-256 hex of what a runtime class's embedding depends on: the text graphs, templates, vocabulary and
    context length of ``bundle``."""
    m = bundle.model
    ident = {
        "text_graphs": [spec.sha256 for spec in m.graphs.text],
        "templates": list(bundle.templates),
        "vocab": m.text.vocab_sha256,
        "context_length": int(bundle.context_length),
        "embedding_dim": int(bundle.embedding_dim),
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode("utf-8")).hexdigest()


class EmbeddingStore:
    """``state_dir/class_embeddings.npz`` for one bundle's text encoder (``key``)."""

    def __init__(self, state_dir: str | os.PathLike, key: str, *, num_sets: int, dim: int) -> None:
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / EMBEDDINGS_FILE
        self.key = key
        self.num_sets = int(num_sets)
        self.dim = int(dim)
        self._sig: tuple[int, ...] | None = None

    def changed(self) -> bool:
        """Whether the file differs from the one last read or written (one ``stat``)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return self._sig is not None
        return file_signature(st) != self._sig

    def load(self) -> dict[str, np.ndarray]:
        """``name -> [S, D]`` of the stored rows; empty when the file is missing, for another text encoder, or
        unreadable (logged: those classes are re-encoded)."""
        try:
            with open(self.path, "rb") as fh:
                st = os.fstat(fh.fileno())
                with np.load(fh, allow_pickle=False) as data:
                    key = str(data["key"])
                    names = [str(n) for n in data["names"]]
                    emb = np.asarray(data["embeddings"], dtype=np.float32)
        except FileNotFoundError:
            self._sig = None
            return {}
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as exc:
            logger.warning("class embeddings file %s is unreadable (%s: %s): the runtime classes are re-encoded and "
                           "the file rewritten", self.path, type(exc).__name__, exc)
            self._sig = None
            return {}
        self._sig = file_signature(st)
        if key != self.key:
            logger.info("class embeddings file %s was written for another text encoder: re-encoding the runtime "
                        "classes once", self.path)
            return {}
        if emb.shape != (len(names), self.num_sets, self.dim):
            logger.warning("class embeddings file %s has shape %s for %d names (expected [%d, %d, %d]): "
                           "re-encoding", self.path, emb.shape, len(names), len(names), self.num_sets, self.dim)
            return {}
        return {name: emb[i] for i, name in enumerate(names)}

    def save(self, rows: Mapping[str, np.ndarray]) -> None:
        """Atomically replace the file with ``rows`` (``name -> [S, D]``). An error is logged, not raised: the
        class list is already safe, and the rows are encoded again at the next start."""
        names = list(rows)
        emb = (np.stack([np.asarray(rows[n], dtype=np.float32) for n in names]) if names
               else np.zeros((0, self.num_sets, self.dim), dtype=np.float32))
        try:
            st = replace_file(self.path, lambda fh: np.savez(fh, key=np.array(self.key),
                                                             names=np.array(names, dtype=str), embeddings=emb))
        except OSError as exc:
            logger.error("cannot write class embeddings file %s (%s); runtime classes will be re-encoded at the "
                         "next start", self.path, exc)
            return
        self._sig = file_signature(st)
