"""Datasets for few-shot prompt learning: sample records, image-folder reader, torch datasets
and a procedural coloured-shapes set."""
from __future__ import annotations

from training.data.dataset import ImageListDataset, load_rgb, make_loader
from training.data.folder import IMAGE_EXTENSIONS, list_images, read_image_folder
from training.data.samples import (
    SUBSAMPLE_CHOICES,
    DatasetSplits,
    Sample,
    class_name_from_folder,
    sample_few_shot,
    subsample_classes,
)
from training.data.synthetic import (
    DEFAULT_CLASSES,
    DEFAULT_COLORS,
    DEFAULT_SHAPES,
    make_shapes_dataset,
    render_shape,
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
    "ImageListDataset",
    "load_rgb",
    "make_loader",
    "DEFAULT_CLASSES",
    "DEFAULT_COLORS",
    "DEFAULT_SHAPES",
    "make_shapes_dataset",
    "render_shape",
]
