"""A pipeline of pluggable stages: a convention's rules plus the user's transform and maps.

:class:`StagePipeline` is what the engine runs when a dataset is given ``convention=``,
``transform=`` (an albumentations ``Compose`` or a callable) or ``maps=``: decode → the
convention's annotation rules → transform → maps, each stage versioned by its fingerprint.
The ``tensors`` kind holds the transform's output as the stage returned it (image, moved
polygons, inverse matrix, plus the source's raw size and EXIF orientation for the sample's
metadata), so a cached sample is the stage's own bits. For a random albumentations transform
it holds the output of the Compose's deterministic prefix instead, and the rest runs live
(:meth:`StagePipeline.run_rest`); maps of a random transform are always computed live.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from diskcache_ocr.keys import fingerprint
from diskcache_ocr.ocr.conventions import (
    Convention,
    TransformResult,
    get_convention,
    upright_size,
)
from diskcache_ocr.ocr.decode import MAX_PIXELS_DEFAULT, decode_image
from diskcache_ocr.ocr.pipeline import DECODE_PARAMS
from diskcache_ocr.ocr.stages import (
    BuiltinTransform,
    CallableTransform,
    MapsStage,
    TransformError,
    TransformStage,
    Words,
    follow,
    kept_words,
    maps_stage,
)
from diskcache_ocr.schema import KindVersion

log = logging.getLogger(__name__)

# Record layout of the ``tensors`` kind under a stage pipeline (version of the layout itself;
# v2: ``words``, the input word of each polygon).
STAGE_RECORD = "stage-record-v2"


def image_header(data: bytes) -> tuple[tuple[int, int], int]:
    """(raw width, raw height) and the EXIF orientation (1 when absent), from the header."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(data)) as im:
            size = (int(im.size[0]), int(im.size[1]))
            try:
                orientation = int(im.getexif().get(0x0112, 1))
            except Exception:  # noqa: BLE001 - a damaged EXIF block: decode applies none
                orientation = 1
    return size, orientation if orientation in range(1, 9) else 1



def decode_params(convention: str = "db") -> dict[str, Any]:
    """What decoding does under ``convention``, as data (its alpha rule)."""
    decode = dict(DECODE_PARAMS)
    if get_convention(convention).alpha == "drop":
        decode.update(alpha="dropped", sixteen_bit="pillow-convert")
    return decode


def images_version(convention: str = "db") -> KindVersion:
    """The ``images`` kind's version under ``convention``'s decode rules."""
    decode = decode_params(convention)
    return KindVersion(str(decode["version"]), fingerprint({"decode": decode}))


def transform_stage(transform: object = None, *, version: object = None,
                    convention: str = "db") -> TransformStage:
    """The stage for what a user passes: None (the convention's built-in transform), an
    ``albumentations.Compose``, a :class:`TransformStage`, or a callable (with ``version``)."""
    if transform is None:
        if version is not None:
            raise ValueError("transform_version is only for a transform you pass")
        return BuiltinTransform(convention)
    if isinstance(transform, TransformStage):
        return transform
    # albumentations is optional; only a Compose brings it in (the stages below it know
    # nothing of it, so no import runs back up)
    from diskcache_ocr.ocr import albu

    if albu.is_compose(transform):
        return albu.AlbumentationsTransform(transform, version=version)
    from diskcache_ocr.ocr import wrapped

    if wrapped.holds_compose(transform):  # e.g. the origin project's transform objects
        return wrapped.ComposeHolderTransform(transform, version=version)
    return CallableTransform(transform, version)  # type: ignore[arg-type]

