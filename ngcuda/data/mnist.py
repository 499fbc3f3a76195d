"""MNIST from the original IDX files (gzipped or raw).

The 10k test set (t10k-*) ships inside the package, so `load_mnist()` works offline: without `root` its
first 8000 images stand in for the training set and its last 2000 for the test set. With `root` the
standard 60k/10k sets are read (train-images-idx3-ubyte[.gz] etc.).
"""
from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import torch

from .graph import FILES, missing_file, verify_sha256

SHIPPED_TRAIN = 8000  # of the shipped 10k images, the first 8000 train and the last 2000 test
_DTYPES = {
    0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped): big-endian header, magic 0x0000<dtype><ndim>, then one uint32
    per dimension, then the data. Returns the array with its header's shape."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            buf = f.read()
    except FileNotFoundError:
        raise
    except (OSError, EOFError, zlib.error) as e:  # a truncated or non-gzip .gz, an unreadable file
        raise ValueError(f"{path}: cannot be read as {'gzipped ' if opener is gzip.open else ''}IDX "
                         f"({type(e).__name__}: {e})") from e
    if len(buf) < 4 or buf[0] != 0 or buf[1] != 0 or buf[2] not in _DTYPES:
        raise ValueError(f"{path}: not an IDX file (bad magic number {buf[:4].hex()})")
    dtype = np.dtype(_DTYPES[buf[2]])
    ndim = buf[3]
    header = 4 + 4 * ndim
    if len(buf) < header:
        raise ValueError(f"{path}: truncated IDX header")
    dims = tuple(int(d) for d in np.frombuffer(buf, dtype=">u4", count=ndim, offset=4))
    count = int(np.prod(dims)) if dims else 1
    if len(buf) - header != count * dtype.itemsize:
        raise ValueError(
            f"{path}: IDX header says {dims} ({count * dtype.itemsize} bytes of data) "
            f"but the file holds {len(buf) - header}"
        )
    return np.frombuffer(buf, dtype=dtype, count=count, offset=header).reshape(dims)


def _find(folder: Path, stem: str) -> Path:
    for candidate in (folder / f"{stem}.gz", folder / stem, folder / "mnist" / f"{stem}.gz", folder / "mnist" / stem):
        if candidate.is_file():
            return candidate
    raise missing_file(folder / f"{stem}.gz", "MNIST")


def load_mnist(root: str | Path | None = None, train: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Load MNIST images and labels.

    root:  folder with the IDX files (gzipped or not; also looked up in root/mnist/). None: the 10k test set
           shipped with ngcuda, split in two: its first 8000 images (train=True) and its last 2000 (train=False).
    train: the training set (60k, or 8000 shipped) or the test set (10k, or 2000 shipped).
    Returns (images [N, 784] float32 in [0, 1], labels [N] int64).
    """
    prefix = "train" if train else "t10k"
    if root is None:
        folder = FILES / "mnist"
        images_path, labels_path = (folder / f"t10k-{k}.gz" for k in ("images-idx3-ubyte", "labels-idx1-ubyte"))
        verify_sha256(images_path)
        verify_sha256(labels_path)
    else:
        folder = Path(root)
        images_path = _find(folder, f"{prefix}-images-idx3-ubyte")
        labels_path = _find(folder, f"{prefix}-labels-idx1-ubyte")
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"MNIST: images {images.shape} and labels {labels.shape} do not match")
    if root is None:
        rows = slice(0, SHIPPED_TRAIN) if train else slice(SHIPPED_TRAIN, None)
        images, labels = images[rows], labels[rows]
    x = torch.from_numpy(images.reshape(images.shape[0], -1).astype(np.float32) / 255.0)
    return x, torch.from_numpy(labels.astype(np.int64))
