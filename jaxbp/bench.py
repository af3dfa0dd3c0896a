"""``jaxbp bench``: the hand-written backward against autodiff and the hardware's matmul peak.

For each model, on whatever device JAX selects, in one run:

* ``manual``   jitted ``net.manual_value_and_grad`` (the hand-written backward);
* ``autodiff`` jitted ``jax.value_and_grad(net.loss)``;
* ``remat k``  ``manual_value_and_grad(..., remat_every=k)`` (stores every k-th layer input;
               not for ``char-lstm``: of its three layers only the LSTM stores much, its
               per-step residuals, and remat splits between layers, not within one;
               nor for ``gpt``);
* ``train``    a full optax step (manual gradients; plain SGD unless ``optimizer`` says
               ``"momentum"`` or ``"adam"``), called in a Python loop;
* ``scan``     ``fit``'s fused epoch: the same step in a ``lax.scan`` that also
               shuffles and gathers the batches and checks finiteness (time per step);
* ``matmuls``  for dense nets, the matmuls of ``manual`` alone (same shapes and
               operand layouts, no bias, activation, loss or reduction between them):
               how fast the step's products run by themselves (a reference, not a
               bound: XLA schedules a bare chain of dots differently);
* ``matmul``   an ``n × n`` by ``n × n`` matmul of the same dtype: the device's peak;
* ``pytorch``  the same architecture's eager training step, if torch is installed.

``char-lstm`` is the model ``jaxbp train --model char-lstm`` trains on Shakespeare,
with its defaults (``models.char_rnn``: Embedding(80, 64) → LSTM(256) → Dense(80),
the corpus's 80 characters), on random ids: input (batch, T) = (32, 64) ids in
[0, 80), one label per position, the loss averaged over all of them. It has no
``matmuls`` and no ``remat`` row, and every row also gives ``tok/s``, the tokens
(batch × T positions) its step processes per second. Its LSTM runs a ``lax.scan`` over
time, so the program should not grow with T: ``compile_times`` (and the bench,
``lengths``, ``--lengths``) compiles its manual step at other lengths T.

``gpt`` is nanoGPT's Shakespeare configuration for a CPU (n_layer 4, n_head 4,
n_embd 128, block_size 64): ``models.gpt(80, context=64, d_model=128,
num_heads=4, num_layers=4)``, token and learned position embeddings, four pre-LN
blocks of causal 4-head attention (the ``standard`` backward, which stores the
probabilities) and a GELU MLP, a final LayerNorm and a linear head, 0.82 M
params, on the same random ids as ``char-lstm`` (batch, T) = (32, 64) and with
the same rows and ``tok/s``. Its PyTorch reference is the same network in
``torch.nn``, nanoGPT's attention with ``F.scaled_dot_product_attention``.
``bench_attention`` (``--attention-sweep``) measures one attention layer's
memory and time against T, the lean backward's included.

Timing: every variant is warmed up, then the variants take turns in ``rounds``
interleaved rounds (each round runs a variant for about ``round_seconds``, at
least one call, and blocks on its result), so a busy machine slows every variant
alike. Many short rounds pair the variants closely in time, so the per-round
ratios cancel a machine's drift better than a few long rounds do.

A row reports the median time per step over the rounds and the spread (half
the inter-quartile range, relative to the median). ``×autodiff`` is the median
of per-round ratios, each between two variants timed in the same round (so not
the ratio of the medians); ``IQR`` gives the quartiles of those ratios: when they
straddle 1.00, the two variants are equally fast within the machine's noise.
The JSON's ``fraction_of_peak`` is likewise a median of per-round ratios (of
the row's rate to the matmul's).
FLOPs come from XLA's cost analysis of the compiled program; ``GFLOP/s = FLOPs /
median time``, and the table's ``%peak`` divides it by the matmul row's
``GFLOP/s``, so that it follows from the figures printed. XLA counts a loop's
body once, however often it runs, so for a model whose program loops (a
``lax.scan``: ``char-lstm``, and the CNNs, whose kernel gradients sum the batch in
chunks) the FLOPs are instead the matmuls and convolutions of the program's jaxpr,
``2·M·N·K`` per product and ``2·kh·kw·C_in`` per convolution output, each scan
body's times its length (``_matmul_flops``; the element-wise work, a few percent,
is left out). ``gpt``'s program has no
loop: XLA's count, which includes attention's batched products, is the analytic
``6·N·tokens + 12·L·T²·C·batch`` (N = 12·L·C² + C·V weights that multiply, the
embeddings being lookups; the attention scores over all T² pairs, the masked
half included, as nanoGPT's ``estimate_mfu`` counts them) plus 2.4% of
element-wise work; the tests pin both. ``temp`` is the
temporary memory of XLA's compiled memory analysis (parameters, inputs and
outputs excluded); ``compile`` is trace + lower + compile of that program. The
``train`` step donates its parameters and optimizer state (updated in place).
On CPUs XLA allocates that temporary memory afresh in every call, and glibc
serves large blocks with new pages, which fault on first touch: ``char-lstm``'s
manual step takes ~10⁴ page faults a call, 15–25% of its time, which the
fused epoch (``scan``: one allocation per epoch) does not pay. Starting Python
with ``MALLOC_MMAP_THRESHOLD_=2000000000 MALLOC_TRIM_THRESHOLD_=20000000000``
(glibc keeps freed memory) removes them.

Matmul precision: timings use JAX's default precision, the same for every row
(on GPUs float32 matmuls may then run as TF32; on CPUs they are exact float32).
The gradient check (``grad err``: the largest per-leaf relative error of each
manual variant against autodiff) runs under ``jax.default_matmul_precision("highest")``
so that it compares the math, not the matmul units. For bfloat16 the reference
is autodiff in float32, and autodiff's bfloat16 gradient gets its own error.

Every variant runs in train mode: ``mlp-bn`` (BatchNorm and Dropout) and ``resmlp``
(pre-LayerNorm residual blocks) use batch statistics and draw dropout masks, the
manual and autodiff rows from the same state and key.

A network of your own (your own layers included) is benched by registering it:
``bench.MODELS["mine"] = bench.ModelSpec(build, input_shape, batch)`` with ``build()``
returning the model, then ``bench_model("mine", torch_reference=False)``.

``run_bench(["mlp-large"])`` returns the figures that ``jaxbp bench --models
mlp-large`` prints (``format_table``) and writes (``--json PATH``).

Example:
  >>> from jaxbp import bench
  >>> sorted(bench.MODELS)
  ['char-lstm', 'cnn', 'cnn-wide', 'deep-mlp', 'gpt', 'mlp-bn', 'mlp-large', 'mlp-small', 'resmlp']
  >>> times = bench.interleaved_times({"noop": lambda: None}, rounds=3, round_seconds=0.0)
  >>> len(times["noop"])
  3
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import statistics
import textwrap
import time
from collections.abc import Callable

import jax
import jax.extend.core
import jax.numpy as jnp

from . import models, train
from .cli import NON_NEGATIVE_INT, POSITIVE_INT, number
from .layers import Dense
from .layers.base import check_int, check_real, dtype_name
from .paths import output_file_problem


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A bench model: how to build it and the random data it is timed on.

    ``vocab``: ``None`` for float inputs ``(batch, *input_shape)`` with one label
    per sample; for a sequence model the vocabulary size, its inputs then being
    integer ids ``(batch, T)`` in [0, vocab) with ``input_shape = (T,)`` and one
    label in [0, classes) per position. ``remat``: whether a ``remat k`` row applies.
    ``scans_time``: whether the model runs a ``lax.scan`` over time (a recurrent
    layer), so that ``compile_times`` applies.
    """

    build: Callable  # () -> Sequential
    input_shape: tuple[int, ...]
    batch: int
    classes: int = 10
    vocab: int | None = None
    remat: bool = True
    scans_time: bool = False


