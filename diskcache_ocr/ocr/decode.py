"""Decode image bytes into an H×W×3 uint8 RGB array, defensively and deterministically.

Conventions (fixed, so cached arrays never depend on the source's storage choices):

* EXIF orientation is applied, so pixels match the displayed image that polygons were
  drawn on.
* Alpha (RGBA, LA, PA, palette transparency) is composited over **white**: scanned and
  rendered documents have white paper, and black text on a transparent background would
  otherwise vanish into black.
* 16-bit integer modes (I;16*) keep the high byte (``value >> 8``); mode ``I`` is treated as
  16-bit data too (clipped to 0..65535 first), since Pillow uses it for 16-bit sources.
* Float mode ``F`` is taken to be 0..255 (Pillow's own ``F`` -> ``L`` convention): clipped and
  rounded, NaN -> 0.
* Truncated data is an error. This relies on Pillow's default
  ``ImageFile.LOAD_TRUNCATED_IMAGES = False``; this module never changes Pillow globals.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from diskcache_ocr.errors import ImageDecodeError

MAX_PIXELS_DEFAULT = 100_000_000

_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_16BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


def decode_image(data: bytes, source: str, *, max_pixels: int = MAX_PIXELS_DEFAULT) -> np.ndarray:
    """Decode `data` to a C-contiguous H×W×3 uint8 RGB array.

    Raises ImageDecodeError naming `source` for empty, corrupt, truncated, unrecognised or
    oversized images; the size limit is checked from the header, before any pixel is decoded.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes, got {type(data).__name__}")
    if max_pixels <= 0:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    if len(data) == 0:
        raise ImageDecodeError(source, "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # Our own max_pixels check below supersedes Pillow's global-threshold warning
            # (which would otherwise cap the limit at ~89M pixels); Pillow's hard
            # DecompressionBombError (2x that global) still applies and is converted below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(bytes(data))) as im:
                width, height = im.size  # header only: Image.open is lazy
                if width <= 0 or height <= 0:
                    raise ImageDecodeError(source, f"image has no pixels ({width}×{height})")
                if width * height > max_pixels:
                    raise ImageDecodeError(
                        source,
                        f"image size {width}×{height} = {width * height} pixels exceeds "
                        f"the limit of {max_pixels}",
                    )
                im.load()
                return _to_rgb(ImageOps.exif_transpose(im))
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(source, f"decompression bomb refused: {e}") from e
    except UnidentifiedImageError as e:
        raise ImageDecodeError(source, "not a recognised image format") from e
    except MemoryError as e:
        raise ImageDecodeError(source, "not enough memory to decode") from e
    except Exception as e:  # noqa: BLE001 - plugins raise many types on hostile data
        raise ImageDecodeError(source, f"cannot decode ({type(e).__name__}: {e})") from e


def _to_rgb(im: Image.Image) -> np.ndarray:
    """Convert any single-frame Pillow mode to RGB uint8 (see the module docstring)."""
    mode = im.mode
    if (mode == "P" and "transparency" in im.info) or mode in ("PA", "RGBa", "La"):
        im, mode = im.convert("RGBA"), "RGBA"
    if mode in _ALPHA_MODES:
        rgba = np.asarray(im.convert("RGBA"), dtype=np.uint32)
        rgb, alpha = rgba[..., :3], rgba[..., 3:]
        # Integer "over white" with round-half-up, so the result is exact and portable.
        out = (rgb * alpha + 255 * (255 - alpha) + 127) // 255
        return np.ascontiguousarray(out, dtype=np.uint8)
    if mode in _16BIT_MODES or mode == "I":
        values = np.asarray(im).astype(np.int64)
        gray = (np.clip(values, 0, 65535) >> 8).astype(np.uint8)
        return _gray_to_rgb(gray)
    if mode == "F":
        values = np.nan_to_num(np.asarray(im, dtype=np.float64), nan=0.0)
        return _gray_to_rgb(np.clip(np.rint(values), 0, 255).astype(np.uint8))
    if mode != "RGB":
        im = im.convert("RGB")  # L, 1, P, CMYK, YCbCr, RGBX, ...
    return np.array(im, dtype=np.uint8, order="C")  # a private, writable copy


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=2))
