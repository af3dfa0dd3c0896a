"""Layers: each is ``init`` / ``forward`` / ``backward`` (see ``jaxbp.layers.base``)."""

from .activations import ELU, GELU, Identity, LeakyReLU, ReLU, Sigmoid, Softmax, Softplus, Tanh
from .base import Layer
from .conv import Conv2D
from .dense import Dense
from .flatten import Flatten
from .norm import LayerNorm, RMSNorm
from .pool import AvgPool2D, MaxPool2D

__all__ = [
    "Layer",
    "Dense",
    "Conv2D",
    "MaxPool2D",
    "AvgPool2D",
    "Flatten",
    "LayerNorm",
    "RMSNorm",
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
