"""Fault injection: ``jaxbp train`` killed with SIGKILL at random points.

Every kill leaves a checkpoint that loads (or none yet), holds only finite
values and never goes back an epoch; the run resumed after each kill ends with
exactly the arrays and history of an uninterrupted run, and the temporary files
of saves cut short are gone.

The runs are forked from a server that has already imported JAX and jaxbp
(``multiprocessing``'s forkserver), so that a run costs its training, not a
Python start. ``JAXBP_SLOW=1`` runs the longer variant.
"""

import functools
import multiprocessing
import os
import signal
import threading
import time

import jax
import numpy as np
import pytest
import safetensors.numpy
import tqdm.auto

from jaxbp import checkpoint, data, train, train_cli

ARGS = ["train", "--dataset", "xor", "--hidden", "8", "--batch-size", "64", "--lr", "0.01",
        "--skip-gradcheck"]
PRELOAD = ["jax", "optax", "numpy", "sklearn.model_selection", "tqdm.auto", "jaxbp.cli",
           "jaxbp.train_cli", "jaxbp.train", "jaxbp.checkpoint", "jaxbp.gradcheck_cli",
           "jaxbp.bench", "tests.test_faults"]


def _train(directory: str, epochs: int, resume: bool, cache: str) -> None:
    """A forked ``jaxbp train`` run into ``directory``; its output goes to ``directory``.log."""
    log = os.open(directory + ".log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    jax.config.update("jax_compilation_cache_dir", cache)  # compiled once for all runs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    # A thread lock for the progress bar: its default, a multiprocessing lock, is a named
    # semaphore that a killed process would leak.
    tqdm.auto.tqdm.set_lock(threading.RLock())
    from jaxbp import cli

    os._exit(cli.main([*ARGS, "--epochs", str(epochs), "--checkpoint-dir", directory,
                       *(["--resume"] if resume else [])]))


def _temporaries(directory: str) -> set:
    return {n for n in os.listdir(directory) if n.endswith(".tmp")} if os.path.isdir(
        directory) else set()


def _mtime(path: str):
    try:
        return os.stat(path).st_mtime_ns
    except FileNotFoundError:
        return None


class _Chain:
    """One checkpoint directory: runs started, killed at a random point and resumed."""

    def __init__(self, ctx, directory, epochs, cache, rng, kills):
        self.ctx, self.directory, self.cache, self.rng = ctx, directory, cache, rng
        self.epochs = epochs
        self.path = os.path.join(directory, checkpoint.FILENAME)
        self.kills_left, self.seen_epochs, self.outcomes = kills, [], []
        self.proc = None

    def start(self):
        resume = os.path.exists(self.path)
        self.proc = self.ctx.Process(target=_train,
                                     args=(self.directory, self.epochs, resume, self.cache))
        self.proc.start()
        self.started, self.seen = time.monotonic(), _mtime(self.path)
        self.temporaries = _temporaries(self.directory)
        # Most kills land a random moment after the run's next save, some during start-up.
        self.after_save = self.rng.random() < 0.8
        self.delay = self.rng.uniform(0, 0.03) if self.after_save else self.rng.uniform(0, 1.5)
        self.saved_at = None

    def poll(self) -> bool:
        """Advance; True once the chain's last run has finished by itself."""
        if self.proc is None:
            self.start()
        if not self.proc.is_alive():  # trained to the end before its kill came
            self.proc.join()
            assert self.proc.exitcode == 0, open(self.directory + ".log").read()[-3000:]
            return True
        if not self.kills_left:
            return False
        now = time.monotonic()
        if not self.after_save:
            due = self.started + self.delay
        else:
            if self.saved_at is None and _mtime(self.path) != self.seen:
                self.saved_at = now
            due = None if self.saved_at is None else self.saved_at + self.delay
        if due is not None and now >= due:
            self.proc.kill()
            self.proc.join()
            if self.proc.exitcode == 0:  # finished just before
                return True
            assert self.proc.exitcode == -signal.SIGKILL
            self.kills_left -= 1
            self.outcomes.append(self._check())
            self.proc = None
        return False

    def _check(self) -> str:
        """The checkpoint after a kill: absent, or loadable, finite and no older than before."""
        if not os.path.exists(self.path):
            return "before the first save"
        cut_short = _temporaries(self.directory) - self.temporaries  # by this kill
        state, meta = checkpoint.restore(self.path, like=_template())
        assert all(np.isfinite(a).all() for a in jax.tree.leaves((state.params, state.opt_state)))
        assert meta["history"]["epoch"] == list(range(1, state.epoch + 1))
        assert not self.seen_epochs or state.epoch >= self.seen_epochs[-1]
        self.seen_epochs.append(state.epoch)
        return "during a save" if cut_short else "between saves"


@functools.cache
def _template():
    """The state a run of ``ARGS`` trains, to restore its checkpoints into."""
    ds = data.load("xor")
    config = {"model": "mlp", "hidden": [8], "weight_decay": 1e-3}  # the default
    net = train_cli.build_model(config, ds)
    opt = train.optimizer("adam", 0.01)
    return train.init_state(net, opt, jax.random.key(0), ds.input_shape, "float32")


def _contents(path):
    tensors = safetensors.numpy.load_file(path)
    meta = checkpoint.read_metadata(path)
    meta["history"].pop("time")  # wall-clock: the one thing allowed to differ
    return tensors, meta


def _kill_and_resume(tmp_path, chains: int, kills: int, epochs: int):
    """Train ``chains`` runs of ``epochs`` epochs, each killed ``kills`` times and resumed,
    and one uninterrupted run; return how many kills found the checkpoint in which state."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    cache = str(tmp_path / "jit-cache")
    rng = np.random.default_rng(0)
    _template()  # compiled before the runs start
    runs = [_Chain(ctx, str(tmp_path / "reference"), epochs, cache, rng, 0)]  # never killed
    runs += [_Chain(ctx, str(tmp_path / f"chain{i}"), epochs, cache, rng, kills)
             for i in range(chains)]
    done = set()
    deadline = time.monotonic() + 600
    try:
        while len(done) < len(runs):
            assert time.monotonic() < deadline, [r.outcomes for r in runs]
            for i, run in enumerate(runs):
                if i not in done and run.poll():
                    done.add(i)
            time.sleep(0.002)
    finally:
        for run in runs:
            if run.proc is not None and run.proc.is_alive():
                run.proc.kill()
                run.proc.join()
    want_tensors, want_meta = _contents(str(tmp_path / "reference" / checkpoint.FILENAME))
    for run in runs[1:]:
        assert os.listdir(run.directory) == [checkpoint.FILENAME]  # stale temporaries removed
        tensors, meta = _contents(run.path)
        assert meta == want_meta and meta["epoch"] == epochs
        assert tensors.keys() == want_tensors.keys()
        for k, v in tensors.items():
            np.testing.assert_array_equal(v, want_tensors[k], err_msg=k)
    outcomes = [o for run in runs for o in run.outcomes]
    return {o: outcomes.count(o) for o in sorted(set(outcomes))}


def test_sigkill_at_random_points_never_costs_a_checkpoint(tmp_path):
    counts = _kill_and_resume(tmp_path, chains=4, kills=6, epochs=100)
    print("kills:", counts)
    assert sum(counts.values()) >= 20


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("JAXBP_SLOW") != "1", reason="set JAXBP_SLOW=1 to run")
def test_many_sigkills(tmp_path):
    counts = _kill_and_resume(tmp_path, chains=4, kills=40, epochs=600)
    print("kills:", counts)
    assert sum(counts.values()) >= 120
