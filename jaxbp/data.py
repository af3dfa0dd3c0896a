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
import zlib
from typing import NamedTuple

import numpy as np

from .layers.base import check_int, check_memory, check_real, count_non_finite, is_int

MAX_CLASSES = 65536  # an IDX label file with a larger label is taken to be corrupt

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


def _shown(values: np.ndarray, most: int = 5) -> str:
    """``[a, b, c]``, or the first ``most`` and how many more."""
    head = ", ".join(str(v) for v in values[:most])
    return f"[{head}]" if len(values) <= most else f"[{head}, … ({len(values) - most} more)]"


def classes_in(y) -> np.ndarray | None:
    """The classes present in labels (batch,) or in the columns of targets (batch, K)."""
    y = np.asarray(y)
    if y.ndim == 1 and np.issubdtype(y.dtype, np.integer):
        return y
    if y.ndim == 2 and (np.issubdtype(y.dtype, np.number)):
        return np.flatnonzero(np.any(y > 0, axis=0))
    return None


def check_classes(y_train, y_test, train_where: str, test_where: str, *,
                  every_class: bool = True) -> None:
    """A ValueError unless the labels make a classification problem a model can learn.

    The training split must hold at least two classes (and, with ``every_class``,
    every class in ``[0, max label]``); the test split no class the training split
    lacks (its accuracy would count a class no sample taught). ``train_where`` and
    ``test_where`` prefix the messages (a dataset's or a file's name).
    """
    present = np.unique(y_train)
    if len(present) < 2:
        raise ValueError(f"{train_where}: the training split holds a single class "
                         f"({present[0] if len(present) else 'none'}); a classifier needs at "
                         f"least two")
    unseen = np.setdiff1d(np.unique(y_test), present)
    if unseen.size:
        train = "the training split" + (f" ({train_where})" if train_where != test_where else "")
        raise ValueError(f"{test_where}: the test split holds class(es) {_shown(unseen)} that "
                         f"{train} lacks; no training sample teaches them")
    classes = int(present[-1]) + 1
    if every_class and len(present) < classes:
        gaps = np.setdiff1d(np.arange(classes), present)
        raise ValueError(f"{train_where}: the training split lacks class(es) {_shown(gaps)} of "
                         f"[0, {classes}); every class needs training samples")


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
    check_classes(y_tr, y_te, f"load({name!r})", f"load({name!r})")
    return _finish(name, x_tr, y_tr, x_te, y_te, image)


def _check_generator(fn: str, *, noise, seed, **counts) -> None:
    for arg, value in counts.items():
        check_int(fn, arg, value)
    if seed is not None:  # None: fresh entropy, as numpy.random.default_rng(None)
        check_int(fn, "seed", seed, 0)
    check_real(fn, "noise", noise, 0)


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


# Deflate expands a byte to at most 1032 bytes: a header claiming more than that
# many times the compressed file's size cannot be right.
_MAX_DEFLATE_RATIO = 1032
_CHUNK = 1 << 22  # bytes per read: no single allocation is sized by a header


def _read(path: str, f, n: int, compressed: bool) -> bytes:
    """Up to ``n`` bytes of ``f``, in chunks; gzip and deflate errors become ValueErrors."""
    chunks, left = [], n
    try:
        while left > 0:
            chunk = f.read(min(left, _CHUNK))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
    except (OSError, EOFError, zlib.error) as err:
        if not compressed:
            raise
        raise ValueError(f"{path}: corrupt gzip data ({err})") from None
    return b"".join(chunks)


