"""The toy world as a dataset provider of the protocol runner (:mod:`training.protocols.runner`).

Dataset names (after an optional ``prefix``, ``"toyworld-"`` in ``promptclip reproduce``):

* ``<style>``: the style's own seeded colour-shape classes rendered in that style (base-to-novel, cross-style);
* ``dg-<style>``: the *source style's* classes rendered in ``<style>`` (domain generalisation);
* ``disjoint-<style>``: the *disjoint* base/new split of ``<style>``: the base half of its classes uses one seeded
  half of the shapes and the new half the other shapes, so a novel class shares no shape with any base class (a
  context that overfits to the base shapes cannot transfer through a shared shape, as it can on ``<style>``, whose
  base/new halves split the sorted names and so share shapes). The base classes come first in label order, so the
  CoOp base/new rule (first ``ceil(n / 2)`` labels) picks them;
* ``colour-<style>``: the *colour* base/new split of ``<style>``: the base classes are one colour and differ only in
  shape; the new classes are the other shapes in other colours, so new classes sharing a shape differ only in colour.
  A prompt fitted to the base classes has no reason to keep colour, which the new classes need (base first, as above);
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
#: Base/new splits of the toy world: ``"name"`` (the CoOp rule on sorted class names; novel classes share shapes
#: with base ones), ``"disjoint"`` (novel classes share no shape with base classes) and ``"colour"`` (base classes
#: are one colour and differ only in shape; novel classes are other shapes that differ in colour).
SPLITS = ("name", "disjoint", "colour")
DISJOINT = "disjoint-"
COLOUR = "colour-"
#: dataset-name prefix and class picker of each split but ``name``
_SPLIT_PREFIX = {"disjoint": DISJOINT, "colour": COLOUR}
_SPLIT_CLASSES = {"disjoint": world.disjoint_style_classes, "colour": world.colour_split_classes}


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

    def dataset_name(self, style: str, *, dg: bool = False, split: str = "name") -> str:
        """The name of ``style``'s own dataset (``split`` ``"disjoint"``: its disjoint base/new split), or (``dg``)
        of the source classes rendered in ``style``."""
        if split not in SPLITS:
            raise DatasetError(f"unknown toy-world split {split!r}; choose from {', '.join(SPLITS)}")
        if dg and split != "name":
            raise DatasetError(f"the {split} split is a base-to-novel split; dg datasets have no base/new split")
        return f"{self.prefix}{'dg-' if dg else ''}{_SPLIT_PREFIX.get(split, '')}{style}"

    def owns(self, name: str) -> bool:
        if name == WORLD:
            return True
        key = name[len(self.prefix):] if name.startswith(self.prefix) else None
        return key is not None and any(key.removeprefix(p) in world.STYLES for p in ("dg-", DISJOINT, COLOUR))

    def load(self, name: str) -> DatasetSplits:
        if not self.owns(name) or name == WORLD:
            raise DatasetError(f"{name!r} is not a toy-world dataset; use {self.prefix}<style>, "
                               f"{self.prefix}{DISJOINT}<style>, {self.prefix}{COLOUR}<style> or "
                               f"{self.prefix}dg-<style> with a style of "
                               f"{', '.join(world.STYLES)}")
        key = name[len(self.prefix):]
        if key.startswith("dg-"):  # one training image per class: only the test split is used
            style = key[3:]
            splits = world.write_style_dataset(self.root / key, style, classes=self._classes(self.source_style),
                                               train_per_class=1, test_per_class=self.test_per_class,
                                               seed=self.data_seed + 1)
        elif (split := next((sp for sp, p in _SPLIT_PREFIX.items() if key.startswith(p)), None)) is not None:
            style = key[len(_SPLIT_PREFIX[split]):]
            classes = _SPLIT_CLASSES[split](style, num_classes=self.num_classes, seed=self.data_seed)
            splits = ordered_labels(world.write_style_dataset(
                self.root / key, style, classes=classes, train_per_class=self.train_per_class,
                test_per_class=self.test_per_class, seed=self.data_seed), [world.class_name(*c) for c in classes])
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


def ordered_labels(splits: DatasetSplits, classnames: Sequence[str]) -> DatasetSplits:
    """``splits`` relabelled so that label ``i`` is ``classnames[i]`` (the same set of names in another order)."""
    if sorted(classnames) != sorted(splits.classnames):
        raise DatasetError(f"cannot reorder the classes of {splits.name or 'a toy-world dataset'}: the names differ")
    old = {name: i for i, name in enumerate(splits.classnames)}
    relabel = {old[name]: new for new, name in enumerate(classnames)}

    def _relabel(items: list) -> list:
        return sorted((dataclasses.replace(x, label=relabel[x.label]) for x in items),
                      key=lambda x: (x.label, x.path, x.domain))

    return dataclasses.replace(splits, classnames=list(classnames), train=_relabel(splits.train),
                               val=_relabel(splits.val), test=_relabel(splits.test))
