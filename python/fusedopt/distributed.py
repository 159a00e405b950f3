"""ShardedOptimizer: a fusedopt optimizer with its state sharded across ranks (ZeRO stage 1).

Every rank keeps the full parameters and gradients, and the optimizer state (moments) of one
contiguous shard of each flat buffer. A step, per flat buffer (docs/distributed.md):
  1. reduce-scatter the flat gradients, averaging: each rank receives its shard of the mean;
  2. grad_norm + tensor_reduce over the shard: per-tensor partial sums of g^2 and non-finite
     block counts, which add across shards;
  3. one all-reduce (SUM) of those per-tensor figures and the external found_inf flag, so every
     rank runs finalize on the same numbers and reaches the same norm, clip and skip decision;
  4. the update kernel over the shard (moments exist only there);
  5. all-gather of the parameter shards into the full flat parameter buffer.
The collectives are torch.distributed's (NCCL on GPUs, gloo on CPU) and the kernels those of
docs/kernel_contract.md, launched on shard-local tables: the blocks of the shard, tensor ends
shifted by the shard start and per-tensor block ranges clamped to the shard. Nothing reads
device memory on the host, so the step does not sync (the reference backend does, as always).

Shards are whole BLOCKs, so no kernel block spans two ranks: a buffer of B blocks is padded to
world_size * ceil(B / world_size) blocks and rank r owns blocks [r * c, (r + 1) * c). The padding
is at most world_size - 1 blocks per buffer and is never read by the kernels.

Communication per step, fp32 grads and params: the reduce-scatter and all-gather move
(W - 1) / W * 4 B per element each, the same as the all-reduce of DDP (a reduce-scatter plus an
all-gather), so sharding the state costs no extra bandwidth.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from fusedopt import backends, flat
from fusedopt.flat import BLOCK
from fusedopt.optimizer import FusedOptimizer
from fusedopt.reference import (adam_reference, clip_coefficient, decay_multiplier,
                                sgd_reference)

# torch 2.13 renamed reduce_scatter_tensor / all_gather_into_tensor (the old names warn); older
# releases have only the old names.
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

# The marker of the sharded (torch.distributed.checkpoint) form of the state dict.
SHARDED_KEY = "fusedopt_sharded"


def shard_blocks(num_blocks: int, world_size: int) -> int:
    """Blocks per rank: ceil(num_blocks / world_size), the torch.chunk split of the block rows, so
    the sharded checkpoint form is a DTensor sharded along rows with the default placement."""
    return -(-num_blocks // world_size)


class _Shard:
    """One flat buffer's shard on this rank and the shard-local kernel tables."""

    def __init__(self, buf, ds, rank, world_size, moment_names, stat_columns, kernel_backend):
        self.buf = buf
        self.blocks = shard_blocks(buf.num_blocks, world_size)
        self.first_block = rank * self.blocks
        # Blocks of this shard holding real layout (the last ranks may hold padding only).
        self.real_blocks = max(0, min(self.blocks, buf.num_blocks - self.first_block))
        self.start = self.first_block * BLOCK
        size = self.blocks * BLOCK
        device, dtype = buf.device, buf.dtype
        moment_dtype = next(iter(buf.moments.values())).dtype if buf.moments else torch.float32
        self.moments = {name: torch.zeros(size, dtype=moment_dtype, device=device)
                        for name in moment_names}
        self.grad = torch.zeros(size, dtype=dtype, device=device)
        first, last = self.first_block, self.first_block + self.real_blocks
        self.block_tensor = buf.block_tensor[first:last]
        # Kernels index tensor_end by device-local tensor; loads are relative to the shard start.
        self.tensor_end = ds.tensor_end - self.start
        starts = buf.tensor_block_start.to(torch.int64)
        self.tensor_block_start = (starts.clamp(first, last) - first).to(torch.int32)
        self.block_sums = torch.zeros(2, self.real_blocks, dtype=torch.float32, device=device)
        self.stat_partials = (torch.zeros(len(stat_columns), self.real_blocks,
                                          dtype=torch.float32, device=device)
                              if kernel_backend else None)

    def param_shard(self):
        """This rank's part of the padded flat parameters: the all-gather's input."""
        return self.buf.param[self.start:self.start + self.blocks * BLOCK]

    def real(self, tensor):
        """The part of a shard-sized tensor that the kernels cover (the real blocks)."""
        return tensor[:self.real_blocks * BLOCK]

    def slices(self):
        """(index in buffer, flat lo, flat hi) of each tensor's elements inside this shard."""
        end = self.start + self.real_blocks * BLOCK
        for i, p in enumerate(self.buf.params):
            lo, hi = max(self.buf.starts[i], self.start), min(self.buf.starts[i] + p.numel(), end)
            if lo < hi:
                yield i, lo, hi


