"""Datasets: shapes, deterministic splits, train-only standardisation, the IDX loader."""

import gzip
import re

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from jaxbp import data
from jaxbp.layers import base


def _raw_digits_split():
    bunch = load_digits()
    return train_test_split(
        bunch.data, bunch.target, test_size=0.2, random_state=0, stratify=bunch.target
    )


def test_digits_flat_is_standardised_with_train_statistics_only():
    ds = data.load("digits")
    assert ds.x_train.shape == (1437, 64) and ds.x_test.shape == (360, 64)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    assert ds.classes == 10 and ds.input_shape == (64,)
    # Rebuild the split and the standardisation by hand: μ, σ come from train only.
    x_tr, x_te, _, y_te = _raw_digits_split()
    mu, sd = x_tr.mean(0), x_tr.std(0)
    sd = np.where(sd > 0, sd, 1.0)
    np.testing.assert_allclose(ds.x_test, (x_te - mu) / sd, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(ds.y_test, y_te)
    live = x_tr.std(0) > 0
    np.testing.assert_allclose(ds.x_train.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(ds.x_train.std(0)[live], 1, rtol=1e-4)
    assert abs(ds.x_test.mean()) > 1e-3  # the test split was not standardised on itself


def test_digits_images_are_nhwc_with_one_scalar_scale():
    ds = data.load("digits", layout="image")
    assert ds.x_train.shape == (1437, 8, 8, 1) and ds.input_shape == (8, 8, 1)
    x_tr, x_te, y_tr, _ = _raw_digits_split()
    np.testing.assert_array_equal(ds.y_train, y_tr)
    mu, sd = x_tr.mean(), x_tr.std()  # one μ and σ over all training pixels
    np.testing.assert_allclose(ds.x_test, ((x_te - mu) / sd).reshape(-1, 8, 8, 1), atol=1e-5)
    np.testing.assert_allclose(ds.x_train, ((x_tr - mu) / sd).reshape(-1, 8, 8, 1), atol=1e-5)


@pytest.mark.parametrize(
    "name, features, classes, n",
    [("iris", 4, 3, 150), ("breast_cancer", 30, 2, 569), ("spirals", 2, 3, 600),
     ("xor", 2, 2, 800)],
)
def test_tabular_and_synthetic_sets(name, features, classes, n):
    ds = data.load(name)
    assert ds.input_shape == (features,) and ds.classes == classes
    assert len(ds.x_train) + len(ds.x_test) == n and len(ds.x_test) == pytest.approx(0.2 * n, abs=1)
    assert set(np.unique(ds.y_test)) == set(range(classes))  # stratified
    again = data.load(name)
    np.testing.assert_array_equal(again.x_train, ds.x_train)  # deterministic
    other = data.load(name, seed=1)
    assert not np.array_equal(other.y_train, ds.y_train)


def test_bad_requests():
    with pytest.raises(ValueError, match="unknown dataset 'cifar'; expected one of digits"):
        data.load("cifar")
    with pytest.raises(ValueError, match="layout='image' needs an image dataset.*iris is tabular"):
        data.load("iris", layout="image")
    with pytest.raises(ValueError, match="test_fraction must lie in \\(0, 1\\); got 1.5"):
        data.load("iris", test_fraction=1.5)
    with pytest.raises(ValueError, match="data_dir is required"):
        data.load("mnist")
    with pytest.raises(ValueError, match="unknown dataset 'foo'; expected one of digits"):
        data.load("foo", layout="image")
    with pytest.raises(ValueError, match=r"load\('iris'\): test_fraction × 150 samples, rounded "
                       r"up, must give between 3 and 147 test samples \(one per class in each "
                       r"split, 3 classes\); got 0.01 \(2 test samples\)"):
        data.load("iris", test_fraction=0.01)
    with pytest.raises(ValueError, match=r"between 3 and 147 test samples .*got 0.99 \(149 test"):
        data.load("iris", test_fraction=0.99)
    # the extremes that work: ceil(0.0134·150) = 3 and ceil(0.98·150) = 147
    assert len(data.load("iris", test_fraction=0.0134).x_test) == 3
    assert len(data.load("iris", test_fraction=0.98).x_test) == 147


# -------------------------------------------------------------------------- IDX

_TYPE = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C, np.float32: 0x0D,
         np.float64: 0x0E}


def _idx_bytes(a: np.ndarray) -> bytes:
    header = bytes([0, 0, _TYPE[a.dtype.type], a.ndim]) + np.array(a.shape, ">u4").tobytes()
    return header + a.astype(a.dtype.newbyteorder(">")).tobytes()


def _write_mnist(directory, n_train=12, n_test=6, compress=True, size=5, test_size=None):
    rng = np.random.default_rng(0)
    test_size = size if test_size is None else test_size
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, size, size), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, test_size, test_size),
                                               dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) % 10).astype(np.uint8),
    }
    for stem, a in arrays.items():
        raw = _idx_bytes(a)
        if compress:
            (directory / f"{stem}.gz").write_bytes(gzip.compress(raw))
        else:
            (directory / stem).write_bytes(raw)
    return arrays


