"""jaxbp: forward and hand-written backward propagation in JAX, verified against autodiff.

Conventions: the batch is the leading axis; a dense layer computes
``y = x @ W + b`` with ``W`` of shape (in, out); images are NHWC and kernels HWIO.
"""

from . import conventions, data, layers, losses, models, parallel, text, train
from .bridge import with_manual_grad
from .check import check_custom_vjp, check_vjp
from .gradcheck import check_layer, finite_differences, gradcheck
from .layers import Sequential
from .layers.conv import conv_output_size
from .network import Model

__version__ = "0.1.0"

__all__ = [
    "Sequential",
    "Model",
    "check_custom_vjp",
    "check_layer",
    "check_vjp",
    "conv_output_size",
    "finite_differences",
    "gradcheck",
    "with_manual_grad",
    "conventions",
    "data",
    "parallel",
    "text",
    "train",
    "layers",
    "losses",
    "models",
    "__version__",
]
