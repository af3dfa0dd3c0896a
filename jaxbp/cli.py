"""The ``jaxbp`` command line.

Each command lives in its own module, which provides ``add_arguments(parser)``
and ``run(args) -> int`` (the exit status).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command name -> (module, one-line help)
COMMANDS = {
    "gradcheck": ("jaxbp.gradcheck_cli", "check a network's manual backward against autodiff"),
    "train": ("jaxbp.train_cli", "check the manual gradients, then train on a real dataset"),
    "bench": ("jaxbp.bench", "time the manual backward against autodiff and the matmul peak"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxbp",
        description="Forward and hand-written backward propagation in JAX, verified "
        "against autodiff.",
    )
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
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
