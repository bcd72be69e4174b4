"""Where the protocol runner's datasets come from: the :class:`DatasetProvider` interface and the benchmark catalog.

A provider turns dataset *names* into :class:`~training.data.DatasetSplits` (each carrying its prompt template) and
says which datasets each protocol uses by default and which domains a multi-source dataset has. Two implementations:
:class:`CatalogProvider` (the benchmark folders under a root, ``training.data``) and
:class:`training.toyworld.provider.ToyWorldProvider` (the toy world's styles, generated on demand).
:class:`CombinedProvider` chains them so ``promptclip reproduce`` accepts both kinds of names.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

from training.data import (
    IMAGENET_DG_TARGETS,
    DatasetSplits,
    dataset_domains,
    is_imagenet_dg,
    multi_source_task,
    read_dataset,
)

#: The protocol names :meth:`DatasetProvider.default_datasets` answers for (those of ``promptclip reproduce``).
PROTOCOLS = ("base2novel", "cross-dataset", "domain-generalization", "few-shot", "multi-source-dg")

DEFAULT_B2N = ("ImageNet", "Caltech101", "OxfordPets", "StanfordCars", "Flowers102", "Food101", "FGVCAircraft",
               "SUN397", "DTD", "EuroSAT", "UCF101")
DEFAULT_DG_TARGETS = ("ImageNetV2", "ImageNetSketch", "ImageNetA", "ImageNetR")
DEFAULT_MULTI_SOURCE = ("PACS", "VLCS", "TerraIncognita")


@runtime_checkable
class DatasetProvider(Protocol):
    """What the protocol runner needs to know about datasets."""

    def owns(self, name: str) -> bool:
        """Whether ``name`` is one of this provider's datasets (used by :class:`CombinedProvider`)."""

    def load(self, name: str) -> DatasetSplits:
        """The splits of dataset ``name`` (template included); an unknown name raises ``DatasetError``."""

    def default_datasets(self, protocol: str) -> tuple[str, ...]:
        """The datasets ``protocol`` (one of :data:`PROTOCOLS`) runs when the user names none (its targets for the
        source-trained protocols)."""

    def domains(self, name: str) -> list[str]:
        """The target domains of multi-source dataset ``name``, in the order they are left out."""

    def multi_source_task(self, name: str, target: str, seed: int) -> DatasetSplits:
        """Leave-``target``-out splits of ``name``: domain-tagged training samples of the other domains, the test
        split of ``target``."""


class CatalogProvider:
    """The benchmark datasets of ``training.data`` (CoOp / DomainBed / ImageNet variants) under ``root``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def owns(self, name: str) -> bool:
        return True  # the catalog reader names the known datasets when ``name`` is none of them

    def load(self, name: str) -> DatasetSplits:
        return read_dataset(name, self.root)

    def default_datasets(self, protocol: str) -> tuple[str, ...]:
        return {"cross-dataset": DEFAULT_B2N[1:], "domain-generalization": DEFAULT_DG_TARGETS,
                "multi-source-dg": DEFAULT_MULTI_SOURCE}.get(protocol, DEFAULT_B2N)

    def domains(self, name: str) -> list[str]:
        return list(IMAGENET_DG_TARGETS) if is_imagenet_dg(name) else dataset_domains(name)

    def multi_source_task(self, name: str, target: str, seed: int) -> DatasetSplits:
        return multi_source_task(self.root, target, dataset=name, seed=seed)


class CombinedProvider:
    """The first of ``providers`` that owns a name answers for it; defaults come from the last one (the fallback)."""

    def __init__(self, *providers: DatasetProvider) -> None:
        if not providers:
            raise ValueError("CombinedProvider needs at least one provider")
        self.providers: Sequence[DatasetProvider] = providers

    def _owner(self, name: str) -> DatasetProvider:
        return next((p for p in self.providers if p.owns(name)), self.providers[-1])

    def owns(self, name: str) -> bool:
        return any(p.owns(name) for p in self.providers)

    def load(self, name: str) -> DatasetSplits:
        return self._owner(name).load(name)

    def default_datasets(self, protocol: str) -> tuple[str, ...]:
        return self.providers[-1].default_datasets(protocol)

    def domains(self, name: str) -> list[str]:
        return self._owner(name).domains(name)

    def multi_source_task(self, name: str, target: str, seed: int) -> DatasetSplits:
        return self._owner(name).multi_source_task(name, target, seed)
