"""Conventions by name: the origin project's pipeline ("origin") and the reference DBNet one ("db").

A convention bundles these rules, each with a fingerprint dict:

* how annotation points are loaded (the origin rounds them to int32);
* in which frame annotations of an EXIF-rotated image live ("upright": as displayed;
  "raw": as stored, so they are rotated with the image; "auto": the origin's rule, decided
  per image by where the words fit, see :func:`annotations_are_upright`);
* which words reach the transform and which leave it (the origin drops words of fewer than
  3 points before, and words thinner than a pixel after, see :meth:`Convention.kept`);
* the built-in transform (image HWC uint8 + polygons -> float32 CHW image, moved polygons,
  inverse matrix mapping output pixels back to the upright source);
* the built-in DBNet map maker.

The origin's transform is its ``val_transform`` as albumentations 1.3.1 computes it:
``LongestMaxSize(640, cv2.INTER_LINEAR)``, centred ``PadIfNeeded(640, 640, value 0)``,
``Normalize(mean 0.5602, std 0.2539, max_pixel_value 255)``, to CHW. It is reimplemented here
(albumentations is optional) with the same arithmetic, so its output is the same bits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import cv2
import numpy as np

from diskcache_ocr.ocr.maps import MapConfig, make_maps
from diskcache_ocr.ocr.origin_maps import OriginMapConfig, make_origin_maps
from diskcache_ocr.ocr.transform import TransformConfig, finish_numpy, resize_pad

Frame = Literal["upright", "raw", "auto"]
TransformResult = tuple[np.ndarray, list[np.ndarray], np.ndarray]


def round_points(points: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    """The origin's annotation rule: points rounded to the nearest int (halves to even), int32."""
    return np.round(np.asarray(points, np.float64)).astype(np.int32)


def upright_size(raw_width: int, raw_height: int, orientation: int) -> tuple[int, int]:
    """(width, height) of the image once its EXIF orientation is applied."""
    _check_orientation(orientation)
    return (raw_height, raw_width) if orientation >= 5 else (raw_width, raw_height)


def raw_to_upright(points: np.ndarray, orientation: int, raw_width: int, raw_height: int
                   ) -> np.ndarray:
    """Map (N, 2) points from the stored (raw) frame to the upright frame, as
    ``PIL.ImageOps.exif_transpose`` moves the pixels: pixel (x, y) of the raw image lands on
    the returned coordinates (pixel-index convention, so ``W - 1 - x`` for a mirror).
    Returns float64; orientation 1 returns the points unchanged.
    """
    _check_orientation(orientation)
    p = np.asarray(points, np.float64).reshape(-1, 2)
    x, y = p[:, 0], p[:, 1]
    xm, ym = (raw_width - 1) - x, (raw_height - 1) - y
    out = {
        1: (x, y), 2: (xm, y), 3: (xm, ym), 4: (x, ym),
        5: (y, x),  # transpose
        6: (ym, x),  # rotate 90° clockwise
        7: (ym, xm),  # transverse
        8: (y, xm),  # rotate 90° counter-clockwise
    }[orientation]
    return np.stack(out, axis=1)


def annotations_are_upright(polygons: Sequence[np.ndarray], orientation: int,
                            raw_width: int, raw_height: int, tolerance: float = 1.5) -> bool:
    """The origin's per-image rule for an EXIF-rotated image: its words are taken as upright
    when the extent of all their points (``tolerance`` pixels of slack) does not fit the
    stored image but does fit the upright one; otherwise they are in the stored frame and
    are remapped. An image without words, or orientation 1, is never "upright" here."""
    if orientation == 1 or not polygons:
        return False
    pts = np.concatenate([np.asarray(p, np.float32).reshape(-1, 2) for p in polygons])
    if not len(pts):
        return False
    lo, hi = pts.min(axis=0).astype(np.float64), pts.max(axis=0).astype(np.float64)

    def fits(width: int, height: int) -> bool:
        return bool(lo[0] >= -tolerance and lo[1] >= -tolerance
                    and hi[0] <= width - 1 + tolerance and hi[1] <= height - 1 + tolerance)

    if fits(raw_width, raw_height):
        return False
    return fits(*upright_size(raw_width, raw_height, orientation))