MODELS = {
    "mlp-small": ModelSpec(lambda: models.mlp(hidden=(128,)), (64,), 64),
    "mlp-large": ModelSpec(lambda: models.mlp(hidden=(1024, 1024)), (784,), 256),
    "cnn": ModelSpec(lambda: models.cnn((28, 28, 1), 10), (28, 28, 1), 128),
    # A small CIFAR-style network: two stages of two 3×3 convolutions (32, then 64 channels).
    "cnn-wide": ModelSpec(lambda: models.cifar_cnn((32, 32, 3), 10), (32, 32, 3), 64),
    "deep-mlp": ModelSpec(lambda: models.mlp(hidden=(512,) * 16), (784,), 256),
    "mlp-bn": ModelSpec(lambda: models.mlp(hidden=(1024, 1024), norm="batch", dropout=0.1),
                        (784,), 256),
    "resmlp": ModelSpec(lambda: models.residual_mlp(width=512, blocks=4), (784,), 256),
    # jaxbp train --model char-lstm's defaults; the Shakespeare corpus has 80 characters.
    "char-lstm": ModelSpec(lambda: models.char_rnn(80, "lstm", hidden=256, embed=64), (64,), 32,
                           classes=80, vocab=80, remat=False, scans_time=True),
    # nanoGPT's Shakespeare-on-a-CPU configuration (n_layer 4, n_head 4, n_embd 128, block 64).
    "gpt": ModelSpec(lambda: models.gpt(80, context=64, d_model=128, num_heads=4, num_layers=4),
                     (64,), 32, classes=80, vocab=80, remat=False),
}
LEARNING_RATE, MOMENTUM = 0.01, 0.9
DTYPES = ("float32", "float64", "bfloat16", "float16")


# ------------------------------------------------------------------ XLA numbers


def _compile(fn, *args, donate_argnums=()):
    """``(compiled, seconds)``: trace, lower and compile ``jax.jit(fn)`` for ``args``."""
    start = time.perf_counter()
    compiled = jax.jit(fn, donate_argnums=donate_argnums).lower(*args).compile()
    return compiled, time.perf_counter() - start


