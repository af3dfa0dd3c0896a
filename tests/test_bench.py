"""``jaxbp bench`` on tiny settings, and the rematerialising backward.

No timing is asserted: the bench's numbers depend on the machine. What is
asserted is the shape of its data, the JSON it writes, and the two properties
of ``remat_every`` that do not depend on timing: gradients equal to autodiff's
(float64, ≤ 1e-10) and a smaller temporary memory in XLA's compiled analysis.
The ``char-lstm`` row runs at its real sizes on a batch of 2 sequences.
"""

import json
import math
import re
import statistics
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbp import Sequential, bench, bench_attention, bench_torch, cli, layers, losses, models
from tests.helpers import max_tree_rel_error, random_params, rel_error
from tests.test_layers import ACTIVATIONS

TINY = dict(batch=8, rounds=3, round_seconds=0.001, epoch_steps=2, peak_size=64)
ROW_KEYS = {"variant", "compile_s", "flops", "temp_bytes", "time_s", "spread", "steps_per_s",
            "tokens_per_s", "ratio_to_autodiff", "ratio_iqr", "flops_per_s", "fraction_of_peak"}
MODEL_NAMES = "mlp-small, mlp-large, cnn, cnn-wide, deep-mlp, mlp-bn, resmlp, char-lstm, gpt"


@pytest.fixture(scope="module")
def result():
    return bench.run_bench(["mlp-small"], torch_reference=False, **TINY)


def test_run_bench_returns_every_row_well_formed(result):
    assert result["backend"] == jax.default_backend() and result["dtype"] == "float32"
    (model,) = result["models"]
    assert model["model"] == "mlp-small" and model["batch"] == 8 and model["layers"] == 3
    assert model["pytorch"] == "disabled"
    rows = {row["variant"]: row for row in model["rows"]}
    assert list(rows) == ["manual", "autodiff", "remat 4", "matmuls", "train", "scan",
                          "matmul 64²"]
    for row in rows.values():
        assert set(row) == ROW_KEYS and row["tokens_per_s"] is None
        assert row["time_s"] > 0 and row["spread"] >= 0
        assert row["flops"] > 0 and row["fraction_of_peak"] > 0
        q1, q3 = row["ratio_iqr"]
        assert q1 <= row["ratio_to_autodiff"] <= q3
    assert rows["matmul 64²"]["flops"] == 2 * 64**3
    # One step of the 64-128-10 MLP: forward 2·B·(64·128 + 128·10) FLOPs, backward twice that
    # less the unneeded dx of the first layer; XLA counts a few element-wise FLOPs more.
    dots = 2 * 8 * (64 * 128 + 128 * 10) * 3 - 2 * 8 * 64 * 128
    assert dots <= rows["manual"]["flops"] < 1.1 * dots
    assert rows["matmuls"]["flops"] == dots  # the same matmuls, nothing else
    assert rows["train"]["flops"] > rows["manual"]["flops"]  # plus the optimizer update
    assert rows["remat 4"]["flops"] > rows["manual"]["flops"]  # plus the recomputation
    for variant in ("manual", "autodiff", "remat 4"):
        assert isinstance(rows[variant]["temp_bytes"], int)
    assert rows["manual"]["temp_bytes"] <= rows["autodiff"]["temp_bytes"]
    errors = model["grad_rel_error"]
    assert model["grad_reference"] == "float32"
    assert set(errors) == {"manual", "remat"} and max(errors.values()) < 1e-5
    assert model["flops_count"] == "xla" and model["compile_s_by_length"] == {}
    assert model["tokens_per_step"] is None


def test_bfloat16_gradients_are_measured_against_float32_autodiff():
    # In bfloat16, autodiff's own gradient is rounded as coarsely as the manual one,
    # so both are compared with autodiff in float32.
    net = models.cnn((8, 8, 1), 3, filters=(2, 2))
    params = net.init(jax.random.key(0), (8, 8, 1), jnp.bfloat16)
    x = jax.random.normal(jax.random.key(1), (16, 8, 8, 1), jnp.bfloat16)
    y = jax.random.randint(jax.random.key(2), (16,), 0, 3)
    mode = {"state": None, "key": None, "train": True}
    reference, errors = bench._gradient_errors(net, params, x, y, 2, mode)
    assert reference == "float32" and set(errors) == {"manual", "remat", "autodiff"}
    assert max(errors["manual"], errors["remat"]) < 0.05, errors  # 8 significant bits
    assert errors["autodiff"] > 0


def test_format_table_lists_every_row(result):
    table = bench.format_table(result).splitlines()
    assert table[0].startswith("device ") and "ms/step" in table[1] and "%peak" in table[1]
    assert sum(line.startswith("mlp-small  ") for line in table) == 7
    assert "IQR" in table[1]
    assert "grad err vs float32 autodiff" in table[-1]
    assert table[1].split()[-1] == "tok/s" and not any("tokens" in line for line in table)


def test_cli_writes_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    argv = ["bench", "--models", "mlp-small", "--batch", "4", "--rounds", "2",
            "--round-seconds", "0.001", "--epoch-steps", "2", "--peak-size", "32",
            "--remat-every", "0", "--optimizer", "momentum", "--no-torch", "--json", str(path)]
    assert cli.main(argv) == 0
    data = json.loads(path.read_text())
    (model,) = data["models"]
    assert model["batch"] == 4 and model["optimizer"] == "momentum"
    assert [r["variant"] for r in model["rows"]] == [
        "manual", "autodiff", "matmuls", "train", "scan", "matmul 32²"]
    assert "mlp-small  manual" in capsys.readouterr().out


