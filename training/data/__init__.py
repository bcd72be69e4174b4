"""Datasets for few-shot prompt learning: sample records, image-folder and benchmark readers, few-shot sampling,
torch datasets and loaders (procedural test images come from :mod:`training.toyworld.world`).

Modules: :mod:`~training.data.samples` (records, few-shot sampling, base/new split), :mod:`~training.data.folder`
(plain image folders), :mod:`~training.data.catalog` (which benchmarks exist and where they live),
:mod:`~training.data.readers_coop` (CoOp's 11 datasets and the ImageNet variants),
:mod:`~training.data.readers_domainbed` (DomainBed, your own domain folders, ImageNet-DG, DG tasks),
:mod:`~training.data.fewshot_cache` (a few-shot pick cached as JSON), :mod:`~training.data.dataset` (torch datasets
and loaders)."""
from __future__ import annotations

from training.data.catalog import (
    BASE_TO_NOVEL_DATASETS,
    DATASETS,
    DOMAIN_DATASETS,
    IMAGENET_DG_DOMAINS,
    IMAGENET_DG_SOURCES,
    IMAGENET_DG_TARGETS,
    IMAGENET_VARIANTS,
    DatasetInfo,
    DomainDatasetInfo,
    dataset_domains,
    dataset_info,
    is_imagenet_dg,
    list_datasets,
    list_domain_datasets,
)
from training.data.dataset import (
    DomainBalancedBatches,
    EvalTransform,
    ImageListDataset,
    load_rgb,
    make_domain_balanced_loader,
    make_loader,
)
from training.data.fewshot_cache import few_shot_cached
from training.data.folder import IMAGE_EXTENSIONS, list_images, read_image_folder
from training.data.readers_coop import CoopSplit, read_dataset, read_imagenet_classnames, read_split_json
from training.data.readers_domainbed import (
    HoldoutSplit,
    holdout_split,
    leave_one_domain_out,
    multi_source_task,
    read_domain_dataset,
    read_domain_folders,
    read_imagenet_dg,
)
from training.data.samples import (
    SUBSAMPLE_CHOICES,
    DatasetSplits,
    Sample,
    class_name_from_folder,
    sample_few_shot,
    subsample_classes,
)

__all__ = [
    "Sample",
    "DatasetSplits",
    "SUBSAMPLE_CHOICES",
    "class_name_from_folder",
    "sample_few_shot",
    "subsample_classes",
    "IMAGE_EXTENSIONS",
    "list_images",
    "read_image_folder",
    "EvalTransform",
    "ImageListDataset",
    "load_rgb",
    "make_loader",
    "DomainBalancedBatches",
    "make_domain_balanced_loader",
    "DatasetInfo",
    "DomainDatasetInfo",
    "CoopSplit",
    "HoldoutSplit",
    "DATASETS",
    "DOMAIN_DATASETS",
    "BASE_TO_NOVEL_DATASETS",
    "IMAGENET_VARIANTS",
    "IMAGENET_DG_DOMAINS",
    "IMAGENET_DG_SOURCES",
    "IMAGENET_DG_TARGETS",
    "list_datasets",
    "list_domain_datasets",
    "dataset_info",
    "read_dataset",
    "read_split_json",
    "read_imagenet_classnames",
    "read_domain_dataset",
    "holdout_split",
    "leave_one_domain_out",
    "is_imagenet_dg",
    "dataset_domains",
    "multi_source_task",
    "read_domain_folders",
    "read_imagenet_dg",
    "few_shot_cached",
]
