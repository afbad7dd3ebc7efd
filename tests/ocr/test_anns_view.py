"""The origin's ``anns`` as a lazy view over the catalog (diskcache_ocr.ocr.anns): what an
eagerly built OrderedDict of the same images would answer, image by image."""

from __future__ import annotations

import collections
import copy
import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from diskcache_ocr.ocr.anns import OrderedDict as LazyAnns
from diskcache_ocr.ocr.catalog import Catalog
from diskcache_ocr.ocr.conventions import round_points


@pytest.fixture
def catalog(tmp_path: Path) -> Catalog:
    images = tmp_path / "img"
    images.mkdir()
    doc = {}
    for i, name in enumerate(["z.jpg", "a.jpg", "m.jpg", "b.jpg"]):
        (images / name).write_bytes(b"")
        words = {str(k): {"points": [[k + 0.5, i], [k + 9.5, i], [k + 9.5, i + 8.5],
                                     [k + 0.5, i + 8.5]]} for k in range(i)}
        doc[name] = {"words": words}
    (tmp_path / "v.json").write_text(json.dumps({"images": doc}))
    return Catalog.load(images, tmp_path / "v.json", "origin", cache_dir=tmp_path / "c")


def eager(cat: Catalog) -> collections.OrderedDict:
    out: collections.OrderedDict = collections.OrderedDict()
    for i in range(len(cat)):
        out[cat.source(i)] = [round_points(p) for p in cat.words(i)[0]] or None
    return out


def same(a: object, b: object) -> bool:
    if a is None or b is None:
        return a is b
    assert isinstance(a, list) and isinstance(b, list)
    return len(a) == len(b) and all(x.dtype == y.dtype == np.int32 and x.shape == y.shape
                                    and np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_it_answers_what_the_eager_dict_answers(catalog: Catalog) -> None:
    view, want = LazyAnns(catalog), eager(catalog)
    assert isinstance(view, collections.OrderedDict) and type(view).__name__ == "OrderedDict"
    assert list(view) == list(want) == ["z.jpg", "a.jpg", "m.jpg", "b.jpg"]
    assert list(view.keys()) == list(want.keys()) and list(reversed(view)) == list(reversed(want))
    assert len(view) == 4 and bool(view) and len(collections.OrderedDict()) == 0
    for name in want:
        assert name in view and same(view[name], want[name]) and same(view.get(name), want[name])
    assert [k for k, _ in view.items()] == list(want)
    assert all(same(a, b) for a, b in zip(view.values(), want.values(), strict=True))
    assert "nope.jpg" not in view and view.get("nope.jpg") is None and 3 not in view
    with pytest.raises(KeyError):
        view["nope.jpg"]
    assert view["z.jpg"] is None  # an image without words
    assert dict(view).keys() == want.keys()


def test_it_holds_nothing_until_asked_and_builds_each_time(catalog: Catalog) -> None:
    view = LazyAnns(catalog)
    assert collections.OrderedDict.__len__(view) == 0  # the dict itself stays empty
    first = view["b.jpg"]
    assert first is not view["b.jpg"] and same(first, view["b.jpg"])


def test_a_change_makes_it_a_plain_dict_of_every_image(catalog: Catalog) -> None:
    view, want = LazyAnns(catalog), eager(catalog)
    view["new.jpg"] = None
    assert list(view) == [*want, "new.jpg"]
    assert all(same(view[k], want[k]) for k in want)
    del view["a.jpg"]
    assert "a.jpg" not in view and len(view) == 4
    assert view.pop("m.jpg") is not None and view.popitem() == ("new.jpg", None)


def test_copies_and_pickles(catalog: Catalog) -> None:
    view, want = LazyAnns(catalog), eager(catalog)
    for other in (view.copy(), copy.copy(view), copy.deepcopy(view)):
        assert list(other) == list(want) and all(same(other[k], want[k]) for k in want)
    back = pickle.loads(pickle.dumps(view))
    assert type(back) is LazyAnns and list(back) == list(want)
    assert all(same(back[k], want[k]) for k in want)
