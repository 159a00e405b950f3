"""The step engine: builds the tables over the owners' tensors and runs the step, once.

A step, per device (docs/kernel_contract.md): grad_norm + tensor_reduce for each segment, one
finalize, then update (+ tensor_reduce of the statistics partials) for each segment. The host
only launches: hyperparameters, loss scale, step counts and the skip decision live in device
memory, so step() never waits for the GPU and can be captured in a CUDA graph. The reference
backend runs the same step through engine/reference.py, one tensor at a time (it syncs).
"""
from __future__ import annotations

import torch

from fusedopt import distributed
from fusedopt.engine import backends, int8, layout, master
from fusedopt.engine.reference import ReferenceTensor, reference_step, scaler_update
from fusedopt.engine.tables import DeviceTables, Segment, is_dense, same_layout


class Engine:
    """The tables and launches of one optimizer over its params.

    `algorithm` is a fusedopt.algorithms module; `entries` the (param, group index, name) of
    every param in optimizer order; `master_bits` None, 24 or 32: master weights for bf16 params
    (fusedopt/engine/master.py); `state_storage` None (fp32 state), torch.bfloat16 (rounded
    stochastically, fusedopt/engine/stochastic.py) or int8.CODES_DTYPE (8-bit codes and group
    scales, fusedopt/engine/int8.py). Public surface: `devices` (DeviceTables by device),
    `state_view(p, name)` (the storage), `state_value(p, name)` / `load_state(p, name, value)`
    (the numbers), `scale_view(p, name)`, `remainder_view(p)`, `step_count(p)`,
    `refresh(groups, validate)`,
    `run(scaling, max_grad_norm, collect_stats)`, `rebuild(entries)`.
    """

    def __init__(self, algorithm, entries, num_groups, backend, master_bits=None,
                 state_storage=None):
        self.algorithm = algorithm
        self.backend = backend
        self.master_bits = master_bits
        self.state_storage = state_storage
        self.num_stats = len(algorithm.STATS)
        self.build(entries, num_groups)

    # ----------------------------------------------------------------- layout
    def build(self, entries, num_groups):
        self.names = {p: name for p, _, name in entries}
        self.group_of = {p: gi for p, gi, _ in entries}
        by_device = {}
        for p, _, name in entries:
            by_device.setdefault(p.device, {}).setdefault(p.dtype, []).append(p)
        self.devices = {}
        for device, by_dtype in by_device.items():
            if self.master_bits is not None and torch.float16 in by_dtype:
                p = by_dtype[torch.float16][0]
                raise ValueError(f"params: {self.names[p]} is float16; master_weight_bits "
                                 "splits a master into a bfloat16 param and its low bits, so it "
                                 "takes bfloat16 (and float32, which needs none) params")
            if self.state_storage is not None and torch.float64 in by_dtype:
                p = by_dtype[torch.float64][0]
                raise ValueError(f"params: {self.names[p]} is float64; "
                                 f"{self.state_feature()} is for float32, bfloat16 and float16 "
                                 "params")
            needs = []
            if self.master_bits is not None and torch.bfloat16 in by_dtype:
                needs.append("master_weight_bits")
            if self.state_storage is not None:
                needs.append(self.state_feature())
            backend = backends.resolve(self.backend, device, list(by_dtype), needs)
            segments, offset = [], 0
            for dtype, params in by_dtype.items():
                if backend != "reference":
                    for p in params:
                        self._check_dense(p, distributed.local(p))
                segments.append(Segment(params, device, dtype, offset, self.algorithm.STATE,
                                        self.master_bits, self.state_storage,
                                        self.algorithm.STATE_CODES))
                offset += len(params)
            self.devices[device] = DeviceTables(device, segments, self.group_of, num_groups,
                                                self.num_stats, backend)
        self._check_overlaps([p for p, _, _ in entries])
        sharded = [p for p, _, _ in entries if distributed.is_dtensor(p)]
        if sharded and len(self.devices) > 1:
            raise ValueError("params: DTensor params of one optimizer must live on one device "
                             "per rank")
        self.reduction = distributed.ShardReduction.for_params(
            [p for p, _, _ in entries], self.names, [op for _, op in self.algorithm.STATS],
            sharded[0].device if sharded else None)
        self.slots = {}
        for ds in self.devices.values():
            for seg in ds.segments:
                for i, p in enumerate(seg.params):
                    self.slots[p] = (ds, seg, i, seg.tensor_offset + i)
        self.layout_key = {p: (p.device, p.dtype, p.shape) for p, _, _ in entries}

    def rebuild(self, entries, num_groups):
        """A new layout for new params or params whose dtype or device changed; the state
        follows, converted to the new state dtype and moved to the new device."""
        saved = {p: (float(self.step_count(p)), {n: self.state_value(p, n).clone()
                                                 for n in self.algorithm.STATE},
                     self.remainder_view(p))
                 for p in self.slots}
        self.build(entries, num_groups)
        with torch.no_grad():
            for p, (step, state, remainder) in saved.items():
                if p not in self.slots:
                    continue
                ds, _, _, position = self.slots[p]
                ds.tensor_step[position] = step
                for name, value in state.items():
                    self.load_state(p, name, value.reshape(p.shape))
                if remainder is None:
                    continue
                target = self.remainder_view(p)
                local = distributed.local(p)
                if target is not None:
                    # Same dtype (bf16) on a new device: the master's low bits move with it.
                    target.copy_(remainder.reshape(target.shape))
                elif local.dtype == torch.float32 and torch.equal(
                        local.to(torch.bfloat16).float(), local):
                    # model.float() after construction: the fp32 param becomes its master (the
                    # bf16 value it was cast from, and the low bits kept here).
                    local.copy_(master.combine(local.to(torch.bfloat16),
                                               remainder.to(local.device), self.master_bits))

    def state_view(self, p, name):
        """The state `name` of p as the kernels hold it (this rank's shard for a DTensor p)."""
        _, seg, i, _ = self.slots[p]
        return seg.state_view(name, i)

    def state_value(self, p, name):
        """The state `name` of p as numbers (this rank's shard): the storage view, or the
        decoded fp32 values of 8-bit state."""
        _, seg, i, _ = self.slots[p]
        return seg.state_value(name, i)

    def load_state(self, p, name, value):
        """Set the state `name` of p (this rank's shard) to value, converted to the storage."""
        _, seg, i, _ = self.slots[p]
        seg.load_state(name, i, value)

    def scale_view(self, p, name):
        """The group scales of p's 8-bit state `name` (fusedopt/engine/int8.py)."""
        _, seg, i, _ = self.slots[p]
        return seg.scale_view(name, i)

    def state_feature(self):
        """The state_dtype option as backends.FEATURE_BACKENDS names it."""
        return {torch.bfloat16: "state_dtype='bf16'",
                int8.CODES_DTYPE: "state_dtype='int8'"}[self.state_storage]

    def remainder_view(self, p):
        """The master-weight remainder of p (this rank's shard), None where p keeps no master."""
        _, seg, i, _ = self.slots[p]
        return seg.remainder_view(i)

    def owner_state(self, p, name):
        """The state `name` of p shaped as p: a DTensor with p's placements for a DTensor p."""
        return distributed.like_param(p, self.state_view(p, name))

    def step_count(self, p):
        ds, _, _, position = self.slots[p]
        return ds.tensor_step[position]

    def _check_dense(self, p, tensor):
        if not is_dense(tensor):
            raise ValueError(f"params: {self.names[p]} (shape {tuple(tensor.shape)}, strides "
                             f"{tensor.stride()}) is not dense in memory; the fused kernels "
                             "address a tensor as one span of memory: make it contiguous or use "
                             "backend='reference'")

    def _check_overlaps(self, params):
        """Params that share memory update as torch only if they do not overlap."""
        tensors = {p: distributed.local(p) for p in params}
        spans = sorted(((t.device, t.data_ptr(), t.data_ptr() + t.numel() * t.element_size(), p)
                        for p, t in tensors.items() if t.numel() and t.device.type != "meta"),
                       key=lambda span: (str(span[0]), span[1], span[2]))
        for (device_a, _, end, a), (device_b, start, _, b) in zip(spans, spans[1:]):
            if device_a == device_b and start < end:
                raise ValueError(f"params: {self.names[a]} and {self.names[b]} overlap in "
                                 "memory; one step would update the shared elements twice")

    # ----------------------------------------------------------------- per step
    def refresh(self, param_groups, validate):
        """Check every param against the layout, find the grads and upload what changed;
        `validate(group)` checks a group's hyperparameters before new values are uploaded.

        Returns True when the layout must be rebuilt first (a param's dtype or device changed).
        """
        self.staged = []
        self.param_groups = param_groups
        rows = tuple(self._hyper_row(group) for group in param_groups)
        for ds in self.devices.values():
            if self._gather(ds):
                return True
            if rows != ds.uploaded_hyper:
                for group in param_groups:
                    validate(group)
                ds.upload_hyper(rows)
            for gi, group in enumerate(param_groups):
                if torch.is_tensor(group["lr"]):
                    ds.hyper[gi, layout.LR].copy_(group["lr"].reshape(()), non_blocking=True)
        return False

    def _gather(self, ds):
        """The addresses of every param and grad of one device, and which params have grads;
        uploaded if anything changed. Runs every step, so the common case (nothing moved, every
        param contiguous with a contiguous grad) is three passes over the lists: at 1200 tensors
        each Python operation per param costs about 0.1 ms a step. The passes map unbound
        methods, which skips a method lookup per tensor (data_ptr of 1200 tensors: 0.098 against
        0.124 ms as a list comprehension, on this project's CPU machine)."""
        tensors, grads = ds.walked()
        ptrs = list(map(torch.Tensor.data_ptr, tensors))
        if ptrs != ds.known_ptrs:
            for i, (p, t, ptr) in enumerate(zip(ds.params, tensors, ptrs)):
                if ptr != ds.known_ptrs[i]:
                    if self._moved(p, t):
                        return True
                    ds.note_moved(i, t)
        try:
            # About 3x faster than a generator expression at 1200 grads. A None grad raises
            # TypeError, a sparse one RuntimeError (some torch versions): the loop below handles
            # both.
            fast = ds.all_contiguous and all(map(torch.Tensor.is_contiguous, grads))
        except (TypeError, RuntimeError):
            fast = False
        if fast:
            grad_ptrs, groups = list(map(torch.Tensor.data_ptr, grads)), ds.groups
        else:
            grad_ptrs, groups = self._grads_one_by_one(ds, tensors, grads)
        ds.upload_addresses(ptrs, grad_ptrs, groups)
        return False

    def _grads_one_by_one(self, ds, tensors, grads):
        grad_ptrs, groups = [], []
        kernels = ds.backend != "reference"
        for p, t, g, group, contiguous in zip(ds.params, tensors, grads, ds.groups,
                                              ds.contiguous):
            if g is None:
                grad_ptrs.append(0)
                groups.append(-1)
                continue
            if g.layout is not torch.strided:
                raise TypeError(f"grad of {self.names[p]}: sparse gradients are not supported")
            if kernels and not (contiguous and g.is_contiguous()) and not (
                    is_dense(g) and same_layout(g, t)):
                # A grad laid out unlike its param (set by hand, or a view): the kernels walk
                # both in the param's memory order, so it is copied into that layout first.
                g = torch.empty_like(t).copy_(g)
                self.staged.append(g)
            grad_ptrs.append(g.data_ptr())
            groups.append(group)
        return grad_ptrs, groups

    def _moved(self, p, tensor):
        """The param's storage (`tensor`: p or its local shard) changed. Same dtype, device and
        shape: only its address is new. A new dtype or device: the layout is rebuilt and the
        state follows (True)."""
        device, dtype, shape = self.layout_key[p]
        if p.shape != shape:
            raise ValueError(f"params: {self.names[p]} changed shape from {tuple(shape)} to "
                             f"{tuple(p.shape)} since it was added to the optimizer; its state "
                             "cannot follow (build a new optimizer)")
        if p.device != device or p.dtype != dtype:
            return True
        if self.devices[p.device].backend != "reference":
            self._check_dense(p, tensor)
        self._check_overlaps(list(self.slots))
        return False

    def _hyper(self, group, lr):
        """{hyperparameter: float} of a group, the table's columns, with the given lr."""
        return {"lr": lr, "max_lr": float(group["max_lr"]),
                "weight_decay": float(group["weight_decay"]),
                "corrected": float(group["corrected"]), **self.algorithm.hyper_values(group)}

    def _hyper_row(self, group):
        # A tensor lr is copied on the device after the upload; 0.0 holds its column in the host
        # rows (a NaN would compare unequal to itself and force an upload every step).
        values = self._hyper(group, 0.0 if torch.is_tensor(group["lr"]) else float(group["lr"]))
        row = [values[name] for name in layout.hyper_columns(self.algorithm.HYPER)]
        return tuple(row + [0.0] * (layout.HYPER_COLUMNS - len(row)))

    def run(self, scaling, max_grad_norm, collect_stats):
        kernel_devices = [ds for ds in self.devices.values() if ds.backend != "reference"]
        reference_devices = [ds for ds in self.devices.values() if ds.backend == "reference"]
        if kernel_devices and reference_devices:
            raise RuntimeError("params: one optimizer cannot mix the reference backend with a "
                               "kernel backend across devices")
        if kernel_devices:
            self._kernel_step(kernel_devices, scaling, max_grad_norm, collect_stats)
        if reference_devices:
            self._reference_step(reference_devices, scaling, max_grad_norm, collect_stats)
        self.staged = []

    def _kernel_step(self, devices, scaling, max_grad_norm, collect_stats):
        if scaling.scale is not None and scaling.scale.device not in self.devices:
            raise RuntimeError(f"GradScaler: its scale is on {scaling.scale.device}, where this "
                               "optimizer has no parameters")
        # Copy the scale to every device before any finalize updates it in place: a copy taken
        # later would read the updated scale and unscale that device's gradients with it.
        scales = {ds.device: scaling.scale_on(ds.device) for ds in devices}
        for ds in devices:
            kernels = backends.kernels(ds.backend)
            scale = None if scaling.already_unscaled else scales[ds.device]
            for seg in ds.segments:
                block_sums = seg.block_workspace(len(layout.GRAD_SUM_OPS))
                kernels.grad_norm(seg.dtype, seg.tensor_block_start, seg.num_blocks,
                                  seg.tensor_offset, ds.table, scale, block_sums)
                kernels.tensor_reduce(block_sums, seg.tensor_block_start, layout.GRAD_SUM_OPS,
                                      ds.tensor_sums, seg.tensor_offset)
        found_inf = {ds.device: scaling.found_inf_on(ds.device) for ds in devices}
        if self.reduction is not None:
            # One device per rank (checked in build): the shards' sums become the whole tensors'.
            ds = devices[0]
            found_inf[ds.device] = self.reduction.sums_(ds.tensor_sums, found_inf[ds.device])
        stat_ops = [op for _, op in self.algorithm.STATS]
        for ds in devices:
            kernels = backends.kernels(ds.backend)
            # Every device sums the same per-tensor values in the same order, so all of them
            # agree on the norm and the skip decision to the bit.
            sums = ds.tensor_sums if len(devices) == 1 else torch.cat(
                [d.tensor_sums.to(ds.device, non_blocking=True) for d in devices], dim=1)
            updates_scale = scaling.updates_on(ds.device)
            kernels.finalize(sums, ds.table, ds.tensor_step, ds.globals, scales[ds.device],
                             scaling.growth_tracker if updates_scale else None,
                             found_inf[ds.device], max_grad_norm or 0.0,
                             scaling.growth_factor, scaling.backoff_factor,
                             scaling.growth_interval, updates_scale)
            if scaling.already_unscaled:
                ds.globals[layout.INV_SCALE].fill_(1.0)
            for seg in ds.segments:
                partials = seg.block_workspace(len(stat_ops)) if collect_stats else None
                kernels.update(self.algorithm.NAME, seg.dtype, seg.tensor_block_start,
                               seg.num_blocks, seg.tensor_offset, ds.table, *seg.state_pair(),
                               ds.tensor_step, ds.hyper, ds.globals, partials,
                               seg.remainder, seg.master_bits or 0, *seg.scale_pair())
                if partials is not None:
                    kernels.tensor_reduce(partials, seg.tensor_block_start, stat_ops,
                                          ds.stat_values, seg.tensor_offset)
            if collect_stats and self.reduction is not None:
                self.reduction.stats_(ds.stat_values)

    def _reference_step(self, devices, scaling, max_grad_norm, collect_stats):
        """The same step through engine/reference.py, one tensor at a time (syncs)."""
        slots, param_groups = [], self.param_groups
        for ds in devices:
            tensors, grads = ds.walked()
            for position, (p, t, g, group_index) in enumerate(
                    zip(ds.params, tensors, grads, ds.uploaded_groups())):
                group = param_groups[self.group_of[p]]
                hyper = self._hyper(group, float(group["lr"]))
                state = {n: self.state_view(p, n) for n in self.algorithm.STATE}
                remainder = self.remainder_view(p)
                _, seg, i, _ = self.slots[p]
                rounded = seg.state_storage in (torch.bfloat16, int8.CODES_DTYPE)
                tensor = ReferenceTensor(param=t.data, grad=g if group_index >= 0 else None,
                                         state=state, hyper=hyper,
                                         step=int(ds.tensor_step[position]), remainder=remainder,
                                         master_bits=self.master_bits if remainder is not None
                                         else None,
                                         state_index=seg.state_index(i) if rounded else None,
                                         scales={n: seg.scale_view(n, i) for n in state}
                                         if seg.int8 else None,
                                         state_groups=seg.state_groups(i) if seg.int8 else None,
                                         state_codes=seg.codes)
                slots.append((ds, position, tensor))
        scale = scaling.scale_value()
        result = reference_step(self.algorithm, [t for _, _, t in slots], scale=scale,
                                max_grad_norm=max_grad_norm,
                                external_found_inf=scaling.external_found_inf_value(),
                                want_stats=collect_stats, reduce_sums=self._reduce_sums)
        found = result["found_inf"]
        new_scale = scaling.update_value(found)
        for ds in devices:
            g = ds.globals
            g[layout.GRAD_NORM] = result["grad_norm"]
            g[layout.CLIP_COEF] = result["clip_coef"]
            g[layout.FOUND_INF] = float(found)
            g[layout.INV_SCALE] = 1.0 / scale
            g[layout.SKIPPED_STEPS] += float(found)
            g[layout.SCALE] = new_scale
        stat_names = [name for name, _ in self.algorithm.STATS]
        for ds, position, t in slots:
            ds.tensor_step[position] = t.step
            active = t.grad is not None
            ds.tensor_sums[0, position] = t.stats["grad_sumsq"] if active else 0.0
            ds.tensor_sums[1, position] = float(active and t.stats["nonfinite"])
            if collect_stats and active:
                for c, name in enumerate(stat_names):
                    ds.stat_values[c, position] = t.stats[name]
        if collect_stats and self.reduction is not None:
            self.reduction.stats_(devices[0].stat_values)

    def _reduce_sums(self, sums, found_inf):
        """The reference step's hook between the per-tensor sums and the norm: [2, n] float64
        sums and a [1] found_inf flag, summed over the shards for DTensor params."""
        if self.reduction is None:
            return sums, found_inf
        device = next(iter(self.devices))  # one per rank (build), where the collective runs
        sums, found_inf = sums.to(device), found_inf.to(device)
        found_inf = self.reduction.sums_(sums, found_inf)
        return sums.cpu(), found_inf.cpu()


