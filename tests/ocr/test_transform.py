"""ocr/transform.py: the resize-pad-flip transform, its geometry and the finishing step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from diskcache_ocr.ocr.transform import (
    TransformConfig,
    finish,
    finish_numpy,
    finish_torch,
    map_points,
    map_polygons,
    resize_pad,
    scale_for,
)


def image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


BOX = np.array([[10.0, 20.0], [90.0, 20.0], [90.0, 50.0], [10.0, 50.0]])


@pytest.mark.parametrize("bad, match", [
    ({"size": 8}, "size must be in 16..8192, got 8"),
    ({"std": (0.2, 0.0, 0.2)}, "std > 0"),
    ({"mean": (0.5, 0.5)}, "mean/std need 3 values"),
    ({"pad_value": 256}, "pad_value must be in 0..255, got 256"),
    ({"hflip_prob": 1.5}, r"hflip_prob must be in \[0, 1\], got 1.5"),
    ({"output": "float16"}, "output must be 'float32' or 'compact', got 'float16'"),
])
def test_bad_parameters_are_refused_with_the_value(bad, match):
    with pytest.raises(ValueError, match=match):
        TransformConfig(**bad)


def test_config_round_trips_through_a_dict_and_refuses_unknown_keys():
    config = TransformConfig(size=320, mean=(0.1, 0.2, 0.3), output="float32")
    assert TransformConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown transform parameter.*'sizes'"):
        TransformConfig.from_dict({"sizes": 320})


def test_fingerprint_follows_every_parameter():
    base = TransformConfig()
    assert TransformConfig().fingerprint() == base.fingerprint()
    assert TransformConfig(mean=[0.5602] * 3).fingerprint() == base.fingerprint()  # list == tuple
    for change in ({"size": 512}, {"pad_value": 1}, {"hflip_prob": 0.5}, {"output": "float32"},
                   {"version": "2"}, {"std": (0.25, 0.25, 0.25)}):
        assert TransformConfig(**change).fingerprint() != base.fingerprint(), change


@pytest.mark.parametrize("h, w", [(480, 360), (360, 480), (100, 100), (1, 700)])
def test_resize_pad_places_the_resized_image_top_left_and_pads_the_rest(h, w):
    config = TransformConfig(size=128, pad_value=7)
    src = image(h, w)
    t = resize_pad(src, [BOX], config, flip=False)
    new_h, new_w, _, _ = scale_for(h, w, 128)
    assert max(new_h, new_w) == 128
    assert t.image.shape == (3, 128, 128) and t.image.dtype == np.uint8
    want = np.asarray(Image.fromarray(src).resize((new_w, new_h), Image.Resampling.BILINEAR))
    assert np.array_equal(t.image[:, :new_h, :new_w], want.transpose(2, 0, 1))
    assert (t.image[:, new_h:, :] == 7).all() and (t.image[:, :, new_w:] == 7).all()
    assert tuple(t.orig_size) == (h, w)


def test_inverse_matrix_maps_transformed_polygons_back_to_the_original():
    for flip in (False, True):
        t = resize_pad(image(300, 500), [BOX, BOX + 100], TransformConfig(size=200), flip=flip)
        for moved, original in zip(t.polygons, [BOX, BOX + 100]):
            back = map_points(moved, t.inverse_matrix)
            assert np.allclose(back, original, atol=1e-3), flip


def test_a_flip_mirrors_the_content_and_the_polygons_together():
    config = TransformConfig(size=160)
    src = image(120, 200)
    plain = resize_pad(src, [BOX], config, flip=False)
    flipped = resize_pad(src, [BOX], config, flip=True)
    _, new_w, _, _ = scale_for(120, 200, 160)
    assert np.array_equal(flipped.image[:, :, :new_w], plain.image[:, :, :new_w][:, :, ::-1])
    assert np.allclose(flipped.polygons[0][:, 0], new_w - plain.polygons[0][:, 0], atol=1e-4)
    assert np.array_equal(flipped.polygons[0][:, 1], plain.polygons[0][:, 1])


def test_flip_none_draws_from_torch_with_the_configured_probability():
    src = image(40, 60)
    never = TransformConfig(size=64, hflip_prob=0.0)
    always = TransformConfig(size=64, hflip_prob=1.0)
    plain = resize_pad(src, [], never, flip=False).image
    assert all(np.array_equal(resize_pad(src, [], never).image, plain) for _ in range(5))
    assert not any(np.array_equal(resize_pad(src, [], always).image, plain) for _ in range(5))


def test_resize_pad_refuses_what_is_not_an_rgb_uint8_image():
    with pytest.raises(ValueError, match="expected an H×W×3 uint8 image"):
        resize_pad(np.zeros((10, 10), np.uint8), [], TransformConfig())
    with pytest.raises(ValueError, match="float32"):
        resize_pad(np.zeros((10, 10, 3), np.float32), [], TransformConfig())


def test_a_point_maps_to_the_same_bits_alone_or_among_many():
    matrix = np.array([[0.3713, 0.0, 12.5], [0.0, 0.6117, 3.25], [0.0, 0.0, 1.0]])
    points = np.random.default_rng(1).random((5000, 2)) * 1000
    together = map_points(points, matrix)
    alone = np.concatenate([map_points(points[i:i + 1], matrix) for i in (0, 17, 4999)])
    assert together.dtype == np.float32
    assert np.array_equal(alone, together[[0, 17, 4999]])
    assert map_polygons([], matrix) == ()
    split = map_polygons([points[:3], points[3:10]], matrix)
    assert [len(p) for p in split] == [3, 7] and np.array_equal(split[1], together[3:10])


def test_finish_agrees_bit_for_bit_on_numpy_and_torch_for_every_pixel_value():
    config = TransformConfig(mean=(0.1, 0.5, 0.9), std=(0.2, 0.3, 0.25))
    values = np.arange(256, dtype=np.uint8)
    img = np.broadcast_to(values, (3, 16, 256)).copy()
    by_numpy = finish_numpy(img, config, np.empty(img.shape, np.float32))
    by_torch = finish_torch(torch.from_numpy(img), config, torch.empty(img.shape))
    assert np.array_equal(by_numpy.view(np.uint32), by_torch.numpy().view(np.uint32))
    assert torch.equal(finish(torch.from_numpy(img), config), by_torch)
    mean, std = np.array(config.mean), np.array(config.std)
    expected = (values[None, :] / 255.0 - mean[:, None]) / std[:, None]
    assert np.allclose(by_numpy[:, 0, :], expected, atol=1e-5)


def test_finish_numpy_handles_batches_and_non_contiguous_input():
    config = TransformConfig()
    batch = np.random.default_rng(2).integers(0, 256, (2, 3, 20, 30), dtype=np.uint8)
    whole = finish_numpy(batch, config, np.empty(batch.shape, np.float32))
    strided = batch[:, :, :, ::-1]  # not C-contiguous: the plain path
    mirrored = finish_numpy(strided, config, np.empty(strided.shape, np.float32))
    assert np.array_equal(mirrored, whole[:, :, :, ::-1])
