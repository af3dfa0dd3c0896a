"""What a reader sees: the gradcheck report as text and as HTML, and the bench table.

The text report keeps every line within 100 characters (a terminal, a notebook's
output); the HTML shows each row's reason on the page, not in a tooltip, needs no
external resource and keeps numbers on one line; the bench table explains every
column it prints, and ``jaxbp bench --help`` the variants and the caveats.
"""

import html
import re

import jax
import jax.numpy as jnp
import pytest

from jaxbp import bench, check_layer, cli, gradcheck, layers, models
from tests.mutations import MUTATIONS


@pytest.fixture(scope="module")
def failing():
    mutation = MUTATIONS[0]  # missing σ': two parameter rows and two signals fail
    net, params, x, y = mutation.case()
    report = gradcheck(mutation.mutate(net), params, x, y)
    assert not report.ok and len(report.failures) == 4
    return report


@pytest.fixture(scope="module")
def layer():
    return check_layer(layers.Dense(3), (4,))


@pytest.fixture(scope="module")
def nested():
    """A residual MLP: rows such as ``layers[1].body.layers[0].offset`` of shape (128, 128)."""
    net = models.residual_mlp()
    params = net.init(jax.random.key(0), (20,), jnp.float64)
    x = jax.random.normal(jax.random.key(1), (4, 20), jnp.float64)
    y = jax.random.randint(jax.random.key(2), (4,), 0, 10)
    return gradcheck(net, params, x, y)


@pytest.fixture(params=["failing", "layer", "nested"])
def report(request):
    return request.getfixturevalue(request.param)


# ------------------------------------------------------------------------ text
def test_text_lines_fit_100_characters(report):
    lines = str(report).splitlines()
    assert max(map(len, lines)) <= 100, max(lines, key=len)


def test_text_table_columns_stay_aligned(report):
    lines = str(report).splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("name "))
    rule = lines[header + 1]
    assert set(rule) == {"-"} and len(rule) == len(lines[header])
    status = lines[header].index("status")
    rows = [line for line in lines[header + 2 :] if line.endswith((" ok", " FAIL"))]
    assert len(rows) == len(report.rows)
    assert all(line[status - 2 : status] == "  " and line[status] != " " for line in rows)


def test_text_names_a_nested_row_inside_its_block(nested):
    lines = str(nested).splitlines()
    at = lines.index("layers[1].body.")
    assert lines[at + 1].startswith("  layers[0].offset ")
    assert "layers[1].body.layers[0].offset" in {r.path for r in nested.rows}  # the two lines


def test_text_gives_every_failure_reason_and_the_verdict(failing):
    text = str(failing)
    for r in failing.failures:
        assert f"{r.path}: {r.detail}" in " ".join(text.split())
    assert "FAIL: first divergence from the output: layers[1] (SigmoidMissingDerivative)" in text
    assert text.splitlines()[-1].startswith("failing rows: layers[0].W, layers[0].b")


def test_text_legend_explains_the_short_headers(layer):
    lines = str(layer).splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("columns "))
    legend = " ".join(lines[at : lines.index("", at)])
    for header in ("|manual|", "|auto|", "abs err", "rel err", "cosine", "FD n", "FD err"):
        assert f" {header}:" in legend or f" {header}," in legend, header


# ------------------------------------------------------------------------ HTML
def _rows(page: str) -> list[list[tuple[str, str]]]:
    """Each ``<tr>``'s cells as ``(style, text)``."""
    return [re.findall(r'<t[dh](?: colspan="\d+")? style="([^"]*)">(.*?)</t[dh]>', tr)
            for tr in re.findall(r"<tr[^>]*>(.*?)</tr>", page)]


def test_html_shows_each_failure_reason_below_its_row(failing):
    page = failing._repr_html_()
    assert "title=" not in page
    texts = [[html.unescape(text) for _, text in cells] for cells in _rows(page)]
    for r in failing.failures:
        at = next(i for i, cells in enumerate(texts) if cells[0] == r.path)
        assert texts[at + 1] == [f"↳ {r.detail}"], texts[at + 1]
    assert "FAIL: first divergence from the output" in page


def test_html_is_self_contained(report):
    page = report._repr_html_().lower()
    for external in ("http", "<link", "<script", "src=", "url(", "@import", "<style"):
        assert external not in page, external


def test_html_numbers_stay_on_one_line_and_names_align_left(report):
    rows = [cells for cells in _rows(report._repr_html_()) if len(cells) > 1]
    assert len(rows) == 1 + len(report.rows)  # the header and a row per array
    for cells in rows:
        assert all("white-space:nowrap" in style for style, _ in cells), cells
        assert "text-align:left" in cells[0][0]  # name
        assert "text-align:right" in cells[2][0]  # |manual|
    heading = next(cells for cells in _rows(report._repr_html_()) if "signals" in cells[0][1])
    assert "text-align:left" in heading[0][0]