@dataclass
class StagePipeline:
    """decode → annotation rules → transform → maps, with user stages.

    ``transform`` / ``maps`` are what :func:`transform_stage` / :func:`maps_stage` take.
    ``map_params`` override the built-in maker's parameters.
    """

    convention: str = "db"
    transform: Any = None
    transform_version: Any = None
    maps: Any = None
    maps_version: Any = None
    map_params: dict[str, Any] = field(default_factory=dict)
    max_pixels: int = MAX_PIXELS_DEFAULT
    compact: bool = False  # samples hold the image before a final Normalize, finished later

    def __post_init__(self) -> None:
        self.conv: Convention = get_convention(self.convention)
        self.stage: TransformStage = transform_stage(
            self.transform, version=self.transform_version, convention=self.convention)
        self.maps_stage: MapsStage = maps_stage(
            self.maps, version=self.maps_version, convention=self.convention,
            **self.map_params)
        # Why the transform is random (its parameters, else the probe); None: deterministic.
        self.randomness: str | None = self.stage.random_reason()
        self.deterministic = self.randomness is None
        if self.randomness is not None:
            log.info("%s is random (%s): its output is not cached", self.stage.name,
                     self.randomness)
        self.split = None  # a random Compose cut into a cached prefix and a live rest
        if not self.deterministic:
            from diskcache_ocr.ocr import albu, albu_cut

            if albu.is_compose(self.transform):
                split = albu_cut.cut_deterministic_prefix(self.transform)
                if split.prefix is not None and split.prefix.cacheable:
                    self.split = split
        # Compact: a deterministic Compose ending in a Normalize the library reproduces
        # exactly is cached as its head's uint8 output, and the Normalize becomes the
        # sample's finishing step (None: the transform's own output is what is stored).
        # A random Compose split into a cached prefix runs its rest live without that
        # Normalize instead (``compact_rest``), when that is proven to give the same bits.
        self.head: TransformStage | None = None
        self.tail: Any = None
        self.compact_rest: Any = None
        if self.compact and (self.deterministic or self.split is not None):
            from diskcache_ocr.ocr import albu, albu_cut

            if albu.is_compose(self.transform):
                parts = albu_cut.cut_normalize_tail(self.transform, self.transform_version)
                if parts is not None and self.deterministic and parts[0].cacheable:
                    self.head, self.tail = parts
                elif parts is not None and self.split is not None:
                    self.compact_rest = albu_cut.compact_rest(self.split, parts[1])
                    self.tail = parts[1] if self.compact_rest is not None else None
        self._blank: TransformResult | None = None

    # -- what is cached, and under which versions ------------------------------------------
    def _front_stage(self) -> TransformStage | None:
        """The stage whose output the ``tensors`` kind holds (None: nothing cacheable)."""
        if self.head is not None:
            return self.head
        if self.deterministic:
            return self.stage if self.stage.cacheable else None
        return None if self.split is None else self.split.prefix

    def cacheable_kinds(self) -> frozenset[str]:
        kinds = {"images"}
        if self._front_stage() is not None:
            kinds.add("tensors")
            if self.deterministic and self.maps_stage.cacheable:
                kinds.add("maps")
        return frozenset(kinds)

    def kind_versions(self) -> dict[str, KindVersion]:
        decode = decode_params(self.convention)
        conv = self.conv.fingerprint()
        rules = {"annotations": conv["annotations"], "exif": conv["exif"],
                 "words": conv["words"], "inverse": conv["inverse"]}
        out = {"images": images_version(self.convention)}
        front = self._front_stage()
        if front is None:
            return out
        tensors = {"decode": decode, "rules": rules, "transform": front.fingerprint(),
                   "prefix_of_random": not self.deterministic, "record": STAGE_RECORD}
        if self.head is not None:
            tensors["before_normalize"] = True
        out["tensors"] = KindVersion("stage", fingerprint(tensors))
        if "maps" in self.cacheable_kinds():
            out["maps"] = KindVersion("stage", fingerprint(
                {**tensors, "maps": self.maps_stage.fingerprint()}))
        return out

    def describe(self) -> dict[str, Any]:
        """What the store's header records about this pipeline (plain data)."""
        front = self._front_stage()
        return {"convention": self.convention,
                "transform": self.stage.fingerprint(),
                "cached_transform": None if front is None else front.fingerprint(),
                "maps": self.maps_stage.fingerprint()}

    # -- computing ------------------------------------------------------------------------------
    def decode(self, data: bytes, source: str) -> np.ndarray:
        return decode_image(data, source, max_pixels=self.max_pixels, alpha=self.conv.alpha)

    def load_polygons(self, polygons: Sequence[np.ndarray], raw_size: tuple[int, int],
                      orientation: int) -> list[np.ndarray]:
        """Annotation points as the convention loads them, in the upright frame."""
        loaded = [self.conv.load_points(p) for p in polygons]
        return self.conv.upright_polygons(loaded, orientation, raw_size)

    def front(self, image: np.ndarray, polygons: Sequence[np.ndarray],
              raw_size: tuple[int, int], orientation: int) -> dict[str, np.ndarray]:
        """The ``tensors`` record: the transform's output (the prefix's, when random)."""
        polys = self.load_polygons(polygons, raw_size, orientation)
        if self.split is not None:
            out_image, moved, inverse = self.split.run_prefix(image, polys)
        elif self.head is not None:
            out_image, moved, inverse = self.head(image, polys)
            moved = self._kept(moved, len(polys))
            inverse = self._inverse(inverse, image, out_image)
        elif self.deterministic and self.stage.cacheable:
            out_image, moved, inverse = self.stage(image, polys)
            moved = self._kept(moved, len(polys))
            inverse = self._inverse(inverse, image, out_image)
        else:  # nothing cacheable in front: the record carries the loaded input
            out_image, moved, inverse = image, polys, np.eye(3)
        words = kept_words(moved, len(polys))
        return self._record(out_image, moved, inverse, raw_size, orientation,
                            np.full(len(moved), -1, np.int64) if words is None else words)

    @staticmethod
    def _record(image: np.ndarray, polygons: Sequence[np.ndarray], inverse: np.ndarray,
                raw_size: tuple[int, int], orientation: int, words: np.ndarray
                ) -> dict[str, np.ndarray]:
        polys = [np.asarray(p) for p in polygons]
        dtype = np.result_type(*[p.dtype for p in polys]) if polys else np.dtype(np.float64)
        flat = (np.concatenate([p.reshape(-1, 2) for p in polys]).astype(dtype, copy=False)
                if polys else np.zeros((0, 2), dtype))
        return {"image": np.ascontiguousarray(image), "points": np.ascontiguousarray(flat),
                "sizes": np.array([len(p) for p in polys], np.int64),
                # the source word of each polygon (all -1: the transform did not say)
                "words": np.asarray(words, np.int64),
                "inverse_matrix": np.asarray(inverse, np.float64),
                "raw_size": np.array(raw_size, np.int64),
                "orientation": np.array([orientation], np.int64)}

    def run_rest(self, record: dict[str, np.ndarray]) -> TransformResult:
        """The transform's output from a (cached or computed) record: as it is when the whole
        transform is cached; the random rest run on the prefix output; the whole random
        transform run live otherwise."""
        points, sizes = record["points"], record["sizes"]
        ends = np.cumsum(sizes).tolist()
        # (views, as np.split makes them, without its per-piece overhead)
        polys = [points[a:b] for a, b in zip([0, *ends[:-1]], ends, strict=True)] if ends else []
        words = np.asarray(record["words"])
        front = None if (words < 0).any() else words
        image, inverse = record["image"], record["inverse_matrix"]
        if self.head is not None or (self.deterministic and self.stage.cacheable):
            return image, Words(polys, front), inverse
        if self.split is not None:
            out = (self.compact_rest or self.split).run_rest((image, polys, inverse))
        else:
            out = self.stage(image, polys)
        moved = Words(out[1], follow(front, kept_words(out[1], len(polys))))
        raw = tuple(int(v) for v in record["raw_size"])
        size = upright_size(raw[0], raw[1], int(np.asarray(record["orientation"]).reshape(-1)[0]))
        inverse = self.conv.inverse_matrix(out[2], size, self.output_hw(out[0]))
        return out[0], self._kept(moved, len(polys)), inverse

    def _inverse(self, inverse: np.ndarray, image: np.ndarray, out_image: np.ndarray
                 ) -> np.ndarray:
        """The convention's inverse for a transform of ``image`` (H×W×C) to ``out_image``."""
        return self.conv.inverse_matrix(inverse, (int(image.shape[1]), int(image.shape[0])),
                                        self.output_hw(out_image))

    def _kept(self, moved: Sequence[np.ndarray], n_input: int) -> Sequence[np.ndarray]:
        """The convention's filter of a transform's output words, each word's input index
        following it. (The origin's filter before the transform, of words under 3 points,
        needs no index: its rules make no don't-care words, every flag is False.)"""
        positions = self.conv.kept_positions(moved)
        if positions is None:
            return moved
        index = kept_words(moved, n_input)
        return Words([np.asarray(moved[i], np.float32).reshape(-1, 2) for i in positions],
                     None if index is None else index[positions])

    def word_flags(self, polygons: Sequence[np.ndarray], flags: Sequence[bool]
                   ) -> np.ndarray | None:
        """The don't-care flags of the transform's output ``polygons`` (from
        :meth:`run_rest`), given the source's ``flags``: each polygon's own word's.
        None when the transform changed the count without saying which words it kept and
        the flags are not all alike."""
        source = np.asarray(flags, bool).reshape(-1)
        index = kept_words(polygons, len(source))
        if index is not None:
            return source[index]
        if source.size == 0 or source.all() or not source.any():
            return np.full(len(polygons), bool(source.size and source[0]))
        return None

    def check_word_flags(self, polygons: Sequence[np.ndarray], flags: Sequence[bool],
                         file: str) -> np.ndarray:
        """:meth:`word_flags`, or a :class:`TransformError` naming ``file`` and the
        transform when they cannot follow the polygons."""
        out = self.word_flags(polygons, flags)
        if out is None:
            raise TransformError(
                f"{file}: {self.stage.name} returned {len(polygons)} polygons for "
                f"{len(flags)} words without saying which words it kept, so their don't-care "
                "flags cannot follow them; return (image, polygons, inverse_matrix, kept), "
                "kept[i] the input index of polygon i")
        return out

    def finish_spec(self) -> dict[str, Any] | None:
        """How a compact sample's image becomes the transform's float32 output (None when
        samples are the transform's own output)."""
        return None if self.tail is None else self.tail.spec()

    def make_maps(self, polygons: Sequence[np.ndarray], image: np.ndarray,
                  ignore: Sequence[bool] | None) -> dict[str, np.ndarray]:
        """Maps of the transform's output ``polygons``; ``ignore`` are the source's flags,
        each polygon takes its own word's (:meth:`word_flags`). When they cannot follow the
        polygons the maps are made without flags: the sample is then never served (its
        assembly raises :meth:`check_word_flags`' error, which names the file)."""
        height, width = self.output_hw(image)
        flags = None if ignore is None else self.word_flags(polygons, ignore)
        return self.maps_stage(list(polygons), height, width, ignore=flags)

    @staticmethod
    def output_hw(image: np.ndarray) -> tuple[int, int]:
        """(H, W) of a transformed image: CHW when its first axis is 1 or 3 and its last is
        not, else HWC (or HW)."""
        if image.ndim == 3 and image.shape[0] in (1, 3) and image.shape[2] not in (1, 3):
            return int(image.shape[1]), int(image.shape[2])
        return int(image.shape[0]), int(image.shape[1])

    def blank(self) -> TransformResult:
        """What the transform makes of a blank image (the shape of a bad source's sample)."""
        if self._blank is None:
            side = 64
            self._blank = self.run_rest(self.front(
                np.zeros((side, side, 3), np.uint8), [], (side, side), 1))
        return self._blank

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_blank"] = None
        return state


__all__ = ["StagePipeline", "decode_params", "image_header", "images_version",
           "transform_stage"]
