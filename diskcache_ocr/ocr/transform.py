"""The validation / training transform: longest side to ``size``, pad, normalize.

Split in two so the cache can keep the compact form: :func:`resize_pad` gives the resized,
padded ``uint8`` C×H×W image (deterministic apart from the optional random flip), and
:func:`finish` turns it into the normalized ``float32`` tensor. ``finish`` is the only
normalizing code, on the CPU or a GPU, so a cached compact image plus ``finish`` equals the
uncached output bit for bit (elementwise multiply and add are correctly rounded everywhere).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from PIL import Image

if TYPE_CHECKING:  # torch loads where a tensor is made, not with this module (the commands)
    import torch

from diskcache_ocr.keys import fingerprint

Output = Literal["float32", "compact"]


@dataclass(frozen=True)
class TransformConfig:
    """Parameters of the transform; their fingerprint versions the ``tensors`` kind."""

    size: int = 640
    mean: tuple[float, float, float] = (0.5602, 0.5602, 0.5602)
    std: tuple[float, float, float] = (0.2539, 0.2539, 0.2539)
    pad_value: int = 0
    hflip_prob: float = 0.0
    # "compact": the cache stores the resized, padded uint8 image and normalizes on read (a
    # quarter of the bytes to write, keep in the page cache and copy; normalizing costs about
    # what copying float32 would); "float32": it stores the normalized tensor.
    output: Output = "compact"
    version: str = "1"

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if not 16 <= self.size <= 8192:
            raise ValueError(f"size must be in 16..8192, got {self.size}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean/std need 3 values, std > 0; got {self.mean}, {self.std}")
        if not 0 <= self.pad_value <= 255:
            raise ValueError(f"pad_value must be in 0..255, got {self.pad_value}")
        if not 0.0 <= self.hflip_prob <= 1.0:
            raise ValueError(f"hflip_prob must be in [0, 1], got {self.hflip_prob}")
        if self.output not in ("float32", "compact"):
            raise ValueError(f"output must be 'float32' or 'compact', got {self.output!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TransformConfig:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown transform parameter(s): {sorted(unknown)}")
        return cls(**d)

    def fingerprint(self) -> str:
        return fingerprint(self.to_dict())

    def finish_constants(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel (scale, shift) so that finished = pixel * scale + shift, float32."""
        import torch
        std = np.asarray(self.std, np.float64)
        scale = (1.0 / (255.0 * std)).astype(np.float32)
        shift = (-np.asarray(self.mean, np.float64) / std).astype(np.float32)
        return torch.from_numpy(scale).view(3, 1, 1), torch.from_numpy(shift).view(3, 1, 1)


VALIDATION = TransformConfig()
TRAINING = TransformConfig(hflip_prob=0.5)


@dataclass(frozen=True)
class Transformed:
    image: np.ndarray  # uint8 (3, size, size), resized and padded
    polygons: tuple[np.ndarray, ...]  # float32 (k, 2) in the padded image's coordinates
    inverse_matrix: np.ndarray  # float64 (3, 3): padded image -> original coordinates
    orig_size: np.ndarray  # int32 (2,): original (height, width)


def scale_for(height: int, width: int, size: int) -> tuple[int, int, float, float]:
    """Resized (height, width) and the exact x / y scale factors used for polygons."""
    s = size / max(height, width)
    new_h = min(size, max(1, round(height * s)))
    new_w = min(size, max(1, round(width * s)))
    return new_h, new_w, new_w / width, new_h / height


def forward_matrix(height: int, width: int, size: int, flipped: bool) -> np.ndarray:
    _, new_w, sx, sy = scale_for(height, width, size)
    m = np.array([[sx, 0.0, 0.0], [0.0, sy, 0.0], [0.0, 0.0, 1.0]])
    if flipped:
        m = np.array([[-1.0, 0.0, new_w], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]) @ m
    return m


