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

Memory is bounded, not only pixels: the format is sniffed from the first bytes (a file that
is no image is refused before it is read whole), a file larger than any image within the
pixel limit can be is refused from its size, and the decode's peak memory is estimated from
mode × size before any pixel is decoded. Conversions run in strips of rows, so their
temporaries stay small whatever the image size.
"""

from __future__ import annotations

import io
import os
import stat
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from diskcache_ocr.errors import ImageDecodeError, SourceError

MAX_PIXELS_DEFAULT = 100_000_000
# What a decode may hold per pixel at its peak: Pillow's own image (at most 4 bytes a pixel
# for every mode below) plus the 3-byte result. The default memory bound lets every known
# mode reach the pixel limit and refuses anything that would need more.
BUDGET_BYTES_PER_PIXEL = 8
# Slack over the largest uncompressed image the pixel limit allows (metadata, ICC profiles,
# several TIFF pages): a file beyond it cannot be an image we would decode.
_FILE_SLACK_BYTES = 64 << 20
_SNIFF_BYTES = 16
_STRIP_PIXELS = 1 << 20  # rows per conversion strip: about this many pixels

_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_16BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_STORAGE_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}
_KNOWN_4 = frozenset({"RGB", "RGBA", "RGBa", "RGBX", "LA", "La", "PA", "CMYK", "YCbCr",
                      "LAB", "HSV", "I", "F"})
_UNKNOWN_MODE_BYTES = 8  # Pillow stores other modes in 4 bytes a pixel; assume worse
# Pillow's transpose for each EXIF orientation, as numpy index operations.
_ORIENT = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),
}


def sniff_format(head: bytes) -> str | None:
    """Pillow's format name for an image starting with `head` (its first bytes), or None."""
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith(b"BM"):
        return "BMP"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "TIFF"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if len(head) >= 2 and head[:1] == b"P" and head[1:2] in b"123456fF":
        return "PPM"
    return None


def max_file_bytes(max_pixels: int = MAX_PIXELS_DEFAULT) -> int:
    """The largest file that can hold an image within `max_pixels` (16-bit RGBA, raw)."""
    return max_pixels * 8 + _FILE_SLACK_BYTES


