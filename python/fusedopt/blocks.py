"""Transformer block types and optimizer parameter groups built from them.

`classify(model)` maps every parameter name (as `model.named_parameters()` yields it) to one of
BLOCK_TYPES. `param_groups(model, lr, weight_decay, ...)` turns that map into torch.optim-style
groups with per-block learning rates (Wang et al. 2025, arXiv 2502.19002, "The Sharpness
Disparity Principle in Transformers"), weight-decay masks and the AdamC/SGDC correction flag
(Defazio 2025, arXiv 2506.02285).

Block types (Wang et al.'s five, plus the ones a real model needs so nothing is mislabelled):
  Emb   token / position embeddings (and an embedding tied to the output head, see below)
  QK    query and key projections
  VO    value and attention-output projections
  QKV   a fused query/key/value projection (GPT-2's `c_attn`, `qkv_proj`, `Wqkv`, MHA `in_proj`)
  FFN   feed-forward (MLP) layers
  Norm  normalization gains and biases
  Head  the output projection when it is not tied to the embedding
  Other anything not recognised; never guessed into one of the types above

Decisions, stated because the paper leaves them open:
- Fused QKV is its own type. One Parameter holds q, k and v concatenated along the output
  dimension, so the optimizer (and every per-tensor statistic) sees one tensor: its gradient
  norm mixes the QK and VO blocks and cannot be split without an extra pass. Its LR multiplier
  under the published recipe is min(QK, VO) = 4x: a single LR must be stable for its sharpest
  part (the V columns behave as VO). Wang et al.'s own GPT-2 code avoids the question by
  replacing `c_attn` with three Linear layers.
- A tied embedding / output head (GPT-2's `wte` is `lm_head.weight`) is one Parameter; it is
  classified Emb, as Wang et al.'s GPT-2 code does (its `wte` group gets the Emb LR). Its
  gradient sums the embedding and the head contributions. It is not AdamC-corrected because
  the head's output is not normalized.
- Untied Head keeps the base LR under the published recipe (the five multipliers name no Head).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch
from torch import nn

BLOCK_TYPES = ("Emb", "QK", "VO", "QKV", "FFN", "Norm", "Head", "Other")

# Wang et al. 2025 (arXiv 2502.19002), Sec. 4 / the authors' README: Norm 1x, VO 4x, FFN 6x,
# QK 8x, Emb 10x of the base LR. QKV, Head and Other are our additions (see module docstring).
SHARPNESS_LR_MULTIPLIERS = {
    "Emb": 10.0, "QK": 8.0, "VO": 4.0, "QKV": 4.0, "FFN": 6.0, "Norm": 1.0, "Head": 1.0, "Other": 1.0,
}

# Block types whose weights are linear layers feeding a normalized residual stream: the ones
# Defazio 2025 corrects ("every linear layer whose output is normalized", i.e. all but the head).
# Emb is excluded because an embedding is a lookup whose rows are updated only when their token
# appears, not a normalized linear layer.
CORRECTED_TYPES = frozenset({"QK", "VO", "QKV", "FFN"})

# Module names (one dotted component) that decide the role of a linear layer by themselves.
_QK_NAMES = frozenset({"q_proj", "k_proj", "query", "key", "q", "k", "wq", "wk", "q_attn", "k_attn",
                       "q_lin", "k_lin", "to_q", "to_k"})
_VO_NAMES = frozenset({"v_proj", "o_proj", "value", "out_proj", "v", "o", "wv", "wo", "v_attn",
                       "v_lin", "out_lin", "to_v", "to_out", "attn_out", "attn_proj"})
_QKV_NAMES = frozenset({"c_attn", "qkv", "qkv_proj", "wqkv", "query_key_value", "in_proj"})
_FFN_NAMES = frozenset({"gate_proj", "up_proj", "down_proj", "c_fc", "fc", "fc1", "fc2", "fc_in", "fc_out",
                        "w1", "w2", "w3", "gate_up_proj", "dense_h_to_4h", "dense_4h_to_h", "lin1",
                        "lin2", "wi", "wi_0", "wi_1"})
_HEAD_NAMES = frozenset({"lm_head", "head", "output", "embed_out", "output_layer"})
_EMB_NAMES = frozenset({"wte", "wpe", "embed_tokens", "embed_positions", "tok_embeddings",
                        "word_embeddings", "position_embeddings", "tok_emb", "pos_emb", "embedding",
                        "embeddings"})
# Ancestor names that say which sub-layer an ambiguous name ("c_proj", "dense", "proj") is in.
_ATTN_PARENTS = re.compile(r"attn|attention")
_FFN_PARENTS = re.compile(r"mlp|ffn|feed_forward|feedforward")

# Norm modules by type; transformers' RMSNorm classes (LlamaRMSNorm, T5LayerNorm, ...) are
# recognised by class name because each model defines its own class.
_NORM_TYPES: tuple[type, ...] = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)
if hasattr(nn, "RMSNorm"):
    _NORM_TYPES = _NORM_TYPES + (nn.RMSNorm,)
_NORM_CLASS_NAME = re.compile(r"(RMS|Layer|Group|Batch)Norm", re.IGNORECASE)


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, _NORM_TYPES) or bool(_NORM_CLASS_NAME.search(type(module).__name__))


def _is_linear(module: nn.Module) -> bool:
    # GPT-2's Conv1D (transformers.pytorch_utils.Conv1D) is a linear layer with a transposed weight.
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _linear_role(path: list[str]) -> str:
    """Role of a linear layer from its module path (list of dotted components)."""
    own = path[-1].lower() if path else ""
    if own in _QK_NAMES:
        return "QK"
    if own in _VO_NAMES:
        return "VO"
    if own in _QKV_NAMES:
        return "QKV"
    if own in _FFN_NAMES:
        return "FFN"
    if own in _HEAD_NAMES and len(path) <= 2:
        return "Head"
    ancestors = ".".join(path[:-1]).lower()
    if _FFN_PARENTS.search(ancestors) or _FFN_PARENTS.search(own):
        return "FFN"
    if _ATTN_PARENTS.search(ancestors):
        # Every attention linear that is not a query/key/qkv projection is an output projection
        # (c_proj, dense, proj, out): the V-side of the attention block.
        return "VO"
    return "Other"


_NORM_NAME = re.compile(r"^(ln|norm)|norm$|layernorm|rmsnorm")


def _name_role(param_path: list[str]) -> str:
    """Names only, for parameters owned by modules of a type we do not know."""
    owner = [c.lower() for c in param_path[:-1]]
    leaf = param_path[-1].lower()
    if leaf in ("in_proj_weight", "in_proj_bias"):
        return "QKV"
    if leaf in _EMB_NAMES or (owner and owner[-1] in _EMB_NAMES):
        return "Emb"
    if owner and _NORM_NAME.search(owner[-1]):
        return "Norm"
    if leaf in ("weight", "bias"):
        # A weight/bias of an unknown module named like a linear layer (q_proj, c_fc, ...).
        return _linear_role(owner)
    # A raw parameter named after its role (wq, wk, ...); ancestors alone are not evidence.
    return _linear_role([leaf])


def classify(model: nn.Module) -> dict[str, str]:
    """Map each parameter name of `model` to a block type in BLOCK_TYPES.

    Module type decides first (nn.Embedding -> Emb, norm modules -> Norm, nn.Linear / Conv1D ->
    QK, VO, QKV, FFN or Head from the module's name and its ancestors' names); parameters of other
    modules are classified from names alone, and anything unrecognised is Other.
    Keys are exactly the names of `model.named_parameters()` (tied parameters appear once, under
    their first name, as torch deduplicates them). A parameter shared by an nn.Embedding and a
    linear head is Emb (see the module docstring).
    """
    owners: dict[int, list[tuple[list[str], nn.Module]]] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        path = mod_name.split(".") if mod_name else []
        for leaf, p in module.named_parameters(recurse=False):
            if p is not None:
                owners.setdefault(id(p), []).append((path + [leaf], module))

    types: dict[str, str] = {}
    for name, p in model.named_parameters():
        roles = {_role(path, module) for path, module in owners.get(id(p), [])}
        if not roles:
            roles = {_name_role(name.split("."))}
        if len(roles) == 1:
            types[name] = roles.pop()
        elif roles == {"Emb", "Head"}:
            types[name] = "Emb"
        else:
            # Shared by modules of different roles that are not an embedding/head tie: no
            # single block type is right, so say so rather than pick one.
            types[name] = "Other"
    return types


def _role(param_path: list[str], module: nn.Module) -> str:
    if isinstance(module, nn.Embedding):
        return "Emb"
    if _is_norm(module):
        return "Norm"
    if _is_linear(module):
        return _linear_role(param_path[:-1])
    if isinstance(module, nn.MultiheadAttention):
        return "QKV" if param_path[-1].startswith("in_proj") else "Other"
    return _name_role(param_path)


def _matches(entry: str, name: str, block: str) -> bool:
    if entry in BLOCK_TYPES:
        return entry == block
    return entry in name.rsplit(".", 1)[-1]


def param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    *,
    corrected: bool = True,
    no_decay: Iterable[str] = ("bias", "Norm"),
    blockwise_lr: str | Mapping[str, float] | None = None,
    max_lr: float | None = None,
    types: Mapping[str, str] | None = None,
) -> list[dict]:
    """Optimizer parameter groups for `model`, one per (block type, decayed, corrected).

    Each group is a dict with "params" (a list of (name, Parameter) pairs, so the optimizer's
    statistics carry names), "lr", "max_lr", "weight_decay", "corrected" and "block" (the type).

    - no_decay: entries that are block types (e.g. "Norm", "Emb") exclude whole types; other
      entries exclude parameters whose last name component contains them (e.g. "bias").
    - corrected: the AdamC/SGDC decay correction (Defazio 2025) is set on decayed weights of
      QK, VO, QKV and FFN only: linear layers whose output is normalized, so not the head, not
      embeddings, not norms. With corrected=False every group has corrected=False.
    - blockwise_lr: None -> every block at `lr`; "sharpness" -> SHARPNESS_LR_MULTIPLIERS
      (Wang et al. 2025); a dict {block type: multiplier}, missing types at 1x.
    - max_lr: the peak LR the AdamC correction divides by (k = lr / max_lr). Default `lr`: each
      group's max_lr is its own peak, multiplier x (max_lr or lr), so a shared schedule shape
      (LambdaLR scales every group's initial lr by the same factor) keeps k identical across groups.
    - types: a precomputed classify(model) result, e.g. after editing it by hand.
    Parameters with requires_grad=False are left out.
    """
    if blockwise_lr is None:
        mult = {t: 1.0 for t in BLOCK_TYPES}
    elif blockwise_lr == "sharpness":
        mult = dict(SHARPNESS_LR_MULTIPLIERS)
    elif isinstance(blockwise_lr, Mapping):
        unknown = set(blockwise_lr) - set(BLOCK_TYPES)
        if unknown:
            raise ValueError(f"blockwise_lr: unknown block types {sorted(unknown)}; known: {BLOCK_TYPES}")
        mult = {t: float(blockwise_lr.get(t, 1.0)) for t in BLOCK_TYPES}
    else:
        raise ValueError(f"blockwise_lr must be None, 'sharpness' or a dict, got {blockwise_lr!r}")
    no_decay = tuple(no_decay)
    types = classify(model) if types is None else types
    peak = lr if max_lr is None else max_lr

    groups: dict[tuple[str, bool, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        block = types[name]
        decayed = weight_decay != 0 and not any(_matches(e, name, block) for e in no_decay)
        corr = corrected and decayed and block in CORRECTED_TYPES
        key = (block, decayed, corr)
        if key not in groups:
            groups[key] = {
                "params": [],
                "lr": lr * mult[block],
                "max_lr": peak * mult[block],
                "weight_decay": weight_decay if decayed else 0.0,
                "corrected": corr,
                "block": block,
            }
        groups[key]["params"].append((name, p))
    order = {t: i for i, t in enumerate(BLOCK_TYPES)}
    return [groups[k] for k in sorted(groups, key=lambda k: (order[k[0]], not k[1], not k[2]))]


def tensor_block_index(names: Iterable[str], types: Mapping[str, str], device=None) -> torch.Tensor:
    """int64 tensor: the BLOCK_TYPES index of each name (Other for names not in `types`)."""
    other = BLOCK_TYPES.index("Other")
    idx = [BLOCK_TYPES.index(types[n]) if n in types else other for n in names]
    return torch.tensor(idx, dtype=torch.int64, device=device)