def read_idx(path) -> np.ndarray:
    """Read one IDX file (gzip-compressed or raw, told apart by its first bytes).

    Layout: two zero bytes, a type byte, the number of dimensions ``d``, then
    ``d`` big-endian uint32 sizes and the data in row-major order. The header is
    checked against the file's size (and, compressed, against what deflate can
    expand to) and the machine's memory before the data is read.

    Raises:
      FileNotFoundError: the file does not exist.
      ValueError: the file is not IDX, is truncated, has trailing bytes, corrupt
        gzip data, a dimension of size 0, or more data than fits in memory; the
        message names the file and what is wrong.
    """
    path = os.fspath(path)
    with open(path, "rb") as raw:
        size = os.fstat(raw.fileno()).st_size
        compressed = raw.read(2) == b"\x1f\x8b"
        raw.seek(0)
        f = gzip.GzipFile(fileobj=raw, mode="rb") if compressed else raw
        head = _read(path, f, 4, compressed)
        if len(head) < 4 or head[:2] != b"\x00\x00" or head[2] not in _IDX_TYPES:
            raise ValueError(
                f"{path}: not an IDX file (expected magic 00 00 <type> <ndim> with type in "
                f"{[hex(t) for t in _IDX_TYPES]}; got {head.hex(' ') or 'an empty file'})"
            )
        dtype, ndim = np.dtype(_IDX_TYPES[head[2]]), head[3]
        header = 4 + 4 * ndim
        dims = _read(path, f, header - 4, compressed)
        if len(dims) < header - 4:
            raise ValueError(f"{path}: truncated IDX header ({4 + len(dims)} bytes, need "
                             f"{header})")
        shape = tuple(int(s) for s in np.frombuffer(dims, ">u4"))
        if 0 in shape:
            raise ValueError(f"{path}: IDX dimension sizes must be positive; got shape {shape}")
        nbytes = math.prod(shape) * dtype.itemsize  # a Python int: no overflow
        expected = header + nbytes
        needs = f"shape {shape} of {dtype.name} needs {expected} bytes"
        if not compressed and size != expected:
            what = "truncated" if size < expected else "has trailing bytes"
            raise ValueError(f"{path}: IDX file {what}: {needs}, got {size}")
        if compressed and nbytes > _MAX_DEFLATE_RATIO * size:
            raise ValueError(f"{path}: IDX file truncated: {needs}, more than the {size} "
                             f"compressed bytes can hold (deflate expands at most "
                             f"{_MAX_DEFLATE_RATIO}×)")
        check_memory(path, f"IDX data of shape {shape} ({dtype.name})", 2 * nbytes)
        body = _read(path, f, nbytes + 1, compressed)  # one more byte shows trailing data
    if len(body) != nbytes:
        what, got = ("truncated", header + len(body)) if len(body) < nbytes else \
            ("has trailing bytes", f"more than {expected}")
        raise ValueError(f"{path}: IDX file {what}: {needs}, got {got}")
    return np.frombuffer(body, dtype).reshape(shape).astype(dtype.newbyteorder("="))


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
    n_train = len(arrays["train_images"])
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        image_file, label_file = paths[f"{split}_images"], paths[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(
                f"{image_file} and {label_file}: {split} images must be (n, H, W) and labels "
                f"(n,) with the same n; got {images.shape} and {labels.shape}"
            )
        bad = labels[(labels < 0) | (labels % 1 != 0)]
        if bad.size:
            raise ValueError(
                f"{label_file}: class labels must be non-negative integers; got "
                f"{bad.size} invalid label(s), e.g. {bad[0]}"
            )
        limit = min(MAX_CLASSES, n_train)  # every class needs a training image
        if labels.max() >= limit:
            raise ValueError(
                f"{label_file}: class label {labels.max()} is out of range: labels must lie in "
                f"[0, {limit}) (at most {MAX_CLASSES} classes, and no more than the {n_train} "
                f"training images)"
            )
        bad = count_non_finite(images) if np.issubdtype(images.dtype, np.floating) else 0
        if bad:  # one would turn the whole standardised set into NaN
            raise ValueError(f"{image_file}: the {split} images hold {bad} non-finite value(s) "
                             f"(NaN or ±inf) among {images.size}; clean the data first")
    train_hw, test_hw = arrays["train_images"].shape[1:], arrays["test_images"].shape[1:]
    if train_hw != test_hw:
        raise ValueError(
            f"{paths['train_images']} and {paths['test_images']}: train and test images must "
            f"have the same size (H, W); got {train_hw} for train and {test_hw} for test"
        )
    pixels = arrays["train_images"].size + arrays["test_images"].size
    # float64 pixels, their standardised copy, a temporary and the float32 result
    check_memory(data_dir, f"standardising {pixels} pixels", 28 * pixels)
    labels = (arrays["train_labels"].astype(np.int64), arrays["test_labels"].astype(np.int64))
    check_classes(*labels, paths["train_labels"], paths["test_labels"])
    x_train, x_test = (arrays[f"{s}_images"].astype(np.float64) / 255.0 for s in ("train", "test"))
    if layout == "image":
        x_train, x_test = x_train[..., None], x_test[..., None]
    else:
        x_train, x_test = x_train.reshape(len(x_train), -1), x_test.reshape(len(x_test), -1)
    return _finish(name, x_train, labels[0], x_test, labels[1], layout == "image")


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
