"""Data: image sources, seeded saved splits, transforms and torch datasets.

Typical use (the config layer calls :func:`build_data`)::

    bundle = build_data(source="digits", image_size=32, seed=0, split_path="out/split")
    train_ds = bundle.train_dataset()            # (view1, view2, position)
    db_ds = bundle.eval_dataset("database")      # (image, position)
    db_labels = bundle.labels("database")        # float32 (N, C) multi-hot
"""

from brcd.data.datasets import (
    DEFAULT_LIST_FILES, SOURCES, DataBundle, EvalDataset, OnCorrupt, TwoViewDataset, build_data,
    default_resize_then_crop, labels_for
)
from brcd.data.sources import (
    IMAGE_EXTENSIONS, ArraySource, ConcatSource, CorruptImageError, FileSource, ImageSource, UnsafePickleError,
    cifar10_source, digits_source, image_folder_source, list_file_source, one_hot, open_rgb, read_cifar_batch,
    scan_images
)
from brcd.data.splits import (
    PARTS, Split, cifar10_split, class_ids, list_split, load_or_create_split, load_split, random_split, save_split,
    split_files, stratified_sample
)
from brcd.data.transforms import (
    IMAGENET_MEAN, IMAGENET_STD, TwoViewTransform, augmentation, eval_transform
)

__all__ = [
    "ArraySource", "ConcatSource", "CorruptImageError", "DEFAULT_LIST_FILES", "DataBundle", "EvalDataset",
    "FileSource", "IMAGENET_MEAN", "IMAGENET_STD", "IMAGE_EXTENSIONS", "ImageSource", "OnCorrupt", "PARTS", "SOURCES",
    "Split", "TwoViewDataset", "TwoViewTransform", "UnsafePickleError", "augmentation",
    "build_data", "cifar10_source", "cifar10_split", "class_ids", "default_resize_then_crop", "digits_source",
    "eval_transform", "image_folder_source", "labels_for", "list_file_source", "list_split", "load_or_create_split",
    "load_split", "one_hot", "open_rgb", "random_split", "read_cifar_batch", "save_split", "scan_images",
    "split_files", "stratified_sample"
]