def thin_word(points: np.ndarray) -> bool:
    """The origin's test for a word that leaves its transform unusable: fewer than 3 points,
    or an extent under one pixel (as floats) or of zero (rounded) in x or y."""
    if len(points) < 3:
        return True
    points = np.asarray(points, np.float32)
    span = points.max(axis=0) - points.min(axis=0)  # in float32, as the origin computes it
    rounded = np.rint(points).astype(np.int64)
    rspan = rounded.max(axis=0) - rounded.min(axis=0)
    return bool(span[0] < 1.0 or span[1] < 1.0 or rspan[0] == 0 or rspan[1] == 0)


def _check_orientation(orientation: int) -> None:
    if orientation not in range(1, 9):
        raise ValueError(f"EXIF orientation must be 1..8, got {orientation!r}")


def _py3round(value: float) -> int:
    """albumentations 1.3's rounding of a resized side (halves to even, as Python 3 does)."""
    if abs(value - int(value)) == 0.5:
        return int(2.0 * round(value / 2.0))
    return int(round(value))


@dataclass(frozen=True)
class OriginTransform:
    """The origin's validation transform (see the module docstring). Picklable, pure."""

    size: int = 640
    mean: tuple[float, float, float] = (0.5602, 0.5602, 0.5602)
    std: tuple[float, float, float] = (0.2539, 0.2539, 0.2539)
    max_pixel_value: float = 255.0
    pad_value: int = 0
    version: str = "1"
    _luts: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if not 1 <= self.size <= 16384:
            raise ValueError(f"size must be in 1..16384, got {self.size}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean/std need 3 values, std > 0; got {self.mean}, {self.std}")
        if not 0 <= self.pad_value <= 255:
            raise ValueError(f"pad_value must be in 0..255, got {self.pad_value}")
        # Normalize as albumentations 1.3 does it, in float32: (v - mean * max) * (1 / (std *
        # max)). A uint8 input has 256 values per channel, so a table holds every result.
        mean = np.array(self.mean, np.float32)
        mean *= self.max_pixel_value
        std = np.array(self.std, np.float32)
        std *= self.max_pixel_value
        denominator = np.reciprocal(std, dtype=np.float32)
        values = np.arange(256, dtype=np.float32)[None, :]
        luts = (values - mean[:, None]) * denominator[:, None]
        luts.flags.writeable = False
        object.__setattr__(self, "_luts", luts)

    def fingerprint(self) -> dict[str, Any]:
        return {"transform": "origin-val", "size": self.size, "mean": list(self.mean),
                "std": list(self.std), "max_pixel_value": self.max_pixel_value,
                "pad_value": self.pad_value, "interpolation": "cv2.INTER_LINEAR",
                "padding": "centred", "clamp": "into-image", "polygons": "float32",
                "inverse": "origin-letterbox-float32", "version": self.version,
                "opencv": cv2.__version__}  # (the resize is OpenCV's)

    def __call__(self, image: np.ndarray, polygons: Sequence[np.ndarray]) -> TransformResult:
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an H×W×3 uint8 image, got {image.shape} {image.dtype}")
        height, width = image.shape[:2]
        # The origin clamps every vertex into the image before its transform.
        polygons = [np.clip(np.asarray(p, np.float64).reshape(-1, 2), 0.0,
                            [width - 1.0, height - 1.0]) for p in polygons]
        scale = self.size / float(max(width, height))
        resized = image
        if scale != 1.0:
            new_h, new_w = _py3round(height * scale), _py3round(width * scale)
            if (new_h, new_w) != (height, width):
                resized = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
        rh, rw = resized.shape[:2]
        top = max(self.size - rh, 0) // 2
        left = max(self.size - rw, 0) // 2
        out_h, out_w = max(self.size, rh), max(self.size, rw)
        out = np.empty((3, out_h, out_w), np.float32)
        for c in range(3):
            lut = self._luts[c]
            out[c].fill(lut[self.pad_value])
            out[c, top:top + rh, left:left + rw] = lut[resized[:, :, c]]
        moved = [self._move(p, scale, left, top).astype(np.float32) for p in polygons]
        return out, moved, self.inverse_matrix(width, height, max(out_h, out_w))

    @staticmethod
    def inverse_matrix(width: int, height: int, side: int) -> np.ndarray:
        """The origin's inverse matrix, float32: its own letterbox arithmetic (sizes
        truncated, ``int(w * s)``; offset ``delta // 2``) with separate x and y scales, from
        the input size alone, whatever the transform did. A side that truncates to 0 (the
        origin fails there with a division by zero) counts as 1."""
        s = side / max(width, height)
        new_w, new_h = max(1, int(width * s)), max(1, int(height * s))
        left, top = (side - new_w) // 2, (side - new_h) // 2
        scale = np.array([[width / new_w, 0, 0], [0, height / new_h, 0], [0, 0, 1]], np.float32)
        shift = np.eye(3, dtype=np.float32)
        shift[0, 2], shift[1, 2] = -left, -top
        return (scale @ shift).astype(np.float32)

    @staticmethod
    def _move(points: np.ndarray, scale: float, left: int, top: int) -> np.ndarray:
        p = np.asarray(points, np.float64).reshape(-1, 2)
        # Keypoints are scaled by the one factor, then shifted (albumentations 1.3's order).
        return np.stack([p[:, 0] * scale + left, p[:, 1] * scale + top], axis=1)


