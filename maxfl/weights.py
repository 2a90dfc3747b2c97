"""Model weights on the wire: one flat float32 vector per model.

Flower 1.41 stores and transfers every array of an ArrayRecord as its own object, one HTTP request
each way per hop (ServerApp -> SuperLink -> SuperNode -> ClientApp and back). A model sent tensor by
tensor costs a few dozen round trips per message; one vector costs one. Averaging strategies work
element-wise, so they aggregate the vector exactly as they would the tensors.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ArrayRecord
from torch import nn


def pack(model: nn.Module) -> ArrayRecord:
    tensors = list(model.state_dict().values())
    if not all(t.is_floating_point() for t in tensors):
        raise TypeError("pack() handles floating-point state only; the model has integer buffers")
    flat = torch.cat([t.detach().reshape(-1).to(torch.float32) for t in tensors]) if tensors else torch.zeros(0)
    return ArrayRecord([flat.numpy()])


def unpack_into(model: nn.Module, record: ArrayRecord) -> nn.Module:
    """Load a packed vector into `model`; a vector of the wrong length is rejected, not truncated."""
    arrays = record.to_numpy_ndarrays()
    state = model.state_dict()
    expected = sum(t.numel() for t in state.values())
    if len(arrays) != 1 or arrays[0].ndim != 1 or arrays[0].size != expected:
        shapes = [a.shape for a in arrays]
        raise ValueError(f"weights do not fit the model: expected one vector of {expected} values, got arrays {shapes}")
    flat = torch.from_numpy(np.ascontiguousarray(arrays[0], dtype=np.float32))
    offset, loaded = 0, {}
    for name, tensor in state.items():
        loaded[name] = flat[offset : offset + tensor.numel()].view_as(tensor).to(tensor.dtype)
        offset += tensor.numel()
    model.load_state_dict(loaded)
    return model


def trained_layers(model: nn.Module) -> list[nn.Module]:
    """The modules holding weights that train (a frozen backbone's do not): what DP-SGD clips and what travels."""
    return [m for m in model.modules() if any(p.requires_grad for p in m.parameters(recurse=False))]