def _flops(compiled) -> float | None:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older JAX: one dict per program
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def _matmul_flops(jaxpr) -> int:
    """``2·M·N·K`` summed over the products (``dot_general``) of ``jaxpr`` and its sub-jaxprs,
    and for each convolution 2 × its output's size × one window's multiply-adds
    (``kh·kw·C_in``, the kernel's size over its output features; padded and dilated zeros
    counted).

    A ``scan``'s body counts ``length`` times, the costliest branch of a ``cond``
    once, a ``while`` body once (its trip count is not known before it runs).
    """
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            k = math.prod(eqn.invars[0].aval.shape[d] for d in contract)
            total += 2 * k * math.prod(eqn.outvars[0].aval.shape)
        if eqn.primitive.name == "conv_general_dilated":
            kernel = eqn.invars[1].aval.shape
            window = math.prod(kernel) // kernel[eqn.params["dimension_numbers"].rhs_spec[0]]
            total += 2 * window * math.prod(eqn.outvars[0].aval.shape)
        inner = [_matmul_flops(j) for j in jax.extend.core.jaxprs_in_params(eqn.params)]
        if inner:
            times = eqn.params["length"] if eqn.primitive.name == "scan" else 1
            total += times * (max(inner) if eqn.primitive.name == "cond" else sum(inner))
    return total


def _loops(jaxpr) -> bool:
    """Whether ``jaxpr`` (or a sub-jaxpr) runs a ``scan`` or ``while`` loop."""
    return any(eqn.primitive.name in ("scan", "while")
               or any(_loops(j) for j in jax.extend.core.jaxprs_in_params(eqn.params))
               for eqn in jaxpr.eqns)


def temp_bytes(compiled) -> int | None:
    """Temporary memory of a compiled program (XLA's memory analysis: inputs, outputs and
    parameters excluded), or ``None`` where the backend does not report it."""
    memory = compiled.memory_analysis()
    return None if memory is None else int(memory.temp_size_in_bytes)


# ------------------------------------------------------------------- timing


def _block(out):
    if out is not None:
        jax.block_until_ready(out)


def interleaved_times(timers: dict, rounds: int, round_seconds: float) -> dict:
    """Seconds per call of each zero-argument callable, one entry per round.

    Each callable is warmed up twice, then called ``reps`` times per round (``reps``
    chosen so a round takes about ``round_seconds``) and its result blocked on.
    The callables take turns, in alternating order from round to round.
    """
    reps = {}
    for name, call in timers.items():
        _block(call())
        _block(call())
        start = time.perf_counter()
        _block(call())
        reps[name] = max(1, round(round_seconds / max(time.perf_counter() - start, 1e-7)))
    times = {name: [] for name in timers}
    for r in range(rounds):
        for name in list(timers) if r % 2 == 0 else list(reversed(timers)):
            call, start, out = timers[name], time.perf_counter(), None
            for _ in range(reps[name]):
                out = call()
            _block(out)
            times[name].append((time.perf_counter() - start) / reps[name])
    return times


def _summary(samples: list[float]) -> tuple[float, float]:
    """``(median, spread)``; spread is half the inter-quartile range over the median."""
    median = statistics.median(samples)
    if len(samples) < 4:
        return median, (max(samples) - min(samples)) / 2 / median
    q1, _, q3 = statistics.quantiles(samples, n=4)
    return median, (q3 - q1) / 2 / median


# ------------------------------------------------------------------ variants


def _stateful(step, state, batch, net_state, key):
    """A zero-argument callable running one optimizer step on a carried state."""
    box = [state, net_state]

    def call():
        params, opt_state, metrics = step(*box[0], batch, box[1], key)
        box[0] = (params, opt_state)
        if box[1] is not None:
            box[1] = metrics["net_state"]
        return metrics["loss"]

    return call


def _gradient_errors(net, params, x, y, remat_every, mode) -> tuple[str, dict]:
    """``(reference dtype, errors)``: largest per-leaf relative errors against autodiff.

    The reference is ``jax.grad(net.loss)`` in the bench's dtype, or in float32
    when that dtype is narrower (bfloat16): there autodiff's own gradient has
    rounding errors of the same order as the manual one's, so both are measured
    against the float32 one (row ``autodiff``).
    """
    dtype = jax.tree.leaves(params)[0].dtype  # (x may be integer ids)
    ref_dtype = jnp.promote_types(dtype, jnp.float32)

    def rel(a, b):
        a, b = a.astype(b.dtype), b
        scale = jnp.maximum(jnp.max(jnp.abs(b)), jnp.finfo(b.dtype).tiny)
        return jnp.max(jnp.abs(a - b)) / scale

    def widen(a):  # floats only: integer ids and labels stay as they are
        return a.astype(ref_dtype) if jnp.issubdtype(a.dtype, jnp.inexact) else a

    def errors(params, x, y):
        upcast = functools.partial(jax.tree.map, widen)
        wide = {**mode, "state": upcast(mode["state"])}
        reference = jax.grad(net.loss)(upcast(params), upcast(x), y, **wide)
        out = {"manual": net.manual_backward(params, x, y, **mode)}
        if remat_every:
            out["remat"] = net.manual_backward(params, x, y, remat_every=remat_every, **mode)
        if ref_dtype != dtype:
            out["autodiff"] = jax.grad(net.loss)(params, x, y, **mode)
        return {k: jnp.max(jnp.stack(jax.tree.leaves(jax.tree.map(rel, g, reference))))
                for k, g in out.items()}

    with jax.default_matmul_precision("highest"):
        values = jax.jit(errors)(params, x, y)
    return jnp.dtype(ref_dtype).name, {k: float(v) for k, v in values.items()}


