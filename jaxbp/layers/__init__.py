"""Layers: each is ``init`` / ``forward`` / ``backward`` (see ``jaxbp.layers.base``)."""

from .activations import ELU, GELU, Identity, LeakyReLU, ReLU, Sigmoid, Softmax, Softplus, Tanh
from .attention import MultiHeadAttention
from .base import Context, Layer
from .batchnorm import BatchNorm
from .combinators import Residual, Sequential
from .conv import Conv2D
from .dense import Dense
from .dropout import Dropout
from .embedding import Embedding, TiedEmbedding
from .flatten import Flatten
from .norm import LayerNorm, RMSNorm
from .pool import AvgPool2D, MaxPool2D
from .recurrent import GRU, LSTM, RNN
from .transformer import PositionEmbedding, TransformerBlock

__all__ = [
    "Layer",
    "Context",
    "Sequential",
    "Residual",
    "Dense",
    "Conv2D",
    "MaxPool2D",
    "AvgPool2D",
    "Flatten",
    "LayerNorm",
    "RMSNorm",
    "BatchNorm",
    "Dropout",
    "Embedding",
    "MultiHeadAttention",
    "TiedEmbedding",
    "PositionEmbedding",
    "TransformerBlock",
    "RNN",
    "LSTM",
    "GRU",
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