def read_image_file(path: str | os.PathLike[str], source: str, *,
                    max_pixels: int = MAX_PIXELS_DEFAULT) -> bytes:
    """The bytes of the image file at `path`, read only if it can be an image we decode.

    Opens without blocking and reads regular files only, so a FIFO, socket or device put in
    a source's place fails at once (SourceError) rather than hanging the reader. Refuses,
    before reading the whole file (ImageDecodeError, naming `source`): an empty file, one
    whose first bytes are no known image format, one larger than `max_file_bytes`.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise SourceError(source, f"cannot open: {e.strerror or e}") from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SourceError(source, f"not a regular file ({_file_kind(st.st_mode)})")
        if st.st_size == 0:
            raise ImageDecodeError(source, "empty file (0 bytes)")
        head = os.pread(fd, _SNIFF_BYTES, 0)
        if sniff_format(head) is None:
            raise ImageDecodeError(source, "not a recognised image format")
        limit = max_file_bytes(max_pixels)
        if st.st_size > limit:
            raise ImageDecodeError(source, f"file of {st.st_size} bytes exceeds the {limit} "
                                           f"bytes an image of {max_pixels} pixels can need")
        chunks, total = [], 0
        while chunk := os.read(fd, min(1 << 24, limit + 1 - total)):
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:  # grew while being read
                raise ImageDecodeError(source, f"file grew past {limit} bytes while read")
        return b"".join(chunks)
    except OSError as e:
        raise SourceError(source, f"cannot read: {e.strerror or e}") from e
    finally:
        os.close(fd)


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a plain file"


def decode_bytes_estimate(mode: str, width: int, height: int) -> int:
    """Peak bytes a decode of a `mode` image of `width`×`height` holds (see the module doc)."""
    stored = _STORAGE_BYTES.get(mode, 4 if mode in _KNOWN_4 else _UNKNOWN_MODE_BYTES)
    return width * height * (stored + 3)



def decode_image(data: bytes, source: str, *, max_pixels: int = MAX_PIXELS_DEFAULT,
                 max_bytes: int | None = None, alpha: str = "white") -> np.ndarray:
    """Decode `data` to a C-contiguous H×W×3 uint8 RGB array.

    ``alpha="white"`` composites an image with alpha over white (and keeps more than 8 bits
    of gray as their high byte); ``alpha="drop"`` converts every mode as Pillow's
    ``convert("RGB")`` does, alpha discarded (the origin project's decode).

    Raises ImageDecodeError naming `source` for empty, corrupt, truncated, unrecognised or
    oversized images; the pixel limit and the memory bound (`max_bytes`, by default
    ``max_pixels × BUDGET_BYTES_PER_PIXEL``) are checked from the header, before any pixel
    is decoded.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes, got {type(data).__name__}")
    if max_pixels <= 0:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    budget = max_pixels * BUDGET_BYTES_PER_PIXEL if max_bytes is None else max_bytes
    if len(data) == 0:
        raise ImageDecodeError(source, "empty file (0 bytes)")
    fmt = sniff_format(bytes(data[:_SNIFF_BYTES]))
    if fmt is None:
        raise ImageDecodeError(source, "not a recognised image format")
    try:
        with warnings.catch_warnings():
            # Our own max_pixels check below supersedes Pillow's global-threshold warning
            # (which would otherwise cap the limit at ~89M pixels); Pillow's hard
            # DecompressionBombError (2x that global) still applies and is converted below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=[fmt])
            try:
                width, height = im.size  # header only: Image.open is lazy
                if width <= 0 or height <= 0:
                    raise ImageDecodeError(source, f"image has no pixels ({width}×{height})")
                if width * height > max_pixels:
                    raise ImageDecodeError(
                        source,
                        f"image size {width}×{height} = {width * height} pixels exceeds "
                        f"the limit of {max_pixels}",
                    )
                need = decode_bytes_estimate(im.mode, width, height)
                if need > budget:
                    raise ImageDecodeError(
                        source, f"decoding this {im.mode} image of {width}×{height} needs "
                                f"about {need} bytes, over the limit of {budget}")
                im.load()
                orientation = im.getexif().get(0x0112, 1)
                rgb = _to_rgb(im, alpha)
            finally:
                im.close()  # frees Pillow's copy before the orientation copy is made
        turn = _ORIENT.get(orientation)
        return rgb if turn is None else np.ascontiguousarray(turn(rgb))
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


def _to_rgb(im: Image.Image, alpha: str = "white") -> np.ndarray:
    """Convert any single-frame Pillow mode to RGB uint8, a strip of rows at a time."""
    if alpha not in ("white", "drop"):
        raise ValueError(f"alpha must be 'white' or 'drop', got {alpha!r}")
    convert = _strip_to_rgb if alpha == "white" else _strip_convert
    width, height = im.size
    out = np.empty((height, width, 3), dtype=np.uint8)
    rows = max(1, _STRIP_PIXELS // width)
    for top in range(0, height, rows):
        bottom = min(height, top + rows)
        out[top:bottom] = convert(im.crop((0, top, width, bottom)))
    return out


def _strip_convert(im: Image.Image) -> np.ndarray:
    """One strip as Pillow's ``convert("RGB")`` makes it (alpha dropped)."""
    return np.asarray(im if im.mode == "RGB" else im.convert("RGB"))


def _strip_to_rgb(im: Image.Image) -> np.ndarray:
    """One strip by the module's conventions (every conversion is per pixel)."""
    mode = im.mode
    if (mode == "P" and "transparency" in im.info) or mode in ("PA", "RGBa", "La"):
        im, mode = im.convert("RGBA"), "RGBA"
    if mode in _ALPHA_MODES:
        rgba = np.asarray(im if mode == "RGBA" else im.convert("RGBA"))
        alpha = rgba[..., 3:].astype(np.uint16)
        # Integer "over white" with round-half-up, exact and portable; at most
        # 255 * 255 + 127, so uint16 holds every intermediate.
        out = rgba[..., :3] * alpha
        out += (255 - alpha) * 255
        out += 127
        out //= 255
        return out
    if mode in _16BIT_MODES or mode == "I":
        values = np.asarray(im).astype(np.int64)
        return _gray_to_rgb((np.clip(values, 0, 65535) >> 8).astype(np.uint8))
    if mode == "F":
        values = np.nan_to_num(np.asarray(im, dtype=np.float64), nan=0.0)
        return _gray_to_rgb(np.clip(np.rint(values), 0, 255).astype(np.uint8))
    if mode != "RGB":
        im = im.convert("RGB")  # L, 1, P, CMYK, YCbCr, RGBX, ...
    return np.asarray(im)


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=2)
