"""Checks and listings of dataset folders shared by the benchmark readers; every failure is a
:class:`~training.errors.DatasetError` naming the path and drawing the expected ``layout``."""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from training.data.folder import list_images
from training.errors import DatasetError

__all__ = [
    "subdirs", "require_dir", "require_file", "read_text_lines", "images_per_folder", "wnid_folders",
]


def subdirs(path: str) -> list[str]:
    """Sorted names of the non-hidden sub-directories of ``path``."""
    with os.scandir(path) as it:
        return sorted(e.name for e in it if not e.name.startswith(".") and e.name != "__MACOSX" and e.is_dir())


def require_dir(path: str, what: str, layout: str) -> None:
    if not os.path.isdir(path):
        state = "is not a directory" if os.path.exists(path) else "does not exist"
        raise DatasetError(f"{what} {path} {state}\n{layout}")


def require_file(path: str, what: str, layout: str) -> None:
    if not os.path.isfile(path):
        state = "is not a file" if os.path.exists(path) else "does not exist"
        raise DatasetError(f"{what} {path} {state}\n{layout}")


def read_text_lines(path: str, layout: str) -> list[tuple[int, str]]:
    """``(line number, stripped line)`` of the non-blank lines of a UTF-8 text file."""
    try:
        with open(path, encoding="utf-8") as fh:
            return [(i, line.strip()) for i, line in enumerate(fh, 1) if line.strip()]
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path} is not UTF-8 text: {exc}\n{layout}") from exc
    except OSError as exc:
        raise DatasetError(f"cannot read {path}: {exc}\n{layout}") from exc


def images_per_folder(parent: str, folders: Sequence[str], layout: str) -> dict[str, list[str]]:
    """``{folder: sorted image paths}``; an image-less folder is an error naming it."""
    out: dict[str, list[str]] = {}
    for folder in folders:
        images = list_images(os.path.join(parent, folder))
        if not images:
            raise DatasetError(f"folder {os.path.join(parent, folder)} holds no images\n{layout}")
        out[folder] = images
    return out


def wnid_folders(parent: str, what: str, names: Mapping[str, str], names_path: str, layout: str) -> list[str]:
    """The sorted ``<wnid>`` folders of ``parent`` (an ImageNet-style folder); none, or one whose name is not a wnid
    of ``names`` (read from ``names_path``), is an error naming them."""
    folders = subdirs(parent)
    if not folders:
        raise DatasetError(f"{what} {parent} holds no <wnid> folders\n{layout}")
    unknown = [f for f in folders if f not in names]
    if unknown:
        raise DatasetError(
            f"folder(s) {', '.join(os.path.join(parent, f) for f in unknown[:5])} are not wnids "
            f"listed in {names_path}\n{layout}"
        )
    return folders
