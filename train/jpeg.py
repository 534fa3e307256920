"""JPEG decoding and the standard ResNet augmentation, producing uint8 images; normalisation happens on the device.

Training: RandomResizedCrop + RandomHorizontalFlip with torchvision's ranges and draws (scale (0.08, 1) of the
area, aspect ratio (3/4, 4/3) log-uniform, 10 tries then a centre crop: ``RandomResizedCrop.get_params`` in
torchvision/transforms/transforms.py, the recipe of Szegedy et al. 2015 used by Goyal et al. 2017 sec. 5.1 and
torchvision's references/classification). :func:`crop_params` makes the same draws, in the same order, from a
``torch.Generator`` instead of the global RNG, so with equal seeds it returns torchvision's boxes exactly
(tests/test_pipeline.py checks that). Validation: shorter side resized to ``size / 0.875`` (256 for 224), then a
centre crop, as torchvision's ``Resize`` + ``CenterCrop``.

Where the time goes and what we save (per 500x375 image on one core, see docs/benchmarks.md):

- Decode at reduced size. libjpeg scales by 1/2, 1/4 or 1/8 inside the inverse DCT (PIL's ``Image.draft``),
  which costs a fraction of a full decode. We use it only when the crop, at the reduced scale, is still at
  least the output size on both sides, so the final resize is still a downscale (never an upscale of detail
  that was thrown away). The crop box is then rounded to the reduced pixel grid: its edges move by at most
  half a reduced pixel, under half an output pixel.
- Full-size JPEGs are decoded by torchvision.io.decode_jpeg straight into a tensor (PIL's output would cost
  another copy into numpy); the crop is a view of it.
- Resize uint8 with torch's antialiased bilinear kernel (the same filter as PIL's BILINEAR resize that
  torchvision's PIL path uses, within 1 grey level; about 3x faster than PIL here), flip the small output.
- No float conversion in the worker (4x fewer bytes through shared memory and to the device); the training
  process calls :func:`normalize_uint8` on the device.

Augmentation is deterministic per sample: the generator of sample ``index`` in ``epoch`` is seeded from
``(seed, epoch, index)`` (:func:`sample_seed`), so the same crops come back whichever worker decodes the
sample and wherever a resumed run starts.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

SCALE = (0.08, 1.0)  # torchvision RandomResizedCrop default: fraction of the image area
RATIO = (3 / 4, 4 / 3)  # torchvision RandomResizedCrop default: width / height, drawn log-uniformly
VAL_RESIZE_FRACTION = 0.875  # 224 / 256: torchvision references/classification (resize 256, crop 224)
DRAFT_SCALES = (8, 4, 2)  # the DCT reductions PIL's JPEG draft mode offers (libjpeg scale_denom)
_MASK64 = (1 << 64) - 1
# torchvision 0.29 deprecates its decoders in favour of TorchCodec and warns on every call; decode() falls back to
# PIL if decode_jpeg goes away.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)
# Errors PIL raises for truncated, corrupt or non-image files.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 64-bit seed for one sample's augmentation, from (run seed, epoch, sample index) (splitmix64 mixing).

    torch's CPU generator (mt19937) keeps only the low 32 bits of a seed; the mixing spreads every input bit
    over those, so neighbouring samples and epochs get unrelated streams.
    """
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xD1B54A32D192ED03 + index * 0x8CB92BA72F3D8DD7 + 1) & _MASK64
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & _MASK64
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def crop_params(height: int, width: int, g: torch.Generator, scale: Sequence[float] = SCALE,
                ratio: Sequence[float] = RATIO) -> tuple[int, int, int, int]:
    """A random-resized-crop box ``(top, left, h, w)``: torchvision's ``RandomResizedCrop.get_params``, drawing
    from ``g``. Same draws in the same order (area fraction U(scale), log aspect ratio U(log ratio), then top and
    left by randint), same 10 tries and the same centre-crop fallback, so equal seeds give equal boxes.
    """
    area = height * width
    log_lo, log_hi = torch.log(torch.tensor(ratio)).tolist()  # float32 bounds, as torchvision computes them
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=g).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_lo, log_hi, generator=g)).item()
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=g).item())
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=g).item())
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def draft_scale(region_h: int, region_w: int, out_h: int, out_w: int) -> int:
    """The largest DCT reduction (8, 4, 2, else 1) after which a ``region_h x region_w`` region of the image is
    still at least ``out_h x out_w``, i.e. the resize that follows stays a downscale."""
    for s in DRAFT_SCALES:
        if region_h >= s * out_h and region_w >= s * out_w:
            return s
    return 1


