"""Data: ImageNet (ImageFolder JPEGs), Fashion-MNIST (the four IDX files), synthetic tensors; the sampler.

Sampling follows Goyal et al. (sec. 2.2, "data shuffling"): one random permutation of the training set per
epoch, shared by all workers, each optimizer step consuming the next ``global_batch`` indices of it, each rank
a slice of those and each micro-step a slice of the rank's. A run with 2 ranks x 2 accumulation steps x micro
batch 4 therefore sees, per optimizer step, exactly the 16 samples that 1 rank x micro batch 16 sees. Samples
past the last whole global batch of an epoch are dropped (they would otherwise mix two epochs in one step).

Validation shards ``rank::world`` with no padding, so every sample is counted exactly once.
"""

from __future__ import annotations

import gzip
import os
import signal
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from train.jpeg import TrainTransform, ValTransform, collate_uint8, normalize_uint8, sample_seed

DATASETS = ("imagenet", "fashion-mnist", "synthetic")
FASHION_MNIST_DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist package
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IDX_MAGIC = {0x00000801: 1, 0x00000803: 3}  # unsigned-byte IDX files: labels (1 dim), images (3 dims)


class DataError(ValueError):
    """A data directory or file that cannot be used; the message names the path and what was expected."""


FASHION_MNIST_HELP = (
    "Fashion-MNIST needs the four IDX files {files} (optionally .gz) in one folder. On Debian or Ubuntu: "
    "`sudo apt-get install dataset-fashion-mnist` puts them in " + FASHION_MNIST_DEFAULT_DIR + ". Elsewhere, "
    "download them from the Fashion-MNIST project (github.com/zalandoresearch/fashion-mnist, data/fashion) "
    "and pass --data-dir FOLDER."
).format(files=", ".join(f for pair in FASHION_MNIST_FILES.values() for f in pair))


# ---------------------------------------------------------------------------------------------------------------
# Fashion-MNIST


def read_idx(path: str | Path) -> np.ndarray:
    """Read an unsigned-byte IDX file (plain or gzip), checking magic number, dimensions and length."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # gzip raises these for truncated or non-gzip files
        raise DataError(f"{path}: cannot read IDX file ({e}); expected a gzip'd or plain IDX file") from None
    if len(raw) < 8:
        raise DataError(f"{path}: {len(raw)} bytes is too short for an IDX header (8 bytes at least)")
    (magic,) = struct.unpack(">I", raw[:4])
    if magic not in IDX_MAGIC:
        raise DataError(f"{path}: wrong magic number 0x{magic:08x}; expected 0x00000801 (labels) or "
                        f"0x00000803 (images), unsigned-byte IDX")
    ndim = IDX_MAGIC[magic]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header ({len(raw)} bytes, expected {header})")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(dims)) + header
    if len(raw) != expected:
        raise DataError(f"{path}: IDX file is {len(raw)} bytes, expected {expected} for shape {dims} "
                        f"(truncated or corrupt)")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find(data_dir: Path, name: str) -> Path:
    for candidate in (data_dir / name, data_dir / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise DataError(f"Fashion-MNIST file {name}[.gz] not found in {data_dir}. {FASHION_MNIST_HELP}")


def load_fashion_mnist(data_dir: str | Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 28, 28) uint8 and labels (N,) int64 of one split ('train' or 'val' = the t10k files)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"Fashion-MNIST folder {data_dir} does not exist. {FASHION_MNIST_HELP}")
    img_name, lbl_name = FASHION_MNIST_FILES[split]
    images, labels = read_idx(_find(data_dir, img_name)), read_idx(_find(data_dir, lbl_name))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"{data_dir}: {img_name} has shape {images.shape} and {lbl_name} {labels.shape}; expected "
                        f"(N, H, W) images and (N,) labels with the same N")
    if labels.max(initial=0) >= 10:
        raise DataError(f"{data_dir}/{lbl_name}: label {labels.max()} out of range; Fashion-MNIST has 10 classes")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


# ---------------------------------------------------------------------------------------------------------------
# The sampler


class GlobalBatchSampler:
    """Yields this rank's micro-batches (lists of indices) for one epoch; see the module docstring.

    ``start_step`` skips the first optimizer steps of the epoch (to resume in the middle of one).
    """

    def __init__(self, num_samples: int, global_batch: int, micro_batch: int, world_size: int, rank: int,
                 seed: int = 0, shuffle: bool = True):
        if global_batch % (micro_batch * world_size):
            raise ValueError(f"global batch {global_batch} does not divide by micro batch {micro_batch} x "
                             f"world size {world_size}")
        self.n, self.global_batch, self.micro, self.world, self.rank = (
            num_samples, global_batch, micro_batch, world_size, rank)
        self.accum = global_batch // (micro_batch * world_size)
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.start_step = 0, 0

    @property
    def steps_per_epoch(self) -> int:
        return self.n // self.global_batch

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def permutation(self) -> torch.Tensor:
        """The epoch's order of the whole training set, the same on every rank."""
        if not self.shuffle:
            return torch.arange(self.n)
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(self.n, generator=g)

    def __iter__(self) -> Iterator[list[int]]:
        perm = self.permutation()
        per_rank = self.global_batch // self.world
        for step in range(self.start_step, self.steps_per_epoch):
            mine = perm[step * self.global_batch + self.rank * per_rank:][:per_rank]
            for a in range(self.accum):
                yield mine[a * self.micro:(a + 1) * self.micro].tolist()

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.accum