def map_points(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Apply an affine 3×3 matrix to (P, 2) points; float32 result.

    Elementwise on purpose (no matrix product, whose summation order may depend on the
    array's size): a point maps to the same bits alone or among thousands.
    """
    pts = np.asarray(points, np.float64)
    x, y = pts[:, 0], pts[:, 1]
    out = np.empty(pts.shape, np.float32)
    out[:, 0] = x * matrix[0, 0] + y * matrix[0, 1] + matrix[0, 2]
    out[:, 1] = x * matrix[1, 0] + y * matrix[1, 1] + matrix[1, 2]
    return out


def map_polygons(polygons: Sequence[np.ndarray], matrix: np.ndarray) -> tuple[np.ndarray, ...]:
    if not len(polygons):
        return ()
    sizes = [len(p) for p in polygons]
    moved = map_points(np.concatenate([np.asarray(p, np.float64) for p in polygons]), matrix)
    return tuple(np.split(moved, np.cumsum(sizes)[:-1]))


def resize_pad(
    image: np.ndarray, polygons: Sequence[np.ndarray], config: TransformConfig,
    *, flip: bool | None = None,
) -> Transformed:
    """Resize the longest side to ``config.size`` (bilinear), pad bottom/right, maybe flip.

    ``flip=None`` draws the flip from torch's generator with ``config.hflip_prob`` (so
    DataLoader workers, which seed torch per worker, draw differently).
    """
    import torch
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an H×W×3 uint8 image, got {image.shape} {image.dtype}")
    height, width = image.shape[:2]
    if flip is None:
        flip = config.hflip_prob > 0 and float(torch.rand(())) < config.hflip_prob
    new_h, new_w, _, _ = scale_for(height, width, config.size)
    resized = np.asarray(
        Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BILINEAR)
    )
    if flip:
        resized = resized[:, ::-1]
    out = np.full((3, config.size, config.size), config.pad_value, np.uint8)
    out[:, :new_h, :new_w] = resized.transpose(2, 0, 1)
    forward = forward_matrix(height, width, config.size, flip)
    return Transformed(
        image=out,
        polygons=map_polygons(polygons, forward),
        inverse_matrix=np.linalg.inv(forward),
        orig_size=np.array([height, width], np.int32),
    )


@functools.lru_cache(maxsize=16)
def _numpy_constants(config: TransformConfig) -> tuple[np.ndarray, np.ndarray]:
    """``finish_constants`` as read-only numpy arrays, made once per config (making them
    costs a noticeable share of a cached sample's time)."""
    out = tuple(c.numpy() for c in config.finish_constants())
    for a in out:
        a.flags.writeable = False
    return out[0], out[1]


def finish_numpy(image: np.ndarray, config: TransformConfig, out: np.ndarray) -> np.ndarray:
    """:func:`finish` on the CPU with numpy, writing into ``out`` (float32, same shape).

    Same operations as :func:`finish` (exact uint8 → float32, then one rounded multiply and
    one rounded add per element), so the two agree bit for bit; a test checks all 256 values.
    """
    scale, shift = _numpy_constants(config)
    if not (image.flags.c_contiguous and out.flags.c_contiguous and image.ndim >= 3
            and image.shape[-3] == 3 and image.shape == out.shape):
        np.multiply(image, scale, out=out)
        np.add(out, shift, out=out)
        return out
    # The same operations a block at a time, so each pass after the first works on what the
    # one before it left in the CPU cache instead of making another pass over memory. The
    # exact cast comes first, on its own: numpy's uint8 → float32 cast loop is vectorized,
    # while a multiply that takes uint8 input casts through a small buffer, element by element.
    plane = image.shape[-1] * image.shape[-2]
    src = image.reshape(-1, 3, plane)
    dst = out.reshape(-1, 3, plane)
    scales, shifts = scale.reshape(3), shift.reshape(3)
    for n in range(src.shape[0]):
        for c in range(3):
            for start in range(0, plane, _FINISH_BLOCK):
                block = dst[n, c, start:start + _FINISH_BLOCK]
                np.copyto(block, src[n, c, start:start + _FINISH_BLOCK])
                np.multiply(block, scales[c], out=block)
                np.add(block, shifts[c], out=block)
    return out


# Elements per block: 512 KB of float32, small enough to stay inside a core's L2 between the
# passes (benchmarks/README.md has the block sizes that were compared).
_FINISH_BLOCK = 1 << 17


def finish(image: torch.Tensor, config: TransformConfig, out: torch.Tensor | None = None
           ) -> torch.Tensor:
    """Normalize a uint8 (…, 3, H, W) tensor to float32 on whatever device it lives on."""
    import torch
    if out is None:
        out = torch.empty(image.shape, dtype=torch.float32, device=image.device)
    if image.device.type == "cpu":
        # The same operations in numpy: torch's uint8 → float32 copy is far slower on the CPU.
        finish_numpy(image.numpy(), config, out.numpy())
        return out
    return finish_torch(image, config, out)


def normalize_channels_last(image: np.ndarray, shift: np.ndarray, scale: np.ndarray,
                            out: np.ndarray) -> np.ndarray:
    """``(x - shift) * scale`` per channel on the last axis, in float32, into ``out``: an
    exact uint8 → float32 cast, then one rounded subtraction and one rounded multiplication
    per element. It is what an albumentations ``Normalize`` computes; that is proven value
    by value for every uint8 and channel before a Compose's Normalize is left to it
    (``albu_cut.cut_normalize_tail``)."""
    np.copyto(out, image)
    if out.ndim >= 2 and out.flags.c_contiguous and out.shape[-1] == shift.size == scale.size:
        # The constants tiled along whole rows (…, W·C): numpy's inner loop then runs over a
        # row instead of over the C channels of one pixel. Same constant per element.
        row = out.shape[-2] * out.shape[-1]
        rows = out.reshape(-1, row)
        np.subtract(rows, np.tile(shift, row // shift.size), out=rows)
        np.multiply(rows, np.tile(scale, row // scale.size), out=rows)
        return out
    np.subtract(out, shift, out=out)
    np.multiply(out, scale, out=out)
    return out


def normalize_channels_last_torch(image: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                                  out: torch.Tensor) -> torch.Tensor:
    """:func:`normalize_channels_last` with torch operations, on the image's device (the same
    three elementwise steps, so the same bits; a test compares all 256 values)."""
    out.copy_(image)
    out.sub_(shift.to(out.device))
    out.mul_(scale.to(out.device))
    return out


def finish_torch(image: torch.Tensor, config: TransformConfig, out: torch.Tensor) -> torch.Tensor:
    """:func:`finish` with torch operations, as it runs on a GPU (tests run it on the CPU
    to prove it equals :func:`finish_numpy` bit for bit)."""
    scale, shift = config.finish_constants()
    scale, shift = scale.to(image.device), shift.to(image.device)
    out.copy_(image)
    out.mul_(scale).add_(shift)
    return out
