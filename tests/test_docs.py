"""The README's Python examples and the library's docstring examples run as written."""

import doctest
import importlib
import pathlib
import pkgutil
import re

import pytest

import jaxbp

ROOT = pathlib.Path(__file__).resolve().parents[1]


def readme_python_blocks():
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


@pytest.mark.parametrize("index", range(len(readme_python_blocks())))
def test_readme_python_examples_run(index, capsys):
    exec(compile(readme_python_blocks()[index], f"README block {index}", "exec"), {})


def test_readme_shows_the_test_command_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    command = "python -m pytest -n auto"
    assert command in ci and command in (ROOT / "README.md").read_text()


MODULES = sorted(m.name for m in pkgutil.walk_packages(jaxbp.__path__, "jaxbp."))

# Modules whose docstrings hold no examples: their code is exercised by the tests.
WITHOUT_EXAMPLES = frozenset({
    "jaxbp.bench_torch", "jaxbp.cli", "jaxbp.gradcheck_cli", "jaxbp.gradcheck_report",
    "jaxbp.layers", "jaxbp.layers.activations", "jaxbp.layers.base", "jaxbp.losses",
    "jaxbp.train_cli",
})


def examples_in(module) -> int:
    """How many ``>>>`` examples ``doctest.testmod(module)`` would run."""
    return sum(len(test.examples) for test in doctest.DocTestFinder().find(module))


def test_the_list_of_modules_without_examples_is_current():
    """A module listed here that gains examples, or a new module without any, fails."""
    empty = {name for name in MODULES if examples_in(importlib.import_module(name)) == 0}
    assert empty == WITHOUT_EXAMPLES


@pytest.mark.parametrize("name", sorted(set(MODULES) - WITHOUT_EXAMPLES))
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
    assert result.attempted == examples_in(module) > 0
