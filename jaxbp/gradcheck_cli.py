"""``jaxbp gradcheck``: check a network's or one layer's manual backward and print the report.

Exit status 0 when every row passes, 1 when a row fails, 2 when the check cannot
run (bad arguments, or a ``--layer`` that cannot be imported, built or run).

  jaxbp gradcheck                              # the tutorial's 2-2-2 worked example
  jaxbp gradcheck --model mlp --batch 8 --seed 3
  jaxbp gradcheck --model cnn --dtype float32  # float32 notes: finite differences unreliable
  jaxbp gradcheck --layer mylayers:Swish --input-shape 8,16
  jaxbp gradcheck --layer path/to/gated.py:Gated --layer-args '{"units": 4}' --input-shape 16

``--layer MODULE:CLASS`` checks a layer of your own with :func:`jaxbp.check_layer`:
``MODULE`` is a dotted module name, imported with the current directory first on
``sys.path``, or the path of a ``.py`` file; ``CLASS`` is a subclass of
``jaxbp.layers.Layer``, built as ``CLASS(**LAYER_ARGS)`` from the JSON object
``--layer-args`` (default ``{}``: ``CLASS()``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import os
import re
import sys
import traceback
import warnings

import jax
import jax.numpy as jnp

from . import layers, models
from .cli import NON_NEGATIVE_INT, POSITIVE_INT, SEED
from .gradcheck import FLOAT32_WARNING, check_layer, gradcheck


def _mlp_case(key, batch):
    """A 8 → 16 → 16 → 4 ReLU MLP with weight decay and softmax cross-entropy."""
    net = models.mlp(hidden=(16, 16), classes=4, activation=layers.ReLU, weight_decay=1e-3)
    k_init, k_x, k_y = jax.random.split(key, 3)
    x = jax.random.normal(k_x, (batch, 8))
    return net, net.init(k_init, (8,)), x, jax.random.randint(k_y, (batch,), 0, 4)


def _cnn_case(key, batch):
    """``models.cnn`` (4 and 4 filters) on random 8×8×1 images with 3 classes."""
    net = models.cnn((8, 8, 1), classes=3, filters=(4, 4))
    k_init, k_x, k_y = jax.random.split(key, 3)
    x = jax.random.normal(k_x, (batch, 8, 8, 1))
    return net, net.init(k_init, (8, 8, 1)), x, jax.random.randint(k_y, (batch,), 0, 3)


PRESETS = {
    "worked-example": lambda key, batch: models.worked_example(),
    "mlp": _mlp_case,
    "cnn": _cnn_case,
}
DEFAULT_PRESET = "worked-example"
# The fields that size a layer, shown in the presets' descriptions: Dense(16), Conv2D(4, 3×3).
_SIZES = ("units", "filters", "kernel_size", "window")


def _layer_summary(layer) -> str:
    sizes = [getattr(layer, f) for f in _SIZES if hasattr(layer, f)]
    shown = ["×".join(map(str, s)) if isinstance(s, tuple) else str(s) for s in sizes]
    return f"{layer.name}({', '.join(shown)})" if shown else layer.name


def describe(case) -> list[str]:
    """A preset's parts: input shape, then ``→ layer`` each, then loss and weight decay.

    Read from the network ``case`` builds, traced with ``jax.eval_shape``: nothing
    is computed and no device is set up, so every command's parser can afford it.
    """
    built = {}

    def input_of_a_batch_of_one():
        net, _, x, _ = case(jax.random.key(0), 1)
        built["net"] = net
        return x

    x = jax.eval_shape(input_of_a_batch_of_one)
    net = built["net"]
    decay = f", weight decay {net.weight_decay:g}" if net.weight_decay else ""
    return ["×".join(map(str, x.shape[1:])),
            *(f"→ {_layer_summary(layer)}" for layer in net.layers),
            f"· loss {net.loss_fn.name}{decay}"]


def _presets_help(width: int = 78) -> str:
    """The presets, one per entry, wrapped between their parts (never inside one)."""
    indent = max(map(len, PRESETS)) + 4
    lines = ["presets (--model):"]
    for name, case in PRESETS.items():
        line = f"  {name:<{indent - 2}}"
        for i, part in enumerate(describe(case)):
            if i and len(line) + 1 + len(part) > width:
                lines.append(line)
                line = " " * (indent - 1)
            line += (" " if i else "") + part
        lines.append(line)
    return "\n".join(lines)


def _input_shape(text: str) -> tuple[int, ...]:
    """An argparse ``type``: comma-separated positive ints."""
    try:
        shape = tuple(int(s) for s in text.split(","))
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive ints (the input "
                                         f"shape without the batch axis, e.g. 8,16); got {text!r}")
    return shape


def _layer_args(text: str) -> dict:
    """An argparse ``type``: a JSON object (the keyword arguments of the layer's class)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"expected a JSON object of keyword arguments, e.g. "
                                         f"'{{\"units\": 4}}'; got {text!r} ({err})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object of keyword arguments, e.g. "
                                         f"'{{\"units\": 4}}'; got {text!r}, a JSON "
                                         f"{type(value).__name__}")
    return value


