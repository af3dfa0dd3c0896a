"""The PyTorch reference of ``jaxbp bench``: the same network's eager training step.

PyTorch is optional and never a dependency: without it the reference says
"not installed". The network is rebuilt layer by layer in ``torch.nn`` (images
in PyTorch's own NCHW layout, the same FLOPs; sequences batch-first, as jaxbp's:
``nn.Embedding``, ``nn.RNN``/``nn.LSTM``/``nn.GRU`` with ``batch_first=True``,
``nn.Linear`` on the last axis; a GPT's learned positions as an ``nn.Parameter``,
its attention as nanoGPT's, a fused ``c_attn`` Linear (C, 3C), PyTorch's
``F.scaled_dot_product_attention`` and a ``c_proj`` Linear, in the pre-LN
blocks of ``TransformerBlock``) and trained by the usual eager loop ``zero_grad
→ loss → backward → optimizer step``, the cross-entropy averaged over every
position, on the random data the bench uses (N(0, 1) inputs, or ids for a
network that starts with an Embedding) on the device JAX uses,
with PyTorch's default thread count; its OpenMP threads wait passively
(``OMP_WAIT_POLICY=PASSIVE`` unless set), as spinning threads would slow
whichever of JAX and PyTorch runs next on the same cores.

``load_params`` copies a jaxbp network's params into the module ``to_torch``
built, so that both compute the same function (the tests compare them in float64).
"""

from __future__ import annotations

import os

import jax
import numpy as np

from .layers import torch_weights
from .layers.conv import resolve_pads

_RECURRENT = ("RNN", "LSTM", "GRU")  # the same names in jaxbp.layers and torch.nn


def _permute(torch, dims):
    """A module that permutes its input's axes to ``dims`` (NCHW ↔ NHWC)."""

    class Permute(torch.nn.Module):
        def forward(self, x):
            return x.permute(*dims)

    return Permute()


def _recurrent(torch, kind, features, layer):
    """PyTorch's ``nn.RNN`` (tanh), ``nn.LSTM`` or ``nn.GRU``, batch-first, returning only the
    output: every h_t (batch, time, hidden), or the last (batch, hidden) for
    ``return_sequences=False``. Its state dict is the one ``torch_weights.to_torch`` gives."""
    base = getattr(torch.nn, kind)
    extra = {"nonlinearity": "tanh"} if kind == "RNN" else {}

    class Recurrent(base):
        def forward(self, x):
            hs, _ = super().forward(x)  # (the final state, also returned, is dropped)
            return hs if layer.return_sequences else hs[:, -1]

    return Recurrent(features, layer.hidden, batch_first=True, **extra)


