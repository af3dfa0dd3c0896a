"""The ``jaxbp`` command line.

Each command lives in its own module, which provides ``add_arguments(parser)``
and ``run(args) -> int`` (the exit status). Ctrl-C ends a command with exit
status 130 and one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys

import numpy as np

from .parallel import is_host_port

# command name -> (module, one-line help)
COMMANDS = {
    "gradcheck": ("jaxbp.gradcheck_cli", "check a network's manual backward against autodiff"),
    "train": ("jaxbp.train_cli", "check the manual gradients, then train on a real dataset"),
    "sample": ("jaxbp.sample_cli", "generate text from a character model's checkpoint"),
    "bench": ("jaxbp.bench", "time the manual backward against autodiff and the matmul peak"),
}


def number(convert, minimum, expected: str, *, strict: bool = False, maximum=math.inf):
    """An argparse ``type``: ``convert(text)``, ≥ ``minimum`` (> if ``strict``), < ``maximum``.

    Anything else is argparse's ``error: argument --flag: expected …; got '…'``
    (exit status 2), before the command does any work.
    """

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not (value > minimum if strict else value >= minimum) \
                or not value < maximum:
            raise argparse.ArgumentTypeError(f"expected {expected}; got {text!r}")
        return value

    return parse


POSITIVE_INT = number(int, 1, "a positive int")
NON_NEGATIVE_INT = number(int, 0, "an int ≥ 0")
SEED = number(int, 0, "an int in [0, 2**32)", maximum=2**32)


def host_port(text: str) -> str:
    """An argparse ``type``: ``HOST:PORT`` with a port in [1, 65535] (an IPv6 host in brackets)."""
    if not is_host_port(text):
        raise argparse.ArgumentTypeError(f"expected HOST:PORT with a port in [1, 65535]; "
                                         f"got {text!r}")
    return text


def _as_float32(text: str) -> float:
    """``text`` rounded to float32, as training uses it (1e300 becomes inf, 1e-50 zero)."""
    with np.errstate(over="ignore", under="ignore"):
        return float(np.float32(float(text)))


# Rates and factors are float32 in training: they must survive the rounding.
POSITIVE_FLOAT = number(_as_float32, 0, "a number > 0 that float32 can hold", strict=True)
NON_NEGATIVE_FLOAT = number(_as_float32, 0, "a number ≥ 0 that float32 can hold")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="jaxbp",
        description="Forward and hand-written backward propagation in JAX, verified "
        "against autodiff.",
    )
    parser.add_argument("--version", action="version", version=f"jaxbp {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        mod = importlib.import_module(module)
        mod.add_arguments(cmd)
        cmd.set_defaults(_run=mod.run)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    import jax

    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:  # Ctrl-C outside training (which says where it stopped)
        print(f"jaxbp {args.command}: interrupted", file=sys.stderr)
        return 130
    except jax.errors.JaxRuntimeError as err:
        if "RESOURCE_EXHAUSTED" not in str(err):
            raise
        first = str(err).strip().splitlines()[0]
        print(f"jaxbp {args.command}: error: out of device memory ({first}); try a smaller "
              "model or batch", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