def _matmuls(net, params):
    """The matmuls of a dense net's manual value-and-grad and nothing else, or ``None``.

    ``None`` unless every layer with parameters is a ``Dense`` (activations have
    none) at the top level. Forward ``a_{l+1} = a_l W_l``; backward, seeded with the output,
    ``dW_l = a_lᵀ dz_l`` and ``dz_{l-1} = dz_l W_lᵀ`` (none below the first layer):
    the dots of ``Dense.backward`` with their shapes and operand layouts, without
    the element-wise work and reductions that the real step runs between them.
    """
    if not all(isinstance(layer, Dense) for layer, p in zip(net.layers, params) if p):
        return None

    def matmuls(weights, x):
        inputs, a = [], x
        for W in weights:
            inputs.append(a)
            a = a @ W
        dz, dweights = a, []
        for i in reversed(range(len(weights))):
            dweights.append(inputs[i].T @ dz)
            if i:
                dz = dz @ weights[i].T
        return dweights

    return matmuls, [p["W"] for p in params if p]


def _data(spec: ModelSpec, batch: int, dtype, key, steps: int = 0, input_shape=None):
    """Random ``(x, y)`` of ``batch`` samples (``(steps, batch, …)`` when ``steps``).

    ``x`` is N(0, 1) in ``dtype``, or for a sequence model integer ids in [0,
    vocab); ``y`` integer labels in [0, classes), one per sample or per position.
    ``input_shape`` (default the spec's) sets another length T for a sequence model.
    """
    kx, ky = jax.random.split(key)
    lead = (steps, batch) if steps else (batch,)
    shape = spec.input_shape if input_shape is None else tuple(input_shape)
    if spec.vocab is None:
        x = jax.random.normal(kx, (*lead, *shape), dtype)
    else:
        x = jax.random.randint(kx, (*lead, *shape), 0, spec.vocab)
    labels = () if spec.vocab is None else shape
    return x, jax.random.randint(ky, (*lead, *labels), 0, spec.classes)


def _ratios(numerators, denominators) -> list[float]:
    """Per-round ``numerator / denominator``, both timed in the same round."""
    return [a / b for a, b in zip(numerators, denominators, strict=True)]


def _quartiles(samples: list[float]) -> list[float]:
    """``[q1, q3]`` of the samples (min and max when there are fewer than four)."""
    if len(samples) < 4:
        return [min(samples), max(samples)]
    q1, _, q3 = statistics.quantiles(samples, n=4)
    return [q1, q3]


# --------------------------------------------------------------- validation


def _check_dtype(dtype) -> jnp.dtype:
    """``jnp.dtype(dtype)`` if one of ``DTYPES`` (64-bit ones need x64), else ``ValueError``."""
    name = dtype_name("bench", dtype, DTYPES)
    if jnp.dtype(name).itemsize == 8 and not jax.config.jax_enable_x64:
        raise ValueError(f"bench: dtype {name} needs jax_enable_x64; enable it first")
    return jnp.dtype(name)


def _check_lengths(lengths) -> tuple[int, ...]:
    """``lengths`` as a tuple of ints, or a ``ValueError`` unless each is a positive int."""
    if isinstance(lengths, (str, bytes)) or not hasattr(lengths, "__iter__"):
        raise ValueError(f"bench: lengths must be a sequence of positive ints (sequence lengths "
                         f"T), e.g. (32, 256); got {lengths!r}")
    lengths = tuple(lengths)
    for i, length in enumerate(lengths):
        check_int("bench", f"lengths[{i}]", length)
    return tuple(int(length) for length in lengths)


def _check_name(name) -> None:
    if name not in MODELS:
        raise ValueError(f"bench: unknown model {name!r}; choose from {sorted(MODELS)}")


def _check_options(name, batch, rounds, round_seconds, remat_every, epoch_steps, optimizer,
                   peak_size, lengths) -> None:
    """A ``ValueError`` naming the first bad argument of ``bench_model`` (but ``dtype``)."""
    _check_name(name)
    _check_lengths(lengths)
    for arg, value in (("batch", batch), ("peak_size", peak_size)):
        if value is not None:  # None: the default
            check_int("bench", arg, value)
    check_int("bench", "rounds", rounds)
    check_int("bench", "epoch_steps", epoch_steps)
    if remat_every is not None:  # None or 0: no remat row
        check_int("bench", "remat_every", remat_every, minimum=0)
    check_real("bench", "round_seconds", round_seconds, 0)
    if optimizer not in train.OPTIMIZERS:
        raise ValueError(f"bench: optimizer must be one of {', '.join(train.OPTIMIZERS)}; "
                         f"got {optimizer!r}")


# -------------------------------------------------------------------- bench


def _mode(net, key, input_shape, dtype) -> dict:
    """Train mode with the network's state (BatchNorm) and a dropout key, where it has them."""
    state = net.init_state(key, input_shape, dtype) if net.stateful else None
    return {"state": state, "key": key if net.body.stochastic else None, "train": True}


