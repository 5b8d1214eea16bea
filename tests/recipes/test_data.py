"""Datasets and loaders of the recipes: digits split, ImageFolder layout, resumable sampling."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import TensorDataset

from spngd_ds.recipes.data import build_datasets, load_digits_split
from spngd_ds.recipes.loaders import ResumableDistributedSampler, ShardSampler, build_loaders

pytestmark = pytest.mark.timeout(60)


def test_digits_split_sizes_shapes_dtypes() -> None:
    train, val, num_classes, in_channels = build_datasets("digits", None, 32)
    assert (num_classes, in_channels) == (10, 1)
    assert isinstance(train, TensorDataset) and isinstance(val, TensorDataset)
    assert len(train) == 1437 and len(val) == 360  # 1,797 samples, 20% held out
    x, y = train.tensors
    assert x.shape == (1437, 1, 32, 32) and x.dtype == torch.float32
    assert y.shape == (1437,) and y.dtype == torch.int64
    assert val.tensors[0].shape == (360, 1, 32, 32)
    assert set(y.tolist()) == set(range(10))


def test_digits_normalised_with_train_statistics() -> None:
    train, val = load_digits_split(image_size=32)
    x = train.tensors[0]
    assert abs(float(x.mean())) < 1e-5
    assert abs(float(x.std()) - 1.0) < 1e-5
    # validation uses the train statistics, so it is close to but not exactly standardised
    assert abs(float(val.tensors[0].mean())) < 0.1


def test_digits_split_is_stratified_and_disjoint() -> None:
    train, val = load_digits_split(image_size=8)
    counts = torch.bincount(val.tensors[1], minlength=10)
    assert int(counts.min()) >= 35 and int(counts.max()) <= 37  # ~18 per class x 2
    # no validation image appears in the training set (images at 8x8 are the raw digits, rescaled)
    tr = {tuple(row.tolist()) for row in train.tensors[0].flatten(1)}
    dup = sum(tuple(row.tolist()) in tr for row in val.tensors[0].flatten(1))
    assert dup <= 5  # the raw data set itself holds a few identical images


def test_digits_split_is_deterministic() -> None:
    a_train, a_val = load_digits_split(image_size=16, seed=0)
    b_train, b_val = load_digits_split(image_size=16, seed=0)
    c_train, _ = load_digits_split(image_size=16, seed=1)
    assert torch.equal(a_train.tensors[0], b_train.tensors[0])
    assert torch.equal(a_val.tensors[1], b_val.tensors[1])
    assert not torch.equal(a_train.tensors[1], c_train.tensors[1])


def test_unknown_dataset_and_bad_size() -> None:
    with pytest.raises(ValueError, match="unknown dataset 'mnist'.*digits, imagefolder"):
        build_datasets("mnist", None, 32)
    with pytest.raises(ValueError, match="image_size"):
        load_digits_split(image_size=0)


def _write_tree(root: str, classes: int = 3, per_class: int = 4) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(classes):
            d = os.path.join(root, split, f"class_{c}")
            os.makedirs(d)
            for i in range(per_class):
                h, w = int(rng.integers(40, 80)), int(rng.integers(40, 80))
                pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(os.path.join(d, f"img_{i}.JPEG"), format="JPEG")


def test_imagefolder_tree(tmp_path: os.PathLike[str]) -> None:
    root = os.fspath(tmp_path)
    _write_tree(root)
    train, val, num_classes, in_channels = build_datasets("imagefolder", root, 32)
    assert (num_classes, in_channels) == (3, 3)
    assert len(train) == 12 and len(val) == 12
    x, y = train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and isinstance(y, int)
    xv, _ = val[5]
    assert xv.shape == (3, 32, 32)
    loaders = build_loaders(train, val, micro_batch_size=4, rank=0, world_size=1)
    xb, yb = next(iter(loaders.train))
    assert xb.shape == (4, 3, 32, 32) and yb.dtype == torch.int64


def test_imagefolder_missing_split_names_path(tmp_path: os.PathLike[str]) -> None:
    root = os.fspath(tmp_path)
    os.makedirs(os.path.join(root, "train", "a"))
    with pytest.raises(ValueError, match=r"val'? does not exist"):
        build_datasets("imagefolder", root, 32)
    with pytest.raises(ValueError, match=os.path.join(root, "nothere", "train").replace("\\", "\\\\")):
        build_datasets("imagefolder", os.path.join(root, "nothere"), 32)
    with pytest.raises(ValueError, match="--data_path"):
        build_datasets("imagefolder", None, 32)


def test_sampler_partitions_and_reshuffles_per_epoch() -> None:
    data = list(range(103))
    s0 = ResumableDistributedSampler(data, num_replicas=2, rank=0, seed=5, drop_last=True)  # type: ignore[arg-type]
    s1 = ResumableDistributedSampler(data, num_replicas=2, rank=1, seed=5, drop_last=True)  # type: ignore[arg-type]
    for s in (s0, s1):
        s.set_epoch(3)
    a, b = list(s0), list(s1)
    assert len(a) == len(b) == 51 and not set(a) & set(b)
    s0.set_epoch(4)
    assert list(s0) != a
    s0.set_epoch(3)
    assert list(s0) == a  # order is a function of (seed, epoch)


def test_sampler_skip_resumes_mid_epoch() -> None:
    data = list(range(40))
    s = ResumableDistributedSampler(data, num_replicas=1, rank=0, seed=1)  # type: ignore[arg-type]
    s.set_epoch(2)
    full = list(s)
    s.skip(12)
    assert len(s) == 28 and list(s) == full[12:]
    s.set_epoch(2)  # a new epoch clears the skip
    assert list(s) == full


def test_shard_sampler_covers_each_sample_once() -> None:
    data = list(range(11))
    shards = [list(ShardSampler(data, 3, r)) for r in range(3)]
    assert sorted(sum(shards, [])) == data
    assert [len(ShardSampler(data, 3, r)) for r in range(3)] == [4, 4, 3]


def test_build_loaders_drop_last_and_equal_lengths() -> None:
    train, val = load_digits_split(image_size=8)
    lens = []
    for rank in range(2):
        loaders = build_loaders(train, val, micro_batch_size=50, rank=rank, world_size=2, num_workers=0)
        lens.append(len(loaders.train))
        assert all(x.shape[0] == 50 for x, _ in loaders.train)
        assert sum(x.shape[0] for x, _ in loaders.val) == len(range(rank, 360, 2))
    assert lens == [14, 14]  # 1437 -> 718 per rank -> 14 full batches of 50
