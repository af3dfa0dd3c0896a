"""Exact weight conversion between jaxbp's recurrent layers and PyTorch's ``nn.RNN/LSTM/GRU``.

PyTorch stores ``weight_ih_l0`` (k·hidden, features) and ``weight_hh_l0``
(k·hidden, hidden) — the transposes of ``Wx`` and ``Wh`` — and two biases,
``bias_ih_l0`` and ``bias_hh_l0``, each (k·hidden,). Its gate order along the
k·hidden axis is i, f, g, o for the LSTM and r, z, n for the GRU; jaxbp's is
i, f, o, g and r, z, n. The two biases add up wherever they are summed before a
nonlinearity, so jaxbp keeps their sum ``b``; the GRU's ``b_hn`` is multiplied
by the reset gate and stays separate as ``bhn``.

Only NumPy is needed: pass ``module.state_dict()`` (tensors convert with
``np.asarray``) and load the result of ``to_torch`` with
``module.load_state_dict({k: torch.from_numpy(v) for k, v in ...items()})``.
One layer, unidirectional (the ``_l0`` names).

Example:
  >>> import numpy as np
  >>> from jaxbp.layers import LSTM
  >>> rng = np.random.default_rng(0)
  >>> sd = {"weight_ih_l0": rng.normal(size=(8, 3)), "weight_hh_l0": rng.normal(size=(8, 2)),
  ...       "bias_ih_l0": rng.normal(size=8), "bias_hh_l0": rng.normal(size=8)}
  >>> params = from_torch(LSTM(2), sd)
  >>> params["Wx"].shape, params["Wh"].shape
  ((3, 8), (2, 8))
  >>> back = to_torch(LSTM(2), params)
  >>> bool(np.allclose(back["weight_ih_l0"], sd["weight_ih_l0"]))
  True
"""

from __future__ import annotations

import numpy as np

from .recurrent import GRU, LSTM, RNN

_NAMES = ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")


def _order(layer):
    """PyTorch's gate blocks, listed in jaxbp's order (the block indices into PyTorch's)."""
    if isinstance(layer, LSTM):
        return [0, 1, 3, 2]  # jaxbp i, f, o, g = PyTorch blocks i0, f1, o3, g2
    if isinstance(layer, (GRU, RNN)):
        return list(range(layer.gates))
    raise ValueError(f"torch_weights: layer must be a jaxbp RNN, LSTM or GRU; got "
                     f"{type(layer).__name__}")


def _blocks(a, order, hidden):
    """Rows of ``a`` (k·hidden, …) regrouped gate block by gate block in ``order``."""
    return np.concatenate([a[j * hidden:(j + 1) * hidden] for j in order], axis=0)


def _inverse(order):
    return [order.index(j) for j in range(len(order))]


def from_torch(layer, state_dict) -> dict:
    """jaxbp params for ``layer`` from a PyTorch ``nn.RNN``/``nn.LSTM``/``nn.GRU`` state dict."""
    order = _order(layer)
    missing = [k for k in _NAMES if k not in state_dict]
    if missing:
        raise ValueError(f"from_torch: the state dict lacks {', '.join(missing)} (one layer, "
                         f"unidirectional, with biases); it has {sorted(state_dict)}")
    w_ih, w_hh, b_ih, b_hh = (np.asarray(_numpy(state_dict[k])) for k in _NAMES)
    H, k = layer.hidden, layer.gates
    if (w_hh.shape != (k * H, H) or w_ih.ndim != 2 or w_ih.shape[0] != k * H
            or b_ih.shape != (k * H,) or b_hh.shape != (k * H,)):
        raise ValueError(f"from_torch: {layer!r} needs weight_hh_l0 of shape ({k * H}, {H}), "
                         f"weight_ih_l0 of shape ({k * H}, features) and biases of shape "
                         f"({k * H},); got {w_hh.shape}, {w_ih.shape}, {b_ih.shape} and "
                         f"{b_hh.shape}")
    params = {"Wx": _blocks(w_ih, order, H).T, "Wh": _blocks(w_hh, order, H).T}
    if isinstance(layer, GRU):
        merged = b_hh.copy()
        merged[2 * H:] = 0  # b_hn stays inside r ⊙ (h Wh_n + b_hn)
        params["b"], params["bhn"] = b_ih + merged, b_hh[2 * H:]
    else:
        params["b"] = _blocks(b_ih + b_hh, order, H)
    return params


def to_torch(layer, params) -> dict:
    """A PyTorch state dict (NumPy arrays) for ``layer``'s ``params``; ``from_torch`` inverts it.

    The sum ``b`` goes to ``bias_ih_l0``; ``bias_hh_l0`` is zero (for the GRU, but
    for its n block, which is ``bhn``).
    """
    order, H = _inverse(_order(layer)), layer.hidden
    Wx, Wh, b = (np.asarray(params[k]) for k in ("Wx", "Wh", "b"))
    b_hh = np.zeros_like(b)
    if isinstance(layer, GRU):
        b_hh[2 * H:] = np.asarray(params["bhn"])
    return {
        "weight_ih_l0": _blocks(Wx.T, order, H),
        "weight_hh_l0": _blocks(Wh.T, order, H),
        "bias_ih_l0": _blocks(b, order, H),
        "bias_hh_l0": b_hh,
    }


def _numpy(value):
    """A NumPy view of a PyTorch tensor (or an array), without importing torch."""
    detach = getattr(value, "detach", None)
    return detach().cpu().numpy() if detach is not None else value