@dataclass(frozen=True)
class OriginMaps:
    """The origin collate's maps: ``{"prob_map", "thresh_map"}``, each (H, W) float32."""

    config: OriginMapConfig = OriginMapConfig()

    def fingerprint(self) -> dict[str, Any]:
        # (the areas, lengths and filled polygons are OpenCV's)
        return {**self.config.to_dict(), "opencv": cv2.__version__}

    def __call__(self, polygons: Sequence[np.ndarray], height: int, width: int,
                 ignore: Sequence[bool] | None = None) -> dict[str, np.ndarray]:
        # The origin has no don't-care words: ``ignore`` is accepted and not used.
        prob, thresh = make_origin_maps(polygons, height, width, self.config)
        return {"prob_map": prob, "thresh_map": thresh}


@dataclass(frozen=True)
class DbTransform:
    """The reference DBNet convention's transform (``transform.resize_pad`` + ``finish``)."""

    config: TransformConfig = TransformConfig(hflip_prob=0.0)

    def __post_init__(self) -> None:
        if self.config.hflip_prob:
            raise ValueError("DbTransform is the deterministic transform; hflip_prob must be 0")

    def fingerprint(self) -> dict[str, Any]:
        return {"transform": "db-resize-pad", **self.config.to_dict()}

    def __call__(self, image: np.ndarray, polygons: Sequence[np.ndarray]) -> TransformResult:
        t = resize_pad(image, polygons, self.config, flip=False)
        out = finish_numpy(t.image, self.config, np.empty(t.image.shape, np.float32))
        return out, [np.asarray(p, np.float64) for p in t.polygons], t.inverse_matrix


@dataclass(frozen=True)
class DbMaps:
    """The reference DBNet maps (masks, ``min_text_size``, don't-care words), (1, H, W)."""

    config: MapConfig = MapConfig()

    def fingerprint(self) -> dict[str, Any]:
        return {"maker": "db-reference", **self.config.to_dict()}

    def __call__(self, polygons: Sequence[np.ndarray], height: int, width: int,
                 ignore: Sequence[bool] | None = None) -> dict[str, np.ndarray]:
        flags = np.zeros(len(polygons), bool) if ignore is None else np.asarray(ignore, bool)
        return make_maps(polygons, flags, height, width, self.config)