def test_html_rows_are_compact(report):
    # monospace cells: about a character of padding per column
    rows = [cells for cells in _rows(report._repr_html_()) if len(cells) > 1]
    widest = max(sum(len(html.unescape(text)) + 1 for _, text in cells) for cells in rows)
    assert widest <= 120, widest


# ----------------------------------------------------------------------- bench
def _row(variant, ms, flops, ratio, iqr, peak_share):
    t = ms * 1e-3
    return {"variant": variant, "compile_s": 0.5, "flops": flops, "temp_bytes": 2**20,
            "time_s": t, "spread": 0.05, "steps_per_s": 1 / t, "tokens_per_s": None,
            "ratio_to_autodiff": ratio, "ratio_iqr": iqr, "flops_per_s": flops / t,
            "fraction_of_peak": peak_share}


@pytest.fixture(scope="module")
def bench_result():
    """The figures of ``run_bench(["mlp-small"])``, written out: ``fraction_of_peak`` (a
    median of per-round ratios) differs from GFLOP/s ÷ the matmul's GFLOP/s on purpose."""
    rows = [_row("manual", 0.2, 3.3e5, 0.98, [0.9, 1.1], 0.76),
            _row("autodiff", 0.22, 3.3e5, 1.0, [1.0, 1.0], 0.38),
            _row("matmul 64²", 0.136, 5.24e5, 0.62, [0.5, 1.2], 1.0)]
    model = {"model": "mlp-small", "batch": 8, "input_shape": [64], "layers": 3,
             "optimizer": "sgd", "tokens_per_step": None, "flops_count": "xla",
             "compile_s_by_length": {}, "peak_flops_per_s": rows[2]["flops_per_s"],
             "pytorch": "disabled", "grad_reference": "float32",
             "grad_rel_error": {"manual": 1e-7}, "rows": rows}
    return {"device": "cpu: cpu", "backend": "cpu", "dtype": "float32", "jax": jax.__version__,
            "models": [model]}


_HEADER = re.compile(r"\S+(?: \S+)?")  # a header: "compile s" and "temp MiB" hold one space


def _cells(table: list[str]) -> dict[str, dict[str, str]]:
    """``{variant: {header: cell}}`` of the model's rows: every column after the variant is
    right-aligned under its header, so a cell ends where its header ends."""
    spans = [(m.group(), m.end()) for m in _HEADER.finditer(table[1])]
    out = {}
    for line in table[2:]:
        if line.startswith("mlp-small  "):
            variant = line.removeprefix("mlp-small").strip().split("  ")[0]
            start = spans[1][1] - len("variant") + len(variant)
            cells = {}
            for name, end in spans[2:]:
                cells[name], start = line[start:end].strip(), end
            out[variant] = cells
    return out


def test_bench_legend_explains_every_column(bench_result):
    table = bench.format_table(bench_result).splitlines()
    headers = _HEADER.findall(table[1])
    assert len(headers) == 13
    last_row = max(i for i, line in enumerate(table) if line.startswith("mlp-small  "))
    legend = "\n".join(table[last_row + 1 :])
    for header in headers:
        assert re.search(rf"(^|; |, ){re.escape(header)}(: |, )", legend, re.M), header


def test_bench_matmul_row_has_no_ratio_and_peak_follows_the_table(bench_result):
    rows = _cells(bench.format_table(bench_result).splitlines())
    assert set(rows) == {"manual", "autodiff", "matmul 64²"}
    assert rows["matmul 64²"]["×autodiff"] == rows["matmul 64²"]["IQR"] == ""
    assert rows["manual"]["×autodiff"] == "0.980" and rows["manual"]["IQR"] == "0.90–1.10"
    assert rows["matmul 64²"]["%peak"] == "100%"
    (model,) = bench_result["models"]
    for row in model["rows"]:
        cells = rows[row["variant"]]
        # GFLOP/s ÷ the matmul's GFLOP/s, not the per-round median fraction_of_peak
        assert cells["%peak"] == format(row["flops_per_s"] / model["peak_flops_per_s"], ".0%")
        rate = float(cells["GFLOP"]) * 1e3 / float(cells["ms/step"])
        assert rate == pytest.approx(float(cells["GFLOP/s"]), rel=0.05)  # (rounded figures)
    assert rows["manual"]["%peak"] == "43%"  # 1.65 / 3.85 GFLOP/s (fraction_of_peak: 76%)


def test_bench_help_explains_the_variants_and_the_caveats(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "\n  matmul n²   an n×n by n×n matmul" in out  # the epilog keeps its layout
    text = " ".join(out.split())
    for caveat in ("a reference, not a bound", "differ by several percent between repeat runs",
                   "its bias sums accumulate in bfloat16", "MALLOC_MMAP_THRESHOLD_"):
        assert caveat in text, caveat