def add_arguments(parser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter  # keeps the presets' table
    parser.epilog = _presets_help()
    parser.add_argument(
        "--model",
        choices=list(PRESETS),
        help=f"preset network to check (default {DEFAULT_PRESET}: the tutorial's network with "
        "its exact weights and one sample); the presets are listed below",
    )
    parser.add_argument(
        "--layer", metavar="MODULE:CLASS",
        help="check one layer of your own instead: CLASS from MODULE, a dotted module name "
        "(found from the current directory) or a path/to/file.py; CLASS subclasses "
        "jaxbp.layers.Layer",
    )
    parser.add_argument(
        "--layer-args", metavar="JSON", type=_layer_args,
        help="keyword arguments for --layer's CLASS, a JSON object such as '{\"units\": 4}' "
        "(default {}: CLASS())",
    )
    parser.add_argument(
        "--input-shape", metavar="SHAPE", type=_input_shape,
        help="--layer's input shape without the batch axis, comma-separated positive ints "
        "(e.g. 8,16); required with --layer",
    )
    parser.add_argument(
        "--dtype", choices=["float64", "float32"], default="float64",
        help="precision of the check (default float64, with jax_enable_x64 on for the check "
        "only); float32 checks the precision training uses, where finite differences are "
        "unreliable (the report notes it)",
    )
    parser.add_argument("--seed", type=SEED, default=0,
                        help="seeds params, data and FD coordinates (default 0)")
    parser.add_argument(
        "--batch", type=POSITIVE_INT, default=4,
        help="batch size (default 4; the worked example has one sample)",
    )
    parser.add_argument(
        "--fd-coords",
        type=NON_NEGATIVE_INT,
        default=32,
        help="finite-difference coordinates per large leaf (default 32; 0: none)",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def _usage(problem: str) -> int:
    print(f"error: gradcheck: {problem}", file=sys.stderr)
    return 2


def run(args) -> int:
    if args.layer is None:
        for option in ("--input-shape", "--layer-args"):
            if getattr(args, option[2:].replace("-", "_")) is not None:
                return _usage(f"{option} applies to --layer (a layer of your own); got it "
                              f"without --layer")
        report = _check_preset(args)
    else:
        if args.model is not None:
            return _usage(f"give --model or --layer, not both; got --model {args.model} and "
                          f"--layer {args.layer}")
        if args.input_shape is None:
            return _usage(f"--layer {args.layer} needs --input-shape, the layer's input shape "
                          f"without the batch axis (e.g. --input-shape 8,16)")
        try:
            report = _check_layer(args)
        except ValueError as err:
            return _usage(str(err))
    print(report.to_json(indent=2) if args.json else report)
    return 0 if report.ok else 1


@contextlib.contextmanager
def _float32_noted():
    """The float32 caveat is among the report's notes: no separate warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", re.escape(FLOAT32_WARNING), UserWarning)
        yield


def _check_preset(args):
    # Build the case at the checked precision so that float64 weights are exact.
    with jax.enable_x64(args.dtype == "float64"):
        case = PRESETS[args.model or DEFAULT_PRESET]
        net, params, x, y = case(jax.random.key(args.seed), args.batch)
        x = x.astype(jnp.dtype(args.dtype))
    with _float32_noted():
        return gradcheck(
            net, params, x, y, dtype=args.dtype, fd_max_coords=args.fd_coords, seed=args.seed
        )


def _check_layer(args):
    """``check_layer`` of the ``--layer`` class; ``ValueError`` says why it cannot run."""
    layer = load_layer(args.layer, args.layer_args or {})
    shape = ",".join(map(str, args.input_shape))
    try:
        with _float32_noted():
            return check_layer(layer, args.input_shape, batch=args.batch, seed=args.seed,
                               dtype=args.dtype, fd_max_coords=args.fd_coords)
    except ValueError as err:  # the layer refuses the input (its check)
        raise ValueError(f"--layer {args.layer} with --input-shape {shape}: {err}") from None
    except Exception as err:  # its own code fails: say where, without a traceback
        source = sys.modules.get(type(layer).__module__)
        raise ValueError(f"--layer {args.layer} with --input-shape {shape}: {layer.name} "
                         f"raised {_where(err, getattr(source, '__file__', None))}") from None


def load_layer(spec: str, kwargs: dict):
    """The layer ``--layer spec`` names (``MODULE:CLASS``), built as ``CLASS(**kwargs)``.

    Raises ``ValueError`` for a module that cannot be found or imported, a missing
    class (listing the module's layer classes), something that is not a jaxbp layer
    class, or a constructor that fails (with its error).
    """
    source, colon, name = spec.rpartition(":")
    if not colon or not source or not name.isidentifier():
        raise ValueError(f"--layer must be MODULE:CLASS or path/to/file.py:CLASS; got {spec!r}")
    module = _import(source)
    cls = getattr(module, name, None)
    available = _layer_classes(module)
    listing = (f"its jaxbp layers: {', '.join(available)}" if available
               else "it defines no jaxbp layer (a subclass of jaxbp.layers.Layer)")
    if cls is None:
        raise ValueError(f"--layer {spec}: {source} has no {name!r}; {listing}")
    if not (isinstance(cls, type) and issubclass(cls, layers.Layer)):
        what = "a class" if isinstance(cls, type) else f"a {type(cls).__name__}"
        raise ValueError(f"--layer {spec}: {name} is {what}, not a jaxbp layer (a subclass of "
                         f"jaxbp.layers.Layer); {listing}")
    call = f"{name}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"
    try:
        return cls(**kwargs)
    except Exception as err:
        hint = "" if kwargs else "; pass its arguments as --layer-args '{\"name\": value, ...}'"
        raise ValueError(f"--layer {spec}: {call} failed: {type(err).__name__}: {err}"
                         f"{hint}") from None


def _layer_classes(module) -> list[str]:
    """The names of the layer classes ``module`` defines (not those it imports)."""
    return sorted(n for n, v in vars(module).items()
                  if isinstance(v, type) and issubclass(v, layers.Layer)
                  and v.__module__ == module.__name__)


@contextlib.contextmanager
def _first_on_path(directory: str):
    """``directory`` first on ``sys.path`` for an import, as ``python`` puts a script's."""
    sys.path.insert(0, directory)
    try:
        yield
    finally:
        sys.path.remove(directory)


def _import(source: str):
    """The module ``source`` names: a dotted name, or the path of a ``.py`` file."""
    if source.endswith(".py") or "/" in source or os.sep in source:
        return _load_file(source)
    cwd = os.getcwd()
    try:
        with _first_on_path(cwd):
            return importlib.import_module(source)
    except ModuleNotFoundError as err:
        if err.name is not None and f"{source}.".startswith(f"{err.name}."):
            raise ValueError(f"--layer: no module named {err.name!r} in the current directory "
                             f"{cwd} or on sys.path; give an importable module or a "
                             f"path/to/file.py") from None
        raise ValueError(f"--layer: importing {source} failed: {_where(err)}") from None
    except Exception as err:
        raise ValueError(f"--layer: importing {source} failed: {_where(err)}") from None


def _load_file(path: str):
    """The module that ``path`` (a ``.py`` file) defines, run with its directory on sys.path."""
    if not path.endswith(".py"):
        raise ValueError(f"--layer: expected a module name or a path/to/file.py; got {path!r}")
    if not os.path.isfile(path):
        problem = "is a directory" if os.path.isdir(path) else "does not exist"
        raise ValueError(f"--layer: {path} {problem}; expected a .py file")
    name = os.path.basename(path)[:-3]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    before = sys.modules.get(name)
    sys.modules[name] = module  # dataclasses look the class's module up there
    try:
        with _first_on_path(os.path.dirname(os.path.abspath(path))):
            spec.loader.exec_module(module)
    except Exception as err:
        raise ValueError(f"--layer: importing {path} failed: {_where(err)}") from None
    finally:  # leave sys.modules as it was
        if before is None:
            del sys.modules[name]
        else:
            sys.modules[name] = before
    return module


def _where(err: BaseException, path: str | None = None) -> str:
    """``Type at file:line in function: message``, at the deepest frame of ``err``'s
    traceback in ``path`` (else the deepest one outside Python's import machinery)."""
    frames = [f for f in traceback.extract_tb(err.__traceback__)
              if (not f.filename.startswith("<") if path is None
                  else os.path.abspath(f.filename) == os.path.abspath(path))]
    if not frames and path is not None:
        return _where(err)
    at = f" at {frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name}" if frames else ""
    return f"{type(err).__name__}{at}" + (f": {err}" if str(err) else "")
