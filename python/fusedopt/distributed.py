"""FSDP2 (and any DTensor sharding over one mesh dimension) for the step engine.

FSDP2 holds every parameter as a DTensor whose local tensor is this rank's shard (rows of the
full tensor, possibly uneven or empty), and writes each gradient as a DTensor of the same
placements. The update math is elementwise, so the engine runs on the local shards as it runs
on any tensor; what crosses ranks are the per-tensor figures:

- before finalize, the per-tensor sums of g^2 and the non-finite flags (plus an external
  scaler's found_inf) are summed over the shard group with ONE all-reduce of device tensors (no
  host sync), so every rank finalizes the same numbers: the same global norm, clip coefficient
  and skip decision;
- with statistics, after the update, the statistic columns are reduced to the full tensors'
  figures (sums with one SUM all-reduce, min and max together with one MAX all-reduce). This
  happens in step(), so reading the statistics stays local (logging on rank 0 alone is fine).

Supported placements: Shard(d) (any d, uneven or empty) on exactly one mesh dimension, the same
for every param, with Replicate() on the others (HSDP: the replicas hold equal gradients once
FSDP2 has all-reduced them, so the sums go over the shard dimension only). Partial placements,
params sharded over two mesh dimensions (FSDP + tensor parallel) and DTensor params mixed with
plain tensors in one optimizer are refused with the param's name.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from fusedopt.engine import layout

try:
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
except ImportError:  # torch built without distributed support
    DTensor = None


def is_dtensor(tensor) -> bool:
    return DTensor is not None and isinstance(tensor, DTensor)


def local(tensor):
    """This rank's part of a DTensor, the tensor itself otherwise.

    DTensor._local_tensor rather than to_local(): to_local() is an autograd function, 2.5 us a
    call on the host (measured, torch 2.13): 2 calls per param per step would cost 1 ms a step at
    200 params, for the same tensor."""
    return tensor._local_tensor if is_dtensor(tensor) else tensor


def local_grads(params):
    """The local gradient of every param (None where the param has none)."""
    grads = [p.grad for p in params]
    return [None if g is None else g._local_tensor for g in grads]


class ShardReduction:
    """The collectives that turn local per-tensor figures into the full tensors' figures."""

    def __init__(self, mesh, shard_dim, stat_ops, device):
        self.group = mesh.get_group(shard_dim)
        # Which statistic rows reduce how, as device index tensors made once: indexing with a
        # Python list would copy it to the GPU, and wait for that copy, at every step.
        rows = {op: [i for i, o in enumerate(stat_ops) if o == op] for op in range(len(layout.OPS))}
        self.summed = torch.tensor(rows[layout.OP_SUM], dtype=torch.int64, device=device)
        # min(x) = -max(-x): one MAX all-reduce serves both.
        self.extremes = torch.tensor(rows[layout.OP_MAX] + rows[layout.OP_MIN], dtype=torch.int64,
                                     device=device)
        self.extreme_signs = torch.tensor([1.0] * len(rows[layout.OP_MAX])
                                          + [-1.0] * len(rows[layout.OP_MIN]),
                                          device=device).unsqueeze(1)

    @classmethod
    def for_params(cls, params, names, stat_ops, device):
        """None for plain tensors; the shard group's reduction for DTensor params (all on
        `device`); raises for layouts whose figures it cannot combine (see the module doc)."""
        sharded = [p for p in params if is_dtensor(p)]
        if not sharded:
            return None
        plain = [p for p in params if not is_dtensor(p)]
        if plain:
            raise ValueError(f"params: {names[plain[0]]} is a plain tensor and {names[sharded[0]]}"
                             " a DTensor; one optimizer takes either the params of one FSDP2 "
                             "model or plain tensors (build one optimizer for each)")
        first = sharded[0]
        mesh, shard_dim = first.device_mesh, shard_dimension(first, names[first])
        for p in sharded[1:]:
            if p.device_mesh != mesh:
                raise ValueError(f"params: {names[p]} lives on device mesh {p.device_mesh}, "
                                 f"{names[first]} on {mesh}; one optimizer takes params of one "
                                 "mesh")
            if shard_dimension(p, names[p]) != shard_dim:
                raise ValueError(f"params: {names[p]} is sharded over mesh dimension "
                                 f"{shard_dimension(p, names[p])}, {names[first]} over "
                                 f"{shard_dim}; every param must shard over the same one")
        return cls(mesh, shard_dim, stat_ops, device)

    def sums_(self, tensor_sums, found_inf):
        """All-reduce the per-tensor [sum g^2; non-finite] rows in place, with the external
        found_inf (None or a [1] tensor) in the same call; returns the reduced found_inf."""
        # An empty shard's flag is the max over no blocks, -inf: summed with another rank's 1 it
        # would hide that rank's inf. Clamped to 0, the sum is > 0 exactly when some rank found one.
        tensor_sums[1].clamp_(min=0.0)
        if found_inf is None:
            dist.all_reduce(tensor_sums, group=self.group)
            return None
        packed = torch.cat([tensor_sums.reshape(-1), found_inf.reshape(-1)])
        dist.all_reduce(packed, group=self.group)
        tensor_sums.copy_(packed[:-1].reshape(tensor_sums.shape))
        return packed[-1:]

    def stats_(self, stat_values):
        """All-reduce the statistic rows in place, each with its op (sum, min or max)."""
        if len(self.summed):
            values = stat_values.index_select(0, self.summed)
            dist.all_reduce(values, group=self.group)
            stat_values.index_copy_(0, self.summed, values)
        if len(self.extremes):
            values = stat_values.index_select(0, self.extremes) * self.extreme_signs
            dist.all_reduce(values, op=dist.ReduceOp.MAX, group=self.group)
            stat_values.index_copy_(0, self.extremes, values * self.extreme_signs)