_DECODER: list[Any] = []  # torchvision.io's decode_jpeg and its RGB mode once looked up; [None, None] without them


def _torchvision_decoder() -> tuple[Any, Any]:
    """torchvision.io's ``decode_jpeg`` and ``ImageReadMode.RGB``, imported at the first image rather than with this
    module: importing torchvision imports torch._dynamo (about 1.3 CPU-seconds), which a process that reads no
    JPEG (Fashion-MNIST runs, Downpour's shards and replicas) never needs."""
    if not _DECODER:
        try:
            from torchvision.io import ImageReadMode, decode_jpeg

            _DECODER.extend([decode_jpeg, ImageReadMode.RGB])
        except ImportError:  # a torchvision without its image decoders
            _DECODER.extend([None, None])
    return _DECODER[0], _DECODER[1]


_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}  # start-of-frame markers


def jpeg_size(data: bytes | bytearray) -> tuple[int, int] | None:
    """(height, width) from a JPEG's start-of-frame segment (ITU T.81 B.2.2), or None if ``data`` does not parse
    as a JPEG header. A few microseconds, against ~0.1 ms for PIL's Image.open."""
    if data[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(data)
    while i + 9 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _SOF:
            h, w = int.from_bytes(data[i + 5:i + 7], "big"), int.from_bytes(data[i + 7:i + 9], "big")
            return (h, w) if h and w else None
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
            continue
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def decode(path: str, plan: Callable[[int, int], int]) -> torch.Tensor | None:
    """Decode ``path`` to an RGB (3, H, W) uint8 tensor (strides may be channels-last), or None if unreadable.

    ``plan(height, width)`` sees the full size from the header before decoding (augmentation draws its crop
    there) and returns the DCT reduction to ask for (1, 2, 4 or 8). A full-size JPEG decode goes through
    torchvision.io.decode_jpeg (the same libjpeg-turbo output as PIL, straight into a tensor, without PIL's copy
    into a numpy array), a reduced one through PIL's draft mode, other formats through PIL. The reduced size is
    ``ceil(full / scale)``; callers map their boxes onto it.
    """
    try:
        with open(path, "rb") as f:
            data = bytearray(f.read())
        decode, rgb_mode = _torchvision_decoder()
        size = jpeg_size(data) if decode is not None else None
        if size is not None:
            want = plan(*size)
            if want == 1:
                return decode(torch.frombuffer(data, dtype=torch.uint8), mode=rgb_mode)
        with Image.open(io.BytesIO(data)) as img:
            if size is None:
                full_w, full_h = img.size
                want = plan(full_h, full_w)
            if want > 1 and img.format == "JPEG":
                img.draft("RGB", (img.size[0] // want, img.size[1] // want))
            img.load()
            rgb = img if img.mode == "RGB" else img.convert("RGB")
            with warnings.catch_warnings():  # the array PIL hands over is read-only; we only read it
                warnings.simplefilter("ignore", UserWarning)
                return torch.from_numpy(np.asarray(rgb)).permute(2, 0, 1)
    except (*DECODE_ERRORS, RuntimeError):  # RuntimeError: torchvision's decode_jpeg on corrupt data
        return None


def _resize(chw: torch.Tensor, top: int, left: int, h: int, w: int, out_h: int, out_w: int) -> torch.Tensor:
    """Crop (a view) and resize with antialiased bilinear interpolation; returns (3, out_h, out_w) uint8."""
    x = chw[None, :, top:top + h, left:left + w]
    if (h, w) != (out_h, out_w):
        x = F.interpolate(x, size=(out_h, out_w), mode="bilinear", antialias=True, align_corners=False)
    return x[0]


def box_on_grid(box: tuple[int, int, int, int], scale: int, reduced_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """A (top, left, h, w) box of the full image on the grid of an image decoded ``scale`` times smaller: each edge
    rounded to the nearest reduced pixel (it moves by at most scale/2 full-size pixels; with ``draft_scale`` that
    is under half an output pixel), kept inside the ``reduced_hw`` image and at least one pixel wide."""
    out = []
    for start, length, limit in ((box[0], box[2], reduced_hw[0]), (box[1], box[3], reduced_hw[1])):
        a = min(round(start / scale), limit - 1)
        b = min(round((start + length) / scale), limit)
        out.append((a, max(1, b - a)))
    (top, h), (left, w) = out
    return top, left, h, w


class TrainTransform:
    """path, generator -> (3, size, size) uint8 tensor (random-resized crop, then flip with probability 1/2),
    or None for an unreadable image. ``draft=False`` always decodes at full size (for comparisons)."""

    def __init__(self, size: int, scale: Sequence[float] = SCALE, ratio: Sequence[float] = RATIO,
                 draft: bool = True):
        self.size, self.scale, self.ratio, self.draft = size, tuple(scale), tuple(ratio), draft

    def __call__(self, path: str, g: torch.Generator) -> torch.Tensor | None:
        drawn: dict[str, Any] = {}

        def plan(height: int, width: int) -> int:
            drawn["full"] = height, width
            drawn["box"] = top, left, h, w = crop_params(height, width, g, self.scale, self.ratio)
            drawn["flip"] = bool(torch.rand(1, generator=g).item() < 0.5)  # torchvision RandomHorizontalFlip
            drawn["scale"] = draft_scale(h, w, self.size, self.size) if self.draft else 1
            return drawn["scale"]

        chw = decode(path, plan)
        if chw is None:
            return None
        top, left, h, w = drawn["box"]
        if tuple(chw.shape[1:]) != drawn["full"]:  # decoded at reduced size: the box on the coarser grid
            top, left, h, w = box_on_grid((top, left, h, w), drawn["scale"], (int(chw.shape[1]), int(chw.shape[2])))
        out = _resize(chw, top, left, h, w, self.size, self.size)
        return out.flip(-1) if drawn["flip"] else out.contiguous()


class ValTransform:
    """path -> (3, size, size) uint8 tensor: shorter side resized to round(size / 0.875), centre crop (as
    torchvision's Resize(256) + CenterCrop(224)); None for an unreadable image."""

    def __init__(self, size: int, resize: int | None = None, draft: bool = True):
        self.size = size
        self.resize = resize or round(size / VAL_RESIZE_FRACTION)
        self.draft = draft

    def __call__(self, path: str, g: torch.Generator | None = None) -> torch.Tensor | None:
        target: list[int] = []

        def plan(height: int, width: int) -> int:
            # torchvision's Resize(int): the shorter side becomes `resize`, the longer int(resize * long / short).
            if width <= height:
                target[:] = [int(self.resize * height / width), self.resize]
            else:
                target[:] = [self.resize, int(self.resize * width / height)]
            short = min(height, width)
            return draft_scale(short, short, self.resize, self.resize) if self.draft else 1

        chw = decode(path, plan)
        if chw is None:
            return None
        new_h, new_w = target
        full = _resize(chw, 0, 0, chw.shape[1], chw.shape[2], new_h, new_w)
        top, left = int(round((new_h - self.size) / 2.0)), int(round((new_w - self.size) / 2.0))  # CenterCrop
        return full[:, top:top + self.size, left:left + self.size].contiguous()


def collate_uint8(images: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack (3, H, W) uint8 images into an (N, 3, H, W) batch."""
    return torch.stack(list(images))


_NORMALIZE_CONSTANTS: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor]] = {}


def normalize_constants(device: torch.device | str, mean: Sequence[float],
                        std: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(1 / (255 std), mean / std) as float32 (1, C, 1, 1) tensors on ``device``, made once per device and values.

    Built from Python lists each call, they would be a pageable host-to-device copy (a stream synchronisation on a
    GPU) in every training micro-step and evaluation batch; cached, the copy happens once per device."""
    key = (torch.device(device), tuple(map(float, mean)), tuple(map(float, std)))
    cached = _NORMALIZE_CONSTANTS.get(key)
    if cached is None:
        scale = torch.tensor([1 / (255 * s) for s in key[2]]).view(1, -1, 1, 1)
        shift = torch.tensor([m / s for m, s in zip(key[1], key[2], strict=True)]).view(1, -1, 1, 1)
        cached = _NORMALIZE_CONSTANTS[key] = (scale.to(key[0]), shift.to(key[0]))
    return cached


def normalize_uint8(x: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                    dtype: torch.dtype = torch.float32,
                    memory_format: torch.memory_format = torch.preserve_format) -> torch.Tensor:
    """(x / 255 - mean) / std for a uint8 (N, C, H, W) batch, computed in float32 wherever ``x`` lives (call it
    after the copy to the GPU), returned as ``dtype``. Equals torchvision's Normalize(ToTensor(img)). The constants
    come from :func:`normalize_constants` (no host-to-device copy after the first batch on a device)."""
    scale, shift = normalize_constants(x.device, mean, std)
    out = x.to(torch.float32, memory_format=memory_format).mul_(scale).sub_(shift)
    return out if dtype == torch.float32 else out.to(dtype)
