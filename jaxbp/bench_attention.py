"""``jaxbp bench --attention-sweep``: one attention layer's gradient step, its memory and time in T.

For each sequence length T, one causal ``MultiHeadAttention`` layer of ``heads``
heads of ``head_dim`` features (C = heads · head_dim) maps N(0, 1) inputs
(batch, T, C) to outputs whose ``MeanSquaredError`` against N(0, 1) targets is
the loss, and three jitted programs compute ``(J, ∂J/∂params)``:

* ``standard``  ``manual_value_and_grad`` with ``backward="standard"``: the forward
                stores the probabilities P (batch, heads, T, T), the backward reads them;
* ``lean``      ``manual_value_and_grad`` with ``backward="lean"``: an online-softmax
                forward and a backward that recomputes P ``block_size`` keys at a time,
                storing each row's log-sum-exp instead (no (T, T) matrix);
* ``autodiff``  ``jax.value_and_grad(net.loss)`` of the standard forward.

The three share their params and data. Per T the sweep reports XLA's temporary
memory of each compiled program (``bench.temp_bytes``: inputs, outputs and params
excluded), the size of one (batch, heads, T, T) matrix for scale, the median
time per step over interleaved rounds (as ``jaxbp bench`` times its rows), and
lean's memory and time as fractions of autodiff's, the time's the median of
per-round ratios. ``grad_rel_error`` is the largest per-leaf relative error of
the standard and lean gradients against autodiff's, from the timed programs' own
outputs.

What to expect: standard and autodiff hold (T, T) matrices per head, so their
memory grows as T²; lean holds (T, block_size) blocks, so its memory grows as T.
Lean runs every block of keys for every query (the causally masked ones too, as
standard does) and recomputes the scores in its backward: 7 products of the
(T, T) kind against standard's 6, paid for by less memory traffic. At the
default sizes (batch 4, 4 heads, float32) one (T, T) matrix per head is 256 MiB
at T = 2048, and standard and autodiff each hold several.

``sweep()`` returns a dict (``rows``: one per T, the figures per variant in
nested dicts) that a notebook can plot; ``format_table`` prints it.

Example:
  >>> result = sweep(lengths=(8, 16), batch=1, heads=2, head_dim=4, block_size=4, rounds=2,
  ...                round_seconds=0.0)
  >>> [row["T"] for row in result["rows"]], sorted(result["rows"][0]["temp_bytes"])
  ([8, 16], ['autodiff', 'lean', 'standard'])
  >>> max(result["rows"][1]["grad_rel_error"].values()) < 1e-5
  True
"""

from __future__ import annotations

import statistics
import textwrap

import jax
import jax.numpy as jnp

from . import bench, losses
from .layers import MultiHeadAttention, Sequential
from .layers.base import check_int, check_real

VARIANTS = ("standard", "lean", "autodiff")
LENGTHS = (128, 256, 512, 1024, 2048)


def _programs(heads, block_size):
    """``(standard net, {variant: (J, grads) function of (params, x, y)})``."""
    loss = losses.MeanSquaredError()
    standard = Sequential([MultiHeadAttention(heads, backward="standard")], loss=loss)
    lean = Sequential([MultiHeadAttention(heads, backward="lean", block_size=block_size)],
                      loss=loss)
    return standard, {"standard": standard.manual_value_and_grad,
                      "lean": lean.manual_value_and_grad,
                      "autodiff": jax.value_and_grad(standard.loss)}


def _rel_error(got, want) -> float:
    """The largest per-leaf ``max |got − want| / max |want|``."""
    return max(float(jnp.max(jnp.abs(g - w)) / jnp.max(jnp.abs(w)))
               for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True))


def _length(T, batch, heads, head_dim, block_size, dtype, rounds, round_seconds) -> dict:
    """The figures of one row of the sweep (see ``sweep``)."""
    k_init, k_x, k_y = jax.random.split(jax.random.key(0), 3)
    C = heads * head_dim
    net, programs = _programs(heads, block_size)
    params = net.init(k_init, (T, C), dtype)
    x = jax.random.normal(k_x, (batch, T, C), dtype)
    y = jax.random.normal(k_y, (batch, T, C), dtype)
    compiled, compile_s, temp, timers = {}, {}, {}, {}
    for variant, fn in programs.items():
        compiled[variant], compile_s[variant] = bench._compile(fn, params, x, y)
        temp[variant] = bench.temp_bytes(compiled[variant])
        timers[variant] = lambda c=compiled[variant]: c(params, x, y)
    grads = {variant: c(params, x, y)[1] for variant, c in compiled.items()}
    times = bench.interleaved_times(timers, rounds, round_seconds)
    medians = {v: bench._summary(ts) for v, ts in times.items()}
    ratios = bench._ratios(times["lean"], times["autodiff"])
    memory_ratio = (temp["lean"] / temp["autodiff"]
                    if temp["lean"] is not None and temp["autodiff"] else None)
    return {"T": T, "scores_bytes": batch * heads * T * T * jnp.dtype(dtype).itemsize,
            "temp_bytes": temp, "compile_s": compile_s,
            "time_s": {v: m for v, (m, _) in medians.items()},
            "spread": {v: s for v, (_, s) in medians.items()},
            "memory_ratio": memory_ratio, "time_ratio": statistics.median(ratios),
            "time_ratio_iqr": bench._quartiles(ratios),
            "grad_rel_error": {v: _rel_error(grads[v], grads["autodiff"])
                               for v in ("standard", "lean")}}


