"""Compact batches are never wrong: a batch's finish spec describes every row it covers, or
the batch is refused; ``finish_batch`` refuses what it cannot finish correctly."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import Data
from torch.utils.data import ConcatDataset, DataLoader

from diskcache_ocr import CachedOCRDataset, collate, finish_batch
from diskcache_ocr.errors import BatchError, CacheError
from diskcache_ocr.ocr.transform import TransformConfig
from diskcache_ocr.samples import collate_fn

OTHER = TransformConfig(mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))


def _compact(data: Data, **kw: object) -> CachedOCRDataset:
    return CachedOCRDataset(data.images, data.annotations, preset="none", output="compact",
                            **kw)


def test_a_compact_and_a_float32_dataset_are_not_mixed_in_one_batch(tiny: Data) -> None:
    compact = _compact(tiny)
    plain = CachedOCRDataset(tiny.images, tiny.annotations, preset="none")
    both = ConcatDataset([compact, plain])
    loader = DataLoader(both, batch_size=4, sampler=[0, 1, 8, 9], collate_fn=collate)
    with pytest.raises(BatchError, match=r"sample 0 .*compact.*sample 2 .*finished") as err:
        next(iter(loader))
    assert isinstance(err.value, CacheError) and tiny.names[0] in str(err.value)


def test_two_normalizations_are_not_mixed_in_one_batch(tiny: Data) -> None:
    a = _compact(tiny)
    b = _compact(tiny, transform=OTHER)
    with pytest.raises(BatchError, match=r"mean \[0\.5602.*mean \[0\.5, 0\.4"):
        collate([a[0], b[1]])


def test_two_normalizations_in_separate_batches_are_each_finished_with_their_own(
        tiny: Data) -> None:
    a, b = _compact(tiny), _compact(tiny, transform=OTHER)
    for compact, transform in ((a, TransformConfig()), (b, OTHER)):
        plain = CachedOCRDataset(tiny.images, tiny.annotations, preset="none",
                                 transform=transform)
        got = finish_batch(collate(compact.__getitems__([0, 1])))
        want = collate(plain.__getitems__([0, 1]))
        assert torch.equal(got["image"], want["image"])


def _origin_item(sample: dict) -> dict:
    """A sample under the origin's item keys."""
    name = sample["meta"]["file"]
    return {"image": sample["image"], "polygons": sample["polygons"],
            "inverse_matrix": sample["inverse_matrix"], "finish": sample["finish"],
            "metadata": {"filename": name, "path": name, "raw_size": (1, 1),
                         "orientation": 1}}


def test_origin_keys_refuse_the_mix_too(tiny: Data) -> None:
    a, b = _compact(tiny), _compact(tiny, transform=OTHER)
    same = collate_fn("origin")([_origin_item(a[0]), _origin_item(a[1])])
    assert same["finish"]["image_key"] == "images"
    with pytest.raises(BatchError, match="one normalization"):
        collate_fn("origin")([_origin_item(a[0]), _origin_item(b[1])])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_finish_batch_refuses_a_batch_cast_before_finishing(tiny: Data, dtype) -> None:
    batch = collate(_compact(tiny).__getitems__([0, 1]))
    cast = {**batch, "image": batch["image"].to(dtype)}
    with pytest.raises(BatchError, match=r"'image' is torch\.float.*call finish_batch before"):
        finish_batch(cast)


def test_finish_batch_still_leaves_finished_and_float32_batches_alone(tiny: Data) -> None:
    batch = collate(_compact(tiny).__getitems__([0, 1]))
    once = finish_batch(batch)
    twice = finish_batch(once)
    assert torch.equal(once["image"], twice["image"]) and once["image"].dtype == torch.float32


@pytest.mark.parametrize("field,value,message", [
    ("mean", [math.nan, 0.5, 0.5], "mean must be a list of finite numbers"),
    ("mean", [math.inf, 0.5, 0.5], "mean must be a list of finite numbers"),
    ("std", [0.0, 0.2, 0.2], "std must not be zero"),
    ("std", [math.nan, 0.2, 0.2], "std must be a list of finite numbers"),
    ("std", None, "std must be a list of finite numbers"),
])
def test_finish_batch_refuses_a_spec_that_cannot_finish(tiny: Data, field, value,
                                                         message) -> None:
    batch = collate(_compact(tiny).__getitems__([0, 1]))
    batch["finish"] = {**batch["finish"], field: value}
    with pytest.raises(BatchError, match=message):
        finish_batch(batch)