def compile_times(name: str, lengths=(32, 256), *, batch=None, dtype="float32",
                  repeats=2) -> dict:
    """``{T: seconds}``: trace, lower and compile the ``manual`` step of a recurrent model at T.

    For a model whose ``ModelSpec.scans_time`` (``char-lstm``). The step is the
    jitted ``manual_value_and_grad`` on ``batch`` (default the
    model's) sequences of T ids. The recurrent layer runs its steps in a
    ``lax.scan``, whose body is compiled once for any T, so the times should be
    about equal (an unrolled loop would grow with T). Each figure is the least
    of ``repeats`` compiles, the lengths taking turns, so that neither a busy
    machine nor the one-time costs of a fresh process land on one length alone;
    every compile traces afresh (a new network object, so no trace is reused).

    Example:
      >>> times = compile_times("char-lstm", lengths=(4, 8), batch=2)
      >>> sorted(times), all(s > 0 for s in times.values())
      ([4, 8], True)
    """
    _check_name(name)
    spec = MODELS[name]
    if not spec.scans_time:
        scanning = sorted(n for n, s in MODELS.items() if s.scans_time)
        raise ValueError(f"bench: compile_times needs a model that scans over time "
                         f"({', '.join(scanning)}); got {name!r}")
    lengths = _check_lengths(lengths)
    if batch is not None:
        check_int("bench", "batch", batch)
    check_int("bench", "repeats", repeats)
    dtype = _check_dtype(dtype)
    batch = spec.batch if batch is None else int(batch)

    def seconds(length):
        net = spec.build()  # equal to the others, but a new object: its traces are its own
        k_init, k_data, k_mode = jax.random.split(jax.random.key(0), 3)
        params = net.init(k_init, (length,), dtype)
        x, y = _data(spec, batch, dtype, k_data, input_shape=(length,))
        mode = _mode(net, k_mode, (length,), dtype)
        return _compile(lambda p, x, y: net.manual_value_and_grad(p, x, y, **mode), params, x,
                        y)[1]

    times = {length: [] for length in lengths}
    for r in range(repeats):
        for length in lengths if r % 2 == 0 else lengths[::-1]:
            times[length].append(seconds(length))
    return {length: min(ts) for length, ts in times.items()}