def test_matmuls_are_the_gradient_of_a_linear_chain():
    # Without activations and biases, the chain's weight gradients are those of
    # ½‖x W1 W2 W3‖² (the output seeds the backward walk).
    net = models.mlp(hidden=(5, 4), classes=3)
    params = net.init(jax.random.key(0), (6,), jnp.float64)
    x = jax.random.normal(jax.random.key(1), (7, 6), jnp.float64)
    matmuls, weights = bench._matmuls(net, params)

    def half_square(weights):
        a = x
        for W in weights:
            a = a @ W
        return 0.5 * jnp.sum(a * a)

    expected = jax.grad(half_square)(weights)
    got = matmuls(weights, x)[::-1]  # returned from the last layer down
    assert max_tree_rel_error(got, expected) <= 1e-12


def test_matmuls_row_only_for_dense_nets():
    net = models.cnn((8, 8, 1), 3, filters=(2, 2))
    assert bench._matmuls(net, net.init(jax.random.key(0), (8, 8, 1))) is None


def test_unknown_model_is_rejected():
    with pytest.raises(ValueError, match=r"bench: unknown models \['mlp-huge'\]"):
        bench.run_bench(["mlp-huge"])
    with pytest.raises(ValueError, match=r"bench: unknown model 'mlp-huge'; choose from"):
        bench.bench_model("mlp-huge")
    with pytest.raises(ValueError, match=r"bench: names must list at least one model .*; got \[\]"):
        bench.run_bench([])


@pytest.fixture
def no_compiling(monkeypatch):
    """Fails the test if the bench gets as far as compiling a variant."""
    monkeypatch.setattr(bench, "_compile", lambda *a, **k: pytest.fail("compiled"))


@pytest.mark.parametrize(("option", "message"), [
    (dict(rounds=0), "rounds must be a positive int; got 0"),
    (dict(rounds=-1), "rounds must be a positive int; got -1"),
    (dict(rounds=2.5), "rounds must be a positive int; got 2.5"),
    (dict(batch=0), "batch must be a positive int; got 0"),
    (dict(batch=-4), "batch must be a positive int; got -4"),
    (dict(epoch_steps=0), "epoch_steps must be a positive int; got 0"),
    (dict(remat_every=-2), "remat_every must be an int >= 0; got -2"),
    (dict(remat_every=True), "remat_every must be an int >= 0; got True"),
    (dict(peak_size=0), "peak_size must be a positive int; got 0"),
    (dict(round_seconds=-0.1), "round_seconds must be a finite number >= 0; got -0.1"),
    (dict(round_seconds=float("nan")), "round_seconds must be a finite number >= 0; got nan"),
    (dict(dtype="foo"), "dtype must be one of float32, float64, bfloat16, float16; got 'foo'"),
    (dict(dtype="int32"), "dtype must be one of float32, float64, bfloat16, float16; got 'int32'"),
    (dict(optimizer="lbfgs"), "optimizer must be one of sgd, momentum, adam; got 'lbfgs'"),
    (dict(lengths=(32, 0)), "lengths[1] must be a positive int; got 0"),
    (dict(lengths=(2.5,)), "lengths[0] must be a positive int; got 2.5"),
    (dict(lengths="32"), "lengths must be a sequence of positive ints (sequence lengths T), "
                         "e.g. (32, 256); got '32'"),
])
@pytest.mark.parametrize("api", ["run_bench", "bench_model"])
def test_bad_options_are_rejected_before_compiling(no_compiling, api, option, message):
    call = bench.run_bench if api == "run_bench" else bench.bench_model
    with pytest.raises(ValueError, match=re.escape(f"bench: {message}")):
        call(["mlp-small"] if api == "run_bench" else "mlp-small", **option)


def test_numpy_scalars_are_valid_options(no_compiling):
    # validation passes, so the bench goes on to compile (the fixture stops it there)
    with pytest.raises(pytest.fail.Exception, match="compiled"):
        bench.bench_model("mlp-small", rounds=np.int64(3), round_seconds=np.float32(0.02),
                          batch=np.int32(8), remat_every=np.int64(2), peak_size=np.int64(64),
                          epoch_steps=np.int32(2), torch_reference=False)


def test_float64_needs_x64():
    with jax.enable_x64(False), pytest.raises(ValueError, match="float64 needs jax_enable_x64"):
        bench.run_bench(["mlp-small"], dtype="float64")


