"""Datasets for training, loaded without any network access.

Every loader returns a :class:`Dataset` of NumPy arrays: features ``x`` as
float32 with the batch first, integer class labels ``y`` as int32 of shape
(batch,). The train/test split is deterministic (a stratified split seeded by
``seed``) and standardisation is fitted on the training split only, then applied
to both splits, so nothing about the test set leaks into training:

    x' = (x − μ_train) / σ_train        (σ = 1 where a feature is constant)

Tabular data is standardised per feature. Images (``layout="image"``, NHWC) are
standardised with one scalar μ and σ over all training pixels, so they stay
images (a per-pixel rescaling would distort the picture a convolution sees).

Sources:

* ``digits``: scikit-learn's 1797 handwritten digits, 8×8 pixels in 0..16,
  10 classes; ``layout="flat"`` gives (n, 64), ``layout="image"`` (n, 8, 8, 1).
* ``iris`` (150 × 4, 3 classes) and ``breast_cancer`` (569 × 30, 2 classes),
  bundled with scikit-learn.
* ``spirals`` (K interleaved arms) and ``xor`` (four noisy quadrants), synthetic.
* ``mnist`` / ``fashion-mnist``: the IDX files from a local directory the user
  supplies (``data_dir``), gzip-compressed or raw; the official 60000/10000
  split is kept and pixels are scaled by 1/255 before standardising.

Example:
  >>> ds = load("digits", layout="image")
  >>> ds.x_train.shape[1:], ds.classes, ds.x_train.dtype.name
  ((8, 8, 1), 10, 'float32')
"""

from __future__ import annotations

import gzip
import math
import os
from typing import NamedTuple

import numpy as np

from .layers.base import check_int, count_non_finite, is_int, is_real

DATASETS = ("digits", "iris", "breast_cancer", "spirals", "xor", "mnist", "fashion-mnist")


class Dataset(NamedTuple):
    """A standardised train/test split.

    Attributes:
      x_train, x_test: float32 features, (n, features) or (n, H, W, C).
      y_train, y_test: int32 labels in [0, classes), shape (n,).
      classes: number of classes.
      name: the dataset's name.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: int
    name: str

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One sample's shape (batch axis excluded)."""
        return tuple(self.x_train.shape[1:])


def standardize(x_train, x_test, axis=0):
    """``(x − μ) / σ`` with μ, σ from ``x_train`` over ``axis``; σ = 0 becomes 1."""
    mu = x_train.mean(axis=axis, keepdims=True)
    sigma = x_train.std(axis=axis, keepdims=True)
    sigma = np.where(sigma > 0, sigma, 1.0)
    return (x_train - mu) / sigma, (x_test - mu) / sigma


def _finish(name, x_train, y_train, x_test, y_test, image: bool) -> Dataset:
    x_train = np.asarray(x_train, np.float64)
    x_test = np.asarray(x_test, np.float64)
    for split, x in (("train", x_train), ("test", x_test)):
        bad = count_non_finite(x)
        if bad:  # one would turn the whole standardised set into NaN
            raise ValueError(f"load({name!r}): the {split} features hold {bad} non-finite "
                             f"value(s) (NaN or ±inf) among {x.size}; clean the data first")
    axis = None if image else 0
    x_train, x_test = standardize(x_train, x_test, axis=axis)
    y_train = np.asarray(y_train, np.int32)
    classes = int(max(y_train.max(), np.max(y_test, initial=0))) + 1
    return Dataset(
        x_train.astype(np.float32),
        y_train,
        x_test.astype(np.float32),
        np.asarray(y_test, np.int32),
        classes,
        name,
    )


def _split(name, x, y, test_fraction, seed, image=False) -> Dataset:
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"load({name!r}): test_fraction must lie in (0, 1); got {test_fraction}")
    n, classes = len(y), len(np.unique(y))
    n_test = math.ceil(test_fraction * n)  # as train_test_split rounds
    if not classes <= n_test <= n - classes:
        raise ValueError(
            f"load({name!r}): test_fraction × {n} samples, rounded up, must give between "
            f"{classes} and {n - classes} test samples (one per class in each split, {classes} "
            f"classes); got {test_fraction} ({n_test} test samples)"
        )
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    return _finish(name, x_tr, y_tr, x_te, y_te, image)