def bench_model(name: str, *, batch=None, dtype="float32", rounds=61, round_seconds=0.02,
                remat_every=4, epoch_steps=20, optimizer="sgd", peak_size=None,
                torch_reference=True, lengths=(32, 256)) -> dict:
    """Measure one model of ``MODELS``; see the module docstring for the rows.

    ``batch`` and ``peak_size`` of ``None`` take the model's batch and the
    device's default matmul size; ``remat_every`` of ``None`` or ``0`` drops the
    remat row (a model without one, ``char-lstm`` or ``gpt``, ignores it). For a
    model that scans over time (``char-lstm``), ``lengths`` are the lengths T of
    ``compile_times``, reported as ``compile_s_by_length`` (``{str(T): seconds}``,
    empty for other models or ``lengths=()``). Bad arguments raise ``ValueError``
    before anything is compiled.

    Ratios (``ratio_to_autodiff``, ``fraction_of_peak``) are medians of the
    per-round ratios, each taken between variants timed in the same round, which
    cancels most of the drift of a shared machine.
    """
    _check_options(name, batch, rounds, round_seconds, remat_every, epoch_steps, optimizer,
                   peak_size, lengths)
    dtype = _check_dtype(dtype)
    spec = MODELS[name]
    batch = spec.batch if batch is None else batch
    remat_every = remat_every if spec.remat else None
    net = spec.build()
    k_init, k_data, k_epoch, k_mode = jax.random.split(jax.random.key(0), 4)
    params = net.init(k_init, spec.input_shape, dtype)
    mode = _mode(net, k_mode, spec.input_shape, dtype)
    net_state, key = mode["state"], mode["key"]
    x, y = _data(spec, batch, dtype, k_data)
    # A sequence model's step reads batch × T tokens.
    tokens = batch * math.prod(spec.input_shape) if spec.vocab is not None else None
    xs, ys = _data(spec, batch, dtype, k_epoch, epoch_steps)
    opt = train.optimizer(optimizer, LEARNING_RATE, MOMENTUM)
    opt_state = opt.init(params)
    step = train.make_train_step(net, opt)

    def manual(k):
        return lambda p, x, y: net.manual_value_and_grad(p, x, y, remat_every=k, **mode)

    def autodiff(p, x, y):
        return jax.value_and_grad(net.loss)(p, x, y, **mode)

    programs = {"manual": (manual(None), (params, x, y)), "autodiff": (autodiff, (params, x, y))}
    if remat_every:
        programs[f"remat {remat_every}"] = (manual(remat_every), (params, x, y))
    chain = _matmuls(net, params)
    if chain is not None:
        programs["matmuls"] = (chain[0], (chain[1], x))
    programs["train"] = (step, (params, opt_state, (x, y), net_state, key))
    impl = jax.random.key_impl(k_epoch)
    epoch = train.fused_epoch(net, opt, "manual", epoch_steps, batch, impl)
    carry = (params, net_state, opt_state)
    programs["scan"] = (epoch, (carry, jax.random.key_data(k_epoch), xs.reshape(-1, *x.shape[1:]),
                                ys.reshape(-1, *y.shape[1:])))
    n = peak_size if peak_size is not None else 1024 if jax.default_backend() == "cpu" else 8192
    a = jax.random.normal(k_data, (n, n), dtype)
    peak = f"matmul {n}²"
    programs[peak] = (jnp.matmul, (a, a))

    # XLA counts a loop body once: for a program with loops, count the jaxpr's matmuls.
    loops = _loops(jax.make_jaxpr(manual(None))(params, x, y).jaxpr)
    rows, timers = {}, {}
    for variant, (fn, args) in programs.items():
        # The training step updates its parameters in place (donated buffers).
        donate = (0, 1) if variant == "train" else ()
        compiled, seconds = _compile(fn, *args, donate_argnums=donate)
        flops = _flops(compiled)
        if loops and variant not in ("scan", peak):  # (scan: the train step's, below)
            flops = _matmul_flops(jax.make_jaxpr(fn)(*args).jaxpr)
        rows[variant] = {"variant": variant, "compile_s": seconds, "flops": flops,
                         "temp_bytes": temp_bytes(compiled), "steps_per_call": 1}
        if variant == "train":
            state = jax.tree.map(jnp.copy, (params, opt_state))
            timers[variant] = _stateful(compiled, state, (x, y), net_state, key)
        else:
            timers[variant] = functools.partial(compiled, *args)
    rows["scan"].update(steps_per_call=epoch_steps, flops=rows["train"]["flops"])
    torch_note = "disabled"
    if torch_reference:
        from . import bench_torch

        torch_step, torch_note = bench_torch.train_step(
            net, spec.input_shape, batch, dtype, optimizer, LEARNING_RATE, MOMENTUM
        )
        if torch_step is not None:
            rows["pytorch"] = {"variant": "pytorch", "compile_s": None, "temp_bytes": None,
                               "flops": rows["train"]["flops"], "steps_per_call": 1}
            timers["pytorch"] = torch_step

    times = interleaved_times(timers, rounds, round_seconds)
    steps = {v: rows[v].pop("steps_per_call") for v in times}
    per_step = {v: [t / steps[v] for t in ts] for v, ts in times.items()}
    for variant, samples in per_step.items():
        row = rows[variant]
        median, spread = _summary(samples)
        ratios = _ratios(samples, per_step["autodiff"])
        row.update(time_s=median, spread=spread, steps_per_s=1 / median,
                   tokens_per_s=tokens / median if tokens and variant != peak else None,
                   ratio_to_autodiff=statistics.median(ratios), ratio_iqr=_quartiles(ratios))
        row["flops_per_s"] = row["flops"] / median if row["flops"] else None
        row["fraction_of_peak"] = None
        if row["flops"] and rows[peak]["flops"]:
            rates = [row["flops"] / t for t in samples]
            peaks = [rows[peak]["flops"] / t for t in per_step[peak]]
            row["fraction_of_peak"] = statistics.median(_ratios(rates, peaks))
    by_length = {}
    if spec.scans_time:
        by_length = {str(t): s for t, s in compile_times(name, lengths, batch=batch,
                                                         dtype=dtype).items()}
    reference, grad_errors = _gradient_errors(net, params, x, y, remat_every, mode)
    return {"model": name, "batch": batch, "input_shape": list(spec.input_shape),
            "layers": len(net.layers), "optimizer": optimizer, "tokens_per_step": tokens,
            "flops_count": "jaxpr products" if loops else "xla",
            "compile_s_by_length": by_length,
            "peak_flops_per_s": rows[peak]["flops_per_s"], "pytorch": torch_note,
            "grad_reference": reference, "grad_rel_error": grad_errors,
            "rows": list(rows.values())}


def run_bench(names=None, **options) -> dict:
    """Benchmark the models ``names`` (default all of ``MODELS``); the data ``jaxbp bench`` prints.

    Keyword options are those of ``bench_model``; bad names or options raise
    ``ValueError`` before the first model is timed. Returns ``{"device",
    "backend", "dtype", "jax", "models": [bench_model(...) for each name]}``.
    """
    names = list(MODELS) if names is None else [names] if isinstance(names, str) else list(names)
    if not names:
        raise ValueError(f"bench: names must list at least one model of {sorted(MODELS)}; got []")
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise ValueError(f"bench: unknown models {unknown}; choose from {sorted(MODELS)}")
    dtype = _check_dtype(options.get("dtype", "float32"))
    # bench_model checks its options before it compiles anything, and they are the
    # same for every model: bad ones fail in the first call, before any timing.
    device = jax.devices()[0]
    return {"device": f"{device.platform}: {device.device_kind}",
            "backend": jax.default_backend(), "dtype": dtype.name, "jax": jax.__version__,
            "models": [bench_model(n, **options) for n in names]}


# -------------------------------------------------------------------- output


def _fmt(value, spec: str, scale: float = 1.0) -> str:
    return "" if value is None else format(value * scale, spec)


def _is_peak(variant: str) -> bool:
    """Whether ``variant`` is the ``matmul n²`` row (``matmuls`` is a model's own)."""
    return variant.startswith("matmul ")