@pytest.mark.parametrize(("argv", "message"), [
    (["--models", "foo"], f"argument --models: expected a comma-separated list of {MODEL_NAMES}; "
                          f"got 'foo' (unknown: foo)"),
    (["--models", ","], f"argument --models: expected a comma-separated list of {MODEL_NAMES}; "
                        f"got ','"),
    (["--lengths", "0"], "argument --lengths: expected a comma-separated list of positive ints; "
                         "got '0'"),
    (["--lengths", "32,x"], "argument --lengths: expected a comma-separated list of positive "
                            "ints; got '32,x'"),
    (["--dtype", "int32"], "argument --dtype: invalid choice: 'int32'"),
    (["--dtype", "foo"], "argument --dtype: invalid choice: 'foo'"),
    (["--rounds", "0"], "argument --rounds: expected a positive int; got '0'"),
    (["--rounds", "x"], "argument --rounds: expected a positive int; got 'x'"),
    (["--batch", "0"], "argument --batch: expected a positive int; got '0'"),
    (["--batch", "-4"], "argument --batch: expected a positive int; got '-4'"),
    (["--epoch-steps", "0"], "argument --epoch-steps: expected a positive int; got '0'"),
    (["--remat-every", "-2"], "argument --remat-every: expected an int ≥ 0; got '-2'"),
    (["--peak-size", "0"], "argument --peak-size: expected a positive int; got '0'"),
    (["--round-seconds", "-1"], "argument --round-seconds: expected a finite number ≥ 0; got '-1'"),
    (["--json", "{tmp}"], "argument --json: expected a file path; '{tmp}' is a directory"),
    (["--json", "{tmp}/no/x.json"], "argument --json: directory '{tmp}/no' of '{tmp}/no/x.json' "
                                    "does not exist"),
])
def test_cli_rejects_bad_arguments_with_exit_2(no_compiling, tmp_path, capsys, argv, message):
    argv = [a.format(tmp=tmp_path) for a in argv]
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench", *argv])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"jaxbp bench: error: {message.format(tmp=tmp_path)}" in err
    assert "Traceback" not in err