def _check_generator(fn: str, *, noise, seed, **counts) -> None:
    for arg, value in counts.items():
        check_int(fn, arg, value)
    if seed is not None:  # None: fresh entropy, as numpy.random.default_rng(None)
        check_int(fn, "seed", seed, 0)
    if not (is_real(noise) and 0 <= noise < math.inf):
        raise ValueError(f"{fn}: noise must be a finite number >= 0; got {noise!r}")


def spirals(n_per_class=200, classes=3, noise=0.2, seed=0):
    """``classes`` interleaved spiral arms in 2-D (the CS231n toy set).

    Arm k's points are ``r(sin θ, cos θ)`` with ``r ∈ [0, 1]`` and
    ``θ = 4r + 2πk/K + noise·ε``. Returns ``(x (n, 2), y (n,))``.
    """
    _check_generator("spirals", n_per_class=n_per_class, classes=classes, noise=noise, seed=seed)
    rng = np.random.default_rng(seed)
    r = np.tile(np.linspace(0.0, 1.0, n_per_class), classes)
    k = np.repeat(np.arange(classes), n_per_class)
    theta = 4.0 * r + 2.0 * np.pi * k / classes + noise * rng.standard_normal(r.shape)
    return np.stack([r * np.sin(theta), r * np.cos(theta)], axis=1), k


def xor(n=800, noise=0.1, seed=0):
    """Points of the square [−1, 1]², class 1 where ``x₀·x₁ > 0`` (before noise).

    Returns ``(x (n, 2), y (n,))``; no linear model separates the classes.
    """
    _check_generator("xor", n=n, noise=noise, seed=seed)
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1.0, 1.0, size=(n, 2))
    y = (x[:, 0] * x[:, 1] > 0).astype(np.int32)
    return x + noise * rng.standard_normal(x.shape), y


# ----------------------------------------------------------------------- IDX

