"""decode → transform → maps as one versioned, pure pipeline.

The pipeline knows images and polygons, nothing of LMDB. It says what each cached kind
depends on (``kind_versions``), so a change of decode, transform or map parameters
invalidates exactly the kinds built from them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from diskcache_ocr.keys import fingerprint
from diskcache_ocr.ocr.decode import MAX_PIXELS_DEFAULT, decode_image
from diskcache_ocr.ocr.maps import MAP_NAMES, MapConfig, make_maps
from diskcache_ocr.ocr.transform import (
    VALIDATION,
    TransformConfig,
    Transformed,
    finish_numpy,
    map_polygons,
    resize_pad,
)
from diskcache_ocr.schema import KindVersion

# What decode_image does, as data: bump "version" whenever its behaviour changes.
DECODE_PARAMS = {
    "version": "1", "mode": "RGB", "exif_transpose": True, "alpha": "over-white",
    "sixteen_bit": "high-byte",
}
# The binary maps are stored as uint8 (0/1, exact), the threshold map as float32: well under
# half the bytes of an all-float32 record.
BINARY_MAPS = ("prob_map", "prob_mask", "thresh_mask")
MAPS_STORAGE = "binary-uint8-v1"


@dataclass(frozen=True)
class Pipeline:
    transform: TransformConfig = VALIDATION
    maps: MapConfig = field(default_factory=MapConfig)
    max_pixels: int = MAX_PIXELS_DEFAULT

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> Pipeline:
        """The pipeline whose parameters are ``params`` (a cache header's ``pipeline``:
        ``transform`` and ``maps`` as their ``to_dict``), the defaults for what is absent."""
        transform = (TransformConfig.from_dict(params["transform"]) if "transform" in params
                     else TransformConfig())
        maps = MapConfig.from_dict(params["maps"]) if "maps" in params else MapConfig()
        return cls(transform=transform, maps=maps)

    def kind_versions(self) -> dict[str, KindVersion]:
        """Version and fingerprint of every kind; each covers everything upstream of it."""
        decode = dict(DECODE_PARAMS)
        transform = self.transform.to_dict()
        return {
            "images": KindVersion(str(decode["version"]), fingerprint({"decode": decode})),
            "tensors": KindVersion(
                self.transform.version, fingerprint({"decode": decode, "transform": transform})
            ),
            "maps": KindVersion(
                self.maps.version,
                fingerprint({"decode": decode, "transform": transform,
                             "maps": self.maps.to_dict(), "storage": MAPS_STORAGE}),
            ),
        }

    def decode(self, data: bytes, source: str) -> np.ndarray:
        return decode_image(data, source, max_pixels=self.max_pixels)

    def apply_transform(
        self, image: np.ndarray, polygons: Sequence[np.ndarray], flip: bool | None = None
    ) -> Transformed:
        return resize_pad(image, polygons, self.transform, flip=flip)

    def tensor_record(self, t: Transformed) -> dict[str, np.ndarray]:
        """What the ``tensors`` kind stores for one image."""
        if self.transform.output == "compact":
            image = t.image
        else:  # (numpy: several times faster than torch's uint8 → float32 copy on the CPU)
            image = finish_numpy(t.image, self.transform,
                                 np.empty(t.image.shape, np.float32))
        return {
            "image": image,
            "matrix": np.linalg.inv(t.inverse_matrix),
            "inverse_matrix": t.inverse_matrix,
            "orig_size": t.orig_size,
        }

    def finish_into(self, stored: np.ndarray, out: np.ndarray) -> None:
        """Write the float32 image for a stored ``tensors`` image (a view is fine) into
        ``out``: normalize a compact uint8 image, copy a float32 one. One pass."""
        if stored.dtype == np.uint8:
            finish_numpy(stored, self.transform, out)
        else:
            np.copyto(out, stored)

    def finish_spec(self) -> dict[str, Any]:
        """How a compact sample becomes float32, as plain data (no callables), so it survives
        pickling to and from DataLoader workers and ``pin_memory``: the normalization
        constants of the image and which maps are stored as uint8 0/1."""
        return {"mean": list(self.transform.mean), "std": list(self.transform.std),
                "binary_maps": list(BINARY_MAPS)}

    def maps_record(self, maps: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """What the ``maps`` kind stores (binary maps as exact uint8)."""
        out = {}
        for name, arr in maps.items():
            if name in BINARY_MAPS:
                small = arr.astype(np.uint8)
                if not np.array_equal(small, arr):  # never expected: make_maps emits 0/1
                    raise ValueError(f"{name} is not binary; cannot store it as uint8")
                out[name] = small
            else:
                out[name] = arr
        return out

    def transform_polygons(
        self, polygons: Sequence[np.ndarray], matrix: np.ndarray
    ) -> tuple[np.ndarray, ...]:
        return map_polygons(polygons, matrix)

    def make_maps(self, polygons: Sequence[np.ndarray], ignore: Sequence[bool] | np.ndarray
                  ) -> dict[str, np.ndarray]:
        size = self.transform.size
        return make_maps(polygons, np.asarray(ignore, bool), size, size, self.maps)

    def is_deterministic(self, trials: int = 24) -> bool:
        """Probe the transform: the same input, transformed repeatedly, must not change.

        A flip with probability p survives ``trials`` runs unnoticed with probability
        p**(trials-1) + (1-p)**(trials-1); a declared flip probability counts as random too.
        """
        rng = np.random.default_rng(0)
        image = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
        polygons = [np.array([[3.0, 4.0], [30.0, 4.0], [30.0, 20.0], [3.0, 20.0]])]
        first = self.apply_transform(image, polygons)
        for _ in range(trials - 1):
            other = self.apply_transform(image, polygons)
            if not (np.array_equal(first.image, other.image)
                    and np.array_equal(first.inverse_matrix, other.inverse_matrix)
                    and all(np.array_equal(a, b)
                            for a, b in zip(first.polygons, other.polygons, strict=True))):
                return False
        return self.transform.hflip_prob == 0.0


__all__ = ["DECODE_PARAMS", "MAP_NAMES", "Pipeline"]