@pytest.mark.parametrize("dtype", list(_TYPE))
def test_read_idx_round_trips_every_type(tmp_path, dtype):
    a = (np.arange(24).reshape(2, 3, 4) - 5).astype(dtype)
    path = tmp_path / "a.idx"
    path.write_bytes(_idx_bytes(a))
    out = data.read_idx(path)
    assert out.dtype == a.dtype and out.dtype.isnative
    np.testing.assert_array_equal(out, a)


@pytest.mark.parametrize("compress", [True, False], ids=["gzip", "raw"])
@pytest.mark.parametrize("layout", ["flat", "image"])
def test_mnist_loader(tmp_path, compress, layout):
    arrays = _write_mnist(tmp_path, compress=compress)
    ds = data.load("fashion-mnist", data_dir=tmp_path, layout=layout)
    assert ds.name == "fashion-mnist" and ds.classes == 10
    shape = (5, 5, 1) if layout == "image" else (25,)
    assert ds.x_train.shape == (12, *shape) and ds.x_test.shape == (6, *shape)
    np.testing.assert_array_equal(ds.y_train, arrays["train-labels-idx1-ubyte"])
    pixels = arrays["train-images-idx3-ubyte"].reshape(12, -1) / 255.0
    expected = (pixels - pixels.mean(0)) / pixels.std(0) if layout == "flat" else \
        (pixels - pixels.mean()) / pixels.std()
    np.testing.assert_allclose(ds.x_train.reshape(12, -1), expected, rtol=1e-5, atol=1e-5)


def test_mnist_missing_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="data directory .*nowhere does not exist"):
        data.load("mnist", data_dir=tmp_path / "nowhere")
    _write_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="missing IDX file t10k-labels-idx1-ubyte; looked "
                       "for t10k-labels-idx1-ubyte.gz, t10k-labels-idx1-ubyte"):
        data.load("mnist", data_dir=tmp_path)
    bad = tmp_path / "t10k-labels-idx1-ubyte"
    bad.write_bytes(b"<html>not found</html>")
    with pytest.raises(ValueError, match=r"idx1-ubyte: not an IDX file .*got 3c 68 74 6d"):
        data.load("mnist", data_dir=tmp_path)
    full = _idx_bytes(np.zeros((6,), np.uint8))
    bad.write_bytes(full[:-2])
    with pytest.raises(ValueError, match=r"IDX file truncated: shape \(6,\) of uint8 needs 14 "
                       r"bytes, got 12"):
        data.load("mnist", data_dir=tmp_path)
    bad.write_bytes(full + b"\0")
    with pytest.raises(ValueError, match="IDX file has trailing bytes"):
        data.load("mnist", data_dir=tmp_path)
    bad.write_bytes(_idx_bytes(np.zeros((5,), np.uint8)))
    with pytest.raises(ValueError, match=r"test images must be \(n, H, W\) and labels \(n,\) with "
                       r"the same n; got \(6, 5, 5\) and \(5,\)"):
        data.load("mnist", data_dir=tmp_path)
    bad.unlink()
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(full)[:-6])
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte.gz: corrupt gzip data"):
        data.load("mnist", data_dir=tmp_path)


