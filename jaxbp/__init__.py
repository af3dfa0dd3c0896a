"""jaxbp: forward and hand-written backward propagation in JAX, verified against autodiff.

Conventions: the batch is the leading axis; a dense layer computes
``y = x @ W + b`` with ``W`` of shape (in, out); images are NHWC and kernels HWIO.
"""

from . import conventions, layers, losses, models
from .bridge import with_manual_grad
from .gradcheck import check_layer, gradcheck
from .network import Sequential

__version__ = "0.1.0"

__all__ = [
    "Sequential",
    "check_layer",
    "gradcheck",
    "with_manual_grad",
    "conventions",
    "layers",
    "losses",
    "models",
    "__version__",
]
