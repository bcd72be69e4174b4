"""The runtime-extensible class list, persisted atomically and shared between worker processes.

:class:`ClassRegistry` validates class names (see :meth:`ClassRegistry.normalize_name`), keeps the
active list in memory and, when given a ``state_dir``, in ``state_dir/classes.json``::

    {"format": "promptclip.classes", "format_version": 1, "version": 7, "names": ["cat", "dog", ...]}

(the typed model is :class:`serving.format.ClassState`: unknown keys are ignored with a warning, a newer
``format_version`` is refused with a message naming it).

Every change bumps ``version`` and is written with write-temp + fsync + ``os.replace`` + directory
fsync, so an acknowledged change survives ``kill -9`` and power loss and readers never see a half
written file. Mutations hold a ``threading.Lock`` and an advisory ``fcntl.flock`` on
``state_dir/classes.lock`` and re-read the file first, so several workers (processes) can mutate
the same directory without losing updates; :meth:`ClassRegistry.refresh` picks up other workers'
changes. A state file that cannot be parsed is never overwritten: the registry refuses to start.
"""
from __future__ import annotations

import contextlib
import difflib
import json
import logging
import os
import tempfile
import threading
import time
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from .errors import BundleError, ClassNameError, PromptclipError, RequestError, UnknownClassError
from .format import CLASS_STATE_FORMAT_VERSION, ClassState, canonical_class_name, class_name_key

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from .tokenizer import ClipTokenizer

__all__ = ["ClassRegistry", "ClassStateError", "STATE_FILE", "MARKER_FILE", "MAX_NAME_CHARS",
           "remove_stale_temp_files", "replace_file", "file_signature", "fsync_dir"]

logger = logging.getLogger(__name__)

STATE_FILE = "classes.json"
LOCK_FILE = "classes.lock"
#: Written next to the state file when it is first created: a state dir holding this marker but no state file has
#: lost its state, which is refused unless the caller says to start empty (``start_empty=True``).
MARKER_FILE = "classes.created"
#: Prefixes of the temp files the state directory's writers create (``.<prefix>*.tmp``): the class list's and the
#: runtime class embeddings' (:mod:`serving.embedding_store`) and the image-built classes'
#: (:mod:`serving.image_classes`).
TEMP_PREFIXES = (".classes.", ".class_embeddings.", ".class_images.")
#: Longest class name accepted, in characters (after whitespace normalisation).
MAX_NAME_CHARS = 200
_RESERVED_TOKENS = ("<start_of_text>", "<end_of_text>")
_BAD_CATEGORIES = frozenset({"Cc", "Cf", "Cs"})  # control, format (zero-width, bidi overrides), lone surrogates
#: Format characters that are part of writing, not hiding: ZERO WIDTH NON-JOINER (Persian, Hindi, ...) and ZERO WIDTH
#: JOINER (emoji sequences such as 👩‍🔬, Indic conjuncts). Every other control/format character is refused.
_ALLOWED_FORMAT_CHARS = frozenset({"\u200c", "\u200d"})


class ClassStateError(PromptclipError):
    """The persisted class state (``classes.json``) is unreadable, corrupt, or cannot be written."""


def _preview(name: str, limit: int = 60) -> str:
    return repr(name) if len(name) <= limit else repr(name[:limit]) + f"... ({len(name)} characters)"


