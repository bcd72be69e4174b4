"""Torch datasets over :class:`Sample` lists and a seeded DataLoader factory.

Images are decoded by serving's decoder (:func:`serving.preprocess.decode_image`: EXIF orientation, transparency
composited onto white, palette, 16-bit, CMYK, greyscale, the first frame of an animation) and evaluated through
serving's preprocessing (:class:`EvalTransform`), so training, ``promptclip eval`` and the served bundle see the
same pixels."""
from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from serving.errors import ImageDecodeError
from serving.preprocess import PreprocessConfig, decode_image, preprocess
from training.data.samples import Sample
from training.errors import DatasetError

logger = logging.getLogger(__name__)

__all__ = ["EvalTransform", "ImageListDataset", "load_rgb", "make_loader"]

#: Dataset files are not uploads: no byte limit beyond memory; PIL's decompression-bomb limit still applies.
_MAX_FILE_BYTES = 1 << 34


def load_rgb(path: str) -> Image.Image:
    """Decode ``path`` into an upright 8-bit RGB PIL image exactly as serving decodes an upload
    (:func:`serving.preprocess.decode_image`). Raises :class:`DatasetError` naming the file."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError as exc:
        raise DatasetError(f"image file {path} does not exist") from exc
    except OSError as exc:
        raise DatasetError(f"cannot read image file {path}: {exc}") from exc
    try:
        return decode_image(data, max_bytes=_MAX_FILE_BYTES, max_pixels=Image.MAX_IMAGE_PIXELS or 2 ** 62)
    except ImageDecodeError as exc:
        raise DatasetError(f"cannot decode image file {path}: {exc}") from exc


class EvalTransform:
    """RGB PIL image -> float32 tensor ``[3, H, W]`` through serving's preprocessing
    (:func:`serving.preprocess.preprocess`, open_clip's eval transform): the one definition evaluation, training
    without augmentation and the served bundle share. ``preprocess`` is a backbone's / manifest's preprocessing
    dict. A class (not a closure) so data-loader workers can pickle it."""

    def __init__(self, preprocess_cfg: dict[str, Any]) -> None:
        self.cfg = PreprocessConfig.from_manifest(preprocess_cfg)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return torch.from_numpy(preprocess([image], self.cfg)[0])


def _to_tensor(im: Image.Image) -> torch.Tensor:
    """PIL RGB -> float tensor [3, H, W] in [0, 1] (used when no transform is given)."""
    arr = np.asarray(im, dtype=np.uint8).copy()
    return torch.from_numpy(arr).permute(2, 0, 1).float().div_(255.0)


class ImageListDataset(torch.utils.data.Dataset):
    """``(image tensor [3, H, W], label)`` pairs over a list of :class:`Sample`.

    ``transform`` maps an RGB PIL image to a tensor (e.g. a torchvision/open_clip preprocess);
    without one, images become float tensors in [0, 1]. ``cache_decoded`` keeps decoded RGB images
    in memory so small few-shot sets are not re-decoded each epoch (with worker processes, each
    worker holds its own cache).
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        transform: Callable[[Image.Image], Any] | None,
        *,
        cache_decoded: bool = False,
    ) -> None:
        self.samples: list[Sample] = list(samples)
        self.transform = transform
        self.cache_decoded = cache_decoded
        self._cache: dict[int, Image.Image] = {}

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def targets(self) -> list[int]:
        """Labels of all samples, in order."""
        return [s.label for s in self.samples]

    def load_image(self, index: int) -> Image.Image:
        """Decoded RGB image of sample ``index`` (from the cache when enabled)."""
        if self.cache_decoded:
            im = self._cache.get(index)
            if im is None:
                im = load_rgb(self.samples[index].path)
                self._cache[index] = im
            return im
        return load_rgb(self.samples[index].path)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        sample = self.samples[index]
        im = self.load_image(index)
        if self.transform is None:
            return _to_tensor(im), sample.label
        if self.cache_decoded:
            im = im.copy()  # a transform must never alter the cached image
        return self.transform(im), sample.label