def shard_dimension(p, name):
    """The one mesh dimension over which p is sharded."""
    shard_dims = []
    for dim, placement in enumerate(p.placements):
        if isinstance(placement, Shard):
            shard_dims.append(dim)
        elif not isinstance(placement, Replicate):
            raise ValueError(f"params: {name} has placement {placement!r} on mesh dimension {dim};"
                             " fusedopt takes Shard and Replicate placements (FSDP2, HSDP)")
    if len(shard_dims) != 1:
        raise ValueError(f"params: {name} is sharded over {len(shard_dims)} mesh dimensions "
                         f"(placements {tuple(p.placements)}); fusedopt reduces its figures over "
                         "exactly one (FSDP2, or HSDP's shard dimension), tensor parallelism "
                         "is not supported")
    return shard_dims[0]


def like_param(p, local_value):
    """`local_value` (this rank's part) as p's owners see it: a DTensor with p's mesh,
    placements and global shape for a DTensor p; the tensor itself otherwise."""
    if not is_dtensor(p):
        return local_value
    return DTensor.from_local(local_value, p.device_mesh, p.placements, run_check=False,
                              shape=p.shape, stride=p.stride())


def local_value(p, value, name):
    """This rank's part of a checkpointed state tensor for param p: a DTensor is redistributed
    to p's placements if needed, a full plain tensor is sliced as p is (no communication)."""
    if not is_dtensor(p):
        return value.full_tensor() if is_dtensor(value) else value
    if tuple(value.shape) != tuple(p.shape):
        raise ValueError(f"state_dict: {name} has shape {tuple(value.shape)}, the param "
                         f"{tuple(p.shape)}")
    if is_dtensor(value):
        if value.device_mesh != p.device_mesh or tuple(value.placements) != tuple(p.placements):
            value = value.redistribute(p.device_mesh, p.placements)
        return value._local_tensor
    value = value.to(p.device)
    return distribute_tensor(value, p.device_mesh, p.placements, src_data_rank=None)._local_tensor
