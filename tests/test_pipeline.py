"""The JPEG input pipeline (train/jpeg.py, ImageFolderData): the standard augmentation, uint8 output normalised
on the device, reduced-size decoding, per-sample determinism, corrupt images."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image

from train.data import IMAGENET_MEAN, IMAGENET_STD, GlobalBatchSampler, ImageFolderData, to_model_input
from train.jpeg import RATIO, SCALE, TrainTransform, ValTransform, box_on_grid, collate_uint8, crop_params, draft_scale

STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
# torchvision 0.29 warns on every decode_jpeg call (deprecated for TorchCodec); train/jpeg.py filters it, pytest
# resets filters per test.
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")


def photo(width: int, height: int, seed: int, mode: str = "RGB") -> Image.Image:
    """A smooth, photo-like image (bicubic-upsampled random colours plus mild noise): JPEG-friendly content on
    which filters of the same kind agree to within a few grey levels (random noise would not)."""
    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.integers(0, 256, (max(2, height // 24), max(2, width // 24), 3), dtype=np.uint8))
    arr = np.asarray(base.resize((width, height), Image.BICUBIC)).astype(np.int16)
    arr = (arr + rng.integers(-6, 7, arr.shape)).clip(0, 255).astype(np.uint8)
    return Image.fromarray(arr).convert(mode)


def save(img: Image.Image, path, **kw) -> str:
    img.save(path, quality=90, **kw)
    return str(path)


def imagefolder(root, sizes=((64, 48), (48, 64), (80, 60)), classes=("a", "b"), per_class=6):
    for split in ("train", "val"):
        for c, cls in enumerate(classes):
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                w, h = sizes[i % len(sizes)]
                save(photo(w, h, seed=100 * c + i), root / split / cls / f"{i}.JPEG")
    return root


# ---------------------------------------------------------------------------------------------------------------
# The crop boxes are torchvision's


@pytest.mark.parametrize("hw", [(375, 500), (500, 375), (224, 224), (50, 1000), (1000, 40), (7, 9)])
def test_crop_boxes_equal_torchvision_get_params(hw):
    """Same seed, same box as torchvision's RandomResizedCrop.get_params (scale (0.08, 1), ratio (3/4, 4/3)),
    including the centre-crop fallback that very wide or tall images reach after 10 rejected tries."""
    h, w = hw
    img = torch.empty(1, 1, 1).expand(3, h, w)
    for seed in range(300):
        torch.manual_seed(seed)
        want = T.RandomResizedCrop.get_params(img, [0.08, 1.0], [3 / 4, 4 / 3])
        assert crop_params(h, w, torch.Generator().manual_seed(seed)) == tuple(want), (hw, seed)


def test_crop_distribution_matches_the_recipe_independently():
    """Without torchvision: on a 1000x1000 image a draw (s ~ U(0.08, 1), log r ~ U(log 3/4, log 4/3)) is kept
    iff s <= min(r, 1/r) (w and h within the image), so the kept area fraction has mean
    E[(m^2 - 0.08^2) / 2] / E[m - 0.08] with m = min(r, 1/r) = exp(-|log r|): with a = log(4/3), E[m] = (1/4) / a
    and E[m^2] = (7/16) / (2a), so 0.4778; the log aspect ratio is symmetric around 0; every box lies inside the
    image with area and ratio in range (up to rounding to whole pixels)."""
    n, side = 4000, 1000
    g = torch.Generator().manual_seed(1)
    boxes = np.array([crop_params(side, side, g) for _ in range(n)], dtype=np.float64)
    top, left, h, w = boxes.T
    frac, log_r = h * w / side**2, np.log(w / h)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= side).all() and (left + w <= side).all()
    assert frac.min() > 0.08 * 0.99 and frac.max() <= 1.0
    assert log_r.min() >= math.log(3 / 4) - 0.003 and log_r.max() <= math.log(4 / 3) + 0.003
    a = math.log(4 / 3)
    expected = ((7 / 16) / (2 * a) - 0.08**2) / 2 / ((1 / 4) / a - 0.08)
    assert abs(expected - 0.4778) < 1e-4
    assert abs(frac.mean() - expected) < 4 * frac.std() / math.sqrt(n)
    assert abs(log_r.mean()) < 4 * log_r.std() / math.sqrt(n)
    # top is uniform on [0, side - h]: its position fraction has mean 1/2 and variance ~1/12
    pos = top / np.maximum(side - h, 1)
    assert abs(pos.mean() - 0.5) < 4 * math.sqrt(1 / 12 / n)


def test_default_ranges_are_torchvision_defaults():
    rrc = T.RandomResizedCrop(224)
    assert tuple(rrc.scale) == SCALE == (0.08, 1.0)
    assert tuple(rrc.ratio) == RATIO == (3 / 4, 4 / 3)


# ---------------------------------------------------------------------------------------------------------------
# uint8 + normalisation on the device = torchvision's ToTensor + Normalize on the same crop


@pytest.mark.parametrize("size,mode", [((500, 375), "RGB"), ((375, 500), "RGB"), ((150, 120), "RGB"),
                                       ((320, 240), "L")])
def test_train_output_matches_torchvision_pipeline(tmp_path, size, mode):
    """Same seed: our uint8 crop, normalised, equals torchvision's RandomResizedCrop(224), RandomHorizontalFlip,
    ToTensor, Normalize within one grey level (1/255 before normalisation). 150x120 exercises upscaling."""
    path = save(photo(*size, seed=3, mode=mode), tmp_path / "x.jpg")
    ref_tf = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(),
                        T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    ours_tf = TrainTransform(224, draft=False)
    flips = set()
    for seed in range(8):
        torch.manual_seed(seed)
        with Image.open(path) as im:
            ref = ref_tf(im.convert("RGB"))
        g = torch.Generator().manual_seed(seed)
        x = collate_uint8([ours_tf(path, g)])
        assert x.dtype == torch.uint8 and x.shape == (1, 3, 224, 224)
        got = to_model_input(x, "cpu", torch.float32)
        err = ((got[0] - ref) * STD[0]).abs().max().item()  # back to the [0, 1] scale of ToTensor
        assert err <= 1 / 255 + 1e-5, (seed, err)
        g = torch.Generator().manual_seed(seed)
        crop_params(size[1], size[0], g)
        flips.add(bool(torch.rand(1, generator=g) < 0.5))
    assert flips == {True, False}  # both branches of the flip were compared


@pytest.mark.parametrize("size", [(500, 375), (375, 500), (300, 200)])
def test_val_output_matches_torchvision_pipeline(tmp_path, size):
    """Resize(256) + CenterCrop(224) + ToTensor + Normalize, within one grey level."""
    path = save(photo(*size, seed=4), tmp_path / "x.jpg")
    ref_tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    with Image.open(path) as im:
        ref = ref_tf(im.convert("RGB"))
    got = to_model_input(collate_uint8([ValTransform(224, draft=False)(path)]), "cpu", torch.float32)
    assert ((got[0] - ref) * STD[0]).abs().max().item() <= 1 / 255 + 1e-5


def test_to_model_input_dtypes_and_layout():
    x = torch.randint(0, 256, (2, 3, 28, 28), dtype=torch.uint8)
    want = (x.float() / 255 - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / STD
    got = to_model_input(x, "cpu", torch.bfloat16, torch.channels_last)
    assert got.dtype == torch.bfloat16 and got.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(got.float(), want, atol=0.02)  # bf16 has 8 bits of mantissa
    f = torch.randn(2, 3, 8, 8)
    assert torch.equal(to_model_input(f, "cpu", torch.float32), f)  # float batches are only moved and cast


# ---------------------------------------------------------------------------------------------------------------
# Reduced-size (DCT-scaled) decoding


def test_draft_decode_is_used_only_for_downscales_and_stays_close(tmp_path, monkeypatch):
    """A 1600x1200 photo: crops at least 2x224 on both sides are decoded at 1/2, 1/4 or 1/8 size, the box snapped
    to that grid (each edge within scale/2 pixels of the drawn one). The output stays within a few grey levels
    (mean error < 1.5 levels) of a full-size decode cropped at the snapped box; libjpeg's DCT reduction and the
    antialiased bilinear filter differ slightly. Validation (shorter side 1200 >= 4 x 256) likewise."""
    assert draft_scale(447, 900, 224, 224) == 1 and draft_scale(448, 900, 224, 224) == 2
    assert draft_scale(1792, 1800, 224, 224) == 8 and draft_scale(1000, 1000, 224, 224) == 4
    path = save(photo(1600, 1200, seed=5), tmp_path / "big.jpg")
    with Image.open(path) as im:
        full = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)[None]
    from PIL import JpegImagePlugin

    calls = []
    real_draft = JpegImagePlugin.JpegImageFile.draft
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft",
                        lambda im, mode, size: calls.append(size) or real_draft(im, mode, size))
    drafted = 0
    for seed in range(12):
        g = torch.Generator().manual_seed(seed)
        box = crop_params(1200, 1600, g)
        flip = bool(torch.rand(1, generator=g) < 0.5)
        s = draft_scale(box[2], box[3], 224, 224)
        drafted += s > 1
        top, left, h, w = box_on_grid(box, s, (-(-1200 // s), -(-1600 // s)))
        assert abs(top * s - box[0]) <= s / 2 and abs((left + w) * s - (box[1] + box[3])) <= s / 2
        ref = F.interpolate(full[:, :, top * s:(top + h) * s, left * s:(left + w) * s].float(), size=(224, 224),
                            mode="bilinear", antialias=True)[0]
        ref = ref.flip(-1) if flip else ref
        got = TrainTransform(224)(path, torch.Generator().manual_seed(seed)).float()
        assert (got - ref).abs().mean() < 1.5, seed
    assert drafted >= 6 and len(calls) == drafted  # PIL was asked for a reduced decode exactly when it pays
    a, b = ValTransform(224)(path).float(), ValTransform(224, draft=False)(path).float()
    assert calls[-1] == (1600 // 4, 1200 // 4)
    assert (a - b).abs().mean() < 1.5


# ---------------------------------------------------------------------------------------------------------------
# ImageFolderData: determinism, uint8 batches, corrupt files


def batches(data: ImageFolderData, sampler: GlobalBatchSampler) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in data.train_batches(sampler)]


def test_augmentation_depends_only_on_seed_epoch_and_index(tmp_path):
    """The same crops with 0 or 2 loader processes and when an epoch is resumed at step 2 (as after a checkpoint);
    other crops in another epoch or with another seed."""
    root = imagefolder(tmp_path / "r")
    sampler = GlobalBatchSampler(12, 4, 2, 1, 0, seed=0)
    sampler.set_epoch(1)
    inline = batches(ImageFolderData(root, 32, 0, seed=7, uint8=True), sampler)
    workers = batches(ImageFolderData(root, 32, 2, seed=7, uint8=True), sampler)
    assert len(inline) == 6 and all(x.dtype == torch.uint8 and x.shape == (2, 3, 32, 32) for x, _ in inline)
    assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(inline, workers, strict=True))
    sampler.set_epoch(1, start_step=2)  # resume: skip 2 optimizer steps = 4 micro-batches
    resumed = batches(ImageFolderData(root, 32, 2, seed=7, uint8=True), sampler)
    assert len(resumed) == 2
    assert all(torch.equal(a, c) for (a, _), (c, _) in zip(inline[4:], resumed, strict=True))
    # Another epoch with the same order of samples: other crops of the same images.
    no_shuffle = GlobalBatchSampler(12, 4, 2, 1, 0, shuffle=False)
    data = ImageFolderData(root, 32, 0, seed=7, uint8=True)
    e0 = torch.cat([x for x, _ in batches(data, no_shuffle)])
    no_shuffle.set_epoch(1)
    e1 = torch.cat([x for x, _ in batches(data, no_shuffle)])
    other_seed = torch.cat([x for x, _ in batches(ImageFolderData(root, 32, 0, seed=8, uint8=True), no_shuffle)])
    assert not torch.equal(e0, e1) and not torch.equal(e1, other_seed)


def test_float_mode_equals_uint8_normalised(tmp_path):
    """Without uint8 (loops that do not normalise on the device) the workers return the same batches, normalised."""
    root = imagefolder(tmp_path / "r", per_class=2)
    sampler = GlobalBatchSampler(4, 4, 4, 1, 0)
    (x8, y8), = batches(ImageFolderData(root, 32, 0, seed=0, uint8=True), sampler)
    (xf, yf), = batches(ImageFolderData(root, 32, 0, seed=0), sampler)
    assert xf.dtype == torch.float32 and torch.equal(y8, yf)
    assert torch.allclose(ImageFolderData(root, 32, 0, seed=0).normalize(x8), xf, atol=1e-6)


def test_corrupt_truncated_and_other_formats(tmp_path):
    """Garbage, a JPEG cut in the middle (header fine, data short: decoding fails after the crop was drawn) and an
    empty file are skipped and counted, with loader processes too; PNG and greyscale JPEGs decode."""
    root = imagefolder(tmp_path / "r", per_class=4)
    (root / "train" / "a" / "0.JPEG").write_bytes(b"not a jpeg")
    full = (root / "train" / "a" / "1.JPEG").read_bytes()
    (root / "train" / "a" / "1.JPEG").write_bytes(full[: len(full) // 2])
    (root / "train" / "b" / "0.JPEG").write_bytes(b"")
    photo(70, 50, seed=9).save(root / "train" / "b" / "1.png")
    save(photo(70, 50, seed=9, mode="L"), root / "train" / "b" / "2.JPEG")
    (root / "val" / "b" / "3.JPEG").write_bytes(b"\xff\xd8\xff broken")
    data = ImageFolderData(root, 32, 2, seed=0, uint8=True)
    assert data.info.num_train == 9 and data.info.num_val == 8
    got = batches(data, GlobalBatchSampler(9, 9, 3, 1, 0))
    assert sum(len(y) for _, y in got) == 6 and data.skipped == 3
    assert all(x.dtype == torch.uint8 and x.shape[1:] == (3, 32, 32) for x, _ in got)
    data.skipped = 0
    val = list(data.val_batches(list(range(8)), 3))
    assert sum(len(y) for _, y in val) == 7 and data.skipped == 1