def _positions(torch, layer):
    """``x + P[:time]``, ``P`` (context, dim) an ``nn.Parameter``: jaxbp's ``PositionEmbedding``."""

    class Positions(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.P = torch.nn.Parameter(0.02 * torch.randn(layer.context, layer.dim))

        def forward(self, x):
            return x + self.P[: x.shape[1]]

    return Positions()


def _attention(torch, C, layer):
    """nanoGPT's ``CausalSelfAttention`` (without dropout) for jaxbp's ``MultiHeadAttention``.

    ``c_attn`` maps (batch, time, C) to q, k, v side by side, each split into
    heads of C / num_heads contiguous features, as jaxbp's ``Wqkv``; ``c_proj``
    is ``Wo``. The attention core is ``F.scaled_dot_product_attention``.
    """
    heads, causal = layer.num_heads, layer.causal

    class Attention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c_attn = torch.nn.Linear(C, 3 * C)
            self.c_proj = torch.nn.Linear(C, C)

        def forward(self, x):
            B, T, _ = x.shape
            q, k, v = (a.view(B, T, heads, C // heads).transpose(1, 2)
                       for a in self.c_attn(x).split(C, dim=2))
            o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
            return self.c_proj(o.transpose(1, 2).reshape(B, T, C))

    return Attention()


def _module(torch, layer, shape):
    """``(torch module, output shape)`` for one jaxbp layer; ``shape`` excludes the batch.

    The module computes the layer's function with the layer's settings (GELU's form,
    ELU's α, LeakyReLU's slope, the norms' ε) on PyTorch's NCHW layout: Softmax and
    the norms over the channels of images, and Flatten ordering an image's features
    (H, W, C) as jaxbp does. Sequences (time, features) keep jaxbp's batch-first
    layout; a recurrent layer's input is the sequence alone (initial state zeros).
    """
    nn, kind = torch.nn, type(layer).__name__
    if kind == "Sequential":
        return _sequential(torch, layer.layers, shape)
    if kind == "Residual":
        body, out_shape = _module(torch, layer.body, shape)
        return _residual(torch, body), out_shape
    if kind == "TransformerBlock":  # its pre-LN residual branches, layer by layer
        return _module(torch, layer.body(shape[-1]), shape)
    sequence = len(shape) == 2 and all(isinstance(s, int) for s in shape)
    if kind in (*_RECURRENT, "MultiHeadAttention") and not sequence:
        raise ValueError(f"no PyTorch equivalent for {kind} on input shape {shape} (only a "
                         f"sequence (time, features), without an initial state or a padding "
                         f"mask, is mapped)")
    out_shape = tuple(layer.init(jax.random.key(0), shape)[2])
    image = len(shape) == 3
    if kind == "Embedding":
        return nn.Embedding(layer.vocab_size, layer.dim), out_shape
    if kind in _RECURRENT:
        return _recurrent(torch, kind, shape[1], layer), out_shape
    if kind == "MultiHeadAttention":
        return _attention(torch, shape[1], layer), out_shape
    if kind == "PositionEmbedding":
        return _positions(torch, layer), out_shape
    simple = {"ReLU": nn.ReLU, "Tanh": nn.Tanh, "Sigmoid": nn.Sigmoid, "Identity": nn.Identity,
              "Softplus": nn.Softplus}
    if kind in simple:
        return simple[kind](), out_shape
    if kind == "GELU":
        return nn.GELU(approximate="tanh" if layer.approximate else "none"), out_shape
    if kind == "ELU":
        return nn.ELU(alpha=layer.alpha), out_shape
    if kind == "LeakyReLU":
        return nn.LeakyReLU(negative_slope=layer.negative_slope), out_shape
    if kind == "Softmax":  # over jaxbp's last axis: the channels of an image
        return nn.Softmax(dim=1 if image else -1), out_shape
    if kind == "Flatten":
        if not image:
            return nn.Flatten(), out_shape
        return nn.Sequential(_permute(torch, (0, 2, 3, 1)), nn.Flatten()), out_shape
    if kind in ("LayerNorm", "RMSNorm"):  # over jaxbp's last axis: the channels of an image
        norm = (nn.LayerNorm if kind == "LayerNorm" else nn.RMSNorm)(shape[-1], eps=layer.eps)
        if not image:
            return norm, out_shape
        to_last, to_first = _permute(torch, (0, 2, 3, 1)), _permute(torch, (0, 3, 1, 2))
        return nn.Sequential(to_last, norm, to_first), out_shape
    if kind == "BatchNorm":  # jaxbp's momentum is PyTorch's (it weights the new batch)
        norm = (nn.BatchNorm2d if image else nn.BatchNorm1d)(shape[-1], eps=layer.eps,
                                                             momentum=layer.momentum)
        return norm, out_shape
    if kind == "Dropout":
        return nn.Dropout(layer.rate), out_shape
    if kind == "Dense" and not image:  # on the last axis: features, or a sequence's
        return nn.Linear(shape[-1], layer.units, bias=layer.use_bias), out_shape
    if kind not in ("Conv2D", "MaxPool2D", "AvgPool2D"):
        raise ValueError(f"no PyTorch equivalent for layer {kind}")
    window = layer.kernel_size if kind == "Conv2D" else layer.window
    pads = [resolve_pads(layer.padding if isinstance(layer.padding, str) else layer.padding[d],
                         shape[d], window[d], layer.stride[d]) for d in range(2)]
    if any(lo != hi for lo, hi in pads) or (kind != "Conv2D" and any(lo for lo, _ in pads)):
        raise ValueError(f"no PyTorch equivalent for {kind} padding {pads}")
    padding = tuple(lo for lo, _ in pads)
    if kind == "Conv2D":  # jaxbp images are (H, W, C); PyTorch runs them as (C, H, W)
        conv = nn.Conv2d(shape[2], layer.filters, window, layer.stride, padding,
                         bias=layer.use_bias)
        return conv, out_shape
    pool = nn.MaxPool2d if kind == "MaxPool2D" else nn.AvgPool2d
    return pool(window, layer.stride), out_shape


def _residual(torch, body):
    """A module computing ``x + body(x)``."""

    class Residual(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = body

        def forward(self, x):
            return x + self.body(x)

    return Residual()


def _sequential(torch, layers, shape):
    modules = []
    for layer in layers:
        module, shape = _module(torch, layer, shape)
        modules.append(module)
    return torch.nn.Sequential(*modules), shape


def to_torch(net, input_shape):
    """``net``'s layers as a ``torch.nn.Sequential`` (fresh PyTorch initialisation)."""
    import torch

    return _sequential(torch, net.layers, tuple(input_shape))[0]


def load_params(module, layer, params) -> None:
    """Copy jaxbp ``params`` into the ``module`` that ``to_torch`` built for ``layer`` (or net).

    Containers (a network, ``Sequential``, ``Residual``, ``TransformerBlock``)
    pass each child its own params; see ``_load_layer`` for a layer's.
    """
    kind = type(layer).__name__
    if kind == "Model":  # a network: its body
        load_params(module, layer.body, params)
    elif kind == "Sequential":
        for sub, child, p in zip(module, layer.layers, params, strict=True):
            load_params(sub, child, p)
    elif kind == "Residual":
        load_params(module.body, layer.body, params)
    elif kind == "TransformerBlock":  # the body for C channels, C from LN1's scale
        load_params(module, layer.body(params[0][0]["scale"].shape[0]), params)
    elif params:
        _load_layer(module, layer, params)


def _load_layer(module, layer, params) -> None:
    """One layer's params into its module, each tensor keeping the module's dtype and device.

    Linear weights are ``Wᵀ`` (out, in), Conv2d kernels OIHW (jaxbp's HWIO
    transposed), the norms' ``weight`` and ``bias`` are ``scale`` and ``offset``,
    attention's ``c_attn`` and ``c_proj`` are ``Wqkv`` and ``Wo`` transposed with
    their biases, and a recurrent layer loads ``torch_weights.to_torch``'s state dict.
    """
    import torch

    kind = type(layer).__name__
    if kind in _RECURRENT:
        state = torch_weights.to_torch(layer, params)
    elif kind == "MultiHeadAttention":
        state = {"c_attn.weight": params["Wqkv"].T, "c_attn.bias": params["bqkv"],
                 "c_proj.weight": params["Wo"].T, "c_proj.bias": params["bo"]}
    elif kind == "PositionEmbedding":
        state = {"P": params["P"]}
    else:
        # The one submodule with a weight: a norm of an image sits between NCHW permutes.
        (module,) = [m for m in module.modules() if getattr(m, "weight", None) is not None]
        if "scale" in params:  # LayerNorm, RMSNorm, BatchNorm
            state = {"weight": params["scale"], **(
                {"bias": params["offset"]} if "offset" in params else {})}
        else:  # Embedding (vocab, dim) as it is, Linear (out, in), Conv2d OIHW
            W = np.asarray(params["W"])
            W = W if kind == "Embedding" else W.T if W.ndim == 2 else W.transpose(3, 2, 0, 1)
            state = {"weight": W, **({"bias": params["b"]} if "b" in params else {})}
    targets = module.state_dict()  # (BatchNorm's running statistics stay as they are)
    module.load_state_dict({**targets, **{
        name: torch.as_tensor(np.ascontiguousarray(value)).to(targets[name])
        for name, value in state.items()}})


def train_step(net, input_shape, batch, dtype, optimizer, learning_rate, momentum):
    """``(step, note)``: a zero-argument eager training step, or ``(None, why not)``.

    ``step()`` updates the parameters on one fixed random batch and returns the
    loss before the update, the mean cross-entropy over every position.
    """
    # PyTorch's OpenMP threads busy-wait between parallel regions by default, which
    # starves JAX's threads when the two take turns on the same cores.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        import torch
    except ImportError:
        return None, "not installed"

    if net.loss_fn.name != "SoftmaxCrossEntropy" or net.weight_decay:
        return None, "n/a (only softmax cross-entropy without weight decay is mapped)"
    device = "cpu" if jax.default_backend() == "cpu" else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        return None, "n/a (this PyTorch has no CUDA)"
    try:
        model = to_torch(net, input_shape)
        torch_dtype = getattr(torch, np.dtype(dtype).name)
    except (ValueError, AttributeError, TypeError) as err:
        return None, f"n/a ({err})"
    model = model.to(device=device, dtype=torch_dtype)
    first = net.layers[0]
    if type(first).__name__ == "Embedding":  # integer ids, (batch, time)
        x = torch.randint(0, first.vocab_size, (batch, *input_shape), device=device)
    else:
        shape = input_shape if len(input_shape) != 3 else (input_shape[2], *input_shape[:2])
        x = torch.randn(batch, *shape, device=device, dtype=torch_dtype)
    # Labels in [0, classes) for every position of the output (…, classes).
    *positions, classes = net.output_shape(input_shape)
    y = torch.randint(0, classes, (batch, *positions), device=device)
    if optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=learning_rate)
    else:
        momentum = momentum if optimizer == "momentum" else 0.0
        opt = torch.optim.SGD(model.parameters(), lr=learning_rate, momentum=momentum)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        # the cross-entropy over every position: logits (batch · positions, classes)
        loss = loss_fn(model(x).flatten(0, -2), y.flatten())
        loss.backward()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        return loss.detach()  # the loss before the update

    return step, f"torch {torch.__version__} eager, {torch.get_num_threads()} threads"
