"""The report that ``jaxbp.gradcheck`` and ``jaxbp.check_layer`` return.

One :class:`Row` per compared array: a parameter leaf (``layers[2].W``) or a
backpropagated signal (``layers[2].dx`` = ∂J/∂(input of layers[2]),
``loss.dy_hat`` = ∂L/∂ŷ). A :class:`GradReport` prints as an aligned text table,
renders as an HTML table in Jupyter and converts to a dict or JSON and back.

The text fits lines of 100 characters: notes wrap at spaces, and a nested row is
named inside its block (``  layers[0].W`` below a line ``layers[1].body.``). The
HTML uses inline styles only, so an exported notebook shows it as it was, and
puts the reason for a row's status on a line below the row.
"""

from __future__ import annotations

import dataclasses
import html
import json
import textwrap

# Row statuses that do not fail the report.
PASSING = ("ok", "kink", "fd-noisy")


class GradcheckError(AssertionError):
    """Raised by :meth:`GradReport.raise_if_failed`; the message is the report table."""


@dataclasses.dataclass(frozen=True)
class Row:
    """One compared array.

    ``max_abs_err`` is ``max|manual − autodiff|``, ``rel_err`` that divided by
    ``max|autodiff|``. ``fd_coords`` counts the coordinates compared with finite
    differences (0: none; one whose step rounds away in its dtype is left out) and
    ``fd_rel_err`` is ``max|manual − fd|`` over them, divided by the same scale.
    ``status`` is "ok", "kink" (finite differences disagree only where the loss
    has a kink), "fd-noisy" (float32 finite differences disagree; not a failure)
    or "FAIL"; ``detail`` says why.
    """

    path: str
    shape: tuple[int, ...]
    manual_norm: float
    autodiff_norm: float
    max_abs_err: float
    rel_err: float
    cosine: float
    fd_coords: int
    fd_rel_err: float | None
    status: str
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.status in PASSING


# (header, cell, right-aligned): shared by the text and the HTML table; _LEGEND explains them.
_COLUMNS = (
    ("name", lambda r: r.path, False),
    ("shape", lambda r: str(r.shape), False),
    ("|manual|", lambda r: f"{r.manual_norm:.2e}", True),
    ("|auto|", lambda r: f"{r.autodiff_norm:.2e}", True),
    ("abs err", lambda r: f"{r.max_abs_err:.1e}", True),
    ("rel err", lambda r: f"{r.rel_err:.1e}", True),
    ("cosine", lambda r: f"{r.cosine:.4f}", True),
    ("FD n", lambda r: str(r.fd_coords) if r.fd_coords else "-", True),
    ("FD err", lambda r: "-" if r.fd_rel_err is None else f"{r.fd_rel_err:.1e}", True),
    ("status", lambda r: r.status, False),
)
_LEGEND = (  # one line each in the text report
    "|manual|, |auto|: L2 norms of the manual and autodiff gradients; cosine: between them",
    "abs err: max|manual - autodiff|; rel err: abs err / max|autodiff|",
    "FD n: coordinates compared with central finite differences (FD)",
    "FD err: max|manual - FD| / max|autodiff| over those coordinates",
)
_SIGNALS = "backpropagated signals dJ/d(input of each layer), from the output down"
_WIDTH = 100  # the text report's longest line: a terminal or a notebook's output
_LABEL = 11  # the width of the text report's labels ("gradcheck  ", "note       ")
_RED = "#b00020"


def _wrap(text: str, first: str, indent: int) -> list[str]:
    """``first`` then ``text``, wrapped at spaces to ``_WIDTH``; later lines ``indent`` deep."""
    return textwrap.wrap(text, _WIDTH, initial_indent=first, subsequent_indent=" " * indent,
                         break_on_hyphens=False)