# IDX type byte -> big-endian NumPy dtype (http://yann.lecun.com/exdb/mnist/ format).
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path) -> np.ndarray:
    """Read one IDX file (gzip-compressed or raw, told apart by its first bytes).

    Layout: two zero bytes, a type byte, the number of dimensions ``d``, then
    ``d`` big-endian uint32 sizes and the data in row-major order.

    Raises:
      FileNotFoundError: the file does not exist.
      ValueError: the file is not IDX, is truncated, or has trailing bytes; the
        message names the file and what is wrong.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as err:
            raise ValueError(f"{path}: corrupt gzip data ({err})") from None
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] not in _IDX_TYPES:
        raise ValueError(
            f"{path}: not an IDX file (expected magic 00 00 <type> <ndim> with type in "
            f"{[hex(t) for t in _IDX_TYPES]}; got {raw[:4].hex(' ') or 'an empty file'})"
        )
    dtype, ndim = np.dtype(_IDX_TYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes, need {header})")
    shape = tuple(int(s) for s in np.frombuffer(raw[4:header], ">u4"))
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "has trailing bytes"
        raise ValueError(
            f"{path}: IDX file {what}: shape {shape} of {dtype.name} needs {expected} bytes, "
            f"got {len(raw)}"
        )
    return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def _find_idx(data_dir: str, stem: str) -> str:
    # Files ship as "train-images-idx3-ubyte(.gz)"; some mirrors write "train-images.idx3-ubyte".
    dotted = stem.replace("-idx", ".idx")
    candidates = [stem + ".gz", stem, dotted + ".gz", dotted]
    for name in candidates:
        path = os.path.join(data_dir, name)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"{data_dir}: missing IDX file {stem}; looked for {', '.join(candidates)}"
    )


def load_idx_dir(data_dir, name="mnist", layout="flat") -> Dataset:
    """MNIST or Fashion-MNIST (same file names and format) from ``data_dir``.

    Expects the four files ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte`` (each optionally ``.gz``).
    """
    if layout not in ("flat", "image"):
        raise ValueError(f"load({name!r}): layout must be 'flat' or 'image'; got {layout!r}")
    if data_dir is None:
        raise ValueError(f"load({name!r}): data_dir is required (a directory with the IDX files)")
    data_dir = os.fspath(data_dir)
    if not os.path.isdir(data_dir):
        if os.path.exists(data_dir):
            raise ValueError(f"load({name!r}): data_dir {data_dir} is a file, not a directory")
        raise FileNotFoundError(f"load({name!r}): data directory {data_dir} does not exist")
    paths = {k: _find_idx(data_dir, stem) for k, stem in _MNIST_FILES.items()}
    arrays = {k: read_idx(path) for k, path in paths.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(
                f"{data_dir}: {split} images must be (n, H, W) and labels (n,) with the same n; "
                f"got {images.shape} and {labels.shape}"
            )
        bad = labels[(labels < 0) | (labels % 1 != 0)]
        if bad.size:
            raise ValueError(
                f"{paths[f'{split}_labels']}: class labels must be non-negative integers; got "
                f"{bad.size} invalid label(s), e.g. {bad[0]}"
            )
    train_hw, test_hw = arrays["train_images"].shape[1:], arrays["test_images"].shape[1:]
    if train_hw != test_hw:
        raise ValueError(
            f"{data_dir}: train and test images must have the same size (H, W); got {train_hw} "
            f"for train and {test_hw} for test"
        )
    x_train, x_test = (arrays[f"{s}_images"].astype(np.float64) / 255.0 for s in ("train", "test"))
    if layout == "image":
        x_train, x_test = x_train[..., None], x_test[..., None]
    else:
        x_train, x_test = x_train.reshape(len(x_train), -1), x_test.reshape(len(x_test), -1)
    return _finish(
        name, x_train, arrays["train_labels"], x_test, arrays["test_labels"], layout == "image"
    )


# ---------------------------------------------------------------------- load


def load(name, *, layout="flat", test_fraction=0.2, seed=0, data_dir=None) -> Dataset:
    """Load dataset ``name`` (one of ``DATASETS``) as a standardised split.

    Args:
      name: "digits", "iris", "breast_cancer", "spirals", "xor", "mnist" or
        "fashion-mnist".
      layout: "flat" gives (n, features); "image" gives NHWC images (digits,
        mnist and fashion-mnist only).
      test_fraction: held-out fraction for the bundled and synthetic sets (MNIST
        keeps its official split).
      seed: seeds the split and the synthetic generators.
      data_dir: directory holding the IDX files (mnist, fashion-mnist).
    """
    if name not in DATASETS:
        raise ValueError(f"load: unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    if layout not in ("flat", "image"):
        raise ValueError(f"load({name!r}): layout must be 'flat' or 'image'; got {layout!r}")
    if not (is_int(seed) and 0 <= seed < 2**32):
        raise ValueError(f"load({name!r}): seed must be an int in [0, 2**32); got {seed!r}")
    if layout == "image" and name not in ("digits", "mnist", "fashion-mnist"):
        raise ValueError(
            f"load({name!r}): layout='image' needs an image dataset (digits, mnist, "
            f"fashion-mnist); {name} is tabular"
        )
    if name in ("mnist", "fashion-mnist"):
        return load_idx_dir(data_dir, name, layout)
    if name == "digits":
        from sklearn.datasets import load_digits

        bunch = load_digits()
        x = bunch.images[..., None] if layout == "image" else bunch.data
        return _split(name, x, bunch.target, test_fraction, seed, image=layout == "image")
    if name in ("iris", "breast_cancer"):
        from sklearn import datasets

        bunch = getattr(datasets, f"load_{name}")()
        return _split(name, bunch.data, bunch.target, test_fraction, seed)
    if name == "spirals":
        return _split(name, *spirals(seed=seed), test_fraction, seed)
    return _split(name, *xor(seed=seed), test_fraction, seed)  # name == "xor"