class ScaleInputs:
    """Where this step's loss scale and external inf flag come from.

    fusedopt.GradScaler: its scale and growth tracker, updated inside finalize.
    torch.amp.GradScaler: optimizer.grad_scale / optimizer.found_inf (torch's protocol for fused
    optimizers), read only: torch updates the scale in scaler.update(). Neither: scale 1.
    """

    def __init__(self, scale=None, growth_tracker=None, found_inf=None, updates_scale=False,
                 already_unscaled=False, growth_factor=2.0, backoff_factor=0.5,
                 growth_interval=2000):
        self.scale = scale
        self.growth_tracker = growth_tracker
        self.found_inf = found_inf
        self.updates_scale = updates_scale
        self.already_unscaled = already_unscaled
        self.growth_factor = growth_factor
        self.backoff_factor = backoff_factor
        self.growth_interval = growth_interval

    def scale_on(self, device):
        """The scale finalize reads (and, on the scaler's device, updates)."""
        if self.scale is None:
            return None
        return self.scale if self.scale.device == device else self.scale.to(device, non_blocking=True)

    def found_inf_on(self, device):
        if self.found_inf is None:
            return None
        found = self.found_inf.float().reshape(1)
        return found if found.device == device else found.to(device, non_blocking=True)

    def updates_on(self, device):
        return self.updates_scale and self.scale.device == device

    def scale_value(self):
        if self.scale is None or self.already_unscaled:
            return 1.0
        return float(self.scale)

    def external_found_inf_value(self):
        return self.found_inf is not None and bool(self.found_inf.ne(0).any())

    def update_value(self, found_inf):
        """Reference path: apply the scale rule on the host and write it back."""
        if not self.updates_scale:
            return float(self.scale) if self.scale is not None else 1.0
        scale, tracker = scaler_update(
            float(self.scale), int(self.growth_tracker), found_inf,
            growth_factor=self.growth_factor, backoff_factor=self.backoff_factor,
            growth_interval=self.growth_interval)
        self.scale.fill_(scale)
        self.growth_tracker.fill_(tracker)
        return scale