def test_mnist_inconsistent_files(tmp_path):
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(ValueError, match=r"load\('mnist'\): data_dir .*file is a file, not a "
                       r"directory"):
        data.load("mnist", data_dir=tmp_path / "file")
    _write_mnist(tmp_path, size=6, test_size=4)
    with pytest.raises(ValueError, match=r"train and test images must have the same size "
                       r"\(H, W\); got \(6, 6\) for train and \(4, 4\) for test"):
        data.load("mnist", data_dir=tmp_path)
    labels = tmp_path / "t10k-labels-idx1-ubyte.gz"
    for bad, shown in [(np.array([0, -1, 2], np.int8), "-1"),
                       (np.array([0, 2.7, 1], np.float32), "2.7")]:
        _write_mnist(tmp_path, n_test=3)
        labels.write_bytes(gzip.compress(_idx_bytes(bad)))
        with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte.gz: class labels must be "
                           rf"non-negative integers; got 1 invalid label\(s\), e.g. {shown}"):
            data.load("mnist", data_dir=tmp_path)


def test_non_finite_features_are_refused_by_the_loader(tmp_path):
    arrays = _write_mnist(tmp_path, compress=False)
    images = arrays["train-images-idx3-ubyte"].astype(np.float32)
    images[0, 0, 0] = np.nan
    (tmp_path / "train-images-idx3-ubyte").write_bytes(_idx_bytes(images))
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte: the train images hold 1 "
                       r"non-finite value\(s\) \(NaN or ±inf\) among 300; clean the data first"):
        data.load("mnist", data_dir=tmp_path)


def _gzip_with_deflate(raw: bytes, deflate: bytes) -> bytes:
    """A gzip member around ``deflate`` (a raw deflate stream), with ``raw``'s CRC and length."""
    import zlib

    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
    trailer = np.array([zlib.crc32(raw), len(raw)], "<u4").tobytes()
    return header + deflate + trailer


def test_corrupt_deflate_stream_is_a_value_error_naming_the_file(tmp_path):
    import zlib

    _write_mnist(tmp_path)
    raw = _idx_bytes((np.arange(6) % 10).astype(np.uint8))
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    deflate = compressor.compress(raw) + compressor.flush()
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    assert data.read_idx(_write(path, _gzip_with_deflate(raw, deflate))).shape == (6,)
    # block type 11 is reserved: zlib refuses it ("invalid block type")
    _write(path, _gzip_with_deflate(raw, bytes([deflate[0] | 0x06]) + deflate[1:]))
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte.gz: corrupt gzip data "
                       r"\(Error -3 while decompressing data: invalid block type\)"):
        data.load("mnist", data_dir=tmp_path)
    flipped = bytearray(gzip.compress(raw))
    flipped[-5] ^= 0xFF  # the stored length, checked after the data
    _write(path, bytes(flipped))
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte.gz: corrupt gzip data"):
        data.load("mnist", data_dir=tmp_path)


def _write(path, raw: bytes):
    path.write_bytes(raw)
    return path


def _header(type_byte: int, shape) -> bytes:
    return bytes([0, 0, type_byte, len(shape)]) + np.array(shape, ">u4").tobytes()


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gzip"])
def test_idx_dimensions_that_overflow_or_are_zero_name_the_file(tmp_path, compress):
    pack = gzip.compress if compress else bytes
    path = tmp_path / "a.idx"
    huge = (2**32 - 1,) * 4  # 2**128 bytes: an int64 product would wrap around
    _write(path, pack(_header(0x0E, huge) + b"\0" * 64))
    needs = f"shape {huge} of float64 needs {20 + 8 * (2**32 - 1) ** 4} bytes"
    with pytest.raises(ValueError, match=re.escape(f"{path}: IDX file truncated: {needs}")):
        data.read_idx(path)
    _write(path, pack(_header(0x08, (0, 28, 28))))
    with pytest.raises(ValueError, match=re.escape(f"{path}: IDX dimension sizes must be "
                                                   f"positive; got shape (0, 28, 28)")):
        data.read_idx(path)