def eval_shard(num_samples: int, world_size: int, rank: int) -> list[int]:
    """This rank's validation indices: every sample on exactly one rank, no padding."""
    return list(range(rank, num_samples, world_size))


# ---------------------------------------------------------------------------------------------------------------
# Data sets as seen by the training loop


@dataclass
class DataInfo:
    name: str
    num_train: int
    num_val: int
    num_classes: int
    in_channels: int
    image_size: int


class TensorData:
    """A data set held in memory as uint8 tensors (Fashion-MNIST, synthetic): batches are tensor indexing.

    Training augmentation is a random horizontal flip whose coin flips depend only on (seed, epoch, index),
    so a resumed run draws the same ones.
    """

    skipped = 0  # unreadable samples met in the current training pass: none in memory

    def __init__(self, name: str, train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor],
                 mean: float, std: float, channels: int, flip: bool, seed: int):
        self.name, self.train, self.val = name, train, val
        self.mean, self.std, self.channels, self.flip, self.seed = mean, std, channels, flip, seed
        size = train[0].shape[-1]
        self.info = DataInfo(name, len(train[0]), len(val[0]), 10 if name == "fashion-mnist" else int(
            train[1].max()) + 1, channels, size)

    def _prep(self, x: torch.Tensor) -> torch.Tensor:
        x = x.unsqueeze(1).float().div_(255).sub_(self.mean).div_(self.std)
        return x.expand(-1, self.channels, -1, -1) if self.channels != 1 else x

    def train_batches(self, sampler: GlobalBatchSampler) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        images, labels = self.train
        # One coin per (epoch, sample), drawn up front: the same flips whichever step the epoch starts at.
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + sampler.epoch)
        coins = torch.rand(len(images), generator=g) < 0.5
        for idx in sampler:
            index = torch.tensor(idx)
            x = self._prep(images[index])
            if self.flip:
                x = torch.where(coins[index][:, None, None, None], x.flip(-1), x)
            yield x, labels[index]

    def val_batches(self, indices: list[int], batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        images, labels = self.val
        for i in range(0, len(indices), batch):
            index = torch.tensor(indices[i:i + batch])
            yield self._prep(images[index]), labels[index]


def fashion_mnist(data_dir: str | Path, channels: int, seed: int, flip: bool = True) -> TensorData:
    return TensorData("fashion-mnist", load_fashion_mnist(data_dir, "train"), load_fashion_mnist(data_dir, "val"),
                      FASHION_MNIST_MEAN, FASHION_MNIST_STD, channels, flip, seed)


def hold_out(data: TensorData, n: int) -> TensorData:
    """The last ``n`` training samples as the validation set and the rest as the training set; the test set is not
    used. For tuning on data that the final numbers are not measured on (Fashion-MNIST's training set is in no class
    order: its last 10,000 hold 955-1,050 of each class)."""
    images, labels = data.train
    if not 0 < n < len(images):
        raise DataError(f"a held-out split of {n} samples: the training set has {len(images)}; expected 0 < n < "
                        f"{len(images)}")
    cut = len(images) - n
    return TensorData(data.name, (images[:cut], labels[:cut]), (images[cut:], labels[cut:]), data.mean, data.std,
                      data.channels, data.flip, data.seed)


def synthetic(num_train: int, num_val: int, image_size: int, channels: int, num_classes: int,
              seed: int) -> TensorData:
    """Random images and labels, for speed tests only (nothing to learn)."""
    g = torch.Generator().manual_seed(seed)

    def make(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.randint(0, 256, (n, image_size, image_size), dtype=torch.uint8, generator=g),
                torch.randint(0, num_classes, (n,), generator=g))

    data = TensorData("synthetic", make(num_train), make(num_val), 0.5, 0.25, channels, False, seed)
    data.info.num_classes = num_classes
    return data


# ---------------------------------------------------------------------------------------------------------------
# ImageNet: an ImageFolder root with train/ and val/


IMAGENET_LAYOUT = "DIR/train/<class>/*.JPEG and DIR/val/<class>/*.JPEG, the same class folders in both"


def check_imagefolder_root(data_dir: str | Path) -> list[str]:
    """Check the ImageNet layout before any heavy work; return the sorted class names."""
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"ImageNet folder {root} does not exist; expected {IMAGENET_LAYOUT}")
    classes = {}
    for split in ("train", "val"):
        d = root / split
        if not d.is_dir():
            raise DataError(f"{root} has no {split}/ folder; expected {IMAGENET_LAYOUT}")
        classes[split] = sorted(e.name for e in os.scandir(d) if e.is_dir())
        if not classes[split]:
            raise DataError(f"{d} has no class folders; expected {IMAGENET_LAYOUT}")
    if classes["train"] != classes["val"]:
        only_train = sorted(set(classes["train"]) - set(classes["val"]))[:5]
        only_val = sorted(set(classes["val"]) - set(classes["train"]))[:5]
        raise DataError(f"class folders differ between {root}/train ({len(classes['train'])}) and {root}/val "
                        f"({len(classes['val'])}): only in train {only_train}, only in val {only_val}")
    return classes["train"]