def sweep(lengths=LENGTHS, *, batch=4, heads=4, head_dim=16, block_size=128, dtype="float32",
          rounds=11, round_seconds=0.02) -> dict:
    """Memory and time of one attention layer's gradient step at each length T of ``lengths``.

    Args:
      lengths: the sequence lengths T, each a positive int.
      batch, heads, head_dim: the input (batch, T, heads · head_dim) and the layer's heads.
      block_size: keys per block of the lean forward and backward.
      dtype: one of ``bench.DTYPES`` (64-bit ones need ``jax_enable_x64``).
      rounds, round_seconds: interleaved timing rounds, as in ``bench.bench_model``.

    Returns:
      ``{"device", "backend", "dtype", "jax", "batch", "heads", "head_dim",
      "block_size", "variants", "rows"}``, a row per T: ``T``, ``scores_bytes``
      (one (batch, heads, T, T) matrix), per variant ``temp_bytes``, ``compile_s``,
      ``time_s`` (the median) and ``spread`` (half the IQR over the median), then
      ``memory_ratio`` and ``time_ratio`` (lean / autodiff), ``time_ratio_iqr``
      and ``grad_rel_error`` (standard and lean against autodiff). Bad arguments
      raise ``ValueError`` before anything is compiled.
    """
    lengths = bench._check_lengths(lengths)
    for arg, value in (("batch", batch), ("heads", heads), ("head_dim", head_dim),
                       ("block_size", block_size), ("rounds", rounds)):
        check_int("bench", arg, value)
    check_real("bench", "round_seconds", round_seconds, 0)
    dtype = bench._check_dtype(dtype)
    device = jax.devices()[0]
    rows = [_length(T, batch, heads, head_dim, block_size, dtype, rounds, round_seconds)
            for T in lengths]
    return {"device": f"{device.platform}: {device.device_kind}",
            "backend": jax.default_backend(), "dtype": dtype.name, "jax": jax.__version__,
            "batch": batch, "heads": heads, "head_dim": head_dim, "block_size": block_size,
            "variants": list(VARIANTS), "rows": rows}


def format_table(result: dict) -> str:
    """The aligned table ``jaxbp bench --attention-sweep`` prints, with a legend."""
    mib, ms = (lambda b: "" if b is None else f"{b / 2**20:.2f}"), (lambda s: f"{s * 1e3:.3f}")
    head = ("T", "S MiB", *(f"{v} MiB" for v in VARIANTS), *(f"{v} ms" for v in VARIANTS),
            "lean/auto MiB", "lean/auto ms", "IQR")
    table = [head]
    for row in result["rows"]:
        ratio = row["memory_ratio"]
        table.append((str(row["T"]), mib(row["scores_bytes"]),
                      *(mib(row["temp_bytes"][v]) for v in VARIANTS),
                      *(ms(row["time_s"][v]) for v in VARIANTS),
                      "" if ratio is None else f"{ratio:.3f}", f"{row['time_ratio']:.3f}",
                      "–".join(f"{q:.2f}" for q in row["time_ratio_iqr"])))
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    lines = [f"device {result['device']} · dtype {result['dtype']} · jax {result['jax']} · "
             f"MultiHeadAttention: batch {result['batch']}, {result['heads']} heads × "
             f"{result['head_dim']}, causal, lean block_size {result['block_size']}"]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in table]
    legend = [
        "standard, lean: manual_value_and_grad with backward=\"standard\" (stores P) and "
        "\"lean\" (recomputes P blockwise); autodiff: jax.value_and_grad of the standard forward",
        "S MiB: one (batch, heads, T, T) matrix",
        "MiB: XLA's temporary memory of the compiled step (params, inputs and outputs excluded)",
        "ms: the median over the rounds of the time per step",
        "lean/auto MiB: lean's temporary memory ÷ autodiff's; lean/auto ms: the median over "
        "the rounds of lean's time ÷ autodiff's in the same round; IQR: the quartiles of "
        "those ratios",
    ]
    lines += [line for entry in legend
              for line in textwrap.wrap(entry, 100, subsequent_indent="  ",
                                        break_on_hyphens=False)]
    errors = max(max(row["grad_rel_error"].values()) for row in result["rows"])
    lines.append(f"grad err vs autodiff (standard and lean, every T): at most {errors:.1e}")
    return "\n".join(lines)
