"""Pure-bf16 models with chosen modules kept in fp32.

`to_bf16(model, keep_fp32=...)` casts a model's params and buffers to bfloat16, except the
modules that `keep_fp32` selects (norms by default; an output head if you name it). A kept
module computes in fp32: its floating inputs are cast to fp32 on the way in, and its floating
outputs back to bf16 on the way out. The rest of the model never sees an fp32 tensor, so
`nn.Linear(bf16)` after an fp32 LayerNorm works without autocast.

The optimizer then holds bf16 params (give them master weights with
`master_weight_bits=32`) next to fp32 ones (their own masters): one optimizer takes both.
"""
from __future__ import annotations

import torch
from torch import nn

# Normalization layers: their few params set the scale of every activation after them, and
# their statistics (mean, variance) lose accuracy in bf16.
NORMS = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
         nn.RMSNorm)


def is_norm(name: str, module: nn.Module) -> bool:
    """The default selection: torch's norm layers and modules whose class name ends in 'Norm'
    (transformers' LlamaRMSNorm and its kin)."""
    return isinstance(module, NORMS) or type(module).__name__.endswith("Norm")


def to_bf16(model: nn.Module, keep_fp32=is_norm) -> nn.Module:
    """Cast `model` in place to bfloat16, keeping the modules for which keep_fp32(name, module)
    is true (and everything inside them) in fp32 behind casting hooks. Returns the model and
    the names of the kept modules as model.fp32_modules."""
    kept = []
    for name, module in model.named_modules():
        if any(name.startswith(k + ".") for k in kept) or not keep_fp32(name, module):
            continue
        kept.append(name)
    model.to(torch.bfloat16)
    for name in kept:
        module = model.get_submodule(name)
        module.float()
        module.register_forward_pre_hook(_inputs_to_fp32, with_kwargs=True)
        module.register_forward_hook(_outputs_to_bf16)
    model.fp32_modules = kept
    return model


def _cast(value, dtype):
    """Floating tensors cast, inside plain tuples, lists and dicts too; anything else as it is."""
    if torch.is_tensor(value):
        return value.to(dtype) if value.is_floating_point() else value
    if type(value) in (tuple, list):
        return type(value)(_cast(v, dtype) for v in value)
    if type(value) is dict:
        return {k: _cast(v, dtype) for k, v in value.items()}
    return value


def _inputs_to_fp32(module, args, kwargs):
    return _cast(args, torch.float32), _cast(kwargs, torch.float32)


def _outputs_to_bf16(module, args, output):
    return _cast(output, torch.bfloat16)