class JpegFolder(torch.utils.data.Dataset):
    """(path, label) samples decoded by a :mod:`train.jpeg` transform. Items are keyed ``(epoch, index)`` so the
    augmentation generator of a sample depends only on (seed, epoch, index), not on the worker that decodes it.
    An unreadable image comes back as ``(None, label)``; the collate function drops and counts it."""

    def __init__(self, samples: list[tuple[str, int]], transform: Any, seed: int, random: bool):
        self.samples, self.transform, self.seed, self.random = samples, transform, seed, random

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor | None, int]:

        epoch, index = key
        path, label = self.samples[index]
        g = torch.Generator().manual_seed(sample_seed(self.seed, epoch, index)) if self.random else None
        return self.transform(path, g), label


class _Keyed:
    """A batch sampler's index lists turned into lists of (epoch, index) keys for :class:`JpegFolder`."""

    def __init__(self, batches: Any, epoch: int):
        self.batches, self.epoch = batches, epoch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for batch in self.batches:
            yield [(self.epoch, i) for i in batch]

    def __len__(self) -> int:
        return len(self.batches)


class _Collate:
    """Stack the readable images of a batch (uint8) and count the unreadable ones; optionally
    normalise to float in the worker (the behaviour for loops that do not normalise on the device)."""

    def __init__(self, uint8: bool):
        self.uint8 = uint8

    def __call__(self, items: list[tuple[torch.Tensor | None, int]]) -> tuple[torch.Tensor, torch.Tensor, int]:

        good = [(x, y) for x, y in items if x is not None]
        if not good:
            return torch.empty(0), torch.empty(0, dtype=torch.long), len(items)
        x = collate_uint8([x for x, _ in good])
        if not self.uint8:
            x = normalize_uint8(x, IMAGENET_MEAN, IMAGENET_STD)
        return x, torch.tensor([y for _, y in good], dtype=torch.long), len(items) - len(good)