class ShardedOptimizer(torch.optim.Optimizer):
    """ZeRO-1 over a fusedopt optimizer: optimizer state sharded across the ranks of a group.

    Args:
        optimizer_or_params: a fusedopt optimizer (AdamW, AdamC, SGD, SGDC) built on this rank's
            replica of the model, taken over (step it through this object only); or params /
            param groups, with optimizer_class and its keyword arguments.
        optimizer_class: the fusedopt optimizer class when params are given.
        process_group: the group to shard over; None is the default group.
        **kwargs: optimizer_class's arguments (lr, betas, max_grad_norm, backend, stats, ...).

    Use it on the plain model, not on a DistributedDataParallel one: the step averages the
    gradients itself (a DDP all-reduce before it would do the work twice). Every rank must call
    step(), zero_grad() and the state-dict methods together, with gradients for the same params.
    Construction broadcasts the parameters from the group's first rank, as DDP does.
    """

    def __init__(self, optimizer_or_params, optimizer_class=None, process_group=None, **kwargs):
        if isinstance(optimizer_or_params, FusedOptimizer):
            if optimizer_class is not None or kwargs:
                raise TypeError("optimizer_class and optimizer keyword arguments go with params, "
                                "not with an optimizer that is already built")
            inner = optimizer_or_params
        else:
            if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, FusedOptimizer)):
                raise TypeError("optimizer_class must be a fusedopt optimizer class (e.g. "
                                f"fusedopt.AdamW) when params are given, got {optimizer_class!r}")
            inner = optimizer_class(optimizer_or_params, **kwargs)
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("process_group: torch.distributed is not initialized "
                               "(call torch.distributed.init_process_group first)")
        if len(inner._devices) != 1:
            raise ValueError("optimizer_or_params: a ShardedOptimizer needs all params on one "
                             f"device per rank, got {sorted(map(str, inner._devices))}")
        self._ready = False
        self.inner = inner
        self.group = process_group
        self.rank = dist.get_rank(process_group)
        self.world_size = dist.get_world_size(process_group)
        super().__init__([p for g in inner.param_groups for p in g["params"]], inner.defaults)
        # Share the inner optimizer's groups and state so that lr schedulers and user code see
        # one set of hyperparameters.
        self.param_groups = inner.param_groups
        self.defaults = inner.defaults
        self.ds = next(iter(inner._devices.values()))
        self.kernel_backend = self.ds.backend != "reference"
        self.shards = [self._shard(buf) for buf in self.ds.buffers]
        num_tensors = self.ds.tensor_group.numel()
        # tensor_sums becomes a view of the one buffer the step all-reduces: [sums g^2, non-finite
        # block counts, external found_inf]; the flags add up instead of taking the max, so a
        # shard without a tensor contributes 0 and one all-reduce (SUM) serves every figure.
        self._comm = torch.zeros(2 * num_tensors + 1, dtype=torch.float32, device=self.ds.device)
        self.ds.tensor_sums = self._comm[:2 * num_tensors].view(2, num_tensors)
        self._stat_index = self._stat_columns_by_op()
        inner.state.clear()
        for ds, buf, i, position, p in inner._slots():
            inner.state[p] = {"step": ds.tensor_step[position]}
        self.state = inner.state
        for name in ("step", "state_dict", "load_state_dict", "add_param_group"):
            setattr(inner, name, _taken_over(name))
        self._ready = True

    def _shard(self, buf):
        """Pad buf to whole shards, re-home params and grads there and keep only this rank's
        moments (freeing the inner optimizer's full ones)."""
        shard = _Shard(buf, self.ds, self.rank, self.world_size, self.inner.MOMENTS,
                       self.inner.STAT_COLUMNS, self.kernel_backend)
        padded = shard.blocks * BLOCK * self.world_size
        param = torch.zeros(padded, dtype=buf.dtype, device=buf.device)
        grad = torch.zeros(padded, dtype=buf.dtype, device=buf.device)
        with torch.no_grad():
            param[:buf.numel].copy_(buf.param)
            grad[:buf.numel].copy_(buf.grad)
        old_views = buf.grad_views
        buf.param, buf.grad = param, grad
        buf.grad_views = [buf.view(grad, i) for i in range(len(buf.params))]
        for i, p in enumerate(buf.params):
            buf.rehome(i)
            if p.grad is old_views[i]:
                p.grad = buf.grad_views[i]
        buf.moments = shard.moments
        buf.block_sums = shard.block_sums
        if hasattr(buf, "stat_partials"):
            buf.stat_partials = shard.stat_partials
        with torch.no_grad():
            dist.broadcast(buf.param, src=dist.get_global_rank(self.group or dist.group.WORLD, 0),
                           group=self.group)
        return shard

    def _stat_columns_by_op(self):
        ops = self.inner.STAT_OPS
        index = {op: torch.tensor([c for c, o in enumerate(ops) if o == op], dtype=torch.int64,
                                  device=self.ds.device)
                 for op in (flat.OP_SUM, flat.OP_MIN, flat.OP_MAX)}
        return index

    def add_param_group(self, param_group):
        if getattr(self, "_ready", True):
            raise RuntimeError("param_group: add every param group before sharding (the flat "
                               "layout and the shards are fixed at construction)")
        super().add_param_group(param_group)

    # ----------------------------------------------------------------- the step
    @torch.no_grad()
    def zero_grad(self, set_to_none: bool = True):
        self.inner.zero_grad(set_to_none)

    @torch.no_grad()
    def step(self, closure=None):
        if getattr(self, "grad_scale", None) is not None or getattr(self, "found_inf", None) is not None:
            raise RuntimeError("optimizer: torch.amp.GradScaler decides inf skips and scale "
                               "updates from this rank's gradients only, so ranks would diverge; "
                               "use fusedopt.GradScaler")
        loss, scaling = self.inner._prepare_step(closure, owner=self)
        # Mean over ranks, as DDP computes it.
        for shard in self.shards:
            _reduce_scatter(shard.grad, shard.buf.grad, op=dist.ReduceOp.AVG, group=self.group)
        if self.kernel_backend:
            self._kernel_step(scaling)
        else:
            self._reference_step(scaling)
        for shard in self.shards:
            _all_gather(shard.buf.param, shard.param_shard(), group=self.group)
        return loss

    def _kernel_step(self, scaling):
        ds, inner = self.ds, self.inner
        kernels = backends.kernels(ds.backend)
        full_scale = scaling.scale_on(ds.device)
        scale = None if scaling.already_unscaled else full_scale
        for shard in self.shards:
            buf = shard.buf
            if shard.real_blocks == 0:
                ds.tensor_sums[:, buf.tensor_offset:buf.tensor_offset + len(buf.params)].zero_()
                continue
            kernels.grad_norm(shard.real(shard.grad), shard.block_tensor, shard.tensor_end,
                              ds.tensor_group, scale, shard.block_sums)
            kernels.tensor_reduce(shard.block_sums, shard.tensor_block_start,
                                  (flat.OP_SUM, flat.OP_SUM), ds.tensor_sums, buf.tensor_offset)
        external = self._comm[-1:]
        found_in = scaling.found_inf_on(ds.device)
        if found_in is None:
            external.zero_()
        else:
            external.copy_(found_in)
        dist.all_reduce(self._comm, op=dist.ReduceOp.SUM, group=self.group)
        updates_scale = scaling.updates_on(ds.device)
        kernels.finalize(ds.tensor_sums, ds.tensor_group, ds.tensor_step, ds.globals,
                         full_scale,
                         scaling.growth_tracker if updates_scale else None, external,
                         inner.max_grad_norm or 0.0, scaling.growth_factor,
                         scaling.backoff_factor, scaling.growth_interval, updates_scale)
        if scaling.already_unscaled:
            ds.globals[flat.INV_SCALE].fill_(1.0)
        for shard in self.shards:
            if shard.real_blocks == 0:
                self._identity_stats(shard.buf)
                continue
            partials = shard.stat_partials if inner.collect_stats else None
            moments = [shard.real(shard.moments[name]) for name in inner.MOMENTS]
            kernels.update(inner.KIND, shard.real(shard.param_shard()), shard.real(shard.grad),
                           moments[0], moments[1] if len(moments) > 1 else None,
                           shard.block_tensor, shard.tensor_end, ds.tensor_group, ds.tensor_step,
                           ds.hyper, ds.globals, partials)
            if partials is not None:
                kernels.tensor_reduce(partials, shard.tensor_block_start, inner.STAT_OPS,
                                      ds.stat_values, shard.buf.tensor_offset)
        if inner.collect_stats:
            self._reduce_stats()

    def _identity_stats(self, buf):
        """Statistics of a buffer with no blocks on this rank: the identities of the reductions."""
        if not self.inner.collect_stats:
            return
        columns = slice(buf.tensor_offset, buf.tensor_offset + len(buf.params))
        for c, op in enumerate(self.inner.STAT_OPS):
            value = {flat.OP_SUM: 0.0, flat.OP_MIN: math.inf, flat.OP_MAX: -math.inf}[op]
            self.ds.stat_values[c, columns] = value

    def _reduce_stats(self):
        """Per-tensor statistics across shards: sums add, min and max reduce (two collectives:
        one SUM, one MAX over [-min, max])."""
        values, index = self.ds.stat_values, self._stat_index
        sums = values.index_select(0, index[flat.OP_SUM])
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=self.group)
        values.index_copy_(0, index[flat.OP_SUM], sums)
        if index[flat.OP_MIN].numel() + index[flat.OP_MAX].numel() == 0:
            return
        extremes = torch.cat([values.index_select(0, index[flat.OP_MIN]).neg(),
                              values.index_select(0, index[flat.OP_MAX])])
        dist.all_reduce(extremes, op=dist.ReduceOp.MAX, group=self.group)
        mins = index[flat.OP_MIN].numel()
        values.index_copy_(0, index[flat.OP_MIN], extremes[:mins].neg())
        values.index_copy_(0, index[flat.OP_MAX], extremes[mins:])

    def _reference_step(self, scaling):
        """The step through fusedopt.reference's per-tensor math, on each tensor's slice of the
        shard (syncs). Figures cross ranks in float64, so float64 runs stay exact to rounding."""
        ds, inner = self.ds, self.inner
        num_tensors = ds.tensor_group.numel()
        scale = scaling.scale_value()
        inv_scale = 1.0 / scale
        groups = ds.tensor_group.tolist()
        pieces = []
        figures = torch.zeros(2 * num_tensors + 1, dtype=torch.float64, device=ds.device)
        for shard in self.shards:
            for i, lo, hi in shard.slices():
                position = shard.buf.tensor_offset + i
                if groups[position] < 0:
                    continue
                grad = shard.grad[lo - shard.start:hi - shard.start]
                g = _compute(grad) * inv_scale
                figures[position] = g.double().square().sum()
                figures[num_tensors + position] = float(not bool(torch.isfinite(g).all()))
                pieces.append((shard, i, lo, hi, position))
        figures[-1] = float(scaling.external_found_inf_value())
        dist.all_reduce(figures, op=dist.ReduceOp.SUM, group=self.group)
        host = figures.tolist()
        active = [t for t in range(num_tensors) if groups[t] >= 0]
        found = host[-1] > 0 or any(host[num_tensors + t] > 0 for t in active)
        norm = math.sqrt(math.fsum(host[t] for t in active))
        clip = clip_coefficient(norm, inner.max_grad_norm)
        steps = ds.tensor_step.tolist()
        if not found:
            for t in active:
                steps[t] += 1
        if inner.collect_stats:
            self._identity_stats_all()
        for shard, i, lo, hi, position in pieces:
            group = inner.param_groups[groups[position]]
            self._reference_slice(shard, i, lo, hi, position, group, int(steps[position]),
                                  None if found else inv_scale * clip)
        if inner.collect_stats:
            self._reduce_stats()
        new_scale = scaling.update_value(found)
        ds.tensor_step.copy_(torch.tensor(steps, dtype=torch.float32))
        ds.tensor_sums.copy_(figures[:2 * num_tensors].view(2, num_tensors))
        g = ds.globals
        g[flat.GRAD_NORM] = norm
        g[flat.CLIP_COEF] = clip
        g[flat.FOUND_INF] = float(found)
        g[flat.INV_SCALE] = inv_scale
        g[flat.SKIPPED_STEPS] += float(found)
        g[flat.SCALE] = new_scale

    def _identity_stats_all(self):
        for shard in self.shards:
            self._identity_stats(shard.buf)

    def _reference_slice(self, shard, i, lo, hi, position, group, step, grad_factor):
        """Update one tensor's slice (grad_factor None: a skipped step) and write its
        statistics partials into stat_values."""
        inner = self.inner
        local = slice(lo - shard.start, hi - shard.start)
        stored = shard.buf.param[lo:hi]
        old = _compute(stored).clone()
        state = {name: shard.moments[name][local] for name in inner.MOMENTS}
        hyper = inner._reference_hyper(group)
        k = decay_multiplier(hyper["lr"], hyper["max_lr"], hyper["corrected"])
        g, v_prev = None, None
        if grad_factor is not None:
            param = old.clone()
            g = _compute(shard.grad[local]) * grad_factor
            if inner.KIND == "adam":
                v_prev = state["exp_avg_sq"].clone()
                adam_reference(param, g.to(param.dtype), state["exp_avg"], state["exp_avg_sq"],
                               step=step, lr=hyper["lr"], beta1=hyper["beta1"],
                               beta2=hyper["beta2"], eps=hyper["eps"],
                               weight_decay=hyper["weight_decay"], decay_multiplier=k)
            else:
                sgd_reference(param, g.to(param.dtype), state["momentum_buffer"], step=step,
                              lr=hyper["lr"], momentum=hyper["momentum"],
                              dampening=hyper["dampening"], weight_decay=hyper["weight_decay"],
                              nesterov=hyper["nesterov"], decay_multiplier=k)
            stored.copy_(param)
        if not inner.collect_stats:
            return
        new = _compute(stored)
        values = [new.square().sum(), (new - old).square().sum()]
        if inner.KIND == "adam":
            correction2 = 1 - hyper["beta2"] ** step if step > 0 else 1.0
            vhat = state["exp_avg_sq"] / correction2
            decreased = (g.square() < v_prev).sum() if g is not None else 0
            values += [vhat.min(), vhat.max(), vhat.sum(), decreased]
        else:
            values.append(state["momentum_buffer"].square().sum())
        for c, value in enumerate(values):
            self.ds.stat_values[c, position] = float(value)

    # ----------------------------------------------------------------- statistics, memory
    def stats(self):
        """The last step's statistics, reduced across ranks (the same on every rank)."""
        return self.inner.stats()

    @property
    def _devices(self):
        return self.inner._devices

    def memory(self) -> dict:
        """Bytes this rank holds for the optimizer, and what an unsharded optimizer would hold.

        state: the moments of this rank's shards; grad_shard: the reduce-scatter output;
        unsharded_state: the moments of the whole flat layout (one rank, no sharding).
        """
        state = sum(m.numel() * m.element_size() for s in self.shards for m in s.moments.values())
        grad = sum(s.grad.numel() * s.grad.element_size() for s in self.shards)
        unsharded = sum(s.buf.numel * m.element_size() for s in self.shards
                        for m in s.moments.values())
        return {"state": state, "grad_shard": grad, "unsharded_state": unsharded,
                "world_size": self.world_size}

    # ----------------------------------------------------------------- checkpoints
    def state_dict(self, to: int | None = 0):
        """The full state in torch.optim's format (loads into a plain fusedopt optimizer or
        torch.optim.AdamW/SGD), gathered on group rank `to`; the other ranks get None.
        Collective: every rank calls it. Moments are gathered one at a time through `to`'s
        device, then kept on the CPU."""
        if not (isinstance(to, int) and 0 <= to < self.world_size):
            raise ValueError(f"to must be a rank of the process group (0..{self.world_size - 1}), "
                             f"got {to!r}")
        inner = self.inner
        dst = dist.get_global_rank(self.group or dist.group.WORLD, to)
        mine = self.rank == to
        full = {}
        for bi, shard in enumerate(self.shards):
            for name in inner.MOMENTS:
                local = shard.moments[name]
                parts = [torch.empty_like(local) for _ in range(self.world_size)] if mine else None
                dist.gather(local, parts, dst=dst, group=self.group)
                if mine:
                    full[bi, name] = torch.cat(parts).cpu()
        if not mine:
            return None
        buffer_index = {id(s.buf): bi for bi, s in enumerate(self.shards)}

        def gathered(buf, i, name):
            values = full[buffer_index[id(buf)], name]
            p = buf.params[i]
            return values[buf.starts[i]:buf.starts[i] + p.numel()].view(p.shape)

        return inner._state_dict_from(gathered)

    def sharded_state_dict(self):
        """The state as torch.distributed.checkpoint saves and loads it, resharding on load.

        Each buffer's moments are DTensors of global shape [num_blocks, BLOCK] (independent of
        the world size) sharded along rows, whose local parts are views of this rank's moments:
        dcp.load(opt.sharded_state_dict(), ...) writes them in place, then
        opt.load_state_dict(that dict) applies step counts and hyperparameters.
        """
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.tensor import DTensor, Shard

        mesh = DeviceMesh.from_group(self.group or dist.group.WORLD, self.ds.device.type)
        index_of = {p: index for index, _, _, p in self.inner._ordered_params()}
        out = {SHARDED_KEY: {"kind": self.inner.KIND,
                             "layout": [[str(s.buf.dtype), s.buf.num_blocks] for s in self.shards]},
               "tensor_step": self.ds.tensor_step.clone(),
               "param_groups": self.inner._saved_groups(index_of)}
        for bi, shard in enumerate(self.shards):
            for name in self.inner.MOMENTS:
                local = shard.real(shard.moments[name]).view(shard.real_blocks, BLOCK)
                out[f"buffer{bi}.{name}"] = DTensor.from_local(
                    local, mesh, [Shard(0)], run_check=False,
                    shape=torch.Size((shard.buf.num_blocks, BLOCK)), stride=(BLOCK, 1))
        return out

    def load_state_dict(self, state_dict):
        """Load the full form (state_dict(), a plain fusedopt or torch.optim state dict, given to
        every rank) or the sharded form (sharded_state_dict() after dcp.load). Collective only in
        that every rank must load; a different world size than at saving is fine."""
        if SHARDED_KEY in state_dict:
            self._load_sharded(state_dict)
        else:
            self._load_full(state_dict)
        self.ds.uploaded_hyper = None

    @torch.no_grad()
    def _load_full(self, state_dict):
        inner = self.inner
        inner._load_groups(state_dict["param_groups"])
        shard_of = {id(s.buf): s for s in self.shards}
        steps = []
        for ds, buf, i, position, p, entry, step in inner._saved_entries(state_dict):
            steps.append(step)
            shard = shard_of[id(buf)]
            start, numel = buf.starts[i], p.numel()
            lo = max(start, shard.start)
            hi = min(start + numel, shard.start + shard.real_blocks * BLOCK)
            for name in inner.MOMENTS:
                value = entry.get(name)
                if value is not None and tuple(value.shape) != tuple(p.shape):
                    raise ValueError(f"state_dict: {name} of {inner._names[p]} has shape "
                                     f"{tuple(value.shape)}, expected {tuple(p.shape)}")
                if lo >= hi:
                    continue
                target = shard.moments[name][lo - shard.start:hi - shard.start]
                if value is None:
                    target.zero_()
                else:
                    target.copy_(value.reshape(-1)[lo - start:hi - start])
        self.ds.tensor_step.copy_(torch.tensor(steps, dtype=torch.float32))

    @torch.no_grad()
    def _load_sharded(self, state_dict):
        meta = state_dict[SHARDED_KEY]
        layout = [[str(s.buf.dtype), s.buf.num_blocks] for s in self.shards]
        if meta["kind"] != self.inner.KIND or [list(x) for x in meta["layout"]] != layout:
            raise ValueError(f"state_dict: saved for a {meta['kind']} optimizer over buffers "
                             f"{meta['layout']}, this one is {self.inner.KIND} over {layout}")
        self.inner._load_groups(state_dict["param_groups"])
        for bi, shard in enumerate(self.shards):
            for name in self.inner.MOMENTS:
                local = state_dict[f"buffer{bi}.{name}"].to_local()
                target = shard.real(shard.moments[name])
                if local.data_ptr() != target.data_ptr() or local.numel() != target.numel():
                    target.copy_(local.reshape(-1))
        self.ds.tensor_step.copy_(state_dict["tensor_step"])


def _compute(tensor):
    """The dtype the reference math runs in: fp32 for half types (as fusedopt.reference)."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


def _taken_over(name):
    def refuse(*args, **kwargs):
        raise RuntimeError(f"optimizer.{name}: this optimizer's state is sharded; call "
                           f"{name} on its ShardedOptimizer")
    return refuse