@dataclass(frozen=True)
class Convention:
    """One named set of rules; ``fingerprint()`` covers all of them."""

    name: str
    round_points: bool
    annotation_frame: Frame
    transform: OriginTransform | DbTransform
    maps: OriginMaps | DbMaps
    # The origin's word filters: fewer than 3 points before the transform, thin words after.
    filters_words: bool = False
    # The origin's inverse matrix: its letterbox arithmetic from the input and output sizes,
    # whatever the transform did (its transform objects compute it so).
    letterbox_inverse: bool = False
    # How a decoded image with alpha becomes RGB: "white" composites it over white, "drop"
    # discards it (the origin's Pillow convert("RGB")).
    alpha: Literal["white", "drop"] = "white"

    def load_points(self, points: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
        """An annotation's points as this convention loads them."""
        if self.round_points:
            return round_points(points)
        return np.asarray(points, np.float64)

    def upright_polygons(self, polygons: Sequence[np.ndarray], orientation: int,
                         raw_size: tuple[int, int]) -> list[np.ndarray]:
        """Polygons in the upright frame, as the transform receives them; ``raw_size`` is the
        stored (width, height)."""
        _check_orientation(orientation)
        w, h = raw_size
        if self.annotation_frame == "upright" or orientation == 1:
            out = [np.asarray(p) for p in polygons]
        elif self.annotation_frame == "auto" and annotations_are_upright(polygons, orientation,
                                                                         w, h):
            out = [np.asarray(p) for p in polygons]
        else:
            out = [raw_to_upright(p, orientation, w, h) for p in polygons]
        if not self.filters_words:
            return out
        # The origin's rules: words of fewer than 3 points dropped, every vertex clamped into
        # the (upright) image, as its transform objects do before their Compose.
        w, h = upright_size(w, h, orientation)
        limit = np.array([w - 1, h - 1], np.float32)
        return [np.clip(q, np.float32(0), limit)
                for q in (np.asarray(p, np.float32).reshape(-1, 2) for p in out) if len(q) >= 3]

    def inverse_matrix(self, inverse: np.ndarray, input_size: tuple[int, int],
                       output_hw: tuple[int, int]) -> np.ndarray:
        """The inverse matrix a sample carries: the transform's own, or with
        ``letterbox_inverse`` the origin's from the input (width, height) and the output
        (height, width) alone (:meth:`OriginTransform.inverse_matrix`)."""
        if not self.letterbox_inverse:
            return inverse
        return OriginTransform.inverse_matrix(*input_size, max(output_hw))

    def kept(self, polygons: Sequence[np.ndarray]) -> list[np.ndarray]:
        """The words a transform's output keeps: with the origin's filters, each as a
        (k, 2) float32 array and without thin words (:func:`thin_word`); else as given."""
        positions = self.kept_positions(polygons)
        if positions is None:
            return list(polygons)
        return [np.asarray(polygons[i], np.float32).reshape(-1, 2) for i in positions]

    def kept_positions(self, polygons: Sequence[np.ndarray]) -> list[int] | None:
        """Which of a transform's output words :meth:`kept` keeps (None: all, as given)."""
        if not self.filters_words:
            return None
        return [i for i, p in enumerate(polygons)
                if not thin_word(np.asarray(p, np.float32).reshape(-1, 2))]

    def fingerprint(self) -> dict[str, Any]:
        return {
            "convention": self.name,
            "annotations": {"round_points": self.round_points},
            "exif": {"annotation_frame": self.annotation_frame},
            "inverse": "origin-letterbox" if self.letterbox_inverse else "transform",
            "words": {"filters": self.filters_words,
                      "clamp": "into-image" if self.filters_words else None},
            "transform": self.transform.fingerprint(),
            "maps": self.maps.fingerprint(),
        }


# The origin decides the frame of an EXIF-rotated image's words per image ("auto"); "raw"
# stays available for datasets annotated on the stored pixels.
_CONVENTIONS = {
    "origin": Convention("origin", True, "auto", OriginTransform(), OriginMaps(),
                         filters_words=True, letterbox_inverse=True, alpha="drop"),
    "db": Convention("db", False, "upright", DbTransform(), DbMaps()),
}


def get_convention(name: str) -> Convention:
    """The convention called ``name``: ``"origin"`` or ``"db"``."""
    try:
        return _CONVENTIONS[name]
    except KeyError:
        raise ValueError(f"unknown convention {name!r}; expected one of "
                         f"{sorted(_CONVENTIONS)}") from None


def annotation_rules(convention: str | None) -> Literal["db", "origin"]:
    """The rules a JSON file's words are read by under ``convention`` (see
    :mod:`~diskcache_ocr.ocr.annotations`): the origin's for its convention, else "db"."""
    return "origin" if convention == "origin" else "db"


def conventions() -> tuple[str, ...]:
    return tuple(sorted(_CONVENTIONS))


__all__ = [
    "Convention", "DbMaps", "DbTransform", "OriginMaps", "OriginTransform",
    "annotation_rules", "annotations_are_upright", "conventions", "get_convention",
    "raw_to_upright", "round_points", "thin_word", "upright_size",
]
