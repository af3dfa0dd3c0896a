"""The report that ``jaxbp.gradcheck`` and ``jaxbp.check_layer`` return.

One :class:`Row` per compared array: a parameter leaf (``layers[2].W``) or a
backpropagated signal (``layers[2].dx`` = ∂J/∂(input of layers[2]),
``loss.dy_hat`` = ∂L/∂ŷ). A :class:`GradReport` prints as an aligned text table,
renders as an HTML table in Jupyter and converts to a dict or JSON and back.
"""

from __future__ import annotations

import dataclasses
import html
import json

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


_COLUMNS = (
    ("name", lambda r: r.path),
    ("shape", lambda r: str(r.shape)),
    ("|manual|", lambda r: f"{r.manual_norm:.3e}"),
    ("|autodiff|", lambda r: f"{r.autodiff_norm:.3e}"),
    ("max abs err", lambda r: f"{r.max_abs_err:.2e}"),
    ("rel err", lambda r: f"{r.rel_err:.2e}"),
    ("cosine", lambda r: f"{r.cosine:.6f}"),
    ("FD coords", lambda r: str(r.fd_coords) if r.fd_coords else "-"),
    ("FD rel err", lambda r: "-" if r.fd_rel_err is None else f"{r.fd_rel_err:.2e}"),
    ("status", lambda r: r.status),
)


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
        if self.ok:
            kinks = sum(r.status == "kink" for r in self.rows)
            tail = f" ({kinks} row(s) at a kink)" if kinks else ""
            return (
                f"OK: the manual backward matches autodiff on {len(self.params)} parameter "
                f"row(s) and {len(self.signals)} signal(s){tail}"
            )
        where = self.first_divergence or "finite differences only"
        bad = ", ".join(r.path for r in self.failures)
        return f"FAIL: first divergence from the output: {where}; failing rows: {bad}"

    def _table(self, rows) -> list[list[str]]:
        return [[fmt(r) for _, fmt in _COLUMNS] for r in rows]

    def __str__(self) -> str:
        header = [name for name, _ in _COLUMNS]
        body = self._table(self.rows)
        widths = [max(len(line[j]) for line in [header, *body]) for j in range(len(header))]

        def line(cells):
            return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

        out = [f"gradcheck  {self.title}", f"precision  {self.precision}", f"J = {self.loss:.12g}"]
        out += [f"note       {n}" for n in self.notes]
        out += ["", line(header), "-" * len(line(header))]
        out += [line(c) for c in body[: len(self.params)]]
        if self.signals:
            out += ["backpropagated signals dJ/d(input of each layer), from the output down:"]
            out += [line(c) for c in body[len(self.params) :]]
        for r in self.rows:
            if r.detail and r.status != "ok":
                out.append(f"{r.path}: {r.detail}")
        out += ["", self.verdict()]
        return "\n".join(out)

    def _repr_html_(self) -> str:
        esc = html.escape
        head = "".join(f"<th>{esc(name)}</th>" for name, _ in _COLUMNS)

        def tr(r, cells):
            style = "" if r.passed else ' style="color:#b00020;font-weight:bold"'
            tds = "".join(f"<td>{esc(c)}</td>" for c in cells)
            return f'<tr{style} title="{esc(r.detail)}">{tds}</tr>'

        cells = self._table(self.rows)
        body = [tr(r, c) for r, c in zip(self.params, cells[: len(self.params)], strict=True)]
        if self.signals:
            body.append(
                f'<tr><th colspan="{len(_COLUMNS)}">backpropagated signals, '
                "from the output down</th></tr>"
            )
            body += [tr(r, c) for r, c in zip(self.signals, cells[len(self.params) :], strict=True)]
        notes = "".join(f"<li>{esc(n)}</li>" for n in (self.precision, *self.notes))
        return (
            f"<div><b>gradcheck</b> {esc(self.title)} &mdash; J = {self.loss:.12g}"
            f"<ul>{notes}</ul><table><tr>{head}</tr>{''.join(body)}</table>"
            f"<p><b>{esc(self.verdict())}</b></p></div>"
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