class ClassRegistry:
    """Validated, versioned list of active class names, optionally persisted in ``state_dir``.

    Args:
        state_dir: directory for ``classes.json`` (created if missing); ``None`` keeps the list in memory.
            An existing state file takes precedence over ``initial_names``.
        initial_names: the bundle's classes, used when there is no state file yet.
        tokenizer: the bundle's tokenizer; names must fit its ``context_length`` inside ``template``.
        template: the text template (``"{}"`` marks the name) the names are encoded with.
        max_classes: most classes :meth:`add` lets the list grow to.
        start_empty: start again from ``initial_names`` when ``state_dir`` once held a state file that is now
            missing (by default that is refused with :class:`ClassStateError`: the classes added at runtime would be
            lost silently).
    """

    def __init__(
        self,
        state_dir: str | os.PathLike | None,
        initial_names: Sequence[str],
        *,
        tokenizer: ClipTokenizer,
        template: str,
        max_classes: int = 10000,
        start_empty: bool = False,
    ) -> None:
        if "{}" not in template:
            raise ValueError(f"template must contain '{{}}' where the class name goes, got {template!r}")
        self._tokenizer = tokenizer
        self._template = template
        self._context_length = int(tokenizer.context_length)
        self.max_classes = int(max_classes)
        self._lock = threading.RLock()
        self._names: list[str] = []
        self._version = 0
        self._sig: tuple[int, ...] | None = None
        self.state_dir = Path(state_dir) if state_dir is not None else None

        initial = self._check_initial(initial_names)
        if self.state_dir is None:
            self._names, self._version = initial, 1
            return
        if fcntl is None:  # pragma: no cover
            logger.warning("fcntl is unavailable on this platform: class-state changes are NOT safe across "
                           "processes; run a single worker")
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ClassStateError(f"Cannot create class state directory {self.state_dir}: {exc}") from exc
        with self._lock, self._file_lock():
            remove_stale_temp_files(self.state_dir)  # under the lock no writer is active
            if self.state_path.exists():
                version, names, sig = self._read_state()
                self._names, self._version, self._sig = names, version, sig
                logger.info("loaded %d classes (version %d) from %s", len(names), version, self.state_path)
                marker = self.state_dir / MARKER_FILE
                if not marker.exists():  # a state dir from before the marker existed
                    with contextlib.suppress(ClassStateError):
                        _write_marker(marker)
            else:
                marker = self.state_dir / MARKER_FILE
                if marker.exists() and not start_empty:
                    raise ClassStateError(
                        f"class state file {self.state_path} is missing, but this state directory held one (created "
                        f"{_read_marker(marker)}): the classes added at runtime would be lost. Restore the file from "
                        "a backup, or start again from the bundle's classes on purpose with `promptclip serve "
                        "--start-empty` (PROMPTCLIP_START_EMPTY=1).")
                if marker.exists():
                    logger.warning("class state file %s is missing: starting again from the bundle's %d classes "
                                   "(start_empty)", self.state_path, len(initial))
                self._write_state(1, initial)
                self._names, self._version = initial, 1
                _write_marker(marker)
                logger.info("created %s with the bundle's %d classes", self.state_path, len(initial))

    # -- properties ----------------------------------------------------------------------------

    @property
    def state_path(self) -> Path | None:
        """``state_dir/classes.json``, or ``None`` for an in-memory registry."""
        return self.state_dir / STATE_FILE if self.state_dir is not None else None

    @property
    def tokenizer(self) -> ClipTokenizer:
        """The bundle's tokenizer names are checked with."""
        return self._tokenizer

    @property
    def template(self) -> str:
        """The text template names are validated against."""
        return self._template

    @property
    def version(self) -> int:
        """Version of the class list; every add/remove increments it."""
        with self._lock:
            return self._version

    def names(self) -> list[str]:
        """The active class names, in order (a copy)."""
        with self._lock:
            return list(self._names)

    def snapshot(self) -> tuple[int, list[str]]:
        """``(version, names)`` read consistently."""
        with self._lock:
            return self._version, list(self._names)

    def __len__(self) -> int:
        with self._lock:
            return len(self._names)

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return name in self._names

    # -- validation ----------------------------------------------------------------------------

    def normalize_name(self, name: str, *, field: str = "names") -> str:
        """``name`` in canonical form (:func:`serving.format.canonical_class_name`: underscores become spaces,
        whitespace is stripped and collapsed, case is kept); refuse names that cannot be served.

        Raises:
            ClassNameError: not a string, empty, containing control/format characters or CLIP's
                reserved tokens, longer than ``MAX_NAME_CHARS`` characters, or too many tokens for
                the text context inside the template (names are never truncated).
        """
        if not isinstance(name, str):
            raise ClassNameError(f"class names must be strings, got {type(name).__name__} {name!r:.60}", field=field)
        text = canonical_class_name(name)
        if not text:
            raise ClassNameError(f"class name {_preview(name)} is empty after trimming underscores and whitespace; "
                                 "give a non-empty name", field=field)
        bad = [c for c in text if unicodedata.category(c) in _BAD_CATEGORIES and c not in _ALLOWED_FORMAT_CHARS]
        if bad:
            codes = ", ".join(f"U+{ord(c):04X}" for c in dict.fromkeys(bad))
            raise ClassNameError(
                f"class name {_preview(text)} contains control or invisible formatting character(s) {codes}; "
                "remove them", field=field)
        if len(text) > MAX_NAME_CHARS:
            raise ClassNameError(
                f"class name {_preview(text)} is {len(text)} characters long; the limit is {MAX_NAME_CHARS}",
                field=field)
        lowered = name.lower()  # as written: the canonical form has rewritten the tokens' underscores
        for token in _RESERVED_TOKENS:
            if token in lowered:
                raise ClassNameError(f"class name {_preview(name)} contains CLIP's reserved token {token!r}; remove it",
                                     field=field)
        n = self._tokenizer.num_tokens(self._template.format(text))
        if n > self._context_length:
            raise ClassNameError(
                f"class name {_preview(text)} is {n} tokens long inside the template {self._template!r} (start and "
                f"end tokens included), but the text encoder takes at most {self._context_length}; shorten it by "
                f"at least {n - self._context_length} token(s) (names are never truncated)", field=field)
        return text

    def normalize_names(self, names: Sequence[str], *, field: str = "names") -> list[str]:
        """:meth:`normalize_name` for each of ``names``; also refuses an empty list and repeated names."""
        return self._normalize_all(names, field=field)

    def _normalize_all(self, names: Sequence[str], *, field: str,
                       identity: Callable[[str], str] = class_name_key) -> list[str]:
        if isinstance(names, (str, bytes)) or not isinstance(names, Sequence):
            raise ClassNameError(f"{field} must be a list of class names, got {type(names).__name__}", field=field)
        if not names:
            raise ClassNameError(f"{field} is empty; give at least one class name", field=field)
        out = [self.normalize_name(n, field=field) for n in names]
        keys = [identity(n) for n in out]
        if len(set(keys)) != len(keys):
            dups = [n for n, k in zip(out, keys) if keys.count(k) > 1]
            raise ClassNameError(
                f"{field} lists {', '.join(map(_preview, dict.fromkeys(dups)))} more than once (after normalisation: "
                "underscores and runs of whitespace become one space, and case is ignored); give each name once",
                field=field)
        return out

    def _check_initial(self, names: Sequence[str]) -> list[str]:
        try:  # exact duplicates only: bundles exported before names were compared ignoring case stay servable
            out = self._normalize_all(list(names), field="classes", identity=str)
        except ClassNameError as exc:
            raise BundleError(f"the bundle's class list is not servable: {exc}; re-export the bundle") from exc
        changed = [(a, b) for a, b in zip(names, out) if a != b]
        if changed:
            raise BundleError(
                f"bundle class name {_preview(changed[0][0])} is not normalised (expected {_preview(changed[0][1])}); "
                "re-export the bundle")
        return out

    # -- mutations -----------------------------------------------------------------------------

    def add(self, names: Sequence[str]) -> list[str]:
        """Append new class names (in order) and persist; returns the normalised added names.

        Raises:
            ClassNameError: an invalid name, a name given twice, or one already registered.
            RequestError: the list would exceed ``max_classes``.
        """
        return self.add_versioned(names)[0]

    def add_versioned(self, names: Sequence[str], *,
                      after_commit: Callable[[list[str]], None] | None = None,
                      before_commit: Callable[[list[str]], None] | None = None) -> tuple[list[str], int, int]:
        """:meth:`add`, returning ``(added, version, num_classes)`` of this very change (concurrent changes each
        get their own, strictly increasing version). ``after_commit(names)`` runs with the new list while the file
        lock is still held (the service persists the new classes' embeddings there). ``before_commit(new)`` runs
        with the validated new names under the file lock before the list is written (an image-built class's
        examples are stored there, so that a worker seeing the name always finds them); if it raises, nothing is
        committed."""
        new = self._normalize_all(names, field="names")
        with self._lock, self._file_lock():
            self._reload_locked(force=True)
            present = {class_name_key(n): n for n in self._names}
            already = [(n, present[class_name_key(n)]) for n in new if class_name_key(n) in present]
            if already:
                shown = ", ".join(_preview(n) if n == r else f"{_preview(n)} (as {_preview(r)})"
                                  for n, r in already[:10])
                raise ClassNameError(
                    f"class(es) already registered: {shown}; remove them from the request (names are compared "
                    "ignoring case: CLIP lowercases them, so they would get one embedding and split its score)",
                    field="names")
            total = len(self._names) + len(new)
            if total > self.max_classes:
                raise RequestError(
                    f"adding {len(new)} class(es) would make {total}; the limit is {self.max_classes} -- remove "
                    "classes first or raise the limit", field="names")
            if before_commit is not None:
                before_commit(list(new))
            self._commit_locked(self._names + new)
            logger.info("added %d class(es) -> %d classes, version %d", len(new), len(self._names), self._version)
            result = (new, self._version, len(self._names))
            if after_commit is not None:
                after_commit(list(self._names))
        return result

    def remove(self, names: Sequence[str]) -> list[str]:
        """Remove registered class names and persist; returns the removed (normalised) names.

        Raises:
            UnknownClassError: a name is not registered.
            ClassNameError: a name given twice, or the request would remove every class.
        """
        return self.remove_versioned(names)[0]

    def remove_versioned(self, names: Sequence[str], *,
                         after_commit: Callable[[list[str]], None] | None = None) -> tuple[list[str], int, int]:
        """:meth:`remove`, returning ``(removed, version, num_classes)`` of this very change; ``after_commit`` as
        in :meth:`add_versioned`."""
        if isinstance(names, (str, bytes)) or not isinstance(names, Sequence):
            raise ClassNameError(f"names must be a list of class names, got {type(names).__name__}")
        if not names:
            raise ClassNameError("names is empty; give at least one class name to remove")
        for n in names:
            if not isinstance(n, str):
                raise ClassNameError(f"class names must be strings, got {type(n).__name__} {n!r:.60}")
        asked = [canonical_class_name(n) for n in names]
        keys = [class_name_key(n) for n in asked]
        if len(set(keys)) != len(keys):
            dups = [n for n, k in zip(asked, keys) if keys.count(k) > 1]
            raise ClassNameError(f"names lists {', '.join(map(_preview, dict.fromkeys(dups)))} more than once (case "
                                 "is ignored); give each name once")
        with self._lock, self._file_lock():
            self._reload_locked(force=True)
            registered = {class_name_key(n): n for n in self._names}
            unknown = [n for n, k in zip(asked, keys) if k not in registered]
            if unknown:
                hints = []
                for n in unknown[:3]:
                    close = difflib.get_close_matches(n, self._names, n=1)
                    if close:
                        hints.append(f"{_preview(n)} -> did you mean {_preview(close[0])}?")
                known = ", ".join(map(_preview, self._names[:5]))
                raise UnknownClassError(
                    f"not registered: {', '.join(map(_preview, unknown[:10]))}. "
                    + (" ".join(hints) + " " if hints else "")
                    + f"Registered classes ({len(self._names)}) include {known}"
                    + (", ..." if len(self._names) > 5 else "") + "; list them with /classes.")
            wanted = [registered[k] for k in keys]  # as registered (the request may differ in case)
            remaining = [n for n in self._names if n not in set(wanted)]
            if not remaining:
                raise ClassNameError("this would remove every class; at least one class must remain -- add the new "
                                     "classes before removing the old ones")
            self._commit_locked(remaining)
            logger.info("removed %d class(es) -> %d classes, version %d", len(wanted), len(remaining), self._version)
            result = (wanted, self._version, len(remaining))
            if after_commit is not None:
                after_commit(list(remaining))
        return result

    def refresh(self) -> bool:
        """Reload the list if another process changed the state file; ``True`` when it changed.

        Cheap when nothing changed (one ``stat``). Raises :class:`ClassStateError` on a corrupt file.
        """
        if self.state_dir is None:
            return False
        with self._lock:
            return self._reload_locked()

    # -- persistence ---------------------------------------------------------------------------

    def _reload_locked(self, *, force: bool = False) -> bool:
        """Adopt the state file's contents when they differ from ours (``self._lock`` held).

        Without ``force`` an unchanged ``stat`` signature skips the read; mutations (under the file
        lock) always force a read, so a reused inode with an equal size and timestamp tick can
        never make them build on a stale list.
        """
        if self.state_dir is None:
            return False
        path = self.state_path
        try:
            st = os.stat(path)
        except FileNotFoundError:
            if self._sig is not None:
                logger.warning("class state file %s disappeared; keeping %d classes in memory (version %d); the "
                               "next add/remove rewrites it", path, len(self._names), self._version)
                self._sig = None
            return False
        if not force and self._sig == file_signature(st):
            return False
        version, names, sig = self._read_state()
        changed = version != self._version or names != self._names
        if version < self._version:
            logger.warning("class state file %s went back from version %d to %d (restored from a backup?); using "
                           "the file", path, self._version, version)
        self._names, self._version, self._sig = names, version, sig
        if changed:
            logger.info("class list reloaded from %s: %d classes, version %d", path, len(names), version)
        return changed

    def _read_state(self) -> tuple[int, list[str], tuple[int, ...]]:
        path = self.state_path
        assert path is not None
        fix = (f"Move it away (e.g. `mv {path} {path}.bad`) to start again from the bundle's classes, or restore a "
               "good copy; it is never overwritten automatically.")
        try:
            with open(path, "rb") as fh:
                st = os.fstat(fh.fileno())
                raw = fh.read()
        except OSError as exc:
            raise ClassStateError(f"Cannot read class state file {path}: {exc}") from exc
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ClassStateError(f"Class state file {path} is corrupt (not valid JSON: {exc}). {fix}") from exc

        def corrupt(msg: str) -> ClassStateError:
            return ClassStateError(f"Class state file {path} is invalid: {msg}. {fix}")

        state = ClassState.read(data, source=f"Class state file {path}", invalid=corrupt, error=ClassStateError)
        version, names = state.version, state.names
        known = set(self._names)  # validated before; only new names need the (tokenizing) check
        try:
            checked = [n if isinstance(n, str) and n in known else self.normalize_name(n, field="classes")
                       for n in names]
        except ClassNameError as exc:
            raise corrupt(f"{exc}") from exc
        if len(set(names)) != len(names):
            raise corrupt("names has duplicates")
        if checked != names:
            # e.g. "golden_retriever" added at runtime before underscores became spaces: keep the class, under the
            # name the class-name rule gives it (the file is rewritten at the next change)
            renamed = [(n, c) for n, c in zip(names, checked) if n != c]
            logger.warning("class state file %s: %d name(s) rewritten by the class-name rule (%s); the file keeps "
                           "the old spelling until the next add/remove", path, len(renamed),
                           ", ".join(f"{_preview(a)} -> {_preview(b)}" for a, b in renamed[:5]))
            merged = list(dict.fromkeys(checked))
            if len(merged) != len(checked):
                logger.warning("class state file %s: %d name(s) became the same class under the class-name rule "
                               "and are kept once", path, len(checked) - len(merged))
            names = merged
        return version, names, file_signature(st)

    def _commit_locked(self, names: list[str]) -> None:
        version = self._version + 1
        if self.state_dir is not None:
            self._write_state(version, names)
        self._names, self._version = names, version

    def _write_state(self, version: int, names: list[str]) -> None:
        """Atomically replace the state file (temp file in the same dir, fsync, rename, fsync dir)."""
        assert self.state_dir is not None and self.state_path is not None
        state = ClassState(format_version=CLASS_STATE_FORMAT_VERSION, version=version, names=names)
        payload = json.dumps(state.to_json(), ensure_ascii=False, indent=1).encode("utf-8")
        try:
            st = replace_file(self.state_path, lambda fh: fh.write(payload))
        except OSError as exc:
            raise ClassStateError(f"Cannot write class state file {self.state_path}: {exc}; the change was not "
                                  "applied -- check disk space and permissions") from exc
        self._sig = file_signature(st)

    def file_lock(self) -> contextlib.AbstractContextManager[None]:
        """The state directory's exclusive inter-process lock (and this registry's thread lock): what every writer
        of the directory holds."""
        return _joined(self._lock, self._file_lock())

    @contextlib.contextmanager
    def _file_lock(self) -> Iterator[None]:
        """Exclusive advisory lock on ``state_dir/classes.lock`` (no-op without a state dir)."""
        if self.state_dir is None or fcntl is None:
            yield
            return
        lock_path = self.state_dir / LOCK_FILE
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise ClassStateError(f"Cannot open lock file {lock_path}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __repr__(self) -> str:
        return f"ClassRegistry({len(self)} classes, version {self.version}, state={str(self.state_path)!r})"


@contextlib.contextmanager
def _joined(lock: threading.RLock, inner: contextlib.AbstractContextManager[None]) -> Iterator[None]:
    with lock, inner:
        yield


def remove_stale_temp_files(state_dir: Path) -> int:
    """Delete temp files left by writers killed mid-write (call under the state directory's file lock, when no
    writer can be active); returns how many were removed."""
    removed = 0
    for path in state_dir.iterdir():
        if path.name.endswith(".tmp") and path.name.startswith(TEMP_PREFIXES):
            with contextlib.suppress(OSError):
                path.unlink()
                removed += 1
    if removed:
        logger.info("removed %d stale temp file(s) from %s", removed, state_dir)
    return removed


def _write_marker(path: Path) -> None:
    try:
        path.write_text(time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()) + "\n", encoding="utf-8")
    except OSError as exc:
        raise ClassStateError(f"Cannot write {path}: {exc}; check the state directory's permissions") from exc


def _read_marker(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip() or "at an unknown time"
    except OSError:
        return "at an unknown time"


def file_signature(st: os.stat_result) -> tuple[int, ...]:
    """What identifies one written version of a state file without reading it."""
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename in it is durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_file(path: Path, write: Callable[[BinaryIO], object]) -> os.stat_result:
    """Atomically replace ``path`` with what ``write`` writes to a binary file: a temp file ``.<stem>.*.tmp`` in the
    same directory, flushed and fsynced, renamed over ``path``, the directory fsynced. Returns the new file's stat.

    Raises:
        OSError: nothing was replaced (the temp file is removed; a killed writer's is removed by
            :func:`remove_stale_temp_files`).
    """
    tmp: str | None = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        tmp = None
        fsync_dir(path.parent)
        return os.stat(path)
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
