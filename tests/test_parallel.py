"""Data parallelism on 4 simulated CPU devices, checked in a subprocess against one device."""

import textwrap

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from jaxbp import parallel
from tests.helpers import run_on_cpu_devices

_SCRIPT = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp, numpy as np, optax
    from jax.sharding import NamedSharding, PartitionSpec
    from jaxbp import data, models, parallel, train

    assert len(jax.devices()) == 4
    ds = data.load("digits")
    net = models.mlp(hidden=(32,), classes=10)
    opt = optax.sgd(0.1, momentum=0.9)
    fresh = train.init_state(net, opt, jax.random.key(0), ds.input_shape, jnp.float32)

    def rel(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))

    runs = {}
    for devices, fused in [(1, True), (None, True), (4, False)]:
        state, h = train.fit(net, opt, fresh, ds, epochs=2, batch_size=64, devices=devices,
                             fused=fused)
        runs[(devices, fused)] = (state, h)
    one, one_h = runs[(1, True)]
    out = {"device": [runs[k][1]["device"] for k in runs]}
    for name, k in [("auto_fused", (None, True)), ("looped", (4, False))]:
        state, h = runs[k]
        out[name + "_params"] = max(
            rel(a, b) for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(one.params)))
        out[name + "_loss"] = rel(h["train_loss"], one_h["train_loss"])
        out[name + "_sharding"] = list(state.params[0]["W"].sharding.spec)

    mesh = parallel.data_mesh(4)
    x, y = parallel.shard_batch((ds.x_train[:64], ds.y_train[:64]), mesh)
    out["batch_spec"] = list(x.sharding.spec)
    out["shards"] = [list(s.data.shape) for s in x.addressable_shards]
    out["shard_devices"] = len({s.device for s in x.addressable_shards})
    step = train.make_train_step(net, opt)
    params = parallel.replicate(fresh.params, mesh)
    hlo = step.lower(params, opt.init(params), (x, y)).compile().as_text()
    out["all_reduce"] = "all-reduce" in hlo
    print("RESULT " + json.dumps(out))
""")


@pytest.fixture(scope="module")
def four_devices():
    return run_on_cpu_devices(_SCRIPT)


def test_data_parallel_training_matches_one_device(four_devices):
    assert four_devices["device"] == ["1 × cpu", "4 × cpu", "4 × cpu"]
    for name in ("auto_fused", "looped"):
        assert four_devices[name + "_params"] <= 1e-5, name
        assert four_devices[name + "_loss"] <= 1e-5, name
        assert four_devices[name + "_sharding"] == []  # params replicated


def test_batch_is_split_over_the_data_axis(four_devices):
    assert four_devices["batch_spec"] == ["data"]
    assert four_devices["shards"] == [[16, 64]] * 4 and four_devices["shard_devices"] == 4
    assert four_devices["all_reduce"]  # gradients are summed across the shards


def test_single_device_needs_no_mesh():
    assert parallel.data_mesh(1) is None and parallel.data_mesh() is None
    assert parallel.data_mesh(np.int64(1)) is None
    with pytest.raises(ValueError, match=r"devices must be an int in \[1, 1\] .*got 4"):
        parallel.data_mesh(4)


def test_shard_batch_needs_a_leading_batch_axis():
    mesh = Mesh(np.array(jax.devices()[:1]), (parallel.AXIS,))
    for m in (mesh, None):
        with pytest.raises(ValueError, match=r"parallel.shard_batch: every array needs a leading "
                           r"batch axis to split; got a float32 scalar \(shape \(\)\)"):
            parallel.shard_batch((np.ones(4), np.float32(1)), m)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"coordinator": "localhost"}, r"coordinator must be 'HOST:PORT' with a port in \[1, 65535\]; "
                                   r"got 'localhost'"),
    ({"coordinator": "h:0"}, r"coordinator must be 'HOST:PORT'.*got 'h:0'"),
    ({"num_processes": 0}, r"num_processes must be a positive int; got 0"),
    ({"num_processes": 2, "process_id": 2}, r"process_id must be an int in \[0, 2\); got 2"),
    ({"process_id": -1}, r"process_id must be an int in \[0, num_processes\); got -1"),
])
def test_initialize_checks_its_arguments_before_jax(kwargs, message):
    with pytest.raises(ValueError, match=r"parallel.initialize: " + message):
        parallel.initialize(**kwargs)


def test_one_process_agrees_with_itself():
    assert parallel.agree("start") is None
    assert parallel.agree("start", "a problem") is None  # nobody to tell
