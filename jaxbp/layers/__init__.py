"""Layers: each is ``init`` / ``forward`` / ``backward`` (see ``jaxbp.layers.base``)."""

from .activations import ELU, GELU, Identity, LeakyReLU, ReLU, Sigmoid, Softmax, Softplus, Tanh
from .base import Layer
from .dense import Dense

__all__ = [
    "Layer",
    "Dense",
    "Identity",
    "Sigmoid",
    "Tanh",
    "ReLU",
    "LeakyReLU",
    "ELU",
    "GELU",
    "Softplus",
    "Softmax",
]