def _legend(result: dict) -> list[str]:
    """A line per column of ``format_table``, and the counts behind GFLOP and tok/s."""
    entries = [
        "model, variant: what is timed (jaxbp bench --help lists the variants)",
        "ms/step: the median over the rounds of the time per step",
        "±: half the inter-quartile range of those times, relative to the median",
        "×autodiff: the median over the rounds of the row's time / autodiff's time in the same "
        "round (not ms/step ÷ autodiff's ms/step); IQR: the quartiles of those ratios, an IQR "
        "that straddles 1.00 means as fast as autodiff within the machine's noise; both blank "
        "for the matmul peak",
        "compile s: trace + lower + compile of the row's program",
        "GFLOP: the FLOPs of one step, from XLA's cost analysis",
    ]
    counted = [m["model"] for m in result["models"] if m["flops_count"] != "xla"]
    if counted:
        entries.append(f"GFLOP of {', '.join(counted)}: the jaxpr's matmuls and convolutions, "
                       f"each scan body times its length (XLA's count takes a loop body once)")
    entries += [
        "GFLOP/s: GFLOP / time per step (GFLOP × 1000 / ms/step)",
        "%peak: GFLOP/s ÷ the GFLOP/s of the model's matmul row",
        "temp MiB: XLA's temporary memory of the compiled program (parameters, inputs and "
        "outputs excluded)",
        "steps/s: 1000 / ms/step",
    ]
    tokens = {m["model"]: m["tokens_per_step"] for m in result["models"] if m["tokens_per_step"]}
    per_step = ", ".join(f"{name} {n}" for name, n in tokens.items())
    entries.append("tok/s: batch × T positions per step × steps/s, for a sequence model"
                   + (f"; per step: {per_step}" if tokens else ""))
    return [line for entry in entries
            for line in textwrap.wrap(entry, 100, subsequent_indent="  ", break_on_hyphens=False)]