def test_cli_help_states_the_defaults_and_dtypes(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench", "--help"])
    assert exit_.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for text in ("timing rounds (default 61; 11 for --attention-sweep)", "(default 0.02)",
                 "no remat row (default 4)",
                 "fused epoch (default 20)", "float32, float64, bfloat16, float16",
                 "does not grow with T (default 32,256)",
                 "the lengths of the sweep (default 128,256,512,1024,2048)"):
        assert text in out


def work(n):
    """A callable whose cost is ``n`` units of the same CPU work."""

    def call():
        total = 0
        for i in range(20_000 * n):
            total += i
        return None

    return call


def test_interleaved_times_measures_programs_of_known_cost():
    # Rounds of about 30 ms: the per-round ratio stays near 3 even on a shared machine.
    times = bench.interleaved_times({"1x": work(1), "3x": work(3)}, 9, 0.03)
    ratio = statistics.median(bench._ratios(times["3x"], times["1x"]))
    assert 2.2 < ratio < 4, ratio
    assert statistics.median(times["1x"]) < statistics.median(times["3x"])


@pytest.mark.parametrize("m, k, n", [(8, 64, 128), (128, 10, 3), (1, 5, 7)])
def test_flop_counts_of_a_matmul_are_2_m_n_k(m, k, n):
    a, b = jnp.ones((m, k), jnp.float32), jnp.ones((k, n), jnp.float32)
    compiled, seconds = bench._compile(jnp.matmul, a, b)
    assert bench._flops(compiled) == 2 * m * n * k and seconds > 0


def test_interleaved_times_gives_one_time_per_round():
    calls = []
    times = bench.interleaved_times({"a": lambda: calls.append("a"),
                                     "b": lambda: calls.append("b")}, 4, 0.0)
    assert {k: len(v) for k, v in times.items()} == {"a": 4, "b": 4}
    assert all(t >= 0 for v in times.values() for t in v)
    assert calls[6:] == ["a", "b", "b", "a", "a", "b", "b", "a"]  # after 3 warm-up calls each


def test_torch_reference_says_not_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now raises ImportError
    step, note = bench_torch.train_step(models.mlp((4,)), (3,), 2, "float32", "sgd", 0.1, 0.9)
    assert step is None and note == "not installed"


def test_torch_reference_mirrors_the_architecture():
    torch = pytest.importorskip("torch")
    module = bench_torch.to_torch(models.mlp(hidden=(16, 8)), (5,))
    shapes = [tuple(p.shape) for p in module.parameters()]
    assert shapes == [(16, 5), (16,), (8, 16), (8,), (10, 8), (10,)]
    assert module(torch.zeros(3, 5)).shape == (3, 10)


def _to_nchw(a):
    return a.transpose(0, 3, 1, 2) if a.ndim == 4 else a


def _to_nhwc(a):
    return a.transpose(0, 2, 3, 1) if a.ndim == 4 else a


TORCH_LAYERS = [
    (layer, (5,)) for layer in ACTIVATIONS + [layers.Dense(3), layers.Dense(4, use_bias=False),
                                              layers.Flatten(), layers.ELU(1.0),
                                              layers.LeakyReLU(0.3), layers.LayerNorm(),
                                              layers.LayerNorm(0.5), layers.RMSNorm(),
                                              layers.RMSNorm(0.5), layers.BatchNorm()]
] + [
    (layer, (6, 5, 3)) for layer in [
        *ACTIVATIONS, layers.Flatten(), layers.LayerNorm(0.1), layers.RMSNorm(0.1),
        layers.BatchNorm(0.3, eps=0.01),
        layers.Conv2D(4, 3), layers.Conv2D(2, (3, 2), 2, 1),
        layers.Conv2D(2, 3, padding="SAME", use_bias=False), layers.Conv2D(3, 1, (1, 2)),
        layers.MaxPool2D(2), layers.MaxPool2D((3, 2), (1, 2)), layers.AvgPool2D(2),
        layers.AvgPool2D(3, 1, "VALID"),
    ]
]


@pytest.mark.parametrize("layer, shape", TORCH_LAYERS, ids=lambda v: repr(v))
def test_torch_reference_computes_each_layers_function(layer, shape):
    """Forward equality in float64 in train mode (PyTorch's default), the layer's params copied.

    BatchNorm: batch statistics, and the same running statistics after the step.
    """
    torch = pytest.importorskip("torch")
    module, out_shape = bench_torch._module(torch, layer, shape)
    rng = np.random.default_rng(0)
    params = random_params(Sequential([layer], loss=losses.MeanSquaredError()), shape, rng)[0]
    module = module.to(torch.float64)
    bench_torch.load_params(module, layer, params)
    x = 2 * rng.normal(size=(3, *shape))
    state = layer.init(None, shape, np.float64)[1] if layer.stateful else {}
    want, new_state, _ = layer.forward(params, state, x, layers.Context(train=True))
    got = _to_nhwc(module(torch.from_numpy(_to_nchw(x))).detach().numpy())
    assert want.shape == (3, *out_shape) and got.shape == want.shape
    assert rel_error(got, np.asarray(want)) <= 1e-12
    if layer.stateful:
        assert rel_error(module.running_mean.numpy(), np.asarray(new_state["mean"])) <= 1e-12
        assert rel_error(module.running_var.numpy(), np.asarray(new_state["var"])) <= 1e-12


NETWORKS = {
    "mlp": (lambda: models.mlp(hidden=(6, 5)), (4,)),
    "cnn": (lambda: models.cnn((8, 8, 1), classes=3, filters=(2, 3)), (8, 8, 1)),
    "cifar_cnn": (lambda: models.cifar_cnn((8, 8, 3), classes=3, filters=(2, 4)), (8, 8, 3)),
}


@pytest.mark.parametrize("name", list(NETWORKS))
def test_torch_reference_network_computes_the_same_function(name):
    torch = pytest.importorskip("torch")
    build, shape = NETWORKS[name]
    net = build()
    rng = np.random.default_rng(1)
    params = random_params(net, shape, rng)
    module = bench_torch.to_torch(net, shape).to(torch.float64)
    bench_torch.load_params(module, net, params)
    x = rng.normal(size=(5, *shape))
    got = module(torch.from_numpy(_to_nchw(x))).detach().numpy()
    assert rel_error(got, np.asarray(net.forward(params, x))) <= 1e-12


# -------------------------------------------------------------------- char-lstm

CHAR = dict(TINY, batch=2, lengths=(8, 24))
V, T, E, H = 80, 64, 64, 256  # char-lstm: vocabulary, length, embedding, hidden


@pytest.fixture(scope="module")
def char_result():
    return bench.run_bench(["char-lstm"], torch_reference=False, **CHAR)


def test_char_lstm_data_are_ids_and_labels_per_position():
    spec = bench.MODELS["char-lstm"]
    assert (spec.input_shape, spec.batch, spec.vocab, spec.classes) == ((T,), 32, V, V)
    for steps, lead in ((0, (5,)), (3, (3, 5))):
        x, y = bench._data(spec, 5, jnp.float32, jax.random.key(0), steps)
        assert x.shape == y.shape == (*lead, T)
        for a in (x, y):
            assert jnp.issubdtype(a.dtype, jnp.integer)
            assert 0 <= int(a.min()) and int(a.max()) < V
        assert len(np.unique(np.asarray(x))) > V // 2  # ids spread over the vocabulary
    x, y = bench._data(spec, 2, jnp.float32, jax.random.key(0), input_shape=(9,))
    assert x.shape == y.shape == (2, 9)
    net = spec.build()
    assert [layer.name for layer in net.layers] == ["Embedding", "LSTM", "Dense"]
    assert net.output_shape((T,)) == (T, V)


def test_char_lstm_rows_flops_and_gradients(char_result):
    (model,) = char_result["models"]
    assert model["model"] == "char-lstm" and model["input_shape"] == [T]
    rows = {row["variant"]: row for row in model["rows"]}
    # no remat (one layer holds the memory) and no matmuls (not a dense stack)
    assert list(rows) == ["manual", "autodiff", "train", "scan", "matmul 64²"]
    # Forward x Wx, h Wh (every step), h W_dense; the backward twice each: 3 × forward.
    B = 2
    dots = 3 * 2 * B * T * (E * 4 * H + H * 4 * H + H * V)
    assert model["flops_count"] == "jaxpr products"
    for variant in ("manual", "autodiff", "train", "scan"):
        assert rows[variant]["flops"] == dots, variant
    assert rows["matmul 64²"]["flops"] == 2 * 64**3
    for row in rows.values():
        assert set(row) == ROW_KEYS and row["time_s"] > 0
    assert isinstance(rows["manual"]["temp_bytes"], int)
    assert isinstance(rows["autodiff"]["temp_bytes"], int)
    assert model["grad_reference"] == "float32"
    assert set(model["grad_rel_error"]) == {"manual"}
    assert model["grad_rel_error"]["manual"] < 1e-5


def test_char_lstm_compile_times_for_both_lengths(char_result):
    (model,) = char_result["models"]
    times = model["compile_s_by_length"]
    assert list(times) == ["8", "24"] and all(s > 0 for s in times.values())
    json.dumps(char_result)  # (str keys: the JSON holds the same figures)
    table = bench.format_table(char_result)
    assert "char-lstm: compile of manual at T=8 " in table and ", T=24 " in table


def _cells(line: str) -> list[str]:
    return re.split(r" {2,}", line.strip())


def test_char_lstm_table_gives_tokens_per_second(char_result):
    (model,) = char_result["models"]
    table = bench.format_table(char_result).splitlines()
    head = _cells(table[1])
    assert head[-1] == "tok/s"
    printed = {}
    for line in table[2:]:
        cells = _cells(line)
        if cells[0] == "char-lstm" and cells[1] in ("manual", "autodiff", "train"):
            printed[cells[1]] = dict(zip(head, cells, strict=True))
    assert set(printed) == {"manual", "autodiff", "train"}
    for row in model["rows"]:
        if row["variant"] in printed:
            cells = printed[row["variant"]]
            # tokens per step are batch × T, counted here from the bench's own settings
            want = CHAR["batch"] * T / row["time_s"]
            assert abs(float(cells["tok/s"]) - want) <= 0.5, (cells, want)
            # and the printed ms/step gives the same rate (to its 3 decimals)
            ms = float(cells["ms/step"])
            assert abs(CHAR["batch"] * T / (ms * 1e-3) / want - 1) <= 0.5e-3 / ms + 1e-3
    assert any(line.startswith("tok/s: ") and "char-lstm 128" in line for line in table)
    assert any(line.startswith("GFLOP of char-lstm: the jaxpr's matmuls") for line in table)


def test_compile_times_is_for_models_that_scan_over_time(no_compiling):
    for name in ("mlp-small", "gpt"):  # (gpt: ids, but no loop over time, and T <= 64)
        with pytest.raises(ValueError, match=r"compile_times needs a model that scans over time "
                                             rf"\(char-lstm\); got '{name}'"):
            bench.compile_times(name)
    with pytest.raises(ValueError, match=r"bench: lengths\[0\] must be a positive int; got 0"):
        bench.compile_times("char-lstm", lengths=(0, 32))
    with pytest.raises(ValueError, match=r"bench: batch must be a positive int; got -1"):
        bench.compile_times("char-lstm", batch=-1)
    with pytest.raises(ValueError, match=r"bench: repeats must be a positive int; got 0"):
        bench.compile_times("char-lstm", repeats=0)
    with pytest.raises(ValueError, match=r"bench: unknown model 'lstm'"):
        bench.compile_times("lstm")


def test_convolution_flops_count_every_window_and_each_chunk_of_dw():
    """A Conv2D's forward and hand-written backward: 2·kh·kw·C_in per output of each
    convolution, dW's scan over batch chunks counted once per chunk."""
    layer = layers.Conv2D(5, 3, padding="SAME", use_bias=False)
    n, h, w, c = 12, 6, 7, 4  # over PATCHES_MAX_C_IN channels: dW in 3 chunks of 4 images
    W, x = jnp.zeros((3, 3, c, 5)), jnp.zeros((n, h, w, c))
    fwd = jax.make_jaxpr(lambda W, x: layer.forward({"W": W}, {}, x, None)[0])(W, x).jaxpr
    assert bench._matmul_flops(fwd) == 2 * n * h * w * 5 * 9 * c
    back = jax.make_jaxpr(lambda W, x, dy: layer.backward(
        {"W": W}, layers.conv.ConvResiduals(x=x), dy))(W, x, x[..., :1].repeat(5, -1)).jaxpr
    assert bench._loops(back)
    dW = 2 * (3 * 3 * c * 5) * (h * w * n)  # each entry sums H·W positions of every image
    dx = 2 * (n * h * w * c) * (3 * 3 * 5)
    assert bench._matmul_flops(back) == dW + dx


def test_matmul_flops_count_each_scan_step():
    def chain(h, W, xs):  # T steps of h W: one dot in the body, run T times
        return jax.lax.scan(lambda h, x: (jnp.tanh(h @ W + x), None), h, xs)[0]

    h, W, xs = jnp.ones((3, 4)), jnp.ones((4, 4)), jnp.ones((7, 3, 4))
    jaxpr = jax.make_jaxpr(chain)(h, W, xs).jaxpr
    assert bench._loops(jaxpr)
    assert bench._matmul_flops(jaxpr) == 7 * 2 * 3 * 4 * 4

    def unrolled(h, W, xs):
        for x in xs:
            h = jnp.tanh(h @ W + x)
        return h

    # Without a loop XLA's count holds the same products (plus the element-wise work).
    xla = bench._flops(bench._compile(unrolled, h, W, xs)[0])
    assert 7 * 2 * 3 * 4 * 4 <= xla < 1.5 * 7 * 2 * 3 * 4 * 4
    assert not bench._loops(jax.make_jaxpr(unrolled)(h, W, xs).jaxpr)

    def branches(p, a):  # the costlier branch counts, once
        return jax.lax.cond(p, lambda a: a @ a @ a, lambda a: a @ a, a)

    assert bench._matmul_flops(jax.make_jaxpr(branches)(True, W).jaxpr) == 2 * (2 * 4**3)


SEQUENCE_LAYERS = [layers.RNN(4), layers.LSTM(4), layers.GRU(4), layers.RNN(3, False),
                   layers.LSTM(3, False), layers.GRU(3, False), layers.Dense(3)]


@pytest.mark.parametrize("layer", SEQUENCE_LAYERS, ids=lambda v: repr(v))
def test_torch_reference_computes_each_sequence_layers_function(layer):
    """nn.RNN (tanh), nn.LSTM and nn.GRU batch-first, and nn.Linear on (batch, time, features),
    loaded with ``torch_weights.to_torch``, equal jaxbp's layers in float64."""
    torch = pytest.importorskip("torch")
    shape = (6, 5)
    module, out_shape = bench_torch._module(torch, layer, shape)
    rng = np.random.default_rng(2)
    params = random_params(layer, shape, rng)
    module = module.to(torch.float64)
    bench_torch.load_params(module, layer, params)
    x = rng.normal(size=(3, *shape))
    want = layer.forward(params, {}, x, layers.Context(train=True))[0]
    got = module(torch.from_numpy(x)).detach().numpy()
    assert want.shape == (3, *out_shape) and got.shape == want.shape
    assert rel_error(got, np.asarray(want)) <= 1e-12


def test_torch_reference_refuses_a_recurrent_layer_with_an_initial_state():
    torch = pytest.importorskip("torch")
    with pytest.raises(ValueError, match="no PyTorch equivalent for LSTM on input shape"):
        bench_torch._module(torch, layers.LSTM(4), ((6, 5), ((4,), (4,))))


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_torch_reference_char_rnn_computes_the_same_function(cell):
    torch = pytest.importorskip("torch")
    net = models.char_rnn(7, cell, hidden=5, embed=3)
    rng = np.random.default_rng(3)
    params = random_params(net, (6,), rng)
    module = bench_torch.to_torch(net, (6,)).to(torch.float64)
    assert isinstance(module[0], torch.nn.Embedding) and isinstance(module[2], torch.nn.Linear)
    assert isinstance(module[1], getattr(torch.nn, cell.upper()))
    assert module[1].batch_first
    bench_torch.load_params(module, net, params)
    ids = rng.integers(0, 7, size=(4, 6))
    got = module(torch.from_numpy(ids)).detach().numpy()
    want = np.asarray(net.forward(params, jnp.asarray(ids)))
    assert got.shape == want.shape == (4, 6, 7)
    assert rel_error(got, want) <= 1e-12


def test_torch_reference_trains_a_char_rnn():
    torch = pytest.importorskip("torch")
    net = models.char_rnn(11, hidden=8, embed=4)
    step, note = bench_torch.train_step(net, (6,), 3, "float32", "adam", 0.01, 0.9)
    assert note.startswith(f"torch {torch.__version__} eager")
    losses_ = [float(step()) for _ in range(20)]
    # The mean over the 3 × 6 positions starts near ln 11 (a sum would be 18 times that) and
    # falls on the step's one fixed batch.
    assert abs(losses_[0] - np.log(11)) < 0.5, losses_[0]
    assert losses_[-1] < losses_[0] - 0.1, losses_


# ------------------------------------------------------------------------ remat


def remat_net():
    """Eleven layers, mixed activations, weight decay: segments of every length occur."""
    stack = [layers.Dense(6), layers.Tanh(), layers.Dense(5), layers.ReLU(), layers.Dense(6),
             layers.Sigmoid(), layers.Dense(4), layers.GELU(), layers.Dense(5), layers.ELU(),
             layers.Dense(3)]
    return Sequential(stack, loss=losses.SoftmaxCrossEntropy(), weight_decay=1e-2)


def test_remat_gradients_equal_autodiff_float64():
    net = remat_net()
    k_p, k_x, k_y = jax.random.split(jax.random.key(3), 3)
    params = net.init(k_p, (4,), jnp.float64)
    x = jax.random.normal(k_x, (7, 4), jnp.float64)
    y = jax.random.randint(k_y, (7,), 0, 3)
    ks = (1, 2, 3, 5, 11, 20)

    @jax.jit
    def all_grads(params, x, y):
        auto = jax.value_and_grad(net.loss)(params, x, y)
        return auto, [net.manual_value_and_grad(params, x, y, remat_every=k) for k in ks]

    (J, auto), remat = all_grads(params, x, y)
    for k, (J_k, g_k) in zip(ks, remat, strict=True):
        assert abs(float(J_k - J)) <= 1e-12 * abs(float(J)), k
        assert max_tree_rel_error(g_k, auto) <= 1e-10, k


def test_remat_halves_xla_temporary_memory():
    # A 12-hidden-layer MLP: every layer's input is stored without remat, every 4th with it.
    net = models.mlp(hidden=(256,) * 12)
    params = net.init(jax.random.key(0), (256,), jnp.float32)
    x, y = jnp.ones((128, 256), jnp.float32), jnp.zeros((128,), jnp.int32)

    def temp(k):
        fn = jax.jit(lambda p, x, y: net.manual_value_and_grad(p, x, y, remat_every=k))
        return fn.lower(params, x, y).compile().memory_analysis().temp_size_in_bytes

    plain, remat = temp(None), temp(4)
    assert 2 * remat <= plain, (remat, plain)


@pytest.mark.parametrize("k", [0, -2, 2.5, True])
def test_remat_every_must_be_a_positive_int(k):
    net = models.mlp(hidden=(3,))
    params = net.init(jax.random.key(0), (2,), jnp.float32)
    with pytest.raises(ValueError, match="remat_every must be a positive int or None"):
        net.manual_backward(params, jnp.ones((2, 2)), jnp.zeros(2, int), remat_every=k)


# -------------------------------------------------------------------------- gpt

GPT = dict(V=80, T=64, C=128, L=4)  # bench.MODELS["gpt"]: vocabulary, length, width, blocks


def abstract_gpt(batch):
    """The bench's gpt, its params and data as shapes only: tracing needs no arrays."""
    spec = bench.MODELS["gpt"]
    net = spec.build()
    params = jax.eval_shape(lambda: net.init(jax.random.key(0), spec.input_shape, jnp.float32))
    ids = jax.ShapeDtypeStruct((batch, *spec.input_shape), jnp.int32)
    return spec, net, params, ids


def test_gpt_data_are_ids_and_labels_per_position():
    spec, net, params, _ = abstract_gpt(1)
    V, T = GPT["V"], GPT["T"]
    assert (spec.input_shape, spec.batch, spec.vocab, spec.classes) == ((T,), 32, V, V)
    assert not spec.remat and not spec.scans_time
    x, y = bench._data(spec, 3, jnp.float32, jax.random.key(0))
    assert x.shape == y.shape == (3, T)
    for a in (x, y):
        assert jnp.issubdtype(a.dtype, jnp.integer) and 0 <= int(a.min()) and int(a.max()) < V
    assert [layer.name for layer in net.layers] == [
        "Embedding", "PositionEmbedding", *["TransformerBlock"] * 4, "LayerNorm", "Dense"]
    assert net.output_shape((T,)) == (T, V)
    assert sum(math.prod(p.shape) for p in jax.tree.leaves(params)) == 822_016
    assert bench._matmuls(net, params) is None  # no matmuls row


def gpt_matmul_flops(batch, V, T, C, L):
    """One step's matmul FLOPs: 6 per weight that multiplies and token (forward, dx, dW), plus
    attention's q kᵀ and P v over all T² pairs, forward and twice in the backward."""
    weights = L * (3 * C * C + C * C + 2 * 4 * C * C) + C * V  # qkv, proj, MLP; the head
    return 6 * weights * batch * T + 12 * L * T * T * C * batch


def test_gpt_flops_are_the_analytic_count():
    # The program has no loop, so the bench takes XLA's count: it holds attention's batched
    # products, the analytic count exactly as the jaxpr's matmuls, and a little element-wise work.
    batch = 2
    _, net, params, ids = abstract_gpt(batch)
    want = gpt_matmul_flops(batch, **GPT)
    autodiff = jax.value_and_grad(net.loss)
    for grad in (autodiff, net.manual_value_and_grad):
        jaxpr = jax.make_jaxpr(grad)(params, ids, ids).jaxpr
        assert not bench._loops(jaxpr) and bench._matmul_flops(jaxpr) == want
    xla = bench._flops(bench._compile(net.manual_value_and_grad, params, ids, ids)[0])
    assert want <= xla < 1.05 * want, xla / want


def small_gpt(num_layers=2):
    return models.gpt(11, context=8, d_model=16, num_heads=2, num_layers=num_layers)


def test_run_bench_gives_a_gpt_the_rows_of_a_sequence_model(monkeypatch):
    # The bench's gpt, made small: the rows of char-lstm, XLA's FLOPs, tokens per step, and
    # the manual gradient's error against autodiff.
    spec = bench.ModelSpec(lambda: small_gpt(1), (8,), 2, classes=11, vocab=11, remat=False)
    monkeypatch.setitem(bench.MODELS, "gpt", spec)
    (model,) = bench.run_bench(["gpt"], torch_reference=False, **TINY)["models"]
    rows = {row["variant"]: row for row in model["rows"]}
    assert list(rows) == ["manual", "autodiff", "train", "scan", "matmul 64²"]
    assert model["flops_count"] == "xla" and model["compile_s_by_length"] == {}
    assert model["batch"] == 8 and model["tokens_per_step"] == 8 * 8
    want = gpt_matmul_flops(8, V=11, T=8, C=16, L=1)
    assert want <= rows["manual"]["flops"] < 1.3 * want  # (small C: more element-wise work)
    for row in rows.values():
        assert set(row) == ROW_KEYS and row["time_s"] > 0
    assert model["grad_reference"] == "float32" and set(model["grad_rel_error"]) == {"manual"}
    assert model["grad_rel_error"]["manual"] < 1e-5


def test_torch_reference_gpt_computes_the_same_function():
    """nn.Embedding, learned positions, pre-LN blocks of nanoGPT's attention (fused c_attn,
    scaled_dot_product_attention) and a tanh-GELU MLP, LayerNorm, a Linear head without bias:
    jaxbp's gpt in float64, its params copied by ``load_params``."""
    torch = pytest.importorskip("torch")
    net = small_gpt()
    rng = np.random.default_rng(4)
    params = random_params(net, (8,), rng)
    module = bench_torch.to_torch(net, (8,)).to(torch.float64)
    embedding, positions, block, *_, norm, head = module
    assert isinstance(embedding, torch.nn.Embedding) and positions.P.shape == (8, 16)
    attention = block[0].body[1]
    assert isinstance(block[0].body[0], torch.nn.LayerNorm)
    assert (attention.c_attn.in_features, attention.c_attn.out_features) == (16, 48)
    assert block[1].body[2].approximate == "tanh"
    assert isinstance(norm, torch.nn.LayerNorm) and head.bias is None
    bench_torch.load_params(module, net, params)
    ids = rng.integers(0, 11, size=(3, 7))  # (7 < context 8: the first 7 positions)
    got = module(torch.from_numpy(ids)).detach().numpy()
    want = np.asarray(net.forward(params, jnp.asarray(ids)))
    assert got.shape == want.shape == (3, 7, 11)
    assert rel_error(got, want) <= 1e-12


def test_torch_reference_trains_a_gpt():
    torch = pytest.importorskip("torch")
    step, note = bench_torch.train_step(small_gpt(), (8,), 3, "float32", "adam", 0.01, 0.9)
    assert note.startswith(f"torch {torch.__version__} eager")
    losses_ = [float(step()) for _ in range(20)]
    assert abs(losses_[0] - np.log(11)) < 0.5, losses_[0]  # the mean over 3 × 8 positions
    assert losses_[-1] < losses_[0] - 0.1, losses_


def test_torch_reference_refuses_attention_with_a_padding_mask():
    torch = pytest.importorskip("torch")
    with pytest.raises(ValueError, match="no PyTorch equivalent for MultiHeadAttention on input"):
        bench_torch._module(torch, layers.MultiHeadAttention(2), ((6, 4), (6,)))


# -------------------------------------------------------------- attention sweep

SWEEP = dict(lengths=(128, 256), batch=2, heads=2, head_dim=8, block_size=32, rounds=2,
             round_seconds=0.0)


@pytest.fixture(scope="module")
def sweep_result():
    with jax.enable_x64(False):
        return bench_attention.sweep(**SWEEP)


def test_sweep_returns_every_figure(sweep_result):
    r = sweep_result
    assert (r["batch"], r["heads"], r["head_dim"], r["block_size"]) == (2, 2, 8, 32)
    assert r["dtype"] == "float32" and r["variants"] == ["standard", "lean", "autodiff"]
    assert [row["T"] for row in r["rows"]] == [128, 256]
    for row in r["rows"]:
        assert set(row) == {"T", "scores_bytes", "temp_bytes", "compile_s", "time_s", "spread",
                            "memory_ratio", "time_ratio", "time_ratio_iqr", "grad_rel_error"}
        assert row["scores_bytes"] == 2 * 2 * row["T"] ** 2 * 4
        for key in ("temp_bytes", "compile_s", "time_s", "spread"):
            assert set(row[key]) == set(r["variants"]), key
        assert all(isinstance(b, int) and b > 0 for b in row["temp_bytes"].values())
        assert all(t > 0 for t in row["time_s"].values())
        assert row["memory_ratio"] == row["temp_bytes"]["lean"] / row["temp_bytes"]["autodiff"]
        q1, q3 = row["time_ratio_iqr"]
        assert q1 <= row["time_ratio"] <= q3
        assert set(row["grad_rel_error"]) == {"standard", "lean"}
        assert max(row["grad_rel_error"].values()) < 1e-5
    json.dumps(r)


def test_sweep_lean_memory_grows_linearly_standard_quadratically(sweep_result):
    # XLA's compiled memory analysis, no timing: lean holds (T, block_size) blocks, the
    # others (T, T) matrices. Doubling T: lean about 2×, standard and autodiff about 4×.
    short, long = (row["temp_bytes"] for row in sweep_result["rows"])
    assert long["lean"] < 3 * short["lean"], (short, long)
    for variant in ("standard", "autodiff"):
        assert long[variant] > 3 * short[variant], (variant, short, long)
        assert long["lean"] < long[variant] / 4, (variant, long)


def test_sweep_table_has_a_row_per_length(sweep_result):
    lines = bench_attention.format_table(sweep_result).splitlines()
    assert lines[0].startswith("device ") and "lean block_size 32" in lines[0]
    head = _cells(lines[1])
    assert head == ["T", "S MiB", "standard MiB", "lean MiB", "autodiff MiB", "standard ms",
                    "lean ms", "autodiff ms", "lean/auto MiB", "lean/auto ms", "IQR"]
    for line, row in zip(lines[2:4], sweep_result["rows"], strict=True):
        cells = dict(zip(head, _cells(line), strict=True))
        assert cells["T"] == str(row["T"])
        assert cells["lean MiB"] == f"{row['temp_bytes']['lean'] / 2**20:.2f}"
        assert cells["lean/auto ms"] == f"{row['time_ratio']:.3f}"
    assert lines[-1].startswith("grad err vs autodiff")


@pytest.mark.parametrize(("option", "message"), [
    (dict(lengths=(16, 0)), "lengths[1] must be a positive int; got 0"),
    (dict(heads=0), "heads must be a positive int; got 0"),
    (dict(head_dim=2.5), "head_dim must be a positive int; got 2.5"),
    (dict(block_size=-1), "block_size must be a positive int; got -1"),
    (dict(batch=0), "batch must be a positive int; got 0"),
    (dict(rounds=0), "rounds must be a positive int; got 0"),
    (dict(round_seconds=-1), "round_seconds must be a finite number >= 0; got -1"),
    (dict(dtype="int32"), "dtype must be one of float32, float64, bfloat16, float16"),
])
def test_sweep_rejects_bad_options_before_compiling(no_compiling, option, message):
    with pytest.raises(ValueError, match=re.escape(f"bench: {message}")):
        bench_attention.sweep(**option)


def test_cli_attention_sweep_passes_its_options_and_writes_json(
        sweep_result, monkeypatch, tmp_path, capsys):
    calls = []

    def sweep(**options):  # (the sweep itself is timed above)
        calls.append(options)
        return sweep_result

    monkeypatch.setattr(bench_attention, "sweep", sweep)
    path = tmp_path / "sweep.json"
    assert cli.main(["bench", "--attention-sweep", "--lengths", "128,256", "--batch", "2",
                     "--rounds", "3", "--round-seconds", "0", "--json", str(path)]) == 0
    assert json.loads(path.read_text()) == json.loads(json.dumps(sweep_result))
    out = capsys.readouterr().out
    assert out == bench_attention.format_table(sweep_result) + "\n"
    # Options left out are the sweep's own defaults (lengths 128…2048, batch 4, 11 rounds).
    assert cli.main(["bench", "--attention-sweep"]) == 0
    assert calls == [dict(lengths=(128, 256), batch=2, rounds=3, round_seconds=0.0,
                          dtype="float32"),
                     dict(round_seconds=0.02, dtype="float32")]