def _seed_worker(worker_id: int) -> None:
    """Seed numpy and ``random`` in a DataLoader worker from torch's per-worker seed."""
    worker_seed = torch.initial_seed() % 2**32
    np.random.seed(worker_seed)
    random.seed(worker_seed)


def make_loader(
    dataset: torch.utils.data.Dataset,
    *,
    batch_size: int,
    shuffle: bool,
    num_workers: int = 0,
    seed: int = 0,
    drop_last: bool = False,
    pin_memory: bool | None = None,
) -> torch.utils.data.DataLoader:
    """A DataLoader whose shuffling (and worker seeding) is reproducible for a given ``seed``.

    ``pin_memory`` defaults to ``torch.cuda.is_available()``; workers persist across epochs
    when ``num_workers > 0``.
    """
    if int(batch_size) < 1:
        raise DatasetError(f"batch_size must be >= 1, got {batch_size!r}")
    if int(num_workers) < 0:
        raise DatasetError(f"num_workers must be >= 0, got {num_workers!r}")
    generator = torch.Generator()
    generator.manual_seed(int(seed))
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=int(batch_size),
        shuffle=shuffle,
        num_workers=int(num_workers),
        drop_last=drop_last,
        pin_memory=bool(pin_memory),
        generator=generator,
        worker_init_fn=_seed_worker if num_workers > 0 else None,
        persistent_workers=num_workers > 0,
    )


class DomainBalancedBatches(torch.utils.data.Sampler[list[int]]):
    """Batches that take ``per_domain`` images from every domain: one shuffled stream per domain, zipped per step
    (GuiDG / DomainBed's one ``InfiniteDataLoader`` per source domain).

    ``domains[i]`` is the domain of dataset item ``i``. An epoch is ``ceil(largest domain / per_domain)`` steps, so
    every image of the largest domain is seen once per epoch and smaller domains cycle (reshuffled at each pass).
    Deterministic for a given ``seed``.
    """

    def __init__(self, domains: Sequence[str], per_domain: int, seed: int = 0) -> None:
        if per_domain < 1:
            raise DatasetError(f"per_domain must be >= 1, got {per_domain}")
        groups: dict[str, list[int]] = {}
        for i, d in enumerate(domains):
            groups.setdefault(d, []).append(i)
        if not groups:
            raise DatasetError("no samples to batch")
        self.groups = [groups[d] for d in sorted(groups)]
        self.per_domain = int(per_domain)
        self.seed = int(seed)

    def __len__(self) -> int:
        return math.ceil(max(len(g) for g in self.groups) / self.per_domain)

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed)
        streams = [self._stream(g, gen) for g in self.groups]
        for _ in range(len(self)):
            yield [i for s in streams for i in (next(s) for _ in range(self.per_domain))]

    @staticmethod
    def _stream(indices: list[int], gen: torch.Generator):
        while True:
            for j in torch.randperm(len(indices), generator=gen).tolist():
                yield indices[j]


def make_domain_balanced_loader(dataset: ImageListDataset, *, batch_size: int, seed: int = 0,
                                num_workers: int = 0, pin_memory: bool | None = None) -> torch.utils.data.DataLoader:
    """A DataLoader whose every batch holds ``batch_size // n_domains`` images of each domain (at least one)."""
    domains = [s.domain for s in dataset.samples]
    n = len(set(domains))
    per_domain = max(1, int(batch_size) // n)
    if per_domain * n != int(batch_size):
        logger.info("domain-balanced batches: %d image(s) from each of %d domains = %d per step (batch_size %d)",
                    per_domain, n, per_domain * n, batch_size)
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=DomainBalancedBatches(domains, per_domain, seed), num_workers=int(num_workers),
        pin_memory=bool(pin_memory), worker_init_fn=_seed_worker if num_workers > 0 else None,
        persistent_workers=num_workers > 0)
