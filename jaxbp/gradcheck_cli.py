"""``jaxbp gradcheck``: check a preset network's manual backward and print the report.

Exit status 0 when every row passes, 1 when a row fails, 2 for bad arguments.

  jaxbp gradcheck                              # the tutorial's 2-2-2 worked example
  jaxbp gradcheck --model mlp --batch 8 --seed 3
  jaxbp gradcheck --model cnn --dtype float32  # float32 notes: finite differences unreliable
"""

from __future__ import annotations

import re
import warnings

import jax
import jax.numpy as jnp

from . import layers, models
from .cli import NON_NEGATIVE_INT, POSITIVE_INT, SEED
from .gradcheck import FLOAT32_WARNING, gradcheck


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


def add_arguments(parser) -> None:
    parser.add_argument(
        "--model",
        choices=sorted(PRESETS),
        default="worked-example",
        help="network to check (default: the tutorial's 2-2-2 sigmoid worked example)",
    )
    parser.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    parser.add_argument("--seed", type=SEED, default=0, help="params, data and FD coordinates")
    parser.add_argument(
        "--batch", type=POSITIVE_INT, default=4,
        help="batch size (the worked example has one sample)",
    )
    parser.add_argument(
        "--fd-coords",
        type=NON_NEGATIVE_INT,
        default=32,
        help="finite-difference coordinates per large leaf (0: none)",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args) -> int:
    # Build the case at the checked precision so that float64 weights are exact.
    with jax.enable_x64(args.dtype == "float64"):
        net, params, x, y = PRESETS[args.model](jax.random.key(args.seed), args.batch)
        x = x.astype(jnp.dtype(args.dtype))
    with warnings.catch_warnings():  # the float32 caveat is among the report's notes
        warnings.filterwarnings("ignore", re.escape(FLOAT32_WARNING), UserWarning)
        report = gradcheck(
            net, params, x, y, dtype=args.dtype, fd_max_coords=args.fd_coords, seed=args.seed
        )
    print(report.to_json(indent=2) if args.json else report)
    return 0 if report.ok else 1