def test_a_header_is_checked_against_the_file_and_memory_before_reading(tmp_path, monkeypatch):
    path = tmp_path / "a.idx.gz"
    # 1 GB of zeros claimed by a 1 kB file: more than deflate can expand those bytes to
    _write(path, gzip.compress(_header(0x08, (1000, 1000, 1000)) + b"\0" * 1000))
    with pytest.raises(ValueError, match=r"a.idx.gz: IDX file truncated: shape \(1000, 1000, "
                       r"1000\) of uint8 needs 1000000016 bytes, more than the \d+ compressed "
                       r"bytes can hold \(deflate expands at most 1032×\)"):
        data.read_idx(path)
    _write(path, gzip.compress(_header(0x08, (4, 1000)) + b"\0" * 4000))
    monkeypatch.setattr(base, "memory_bytes", lambda: 2**12)
    with pytest.raises(ValueError, match=r"a.idx.gz: IDX data of shape \(4, 1000\) \(uint8\) "
                       r"would need 7.45e-06 GiB, more than the 3.81e-06 GiB of memory this "
                       r"machine has"):
        data.read_idx(path)
    monkeypatch.setattr(base, "memory_bytes", lambda: 10**4)
    _write_mnist(tmp_path)
    with pytest.raises(ValueError, match=r"standardising 450 pixels would need"):
        data.load("mnist", data_dir=tmp_path)


def test_absurd_labels_are_refused_before_any_model_is_built(tmp_path):
    _write_mnist(tmp_path)
    labels = tmp_path / "train-labels-idx1-ubyte.gz"
    one_billion = (np.arange(12) % 10).astype(np.int32)
    one_billion[3] = 10**9
    _write(labels, gzip.compress(_idx_bytes(one_billion)))
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte.gz: class label 1000000000 is "
                       r"out of range: labels must lie in \[0, 12\) \(at most 65536 classes, "
                       r"and no more than the 12 training images\)"):
        data.load("mnist", data_dir=tmp_path)
    gap = (np.arange(12) % 10).astype(np.uint8)
    gap[gap == 8] = 9  # class 8 has no training image (nor a test one)
    _write(labels, gzip.compress(_idx_bytes(gap)))
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte.gz: the training split lacks "
                       r"class\(es\) \[8\] of \[0, 10\); every class needs training samples"):
        data.load("mnist", data_dir=tmp_path)


def test_a_single_class_or_an_unseen_test_class_is_refused(tmp_path):
    _write_mnist(tmp_path)
    _write(tmp_path / "train-labels-idx1-ubyte.gz",
           gzip.compress(_idx_bytes(np.full(12, 3, np.uint8))))
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte.gz: the training split holds "
                       r"a single class \(3\); a classifier needs at least two"):
        data.load("mnist", data_dir=tmp_path)
    _write_mnist(tmp_path)
    _write(tmp_path / "train-labels-idx1-ubyte.gz",
           gzip.compress(_idx_bytes((np.arange(12) % 2).astype(np.uint8))))
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte.gz: the test split holds "
                       r"class\(es\) \[2, 3, 4, 5\] that the training split "
                       r"\(.*train-labels-idx1-ubyte.gz\) lacks"):
        data.load("mnist", data_dir=tmp_path)
    with pytest.raises(ValueError, match=r"load\('toy'\): the test split holds class\(es\) "
                       r"\[0, 1, 2, 3, 4, … \(2 more\)\] that the training split lacks"):
        data.check_classes(np.array([7, 8]), np.arange(9), "load('toy')", "load('toy')")


@pytest.mark.parametrize("call, message", [
    (lambda: data.load("iris", seed=-1), r"load\('iris'\): seed must be an int in \[0, 2\*\*32\); "
                                         r"got -1"),
    (lambda: data.spirals(classes=-1), "spirals: classes must be a positive int; got -1"),
    (lambda: data.xor(n=0), "xor: n must be a positive int; got 0"),
    (lambda: data.xor(noise=float("inf")), "xor: noise must be a finite number >= 0; got inf"),
    (lambda: data.load_idx_dir("/nowhere", layout="bogus"),
     r"load\('mnist'\): layout must be 'flat' or 'image'; got 'bogus'"),
])
def test_loaders_and_generators_check_their_arguments(call, message):
    with pytest.raises(ValueError, match=message):
        call()