def _block(path: str) -> tuple[str, str]:
    """``("layers[1].body.", "layers[0].W")``: a nested row's block and its path inside it.

    A top-level row (``layers[2].W``, ``loss.dy_hat``, ``layers[1].body.dx``)
    has the block ``""``.
    """
    at = path.rfind(".layers[")
    return (path[: at + 1], path[at + 1 :]) if at >= 0 else ("", path)


@dataclasses.dataclass(frozen=True)
class GradReport:
    """Manual gradients compared with autodiff and finite differences.

    Attributes:
      title: what was checked (the network or layer).
      dtype: the precision the check ran in ("float64" or "float32").
      precision: one line on how that precision was obtained.
      loss: the objective J at the checked point.
      params: one row per parameter leaf (for ``check_layer`` also ``dx``).
      signals: one row per backpropagated signal, from the output down.
      first_divergence: the first place, counting from the output, where the
        manual backward disagrees with autodiff ("loss", "layers[2] (Dense)"), or
        None.
      notes: tolerances, the finite-difference scheme, warnings.
    """

    title: str
    dtype: str
    precision: str
    loss: float
    params: tuple[Row, ...]
    signals: tuple[Row, ...]
    first_divergence: str | None
    notes: tuple[str, ...] = ()

    @property
    def rows(self) -> tuple[Row, ...]:
        return self.params + self.signals

    @property
    def ok(self) -> bool:
        """True when every row passed."""
        return all(r.passed for r in self.rows)

    @property
    def failures(self) -> tuple[Row, ...]:
        return tuple(r for r in self.rows if not r.passed)

    def row(self, path: str) -> Row:
        """The row named ``path`` (``"layers[0].W"``, ``"layers[1].dx"``, ``"loss.dy_hat"``)."""
        for r in self.rows:
            if r.path == path:
                return r
        raise KeyError(f"GradReport: no row named {path!r}; rows: {[r.path for r in self.rows]}")

    def raise_if_failed(self) -> GradReport:
        """Raise :class:`GradcheckError` with the table unless ``ok``; else return self."""
        if not self.ok:
            raise GradcheckError(f"gradient check failed\n{self}")
        return self

    # ------------------------------------------------------------------ text
    def verdict(self) -> str:
        return "; ".join(self._verdict())

    def _verdict(self) -> list[str]:
        """The verdict's statement, then for a failure the failing rows."""
        if self.ok:
            kinks = sum(r.status == "kink" for r in self.rows)
            tail = f" ({kinks} row(s) at a kink)" if kinks else ""
            return [
                f"OK: the manual backward matches autodiff on {len(self.params)} parameter "
                f"row(s) and {len(self.signals)} signal(s){tail}"
            ]
        where = self.first_divergence or "finite differences only"
        bad = ", ".join(r.path for r in self.failures)
        return [f"FAIL: first divergence from the output: {where}", f"failing rows: {bad}"]

    def __str__(self) -> str:
        header = [name for name, _, _ in _COLUMNS]

        def named(r):  # a nested row by its path inside its block, below a line naming the block
            block, inner = _block(r.path)
            cells = [cell(r) for _, cell, _ in _COLUMNS[1:]]
            return block, [f"  {inner}" if block else inner, *cells]

        params, signals = ([named(r) for r in rows] for rows in (self.params, self.signals))
        every = [header, *(cells for _, cells in params + signals)]
        widths = [max(len(c[j]) for c in every) for j in range(len(header))]

        def line(cells):
            padded = [text.rjust(w) if right else text.ljust(w)
                      for text, w, (_, _, right) in zip(cells, widths, _COLUMNS, strict=True)]
            return "  ".join(padded).rstrip()

        def table(section):
            out, current = [], ""
            for block, cells in section:
                if block and block != current:
                    out.append(block)
                current = block
                out.append(line(cells))
            return out

        out = [*_wrap(self.title, "gradcheck".ljust(_LABEL), _LABEL),
               *_wrap(self.precision, "precision".ljust(_LABEL), _LABEL),
               f"J = {self.loss:.12g}"]
        for note in self.notes:
            out += _wrap(note, "note".ljust(_LABEL), _LABEL)
        out += ["", line(header), "-" * len(line(header)), *table(params)]
        if signals:
            out += [f"{_SIGNALS}:", *table(signals)]
        for r in self.rows:
            if r.detail and r.status != "ok":
                out += _wrap(r.detail, f"{r.path}: ", 4)
        out += _wrap(_LEGEND[0], "columns".ljust(_LABEL), _LABEL)
        for item in _LEGEND[1:]:
            out += _wrap(item, " " * _LABEL, _LABEL)
        # The statement stays on one line (it names one layer), the failing rows wrap.
        statement, *rest = self._verdict()
        out += ["", statement]
        for part in rest:
            out += _wrap(part, "", 2)
        return "\n".join(out)

    def _repr_html_(self) -> str:
        """Inline styles only (an exported notebook needs no stylesheet); a row's
        detail shows in a line below it."""
        esc = html.escape
        span = len(_COLUMNS)

        def cell(text, right, tag="td"):
            align = "right" if right else "left"
            style = f"padding:1px 0.5em;white-space:nowrap;font-family:monospace;text-align:{align}"
            return f'<{tag} style="{style}">{esc(text)}</{tag}>'

        def rows(rs):
            out = []
            for r in rs:
                style = "" if r.passed else f' style="color:{_RED};font-weight:bold"'
                tds = "".join(cell(fmt(r), right) for _, fmt, right in _COLUMNS)
                out.append(f"<tr{style}>{tds}</tr>")
                if r.detail and r.status != "ok":
                    style = ("text-align:left;white-space:normal;padding:0 0.5em 4px 2em;"
                             f"color:{'#555' if r.passed else _RED}")
                    out.append(f'<tr><td colspan="{span}" style="{style}">'
                               f"&#8627; {esc(r.detail)}</td></tr>")
            return out

        head = "".join(cell(name, right, "th") for name, _, right in _COLUMNS)
        body = rows(self.params)
        if self.signals:
            body.append(f'<tr><th colspan="{span}" style="text-align:left;padding:6px 0.5em 1px">'
                        f"{_SIGNALS}</th></tr>")
            body += rows(self.signals)
        notes = "".join(f"<li>{esc(n)}</li>" for n in (self.precision, *self.notes))
        legend = "; ".join(esc(item) for item in _LEGEND)
        verdict = "" if self.ok else f' style="color:{_RED}"'
        return (
            f"<div><b>gradcheck</b> {esc(self.title)} &mdash; J = {self.loss:.12g}"
            f'<ul style="margin:4px 0">{notes}</ul>'
            f'<table style="border-collapse:collapse;margin:4px 0">'
            f'<tr style="border-bottom:1px solid #999">{head}</tr>{"".join(body)}</table>'
            f'<p style="margin:2px 0;font-size:90%">{legend}</p>'
            f"<p{verdict}><b>{esc(self.verdict())}</b></p></div>"
        )

    # ------------------------------------------------------------------ dict
    def to_dict(self) -> dict:
        """Plain Python types only (lists, str, float, int, None, bool)."""
        d = dataclasses.asdict(self)
        for r in d["params"] + d["signals"]:
            r["shape"] = list(r["shape"])
        d["params"], d["signals"], d["notes"] = (
            list(d["params"]),
            list(d["signals"]),
            list(d["notes"]),
        )
        d["ok"] = self.ok
        return d

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_dict(cls, d: dict) -> GradReport:
        """Inverse of :meth:`to_dict` (``ok`` is recomputed, not read)."""

        def row(r):
            return Row(**{**r, "shape": tuple(r["shape"])})

        fields = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in fields}
        return cls(
            **{
                **d,
                "params": tuple(row(r) for r in d["params"]),
                "signals": tuple(row(r) for r in d["signals"]),
                "notes": tuple(d["notes"]),
            }
        )
