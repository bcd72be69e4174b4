"""The toy world as a dataset provider of the protocol runner (:mod:`training.protocols.runner`).

Dataset names (after an optional ``prefix``, ``"toyworld-"`` in ``promptclip reproduce``):

* ``<style>``: the style's own seeded colour-shape classes rendered in that style (base-to-novel, cross-style);
* ``dg-<style>``: the *source style's* classes rendered in ``<style>`` (domain generalisation);
* :data:`WORLD` (``"toyworld"``, never prefixed): the multi-source dataset whose domains are the styles; leaving
  one style out trains on the source classes rendered in every other style (one domain per style).

Each dataset is written under ``root/<name without prefix>`` on first use (a stamp makes later uses cheap).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from training.data import DatasetSplits
from training.errors import DatasetError
from training.toyworld import world

WORLD = "toyworld"


class ToyWorldProvider:
    """Toy-world styles as datasets: ``num_classes`` classes per style, ``train_per_class`` / ``test_per_class``
    images per class, all seeded by ``data_seed``."""

    def __init__(self, root: str | Path, *, styles: Sequence[str] = tuple(world.STYLES), source_style: str = "clean",
                 num_classes: int = 20, train_per_class: int = 32, test_per_class: int = 8, data_seed: int = 0,
                 prefix: str = "") -> None:
        self.root = Path(root)
        self.styles = tuple(styles)
        self.source_style = source_style
        self.num_classes = num_classes
        self.train_per_class = train_per_class
        self.test_per_class = test_per_class
        self.data_seed = data_seed
        self.prefix = prefix

    def _classes(self, style: str) -> list[tuple[str, str]]:
        return world.style_classes(style, num_classes=self.num_classes, seed=self.data_seed)

    def dataset_name(self, style: str, *, dg: bool = False) -> str:
        """The name of ``style``'s own dataset, or (``dg``) of the source classes rendered in ``style``."""
        return f"{self.prefix}{'dg-' if dg else ''}{style}"

    def owns(self, name: str) -> bool:
        return name == WORLD or (name.startswith(self.prefix) and name[len(self.prefix):].removeprefix("dg-")
                                 in world.STYLES)

    def load(self, name: str) -> DatasetSplits:
        if not self.owns(name) or name == WORLD:
            raise DatasetError(f"{name!r} is not a toy-world dataset; use {self.prefix}<style> or "
                               f"{self.prefix}dg-<style> with a style of {', '.join(world.STYLES)}")
        key = name[len(self.prefix):]
        if key.startswith("dg-"):  # one training image per class: only the test split is used
            style = key[3:]
            splits = world.write_style_dataset(self.root / key, style, classes=self._classes(self.source_style),
                                               train_per_class=1, test_per_class=self.test_per_class,
                                               seed=self.data_seed + 1)
        else:
            splits = world.write_style_dataset(self.root / key, key, classes=self._classes(key),
                                               train_per_class=self.train_per_class,
                                               test_per_class=self.test_per_class, seed=self.data_seed)
        splits.name = name
        return splits

    def default_datasets(self, protocol: str) -> tuple[str, ...]:
        others = [s for s in self.styles if s != self.source_style]
        if protocol == "cross-dataset":
            return tuple(self.dataset_name(s) for s in others)
        if protocol == "domain-generalization":
            return tuple(self.dataset_name(s, dg=True) for s in others)
        if protocol == "multi-source-dg":
            return (WORLD,)
        return tuple(self.dataset_name(s) for s in self.styles)

    def domains(self, name: str) -> list[str]:
        self._check_world(name)
        return list(self.styles)

    def multi_source_task(self, name: str, target: str, seed: int) -> DatasetSplits:
        """The source classes rendered in every style but ``target`` (train, one domain per style) and in
        ``target`` (test). The same for every seed: the seed only changes the few-shot sample."""
        self._check_world(name)
        if target not in self.styles:
            raise DatasetError(f"toy-world target style {target!r} is not one of {', '.join(self.styles)}")
        classes = self._classes(self.source_style)
        train, test, names, template = [], [], None, "a photo of a {}."
        for s in self.styles:
            # the expert / aggregation halves (GuiDG) each still hold half of train_per_class images
            split = world.write_style_dataset(self.root / f"loso-{s}", s, classes=classes,
                                              train_per_class=self.train_per_class,
                                              test_per_class=self.test_per_class, seed=self.data_seed + 2)
            names, template = split.classnames, split.template
            if s == target:
                test = split.test
            else:
                train += [dataclasses.replace(x, domain=s) for x in split.train]
        return DatasetSplits(classnames=names, train=train, test=test, name=f"{WORLD}-loso-{target}",
                             template=template)

    def _check_world(self, name: str) -> None:
        if name != WORLD:
            raise DatasetError(f"{name!r} has no domains; the toy world's multi-source dataset is {WORLD!r}")
