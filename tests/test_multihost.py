"""Training as 2 processes of one JAX job on 127.0.0.1 (CPU, Gloo), against one process.

Every run is bounded by a timeout, and the coordinator listens on loopback only.
"""

import json
import os
import re
import subprocess
import sys
import textwrap

import jax
import numpy as np
import optax
import pytest

from jaxbp import cli, data, models, train, train_cli
from tests.helpers import result, run_on_cpu_devices, run_processes

# Run with "COORDINATOR PROCESS_ID" as a process of a 2-process job, alone without; with 2
# simulated CPU devices per process the job sees 4, as one process with 4 devices.
_SCRIPT = textwrap.dedent("""
    import json, sys
    from jaxbp import parallel
    if len(sys.argv) > 1:
        parallel.initialize(sys.argv[1], 2, int(sys.argv[2]))
    import jax, jax.numpy as jnp, numpy as np, optax
    from jaxbp import data, models, train

    x, y = data.xor(n=160)  # split by hand: data.load would import scikit-learn, slowly
    x = x.astype(np.float32)
    ds = data.Dataset(x[:128], y[:128], x[128:], y[128:], 2, "xor")
    net = models.mlp(hidden=(8,), classes=ds.classes)
    opt = optax.sgd(0.1, momentum=0.9)
    fresh = train.init_state(net, opt, jax.random.key(0), ds.input_shape, jnp.float32)
    out = {"processes": jax.process_count(), "devices": len(jax.devices())}
    for fused in (True, False):  # data replicated on the devices / batches put per step
        state, h = train.fit(net, opt, fresh, ds, epochs=2, batch_size=16, devices=2,
                             fused=fused)
        out[f"params_{fused}"] = [np.asarray(a).tolist() for a in jax.tree.leaves(state.params)]
        out[f"device_{fused}"] = h["device"]
    out["mesh_2"] = [d.process_index for d in parallel.data_mesh(2).devices.flat]
    out["mesh_all"] = [d.process_index for d in parallel.data_mesh().devices.flat]
    out["refused"], me = {}, jax.process_index()
    for n in (1, 3):
        try:
            parallel.data_mesh(n)
        except ValueError as err:
            out["refused"][n] = str(err)
    checks = [("alike", None, "x"), ("differ", None, f"p{me}"),
              ("stop", "no file" if me == 1 else None, "")]
    for point, problem, same in checks:
        try:
            out[point] = parallel.agree(point, problem, same=same)
        except ValueError as err:
            out[point] = str(err)
    print("RESULT " + json.dumps(out))
""")


def _cli(*args):
    return lambda coordinator, i: [sys.executable, "-m", "jaxbp.cli", "train", *args,
                                   "--coordinator", coordinator, "--num-processes", "2",
                                   "--process-id", str(i)]


@pytest.fixture(scope="module")
def two_processes():
    procs = run_processes(lambda c, i: [sys.executable, "-c", _SCRIPT, c, str(i)], devices=2)
    for proc in procs:
        assert proc.returncode == 0, proc.stderr
    return [result(proc.stdout) for proc in procs]


def test_two_processes_train_like_one_process_with_as_many_devices(two_processes):
    one = run_on_cpu_devices(_SCRIPT, devices=4)
    assert one["processes"] == 1
    for out in two_processes:
        assert out["processes"] == 2 and out["devices"] == 4
        for fused in (True, False):
            assert out[f"device_{fused}"] == "2 × cpu"
            # identical in both processes, and to one process on 2 of its devices
            assert out[f"params_{fused}"] == two_processes[0][f"params_{fused}"]
            assert out[f"params_{fused}"] == one[f"params_{fused}"], fused


def test_the_mesh_takes_devices_from_every_process(two_processes):
    for out in two_processes:
        assert out["mesh_2"] == [0, 1] and out["mesh_all"] == [0, 0, 1, 1]
        for n in ("1", "3"):  # refused alike in every process
            assert out["refused"][n] == (
                "parallel: devices must be spread evenly over the 2 processes, the same "
                f"number from each: one of 2, 4; got {n}"
            )


def test_processes_agree_before_training(two_processes):
    lead, other = two_processes
    assert lead["alike"] is None and other["alike"] is None
    assert lead["differ"] == "process 1 of 2 differs from process 0: p1 there, p0 here"
    assert other["differ"] == "process 0 of 2 differs from process 1: p0 there, p1 here"
    assert lead["stop"] == "process 1 of 2: no file"
    assert other["stop"] is None  # it stops: nothing to wait for


