"""Datasets: Fashion-MNIST (found or downloaded), any ImageFolder, synthetic test data; batching."""
from __future__ import annotations

from hetero.data._idx import read_idx
from hetero.data.fashion_mnist import CLASSES as FASHION_MNIST_CLASSES
from hetero.data.fashion_mnist import find_fashion_mnist, has_fashion_mnist, load_fashion_mnist
from hetero.data.folder_images import FolderImages
from hetero.data.image_folder import load_image_folder
from hetero.data.imageset import FASHION_MNIST_PREPROCESS, ImageSet, Preprocess
from hetero.data.loader import (
                                SYNTHETIC_SPEC,
                                as_nchw,
                                data_source,
                                is_synthetic,
                                iterate_batches,
                                load_dataset,
                                pixel_stats,
)
from hetero.data.synthetic import synthetic_dataset

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_PREPROCESS",
    "FolderImages",
    "ImageSet",
    "as_nchw",
    "Preprocess",
    "SYNTHETIC_SPEC",
    "data_source",
    "find_fashion_mnist",
    "has_fashion_mnist",
    "is_synthetic",
    "iterate_batches",
    "load_dataset",
    "load_fashion_mnist",
    "load_image_folder",
    "pixel_stats",
    "read_idx",
    "synthetic_dataset",
]
