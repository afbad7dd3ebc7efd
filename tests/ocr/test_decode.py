"""Tests for diskcache_ocr.ocr.decode."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from diskcache_ocr.errors import ImageDecodeError
from diskcache_ocr.ocr.decode import MAX_PIXELS_DEFAULT, decode_image

ORIENTATION = 0x0112


def encode(im: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def check_rgb(arr: np.ndarray, h: int, w: int) -> None:
    assert arr.shape == (h, w, 3)
    assert arr.dtype == np.uint8
    assert arr.flags.c_contiguous


def blocks_image(block: int = 1) -> np.ndarray:
    """An asymmetric 2×3-block RGB image: every flip/rotation of it is distinguishable."""
    colours = np.array(
        [[[255, 0, 0], [0, 255, 0], [0, 0, 255]], [[255, 255, 0], [0, 255, 255], [40, 40, 40]]],
        dtype=np.uint8,
    )
    return np.ascontiguousarray(colours.repeat(block, axis=0).repeat(block, axis=1))


def stored_for(display: np.ndarray, orientation: int) -> np.ndarray:
    """The stored pixels that a viewer shows as `display` under the EXIF orientation tag.

    Written from the EXIF definitions (where row 0 / column 0 of the stored image go),
    independently of Pillow's transpose table.
    """
    anti = lambda x: np.rot90(x, 2).transpose(1, 0, 2)  # noqa: E731 - transpose on anti-diagonal
    inverse = {
        1: lambda x: x,
        2: np.fliplr,
        3: lambda x: np.rot90(x, 2),
        4: np.flipud,
        5: lambda x: x.transpose(1, 0, 2),
        6: lambda x: np.rot90(x, 1),  # displayed = stored rotated 90° clockwise
        7: anti,
        8: lambda x: np.rot90(x, -1),  # displayed = stored rotated 90° counter-clockwise
    }
    return np.ascontiguousarray(inverse[orientation](display))


def with_orientation(stored: np.ndarray, orientation: int, fmt: str, **kw: object) -> bytes:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    return encode(Image.fromarray(stored), fmt, exif=exif, **kw)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG with a valid IHDR claiming width×height and no pixel data at all."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


# -- basic round trips ------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF", "WEBP"])
def test_lossless_rgb_round_trip(fmt: str) -> None:
    pixels = blocks_image(4)
    kw = {"lossless": True} if fmt == "WEBP" else {}
    out = decode_image(encode(Image.fromarray(pixels), fmt, **kw), f"x.{fmt.lower()}")
    check_rgb(out, 8, 12)
    np.testing.assert_array_equal(out, pixels)


def test_jpeg_round_trip_is_close() -> None:
    pixels = blocks_image(8)
    out = decode_image(encode(Image.fromarray(pixels), "JPEG", quality=95, subsampling=0), "x.jpg")
    check_rgb(out, 16, 24)
    assert np.abs(out.astype(int) - pixels).max() <= 16


def test_deterministic_and_private_copy() -> None:
    data = encode(Image.fromarray(blocks_image(8)), "JPEG")
    a, b = decode_image(data, "x.jpg"), decode_image(memoryview(data), "x.jpg")
    np.testing.assert_array_equal(a, b)
    a[0, 0] = 7  # the result is the caller's to modify
    np.testing.assert_array_equal(decode_image(data, "x.jpg"), b)


# -- EXIF orientation ---------------------------------------------------------------------


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_png_exact(orientation: int) -> None:
    display = blocks_image(1)
    data = with_orientation(stored_for(display, orientation), orientation, "PNG")
    assert Image.open(io.BytesIO(data)).getexif()[ORIENTATION] == orientation
    out = decode_image(data, "o.png")
    check_rgb(out, *display.shape[:2])
    np.testing.assert_array_equal(out, display)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_jpeg_close(orientation: int) -> None:
    display = blocks_image(8)  # 8×8 flat blocks stay aligned with JPEG blocks after rotation
    stored = stored_for(display, orientation)
    data = with_orientation(stored, orientation, "JPEG", quality=100, subsampling=0)
    out = decode_image(data, "o.jpg")
    check_rgb(out, *display.shape[:2])
    assert np.abs(out.astype(int) - display).max() <= 8


# -- modes ----------------------------------------------------------------------------------


def test_grayscale() -> None:
    gray = np.array([[0, 100], [200, 255]], dtype=np.uint8)
    out = decode_image(encode(Image.fromarray(gray, "L"), "PNG"), "g.png")
    check_rgb(out, 2, 2)
    np.testing.assert_array_equal(out, np.stack([gray] * 3, axis=2))


def test_la_composited_over_white() -> None:
    alpha = Image.frombytes("L", (3, 1), b"\x00\x80\xff")
    la = Image.merge("LA", [Image.new("L", (3, 1), 0), alpha])
    out = decode_image(encode(la, "PNG"), "la.png")
    check_rgb(out, 1, 3)
    # alpha 0 -> white paper, 255 -> the black ink, 128 -> about half way
    np.testing.assert_array_equal(out[0, :, 0], [255, 127, 0])
    assert (out == out[..., :1]).all()


def test_rgba_composited_over_white() -> None:
    rgba = np.array([[[10, 20, 30, 0], [10, 20, 30, 255], [200, 0, 0, 51]]], dtype=np.uint8)
    out = decode_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"), "a.png")
    check_rgb(out, 1, 3)
    np.testing.assert_array_equal(out[0, 0], [255, 255, 255])
    np.testing.assert_array_equal(out[0, 1], [10, 20, 30])
    np.testing.assert_array_equal(out[0, 2], [244, 204, 204])  # 0.2 red over white


def test_palette_with_transparency() -> None:
    im = Image.new("P", (2, 1))
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    im.putpixel((0, 0), 0)
    im.putpixel((1, 0), 1)
    out = decode_image(encode(im, "PNG", transparency=0), "p.png")
    check_rgb(out, 1, 2)
    np.testing.assert_array_equal(out[0], [[255, 255, 255], [255, 0, 0]])
    out_gif = decode_image(encode(im, "GIF", transparency=0), "p.gif")
    np.testing.assert_array_equal(out_gif[0], [[255, 255, 255], [255, 0, 0]])


def test_palette_without_transparency() -> None:
    im = Image.new("P", (1, 1))
    im.putpalette([12, 34, 56] + [0] * 765)
    out = decode_image(encode(im, "PNG"), "p.png")
    np.testing.assert_array_equal(out[0, 0], [12, 34, 56])


def test_cmyk_jpeg() -> None:
    cmyk = Image.new("CMYK", (16, 8), (0, 0, 0, 0))
    cmyk.paste((255, 0, 0, 0), (8, 0, 16, 8))  # cyan on the right half
    out = decode_image(encode(cmyk, "JPEG", quality=100), "c.jpg")
    check_rgb(out, 8, 16)
    assert np.abs(out[:, :8].astype(int) - 255).max() <= 8  # white paper
    assert np.abs(out[:, 8:].astype(int) - [0, 255, 255]).max() <= 8


def test_16bit_png_keeps_high_byte() -> None:
    values = np.array([[0, 255, 256], [4660, 32768, 65535]], dtype=np.uint16)
    im = Image.fromarray(values)
    assert im.mode == "I;16"
    data = encode(im, "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    out = decode_image(data, "deep.png")
    check_rgb(out, 2, 3)
    np.testing.assert_array_equal(out[..., 0], [[0, 0, 1], [18, 128, 255]])
    assert (out == out[..., :1]).all()


def test_16bit_big_endian() -> None:
    values = np.array([[0x1234, 0xFF00]], dtype=">u2")
    im = Image.frombytes("I;16B", (2, 1), values.tobytes())
    out = decode_image(encode(im, "TIFF"), "deep.tif")
    np.testing.assert_array_equal(out[0, :, 0], [0x12, 0xFF])


def test_32bit_int_and_float_modes() -> None:
    ints = Image.fromarray(np.array([[-5, 256, 70000]], dtype=np.int32))
    assert ints.mode == "I"
    np.testing.assert_array_equal(decode_image(encode(ints, "TIFF"), "i.tif")[0, :, 0], [0, 1, 255])
    floats = Image.fromarray(np.array([[-1.0, 127.6, 300.0]], dtype=np.float32))
    assert floats.mode == "F"
    out = decode_image(encode(floats, "TIFF"), "f.tif")
    check_rgb(out, 1, 3)
    np.testing.assert_array_equal(out[0, :, 0], [0, 128, 255])


def test_bilevel() -> None:
    im = Image.new("1", (3, 1), 0)
    im.putpixel((1, 0), 1)
    out = decode_image(encode(im, "PNG"), "b.png")
    np.testing.assert_array_equal(out[0], [[0, 0, 0], [255, 255, 255], [0, 0, 0]])


# -- decompression bombs ----------------------------------------------------------------


def test_bomb_refused_from_header_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    loads: list[object] = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(
        ImageFile.ImageFile, "load", lambda self: loads.append(self) or real_load(self)
    )
    with pytest.raises(ImageDecodeError) as info:
        decode_image(png_header_only(9000, 9000), "bomb.png", max_pixels=1_000_000)
    assert info.value.source == "bomb.png"
    assert "9000×9000 = 81000000 pixels exceeds the limit of 1000000" in str(info.value)
    assert loads == []  # pixel data was never touched


def test_default_limit_applies_between_pillow_thresholds() -> None:
    # 144M pixels: above our default, below Pillow's hard error (it only warns there)
    with pytest.raises(ImageDecodeError, match=f"exceeds the limit of {MAX_PIXELS_DEFAULT}"):
        decode_image(png_header_only(12000, 12000), "big.png")


def test_pillow_bomb_error_is_converted() -> None:
    with pytest.raises(ImageDecodeError, match="huge.png"):
        decode_image(png_header_only(20000, 20000), "huge.png", max_pixels=10**12)


def test_small_limit_applies_to_real_image() -> None:
    data = encode(Image.new("RGB", (100, 100)), "PNG")
    assert decode_image(data, "ok.png", max_pixels=10_000).shape == (100, 100, 3)
    with pytest.raises(ImageDecodeError, match="exceeds the limit of 9999"):
        decode_image(data, "ok.png", max_pixels=9_999)


# -- broken input -----------------------------------------------------------------------


def test_zero_bytes() -> None:
    with pytest.raises(ImageDecodeError, match=r"^empty\.jpg: empty"):
        decode_image(b"", "empty.jpg")


def test_text_named_jpg() -> None:
    with pytest.raises(ImageDecodeError, match=r"^notes\.jpg: not a recognised image format"):
        decode_image(b"this is a text file, not a picture\n", "notes.jpg")


def test_random_garbage() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ImageDecodeError, match="junk.bin"):
        decode_image(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(), "junk.bin")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "TIFF", "WEBP", "BMP"])
@pytest.mark.parametrize("keep", [0.3, 0.6, 0.9])
def test_truncated(fmt: str, keep: float) -> None:
    rng = np.random.default_rng(1)  # noise does not compress, so the cut lands in pixel data
    pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = encode(Image.fromarray(pixels), fmt)
    with pytest.raises(ImageDecodeError, match=f"^cut.{fmt.lower()}: "):
        decode_image(data[: int(len(data) * keep)], f"cut.{fmt.lower()}")


def test_corrupt_png_crc() -> None:
    data = bytearray(encode(Image.fromarray(blocks_image(4)), "PNG"))
    data[20] ^= 0xFF  # inside IHDR: its CRC no longer matches
    with pytest.raises(ImageDecodeError, match="crc.png"):
        decode_image(bytes(data), "crc.png")


def test_rejects_non_bytes_and_bad_limit() -> None:
    with pytest.raises(TypeError):
        decode_image("not bytes", "s")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        decode_image(b"x", "s", max_pixels=0)


# -- bounded memory, regular files only ----------------------------------------------------


def test_memory_estimate_refuses_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """An RGBA image within the pixel limit but over the memory bound is refused from its
    header: Pillow never decodes a pixel of it."""
    from diskcache_ocr.ocr.decode import decode_bytes_estimate

    data = encode(Image.new("RGBA", (100, 100)), "PNG")
    loaded = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loaded.append(self))
    need = decode_bytes_estimate("RGBA", 100, 100)
    assert need == 100 * 100 * (4 + 3)
    with pytest.raises(ImageDecodeError, match=r"^a\.png: decoding this RGBA image of 100×100 "
                                               rf"needs about {need} bytes, over the limit"):
        decode_image(data, "a.png", max_bytes=need - 1)
    assert loaded == []


@pytest.mark.full
def test_rgba_peak_memory_is_bounded_by_the_estimate(tmp_path: Path) -> None:
    """A 6000×6000 RGBA PNG (a few kB on disk): the decode's peak allocation stays within
    the mode × size estimate, not several times the image as a whole-image uint32
    composite needs."""
    import tracemalloc

    data = encode(Image.new("RGBA", (6000, 6000), (10, 20, 30, 128)), "PNG")
    tracemalloc.start()
    try:
        out = decode_image(data, "big.png")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out.shape == (6000, 6000, 3)
    assert tuple(out[0, 0]) == ((10 * 128 + 255 * 127 + 127) // 255,
                                (20 * 128 + 255 * 127 + 127) // 255,
                                (30 * 128 + 255 * 127 + 127) // 255)
    # tracemalloc sees numpy's and Python's buffers, not Pillow's own: the 3-byte result
    # plus one strip's temporaries, whose size does not grow with the image.
    assert peak <= 6000 * 6000 * 3 + (64 << 20)
    from diskcache_ocr.ocr.decode import decode_bytes_estimate

    # With Pillow's 4-byte image, that is the estimate (plus the strip).
    assert peak + 6000 * 6000 * 4 <= decode_bytes_estimate("RGBA", 6000, 6000) + (64 << 20)


def test_strips_equal_whole_image_conversion() -> None:
    """Row strips change nothing: a tall RGBA image with varied alpha, exact."""
    rng = np.random.default_rng(5)
    rgba = rng.integers(0, 256, size=(3000, 700, 4), dtype=np.uint8)
    out = decode_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"), "t.png")
    a = rgba[..., 3:].astype(np.uint32)
    want = (rgba[..., :3] * a + 255 * (255 - a) + 127) // 255
    np.testing.assert_array_equal(out, want.astype(np.uint8))


def test_read_image_file_regular(tmp_path: Path) -> None:
    from diskcache_ocr.ocr.decode import read_image_file

    data = encode(Image.fromarray(blocks_image(4)), "PNG")
    (tmp_path / "a.png").write_bytes(data)
    assert read_image_file(tmp_path / "a.png", "a.png") == data


def test_read_image_file_fifo_fails_at_once(tmp_path: Path) -> None:
    """A FIFO in a source's place: a named error, without waiting for a writer (a blocking
    open would hang this test forever, so the open runs in a thread released at the end)."""
    import threading

    from diskcache_ocr.errors import SourceError
    from diskcache_ocr.ocr.decode import read_image_file

    fifo = tmp_path / "a.png"
    os.mkfifo(fifo)
    result: list[BaseException | bytes] = []
    worker = threading.Thread(target=lambda: result.append(_call(read_image_file, fifo)),
                              daemon=True)
    worker.start()
    worker.join(10)
    if worker.is_alive():  # release the blocked open, then fail
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        worker.join(10)
    assert len(result) == 1 and isinstance(result[0], SourceError), result
    assert str(result[0]) == "a.png: not a regular file (a FIFO)"


def _call(read: object, path: Path) -> BaseException | bytes:
    try:
        return read(path, "a.png")  # type: ignore[operator]
    except BaseException as e:  # noqa: BLE001 - the test inspects it
        return e


def test_read_image_file_directory_and_missing(tmp_path: Path) -> None:
    from diskcache_ocr.errors import SourceError
    from diskcache_ocr.ocr.decode import read_image_file

    (tmp_path / "d.png").mkdir()
    with pytest.raises(SourceError, match=r"^d\.png: "):
        read_image_file(tmp_path / "d.png", "d.png")
    with pytest.raises(SourceError, match=r"^m\.png: cannot open: No such file"):
        read_image_file(tmp_path / "m.png", "m.png")


def test_huge_sparse_file_is_refused_before_reading(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """4 GiB sparse files: one not an image by its first bytes, one starting like a JPEG
    but larger than any image in the pixel limit. Neither is read beyond its first bytes."""
    from diskcache_ocr.ocr.decode import max_file_bytes, read_image_file

    zeros, jpeg = tmp_path / "zeros.jpg", tmp_path / "big.jpg"
    with open(zeros, "wb") as fh:
        fh.truncate(4 << 30)
    with open(jpeg, "wb") as fh:
        fh.write(b"\xff\xd8\xff\xe0")
        fh.truncate(4 << 30)
    read_sizes: list[int] = []
    real_read, real_pread = os.read, os.pread
    monkeypatch.setattr(os, "read", lambda fd, n: read_sizes.append(n) or real_read(fd, n))
    monkeypatch.setattr(os, "pread", lambda fd, n, o: read_sizes.append(n) or real_pread(fd, n, o))
    with pytest.raises(ImageDecodeError, match=r"^zeros\.jpg: not a recognised image format$"):
        read_image_file(zeros, "zeros.jpg")
    with pytest.raises(ImageDecodeError, match=rf"^big\.jpg: file of {4 << 30} bytes exceeds "
                                               rf"the {max_file_bytes()} bytes"):
        read_image_file(jpeg, "big.jpg")
    assert read_sizes and max(read_sizes) <= 64


def test_garbage_is_refused_by_its_first_bytes() -> None:
    with pytest.raises(ImageDecodeError, match=r"^g\.png: not a recognised image format$"):
        decode_image(b"\x00" * 4096, "g.png")
