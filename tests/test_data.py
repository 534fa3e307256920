"""Data: the real Fashion-MNIST files, IDX validation, ImageFolder layout checks, corrupt-image skipping."""

from __future__ import annotations

import gzip
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from train import REPO
from train.data import DataError, GlobalBatchSampler, ImageFolderData, load_fashion_mnist, read_idx


def test_real_fashion_mnist(fashion_mnist_dir):
    """Fashion-MNIST (Xiao et al. 2017): 60,000 train and 10,000 test 28x28 images, 10 balanced classes."""
    x, y = load_fashion_mnist(fashion_mnist_dir, "train")
    assert x.shape == (60000, 28, 28) and x.dtype == torch.uint8
    assert torch.bincount(y).tolist() == [6000] * 10
    xv, yv = load_fashion_mnist(fashion_mnist_dir, "val")
    assert xv.shape == (10000, 28, 28) and torch.bincount(yv).tolist() == [1000] * 10


def idx_bytes(arr: np.ndarray) -> bytes:
    magic = 0x00000803 if arr.ndim == 3 else 0x00000801
    return struct.pack(f">I{arr.ndim}I", magic, *arr.shape) + arr.astype(np.uint8).tobytes()


def test_idx_roundtrip_plain_and_gzip(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a").write_bytes(idx_bytes(arr))
    (tmp_path / "a.gz").write_bytes(gzip.compress(idx_bytes(arr)))
    assert np.array_equal(read_idx(tmp_path / "a"), arr)
    assert np.array_equal(read_idx(tmp_path / "a.gz"), arr)


def test_bad_idx_files_are_named(tmp_path):
    arr = np.zeros((5, 28, 28), dtype=np.uint8)
    good = idx_bytes(arr)
    (tmp_path / "trunc").write_bytes(good[:-10])
    with pytest.raises(DataError, match=r"trunc: IDX file is 3926 bytes, expected 3936 .*truncated"):
        read_idx(tmp_path / "trunc")
    (tmp_path / "magic").write_bytes(b"\x00\x00\x08\x0d" + good[4:])
    with pytest.raises(DataError, match="wrong magic number 0x0000080d"):
        read_idx(tmp_path / "magic")
    noisy = idx_bytes(np.random.default_rng(0).integers(0, 255, (5, 28, 28)))
    (tmp_path / "trunc.gz").write_bytes(gzip.compress(noisy)[:1000])
    with pytest.raises(DataError, match="cannot read IDX file"):
        read_idx(tmp_path / "trunc.gz")


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path):
    with pytest.raises(DataError, match=r"does not exist.*apt-get install dataset-fashion-mnist.*--data-dir"):
        load_fashion_mnist(tmp_path / "nowhere", "train")
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\[.gz\] not found"):
        load_fashion_mnist(tmp_path, "train")


def make_imagefolder(root, classes=("cat", "dog"), per_class=3, size=(40, 30)):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                img = Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8))
                img.save(d / f"{i}.JPEG", quality=90)
    return root


def test_imagefolder_layout_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        ImageFolderData(tmp_path / "none", 32, 0, 0)
    (tmp_path / "a" / "train" / "x").mkdir(parents=True)
    with pytest.raises(DataError, match=r"has no val/ folder"):
        ImageFolderData(tmp_path / "a", 32, 0, 0)
    root = make_imagefolder(tmp_path / "b")
    (root / "val" / "bird").mkdir()
    with pytest.raises(DataError, match=r"class folders differ.*only in val \['bird'\]"):
        ImageFolderData(root, 32, 0, 0)
    root = make_imagefolder(tmp_path / "c")
    (root / "train" / "bird").mkdir()
    (root / "val" / "bird").mkdir()
    with pytest.raises(DataError, match="every class folder needs at least one image"):
        ImageFolderData(root, 32, 0, 0)


def test_corrupt_and_truncated_jpegs_are_skipped_and_counted(tmp_path):
    root = make_imagefolder(tmp_path / "d", per_class=4)
    (root / "train" / "cat" / "0.JPEG").write_bytes(b"not a jpeg at all")
    good = (root / "train" / "dog" / "1.JPEG").read_bytes()
    (root / "train" / "dog" / "0.JPEG").write_bytes(good[: len(good) // 3])
    data = ImageFolderData(root, 32, 0, 0)
    sampler = GlobalBatchSampler(8, 8, 4, 1, 0, seed=0)
    got = list(data.train_batches(sampler))
    assert sum(len(y) for _, y in got) == 6
    assert data.skipped == 2
    assert all(x.shape[1:] == (3, 32, 32) for x, _ in got)


def test_the_named_torchvision_archs_are_torchvisions_resnet_family():
    """train/models.py names torchvision's ResNet family instead of importing torchvision to list it; the list must
    be the pinned torchvision's own."""
    import torchvision

    from train.models import TORCHVISION_ARCHS

    want = sorted(n for n in torchvision.models.list_models(module=torchvision.models)
                  if n.startswith(("resnet", "resnext", "wide_resnet")))
    assert list(TORCHVISION_ARCHS) == want


def test_downpour_processes_do_not_import_torchvision():
    """Importing torchvision imports torch._dynamo (about 1.3 CPU-seconds a process); Downpour's shards and replicas
    (the MLP on Fashion-MNIST) need neither, and a run starts 1 + S + W of them."""
    code = ("import sys; import train.downpour, train.ps.replica, train.ps.run, train.ps.shard; "
            "import os; from train.data import FASHION_MNIST_DEFAULT_DIR, fashion_mnist; from train.models import "
            "build_model; build_model('mlp', 10, 1, 28); "
            "fashion_mnist(os.environ.get('FASHION_MNIST_DIR', FASHION_MNIST_DEFAULT_DIR), 1, 0, flip=False); "
            "print(sorted(m for m in ('torchvision', 'torch._dynamo') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout


STOP_SIGNAL_CHILD = r"""
import signal, sys
from train.data import ImageFolderData
flag = []
signal.signal(signal.SIGTERM, lambda *_: flag.append(1))  # as train.faults.StepAgreement: note it, stop later
data = ImageFolderData(sys.argv[1], 16, 1, 0)
print("ready", flush=True)
n = sum(len(y) for _ in range(int(sys.argv[2])) for _, y in data.val_batches(list(range(4)), 2))
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # Python's exit restores the default action of a Python handler
print("batches", n, "flagged", bool(flag), flush=True)
"""


def test_loader_workers_started_while_sigterm_rains_neither_die_nor_kill_the_rank(tmp_path):
    """The deepspeed launcher's SIGTERM reaches every process of a rank's tree, loader workers too, at any moment.
    Every new iterator forks workers (persistent_workers=False), and torch's worker sets a SIGTERM handler that
    dies before our worker_init_fn ignores the signal: a signal in that window killed the worker and the rank
    ('DataLoader worker ... exited unexpectedly') before it saved. A rank iterating 40 fresh loaders while SIGTERM
    goes to it and all its children every millisecond must see every batch and only note the signal."""
    import psutil

    root = make_imagefolder(tmp_path / "d", per_class=2)
    epochs = 40
    proc = subprocess.Popen([sys.executable, "-c", STOP_SIGNAL_CHILD, str(root), str(epochs)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout.readline().strip() == "ready"
    parent = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            for p in [parent, *parent.children(recursive=True)]:
                p.send_signal(15)
        except psutil.NoSuchProcess:
            pass
        time.sleep(0.001)
    out = proc.stdout.read()
    assert proc.returncode == 0 and f"batches {4 * epochs} flagged True" in out, out[-3000:]