def test_cli_on_two_processes_and_a_checkpoint_missing_on_one_host(tmp_path):
    shared, empty = tmp_path / "shared", tmp_path / "empty"
    common = ("--dataset", "iris", "--hidden", "8", "--batch-size", "16", "--epochs", "1")
    first = run_processes(_cli(*common, "--checkpoint-dir", str(shared)), devices=1)
    assert [p.returncode for p in first] == [0, 0], [p.stderr for p in first]
    lead, other = first
    assert "gradcheck (float64" in lead.stdout and "test accuracy" in lead.stdout
    assert "train: 100%" in lead.stderr  # the progress bar
    # the other process prints nothing of its own (Gloo's C++ log line aside)
    assert [li for li in other.stdout.splitlines() if not li.startswith("[Gloo]")] == []
    assert "train:" not in other.stderr
    saved = (shared / "checkpoint.safetensors").read_bytes()

    empty.mkdir()
    dirs = [shared, empty]  # per-host directories, the checkpoint only on process 0's
    resume = run_processes(
        lambda c, i: _cli(*common[:-1], "2", "--resume", "--skip-gradcheck",
                          "--checkpoint-dir", str(dirs[i]))(c, i),
        devices=1,
    )
    missing = (f"checkpoint {empty / 'checkpoint.safetensors'} does not exist; resuming needs "
               f"the checkpoint on every host (a shared filesystem or a copy)")
    assert [p.returncode for p in resume] == [2, 2]
    assert resume[1].stderr.splitlines() == [f"error: {missing}"]
    assert resume[0].stderr.splitlines() == [f"error: train: process 1 of 2: {missing}"]
    assert (shared / "checkpoint.safetensors").read_bytes() == saved


# jaxbp train with process 0's second checkpoint save failing, as on a full disk.
_FAILING_SAVE = textwrap.dedent("""
    import sys
    from jaxbp import checkpoint, cli
    save = checkpoint.save

    def save_once(path, state, **kwargs):
        if state.epoch == 2:
            raise OSError(28, "No space left on device")
        save(path, state, **kwargs)

    checkpoint.save = save_once
    sys.exit(cli.main(sys.argv[1:]))
""")


def _slurm(coordinator: str, i: int) -> dict:
    """What Slurm sets for task ``i`` of 2 on one node (and the port JAX is to use)."""
    host, port = coordinator.rsplit(":", 1)
    return {"SLURM_JOB_ID": "1", "SLURM_STEP_NODELIST": host, "SLURM_NTASKS": "2",
            "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i), "JAX_COORDINATOR_PORT": port}


def test_a_slurm_job_and_a_checkpoint_write_failure_that_stops_every_process(tmp_path):
    args = ("train", "--dataset", "iris", "--hidden", "8", "--batch-size", "16", "--epochs", "3",
            "--skip-gradcheck", "--checkpoint-dir", str(tmp_path), "--distributed")
    procs = run_processes(lambda c, i: [sys.executable, "-c", _FAILING_SAVE, *args],
                          environ=_slurm)
    failed = (f"train: cannot write the checkpoint {tmp_path / 'checkpoint.safetensors'}: "
              f"[Errno 28] No space left on device")
    assert [p.returncode for p in procs] == [1, 1]
    assert not any("Traceback" in p.stderr for p in procs)
    assert f"error: {failed}" in procs[0].stderr.splitlines()
    assert procs[1].stderr.splitlines()[0] == f"error: process 0 of 2: {failed}"


def test_processes_start_alike_or_not_at_all():
    x, y = data.xor(n=40)
    x = x.astype(np.float32)
    ds = data.Dataset(x[:32], y[:32], x[32:], y[32:], 2, "xor")
    net, opt, config = models.mlp(hidden=(4,), classes=2), optax.sgd(0.1), {"lr": 0.1}
    a, b = (train.init_state(net, opt, jax.random.key(seed), (2,)) for seed in (0, 1))
    start = train_cli._start(config, ds, a)
    assert start == train_cli._start(dict(config), ds, a)
    assert re.fullmatch(r"options \w{12}, data \(32, 2\)\+\(8, 2\) with labels \w{12}, "
                        r"state at epoch 0 step 0 \w{12}", start)
    for other in (train_cli._start({"lr": 0.2}, ds, a), train_cli._start(config, ds, b),
                  train_cli._start(config, ds._replace(y_test=1 - ds.y_test), a)):
        assert other != start


# jax.distributed.initialize() must come first in a process: a fresh one tries the options.
_OPTIONS = textwrap.dedent("""
    import contextlib, io, json, sys
    from jaxbp import cli
    out = []
    for args in json.loads(sys.argv[1]):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            out.append([cli.main(["train", "--dataset", "iris", *args]), err.getvalue()])
    print("RESULT " + json.dumps(out))
""")


def test_several_process_options_are_checked_first():
    cases = {
        ("--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "2"):
            "--process-id must be in [0, 2) for --num-processes 2; got 2",
        ("--distributed",): "no cluster environment JAX detects (Slurm, Open MPI, Kubernetes, "
                            "Cloud TPU) is set up here; pass --coordinator, --num-processes, "
                            "--process-id",
        ("--num-processes", "2"): "no cluster environment JAX detects (Slurm, Open MPI, "
                                  "Kubernetes, Cloud TPU) is set up here; pass --coordinator, "
                                  "--process-id",
    }
    env = {k: v for k, v in os.environ.items()  # without what JAX's cluster detection reads
           if not k.startswith(("SLURM_", "OMPI_", "KUBERNETES_", "JAX_COORDINATOR"))}
    proc = subprocess.run([sys.executable, "-c", _OPTIONS, json.dumps(list(cases))], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert result(proc.stdout) == [[2, f"error: train: {m}\n"] for m in cases.values()]


def test_coordinator_must_be_host_and_port(capsys):
    for bad in ("127.0.0.1", ":80", "host:0", "host:65536", "host:http"):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["train", "--coordinator", bad])
        assert exit_info.value.code == 2
        assert (f"argument --coordinator: expected HOST:PORT with a port in [1, 65535]; "
                f"got '{bad}'") in capsys.readouterr().err