def default_workers(local_ranks: int = 1) -> int:
    """Loader processes per rank: the cores left after one per rank (the training process), at least 1, at most
    16 (a CPU core decodes roughly 500-1,000 ImageNet JPEGs/s with this pipeline; see docs/benchmarks.md)."""
    return max(1, min(16, (os.cpu_count() or 2) // max(1, local_ranks) - 1))


STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def _ignore_stop_signals(worker_id: int) -> None:
    """Loader workers leave SIGTERM/SIGINT to their rank, which checkpoints before it stops them: a worker dying on
    the signal first would crash the rank ("DataLoader worker exited unexpectedly") before it could save. The
    worker starts with the signals blocked (:class:`_StopSafeLoader`); ignoring them discards one already pending."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


class _StopSafeLoader(torch.utils.data.DataLoader):
    """A DataLoader whose workers start with SIGTERM/SIGINT blocked, until :func:`_ignore_stop_signals` ignores them.

    torch's worker installs a SIGTERM handler that exits (torch/csrc/DataLoader.cpp) before it runs worker_init_fn,
    and a launcher signals every process of a rank's tree: a signal in that window killed a worker forked at the
    start of an epoch, and with it the rank, before the rank could save. The rank blocks the signals only while it
    forks; one arriving meanwhile reaches its handler when they are unblocked."""

    def __iter__(self) -> Any:
        if not self.num_workers:
            return super().__iter__()
        old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            return super().__iter__()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)


class ImageFolderData:
    """ImageNet-style folders, decoded by :mod:`train.jpeg` with the standard ResNet augmentation.

    Batches are uint8 (N, 3, H, W) when ``uint8`` is set; call :meth:`normalize` on them
    after the copy to the device (or use :func:`to_model_input`). With ``uint8`` unset (the default) the workers
    normalise, and batches are float32 as torchvision's ToTensor + Normalize would give. ``workers=None`` picks
    :func:`default_workers`; memory is pinned only when CUDA is available.
    """

    def __init__(self, data_dir: str | Path, image_size: int, workers: int | None, seed: int, *,
                 uint8: bool = False, draft: bool = True, prefetch_factor: int = 4):
        classes = check_imagefolder_root(data_dir)
        root = Path(data_dir)
        try:
            import torchvision.datasets as tvd  # here, not at import: torchvision imports torch._dynamo (1.3 CPU-s)

            train_samples = tvd.ImageFolder(str(root / "train"), loader=_no_load).samples
            val_samples = tvd.ImageFolder(str(root / "val"), loader=_no_load).samples
        except FileNotFoundError as e:  # ImageFolder's message for an empty class folder
            raise DataError(f"{root}: {e}; every class folder needs at least one image") from None
        self.train = JpegFolder(train_samples, TrainTransform(image_size, draft=draft), seed, random=True)
        self.val = JpegFolder(val_samples, ValTransform(image_size, draft=draft), seed, random=False)
        self.workers = default_workers(int(os.environ.get("LOCAL_SIZE", "1"))) if workers is None else workers
        self.seed, self.uint8, self.prefetch_factor = seed, uint8, prefetch_factor
        self.skipped = 0  # corrupt images this rank met in the current training pass (and its evaluation)
        self.info = DataInfo("imagenet", len(self.train), len(self.val), len(classes), 3, image_size)

    def normalize(self, x: torch.Tensor, dtype: torch.dtype = torch.float32,
                  memory_format: torch.memory_format = torch.preserve_format) -> torch.Tensor:
        """ImageNet mean/std normalisation of a uint8 batch, run where ``x`` is (the GPU after the copy)."""
        return normalize_uint8(x, IMAGENET_MEAN, IMAGENET_STD, dtype, memory_format)

    def _loader(self, dataset: JpegFolder, batches: Any, epoch: int) -> Any:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return _StopSafeLoader(
            dataset, batch_sampler=_Keyed(batches, epoch), num_workers=self.workers, collate_fn=_Collate(self.uint8),
            pin_memory=torch.cuda.is_available(), generator=g, persistent_workers=False,
            prefetch_factor=self.prefetch_factor if self.workers else None, worker_init_fn=_ignore_stop_signals)

    def train_batches(self, sampler: GlobalBatchSampler) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.skipped = 0
        for x, y, bad in self._loader(self.train, sampler, sampler.epoch):
            self.skipped += bad
            yield x, y

    def val_batches(self, indices: list[int], batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        chunks = [indices[i:i + batch] for i in range(0, len(indices), batch)]
        for x, y, bad in self._loader(self.val, chunks, 0):
            self.skipped += bad
            yield x, y


def _no_load(path: str) -> None:
    """ImageFolder is used only to list (path, class) samples; decoding happens in :mod:`train.jpeg`."""
    return None


def to_model_input(x: torch.Tensor, device: torch.device | str, dtype: torch.dtype,
                   memory_format: torch.memory_format = torch.preserve_format) -> torch.Tensor:
    """A batch from any data set here, on ``device`` as ``dtype``: uint8 ImageNet batches are copied as uint8 and
    normalised there (ImageNet mean/std); float batches are only moved and cast."""
    x = x.to(device, non_blocking=True)
    if x.dtype == torch.uint8:
        return normalize_uint8(x, IMAGENET_MEAN, IMAGENET_STD, dtype, memory_format)
    return x.to(dtype, memory_format=memory_format)


def build_data(name: str, data_dir: str | None, *, channels: int, image_size: int, workers: int | None, seed: int,
               synthetic_size: tuple[int, int] = (4096, 512)) -> TensorData | ImageFolderData:
    """The data set of a run, checked before the model is built."""
    if name == "fashion-mnist":
        return fashion_mnist(data_dir or FASHION_MNIST_DEFAULT_DIR, channels, seed)
    if name == "synthetic":
        return synthetic(*synthetic_size, image_size=image_size, channels=channels, num_classes=1000
                         if image_size > 32 else 10, seed=seed)
    if name == "imagenet":
        if not data_dir:
            raise DataError(f"--dataset imagenet needs --data-dir DIR with {IMAGENET_LAYOUT}")
        return ImageFolderData(data_dir, image_size, workers, seed, uint8=True)  # normalised on the device
    raise DataError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