def format_table(result: dict) -> str:
    """The aligned table ``jaxbp bench`` prints, a legend of its columns, and a line per model."""
    head = ("model", "variant", "ms/step", "±", "×autodiff", "IQR", "compile s", "GFLOP",
            "GFLOP/s", "%peak", "temp MiB", "steps/s", "tok/s")
    lines = [f"device {result['device']} · dtype {result['dtype']} · jax {result['jax']}"]
    table = [head]
    for m in result["models"]:
        peak = m["peak_flops_per_s"]
        for row in m["rows"]:
            # The matmul peak is no step of the model: no ratio to its autodiff.
            ratio = not _is_peak(row["variant"])
            rate = row["flops_per_s"]
            table.append((
                m["model"], row["variant"], _fmt(row["time_s"], ".3f", 1e3),
                _fmt(row["spread"], ".1%"),
                _fmt(row["ratio_to_autodiff"] if ratio else None, ".3f"),
                "–".join(format(q, ".2f") for q in row["ratio_iqr"]) if ratio else "",
                _fmt(row["compile_s"], ".2f"), _fmt(row["flops"], ".3g", 1e-9),
                _fmt(rate, ".1f", 1e-9), _fmt(rate / peak if rate and peak else None, ".0%"),
                _fmt(row["temp_bytes"], ".2f", 2**-20), _fmt(row["steps_per_s"], ".0f"),
                _fmt(row["tokens_per_s"], ".0f"),
            ))
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    for r in table:
        lines.append("  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip())
    lines += _legend(result)
    for m in result["models"]:
        errors = ", ".join(f"{k} {v:.1e}" for k, v in m["grad_rel_error"].items())
        lines.append(f"{m['model']}: batch {m['batch']}, grad err vs {m['grad_reference']} "
                     f"autodiff {errors}, "
                     f"pytorch {m['pytorch']}")
        if m["compile_s_by_length"]:
            times = ", ".join(f"T={t} {s:.2f} s" for t, s in m["compile_s_by_length"].items())
            lines.append(f"{m['model']}: compile of manual at {times} (the least of 2 each; "
                         f"lax.scan: the program does not grow with T)")
    return "\n".join(lines)


def _models(text: str) -> list[str]:
    """An argparse ``type``: a comma-separated list of at least one of ``MODELS``."""
    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [n for n in names if n not in MODELS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated list of {', '.join(MODELS)}; got {text!r}"
            + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
    return names


def _lengths(text: str) -> tuple[int, ...]:
    """An argparse ``type``: a comma-separated list of positive ints."""
    try:
        return tuple(POSITIVE_INT(t) for t in text.split(","))
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated list of positive ints; got {text!r}") from None


def _json_path(path: str) -> str:
    """An argparse ``type``: a file path that can be written (checked before any timing)."""
    problem = output_file_problem(path)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return path


_EPILOG = """\
variants (the table's rows):
  manual      jitted net.manual_value_and_grad: the hand-written backward
  autodiff    jitted jax.value_and_grad(net.loss)
  remat k     manual_value_and_grad(..., remat_every=k): stores every k-th
              layer input and recomputes the rest (not for char-lstm or gpt)
  matmuls     dense nets: the step's matmuls alone, same shapes and operand
              layouts, nothing between them; a reference, not a bound: XLA
              schedules a bare chain of dots differently (on deep-mlp XLA:CPU
              has run it from as fast as the whole step to 1.13× slower)
  train       a full optax step, called in a Python loop
  scan        fit's fused epoch: the same step in a lax.scan (time per step)
  matmul n²   an n×n by n×n matmul of the same dtype: the device's peak
  pytorch     PyTorch's eager training step of the same architecture

timing: every variant is warmed up, then the variants take turns in
interleaved rounds, so that a busy machine slows every variant alike.
×autodiff and its IQR are the median and quartiles of per-round ratios: they
vary much less from run to run than the times, which differ by several
percent between repeat runs. The printed legend explains every column.

precision: timings use JAX's default matmul precision (on GPUs float32
matmuls may run as TF32); grad err is computed under
jax.default_matmul_precision("highest"). For bfloat16 the reference is
autodiff in float32, and autodiff's own bfloat16 gradient gets an error too:
its bias sums accumulate in bfloat16, while jnp.sum in the hand-written
backward accumulates in float32.

attention sweep (--attention-sweep): instead of the models, one causal
MultiHeadAttention layer (batch 4, 4 heads of 16, MeanSquaredError loss) at
each of --lengths, three gradient steps: manual backward="standard" (stores
the (T, T) probabilities), manual backward="lean" (online softmax, recomputes
them 128 keys at a time) and autodiff of the standard forward; the table gives
XLA's temporary memory and the time of each, and lean's as fractions of
autodiff's. Standard and autodiff hold several (batch, heads, T, T) matrices,
256 MiB each at T=2048 and 4× that at 2T.

memory on CPUs: XLA allocates a program's temporary memory afresh in every
call and glibc serves large blocks with new pages, which fault on first
touch (char-lstm's manual step: 15–25% of its time; the fused epoch
allocates once). MALLOC_MMAP_THRESHOLD_=2000000000
MALLOC_TRIM_THRESHOLD_=20000000000 in the environment removes them.
"""


def add_arguments(parser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter  # (the epilog's layout)
    parser.epilog = _EPILOG
    parser.add_argument("--models", type=_models, default=list(MODELS),
                        help=f"comma-separated, from {', '.join(MODELS)} (default all)")
    parser.add_argument("--batch", type=POSITIVE_INT,
                        help="batch size for every model (default per model; 4 for "
                             "--attention-sweep)")
    parser.add_argument("--dtype", default="float32", choices=DTYPES,
                        help="%(choices)s; float64 turns on jax_enable_x64 (default %(default)s)")
    parser.add_argument("--rounds", type=POSITIVE_INT,
                        help="interleaved timing rounds (default 61; 11 for --attention-sweep)")
    parser.add_argument("--round-seconds", type=number(float, 0, "a finite number ≥ 0"),
                        default=0.02,
                        help="time each variant runs per round, at least one call; "
                             "0: one call (default %(default)s)")
    parser.add_argument("--remat-every", type=NON_NEGATIVE_INT, default=4,
                        help="k of the remat row, 0: no remat row (default %(default)s)")
    parser.add_argument("--epoch-steps", type=POSITIVE_INT, default=20,
                        help="steps of the fused epoch (default %(default)s)")
    parser.add_argument("--optimizer", default="sgd", choices=train.OPTIMIZERS,
                        help="optax optimizer of the training rows (default %(default)s)")
    parser.add_argument("--peak-size", type=POSITIVE_INT,
                        help="n of the n×n matmul (default 1024 on CPU, 8192 elsewhere)")
    parser.add_argument("--lengths", type=_lengths,
                        help="sequence lengths T at which char-lstm's manual step is compiled, "
                             "to show the compile time does not grow with T (default 32,256); "
                             "with --attention-sweep, the lengths of the sweep (default "
                             "128,256,512,1024,2048)")
    parser.add_argument("--attention-sweep", action="store_true",
                        help="instead of the models: one MultiHeadAttention layer's gradient "
                             "step (manual standard, manual lean, autodiff) at each of "
                             "--lengths, its XLA temporary memory and time; uses --batch, "
                             "--dtype, --rounds, --round-seconds and --json")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    parser.add_argument("--json", metavar="PATH", type=_json_path,
                        help="also write the figures as JSON (checked before timing)")


def run(args) -> int:
    if jnp.dtype(args.dtype).itemsize == 8:
        jax.config.update("jax_enable_x64", True)
    # Options left out take the defaults of the function they go to.
    given = {k: v for k, v in (("batch", args.batch), ("rounds", args.rounds),
                               ("lengths", args.lengths)) if v is not None}
    if args.attention_sweep:
        from . import bench_attention

        result = bench_attention.sweep(dtype=args.dtype, round_seconds=args.round_seconds,
                                       **given)
        print(bench_attention.format_table(result))
    else:
        result = run_bench(
            args.models, dtype=args.dtype, round_seconds=args.round_seconds,
            remat_every=args.remat_every or None, epoch_steps=args.epoch_steps,
            optimizer=args.optimizer, peak_size=args.peak_size,
            torch_reference=not args.no_torch, **given,
        )
        print(format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0
