"""Datasets for the recipes: scikit-learn's bundled digits and ImageNet-layout folders.

Nothing here downloads anything. ``digits`` ships inside scikit-learn (1,797 grey 8x8 images of
the digits 0-9); ``imagefolder`` reads a directory laid out like ImageNet::

    data_path/train/<class>/<image>.JPEG
    data_path/val/<class>/<image>.JPEG
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, NamedTuple, TypeAlias

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

if TYPE_CHECKING:
    from torchvision.datasets import ImageFolder

__all__ = [
    "DATASETS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Datasets",
    "ImageDataset",
    "build_datasets",
    "imagefolder_datasets",
    "load_digits_split",
]

DATASETS = ("digits", "imagefolder")

#: Per-channel RGB mean and standard deviation of ImageNet (pixel values scaled to [0, 1]).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


#: What :func:`build_datasets` returns per split: ``(image, label)`` samples, ``len()`` defined.
ImageDataset: TypeAlias = "TensorDataset | ImageFolder"


class Datasets(NamedTuple):
    """Train and validation sets with what a model needs to know about them.

    A plain tuple, so ``train, val, num_classes, in_channels = build_datasets(...)`` works.
    """

    train: ImageDataset
    val: ImageDataset
    num_classes: int
    in_channels: int


def load_digits_split(
    image_size: int = 32, val_fraction: float = 0.2, seed: int = 0
) -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's digits as a deterministic stratified train/validation split.

    The 8x8 images (pixel values 0..16) are upscaled to ``image_size`` x ``image_size`` by bilinear
    interpolation, then normalised with the mean and standard deviation of the *training* pixels
    (one scalar each, the images being grey), so the training set has mean 0 and std 1.

    Args:
        image_size: side of the square output images, in pixels.
        val_fraction: share of the 1,797 samples held out, stratified by class
            (0.2 gives 1,437 train / 360 validation).
        seed: seed of the split; the same seed always gives the same split.

    Returns:
        ``(train, val)``; each a :class:`TensorDataset` of images ``(N, 1, image_size, image_size)``
        float32 and labels ``(N,)`` int64 in ``[0, 10)``.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    bunch = load_digits()
    images = torch.from_numpy(bunch.images).to(torch.float32)  # (1797, 8, 8), values 0..16
    labels = torch.from_numpy(bunch.target).to(torch.int64)  # (1797,)
    index = torch.arange(labels.numel()).numpy()
    train_idx, val_idx = train_test_split(
        index, test_size=val_fraction, random_state=seed, stratify=labels.numpy(), shuffle=True
    )
    train_idx_t = torch.as_tensor(sorted(train_idx.tolist()), dtype=torch.int64)
    val_idx_t = torch.as_tensor(sorted(val_idx.tolist()), dtype=torch.int64)

    def upscale(x: torch.Tensor) -> torch.Tensor:
        # (N, 8, 8) -> (N, 1, S, S)
        return F.interpolate(x[:, None], size=(image_size, image_size), mode="bilinear", align_corners=False)

    x_train = upscale(images[train_idx_t])
    x_val = upscale(images[val_idx_t])
    mean = x_train.mean()
    std = x_train.std()
    x_train = ((x_train - mean) / std).contiguous()
    x_val = ((x_val - mean) / std).contiguous()
    return (
        TensorDataset(x_train, labels[train_idx_t].clone()),
        TensorDataset(x_val, labels[val_idx_t].clone()),
    )


def imagefolder_datasets(data_path: str, image_size: int = 224) -> Datasets:
    """ImageNet-layout folders with the standard ImageNet transforms.

    Train: ``RandomResizedCrop(image_size)`` + horizontal flip; validation:
    ``Resize(int(image_size * 256 / 224))`` + ``CenterCrop(image_size)``; both then ``ToTensor`` and
    normalisation with :data:`IMAGENET_MEAN` / :data:`IMAGENET_STD`. Samples are
    ``(image (3, image_size, image_size) float32, label int)``.

    Raises:
        ValueError: ``data_path/train`` or ``data_path/val`` is not a directory (the message names
            the missing path), or the two splits have different class lists.
    """
    from torchvision import datasets, transforms

    train_dir = os.path.join(data_path, "train")
    val_dir = os.path.join(data_path, "val")
    for split_dir in (train_dir, val_dir):
        if not os.path.isdir(split_dir):
            raise ValueError(
                f"imagefolder dataset: directory {split_dir!r} does not exist; expected the ImageNet "
                f"layout {os.path.join(data_path, '{train,val}', '<class>', '<image>')}"
            )
    normalize = transforms.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)
    train_tf = transforms.Compose(
        [
            transforms.RandomResizedCrop(image_size),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            normalize,
        ]
    )
    val_tf = transforms.Compose(
        [
            transforms.Resize(int(image_size * 256 / 224)),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            normalize,
        ]
    )
    train = datasets.ImageFolder(train_dir, transform=train_tf)
    val = datasets.ImageFolder(val_dir, transform=val_tf)
    if train.classes != val.classes:
        raise ValueError(
            f"imagefolder dataset: {train_dir!r} has {len(train.classes)} classes and {val_dir!r} has "
            f"{len(val.classes)}; the class folders must be the same"
        )
    return Datasets(train, val, len(train.classes), 3)


def build_datasets(name: str, data_path: str | None, image_size: int) -> Datasets:
    """Build ``(train, val, num_classes, in_channels)`` for a dataset name.

    Args:
        name: ``"digits"`` (10 classes, 1 channel, ``data_path`` ignored) or ``"imagefolder"``
            (classes from the folder names, 3 channels, ``data_path`` required).
        data_path: root of an ImageNet-layout tree for ``"imagefolder"``.
        image_size: side of the square images the model sees, in pixels.

    Raises:
        ValueError: unknown name, missing ``data_path``, or missing ``train/`` or ``val/``.
    """
    if name == "digits":
        train, val = load_digits_split(image_size=image_size)
        return Datasets(train, val, 10, 1)
    if name == "imagefolder":
        if not data_path:
            raise ValueError("dataset 'imagefolder' needs --data_path pointing at a folder with train/ and val/")
        return imagefolder_datasets(data_path, image_size=image_size)
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
