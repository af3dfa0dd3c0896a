"""Fuzzing the IDX loader: corrupted MNIST files (gzip and raw) load correctly or are refused.

Each example corrupts one of the four files of a small MNIST directory — truncation, byte
flips in the stored bytes or in the IDX content, header edits (type, rank, a dimension), or
trailing bytes — and loads it. Every case either loads a dataset consistent with what an
independent decoder reads from the files, or raises a one-line ValueError naming the
corrupted file; nothing else is raised and no case takes more than a few seconds.
"""

import gzip
import pathlib
import tempfile
import time

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxbp import data
from tests.test_data import _write_mnist

STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
         "t10k-labels-idx1-ubyte")
_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
DIMENSIONS = st.one_of(st.sampled_from([0, 1, 4, 5, 6, 11, 12, 13, 2**31, 2**32 - 1]),
                       st.integers(0, 2**32 - 1))
FLIPS = st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), min_size=1, max_size=3)


def _decode(stored: bytes) -> np.ndarray:
    """An independent IDX decoder (whole-file gzip, struct-free NumPy parsing)."""
    raw = gzip.decompress(stored) if stored[:2] == b"\x1f\x8b" else stored
    ndim = raw[3]
    shape = tuple(int(s) for s in np.frombuffer(raw[4:4 + 4 * ndim], ">u4"))
    return np.frombuffer(raw, _DTYPES[raw[2]], offset=4 + 4 * ndim).reshape(shape)


def _flip(raw: bytes, flips) -> bytes:
    out = bytearray(raw)
    for position, mask in flips:
        out[position % len(out)] ^= mask
    return bytes(out)


@st.composite
def corruptions(draw):
    """``(stem, compress, kind, edit)``; ``edit(stored bytes, IDX content)`` gives the new file."""
    stem = draw(st.sampled_from(STEMS))
    compress = draw(st.booleans())
    store = gzip.compress if compress else bytes
    kind = draw(st.sampled_from(["truncate", "flip-stored", "flip-content", "type", "rank",
                                 "dimension", "trailing"]))
    if kind == "truncate":
        cut = draw(st.integers(0, 10**6))
        return stem, compress, kind, lambda stored, raw: stored[:cut % len(stored)]
    if kind == "flip-stored":
        flips = draw(FLIPS)
        return stem, compress, kind, lambda stored, raw: _flip(stored, flips)
    if kind == "flip-content":
        flips = draw(FLIPS)
        return stem, compress, kind, lambda stored, raw: store(_flip(raw, flips))
    if kind in ("type", "rank"):
        value = draw(st.one_of(st.sampled_from(sorted(_DTYPES)) if kind == "type"
                               else st.integers(0, 4), st.integers(0, 255)))
        at = 2 if kind == "type" else 3
        return stem, compress, kind, lambda stored, raw: store(
            raw[:at] + bytes([value]) + raw[at + 1:])
    if kind == "dimension":
        which, size = draw(st.integers(0, 2)), draw(DIMENSIONS)

        def edit(stored, raw):
            at = 4 + 4 * (which % raw[3])
            return store(raw[:at] + np.array([size], ">u4").tobytes() + raw[at + 4:])

        return stem, compress, kind, edit
    extra = draw(st.binary(min_size=1, max_size=8))
    return stem, compress, kind, lambda stored, raw: store(raw + extra)


def _check_loaded(ds, directory: pathlib.Path, compress: bool):
    """A loaded dataset agrees with what the independent decoder reads from the files."""
    suffix = ".gz" if compress else ""
    decoded = {stem: _decode((directory / (stem + suffix)).read_bytes()) for stem in STEMS}
    np.testing.assert_array_equal(ds.y_train, decoded["train-labels-idx1-ubyte"])
    np.testing.assert_array_equal(ds.y_test, decoded["t10k-labels-idx1-ubyte"])
    assert ds.x_train.shape[0] == decoded["train-images-idx3-ubyte"].shape[0]
    assert ds.x_test.shape[1:] == ds.x_train.shape[1:]
    assert ds.x_train.dtype == np.float32 and np.all(np.isfinite(ds.x_train))
    assert np.all(np.isfinite(ds.x_test))
    assert ds.classes == int(ds.y_train.max()) + 1 >= 2
    assert set(np.unique(ds.y_test)) <= set(np.unique(ds.y_train))


@settings(max_examples=60, deadline=None)
@given(corruptions(), st.sampled_from(["flat", "image"]))
def test_corrupted_idx_files_load_correctly_or_are_refused_naming_the_file(case, layout):
    stem, compress, kind, edit = case
    with tempfile.TemporaryDirectory() as tmp:
        directory = pathlib.Path(tmp)
        arrays = _write_mnist(directory, compress=compress)
        path = directory / (stem + (".gz" if compress else ""))
        raw = gzip.decompress(path.read_bytes()) if compress else path.read_bytes()
        assert _decode(raw).shape == arrays[stem].shape
        path.write_bytes(edit(path.read_bytes(), raw))
        start = time.perf_counter()
        try:
            ds = data.load("mnist", data_dir=directory, layout=layout)
        except ValueError as err:
            message = str(err)
            assert str(path) in message, (kind, message)
            assert "\n" not in message, (kind, message)
        else:
            _check_loaded(ds, directory, compress)
        assert time.perf_counter() - start < 3.0, kind
