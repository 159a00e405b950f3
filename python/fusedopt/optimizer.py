"""FusedOptimizer: the torch.optim front end over flat buffers and a backend.

A step, per device (docs/kernel_contract.md): grad_norm + tensor_reduce for each flat buffer,
one finalize, then update (+ tensor_reduce of the statistics partials) for each buffer. The
host only launches: hyperparameters, loss scale, step counts and the skip decision live in
device memory, so step() never waits for the GPU and can be captured in a CUDA graph.
"""
from __future__ import annotations

import math

import torch

from fusedopt import backends, flat
from fusedopt.flat import FlatBuffer
from fusedopt.reference import ReferenceTensor, reference_step, scaler_update_reference
from fusedopt.stats import StepStats


class _DeviceState:
    """Everything one device's kernels share: the tensor table, hyperparameters, results."""

    def __init__(self, device, buffers, num_groups, stat_columns):
        self.device = device
        self.buffers = buffers
        num_tensors = sum(len(b.params) for b in buffers)
        self.tensor_end = torch.cat([b.tensor_end for b in buffers]).to(device)
        self.numel = torch.tensor([p.numel() for b in buffers for p in b.params],
                                  dtype=torch.int64, device=device)
        self.tensor_group = torch.full((num_tensors,), -1, dtype=torch.int32, device=device)
        self.tensor_step = torch.zeros(num_tensors, dtype=torch.float32, device=device)
        self.hyper = torch.zeros(num_groups, flat.HYPER_COLUMNS, dtype=torch.float32, device=device)
        self.tensor_sums = torch.zeros(2, num_tensors, dtype=torch.float32, device=device)
        self.globals = torch.zeros(flat.GLOBAL_SLOTS, dtype=torch.float32, device=device)
        self.globals[flat.CLIP_COEF] = 1.0
        self.globals[flat.INV_SCALE] = 1.0
        self.globals[flat.SCALE] = 1.0
        self.stat_values = torch.zeros(len(stat_columns), num_tensors, dtype=torch.float32,
                                       device=device)
        self.uploaded_groups = None
        self.uploaded_hyper = None
        self.backend = "reference"


class FusedOptimizer(torch.optim.Optimizer):
    """Base of AdamW/AdamC and SGD/SGDC.

    Subclasses set KIND, MOMENTS, STAT_COLUMNS/STAT_OPS and define _validate_hyper(group),
    _hyper_row(group, lr) (the 10 hyper columns), _reference_hyper(group) and
    _stat_values_from_reference(tensor).
    """

    KIND = ""
    MOMENTS: tuple = ()
    STAT_COLUMNS: tuple = ()
    STAT_OPS: tuple = ()
    # torch.amp.GradScaler hands a fused-capable optimizer grad_scale and found_inf instead of
    # unscaling the gradients itself (torch/amp/grad_scaler.py, GradScaler.step).
    _step_supports_amp_scaling = True

    def __init__(self, params, defaults, *, max_grad_norm, backend, stats):
        if max_grad_norm is not None and not (isinstance(max_grad_norm, (int, float))
                                              and max_grad_norm > 0 and math.isfinite(max_grad_norm)):
            raise ValueError(f"max_grad_norm must be None or a positive finite number, got {max_grad_norm!r}")
        if backend not in backends.BACKENDS:
            raise ValueError(f"backend must be one of {backends.BACKENDS}, got {backend!r}")
        if not isinstance(stats, bool):
            raise TypeError(f"stats must be True or False, got {stats!r}")
        self.max_grad_norm = max_grad_norm
        self.backend = backend
        self.collect_stats = stats
        self._devices = {}
        super().__init__(params, defaults)
        self._build_layout()

    # ----------------------------------------------------------------- parameters and layout
    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if group.get("max_lr") is None:
            # lr_max defaults to the group's lr at construction: its peak under warmup-free
            # schedules, and the value schedulers scale down from (Defazio 2025, Sec. 3).
            group["max_lr"] = float(group["lr"])
        for p in group["params"]:
            if not torch.is_floating_point(p) or p.is_complex():
                raise TypeError(f"params: fused optimizers take real floating-point tensors, got {p.dtype}")
            if p.is_sparse:
                raise TypeError("params: sparse parameters are not supported")
        self._validate_group(group)
        if self._devices:
            self._build_layout()

    def _validate_group(self, group):
        lr = group["lr"]
        lr_value = float(lr) if not torch.is_tensor(lr) else None
        if torch.is_tensor(lr) and (lr.numel() != 1 or not lr.is_floating_point()):
            raise ValueError("lr: a tensor lr must hold one floating-point value")
        if lr_value is not None and not lr_value >= 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not float(group["max_lr"]) > 0:
            raise ValueError(f"max_lr must be > 0, got {group['max_lr']}")
        if not group["weight_decay"] >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {group['weight_decay']}")
        if not isinstance(group["corrected"], bool):
            raise TypeError(f"corrected must be True or False, got {group['corrected']!r}")
        self._validate_hyper(group)

    def _ordered_params(self):
        """(index, group index, name, param) in optimizer order, the order of state_dict."""
        index = 0
        for gi, group in enumerate(self.param_groups):
            names = group.get("param_names")
            for i, p in enumerate(group["params"]):
                yield index, gi, (names[i] if names else f"param{index}"), p
                index += 1

    def _build_layout(self):
        """Re-home every param into flat buffers per (device, dtype), keeping existing state."""
        saved = self._snapshot_state() if self._devices else {}
        by_device = {}
        self._group_of, self._names = {}, {}
        for _, gi, name, p in self._ordered_params():
            if p in self._group_of:
                raise ValueError(f"params: parameter {name} appears in more than one group")
            self._group_of[p] = gi
            self._names[p] = name
            by_device.setdefault(p.device, {}).setdefault(p.dtype, []).append(p)
        self._devices = {}
        for device, by_dtype in by_device.items():
            buffers, offset = [], 0
            for dtype, params in by_dtype.items():
                buffers.append(FlatBuffer(params, device, dtype, offset, self.MOMENTS))
                offset += len(params)
            ds = _DeviceState(device, buffers, len(self.param_groups), self.STAT_COLUMNS)
            ds.backend = backends.resolve(self.backend, device, list(by_dtype))
            if ds.backend != "reference":
                for buf in buffers:
                    buf.stat_partials = torch.zeros(len(self.STAT_COLUMNS), buf.num_blocks,
                                                    dtype=torch.float32, device=device)
            self._devices[device] = ds
        self._bind_state()
        with torch.no_grad():
            for p, (step, moments) in saved.items():
                self.state[p]["step"].fill_(step)
                for name, value in moments.items():
                    self.state[p][name].copy_(value)

    def _snapshot_state(self):
        return {p: (float(s["step"]), {n: s[n].clone() for n in self.MOMENTS})
                for p, s in self.state.items()}

    def _bind_state(self):
        """opt.state[p] exposes the flat storage as torch.optim's per-param state (views)."""
        self.state.clear()
        for ds in self._devices.values():
            position = 0
            for buf in ds.buffers:
                for i, p in enumerate(buf.params):
                    entry = {"step": ds.tensor_step[position]}
                    for name in self.MOMENTS:
                        entry[name] = buf.view(buf.moments[name], i)
                    self.state[p] = entry
                    position += 1

    def _slots(self):
        """(device state, buffer, index in buffer, device-local tensor index, param)."""
        for ds in self._devices.values():
            position = 0
            for buf in ds.buffers:
                for i, p in enumerate(buf.params):
                    yield ds, buf, i, position, p
                    position += 1

    # ----------------------------------------------------------------- gradients
    @torch.no_grad()
    def zero_grad(self, set_to_none: bool = True):
        """Clear every gradient in one memset per flat buffer.

        The .grad views stay whatever set_to_none says: freeing them would make autograd
        allocate fresh gradients that the next step has to copy in. A param that gets no
        gradient in a later backward therefore sees a zero gradient (torch.optim with
        set_to_none=False behaves the same); a param whose .grad is None at step() is skipped.
        """
        for ds in self._devices.values():
            for buf in ds.buffers:
                buf.grad.zero_()
                for i, p in enumerate(buf.params):
                    if p.grad is not None and p.grad is not buf.grad_views[i]:
                        p.grad = buf.grad_views[i]

    def _gather_grads(self, ds):
        """Make every .grad a view of the flat gradient buffer and upload which tensors step.

        A .grad that something replaced (autograd on the first backward, user code) is copied
        into the flat buffer and re-bound, so the step is never computed from stale values.
        """
        groups = []
        group_of = self._group_of
        for buf in ds.buffers:
            for p, view, ptr, i in zip(buf.params, buf.grad_views, buf.param_ptrs,
                                       range(len(buf.params))):
                if p.data_ptr() != ptr:
                    buf.rehome(i)
                grad = p.grad
                if grad is None:
                    groups.append(-1)
                    continue
                if grad is not view:
                    self._check_grad(p, grad)
                    view.copy_(grad)
                    p.grad = view
                groups.append(group_of[p])
        groups = tuple(groups)
        if groups != ds.uploaded_groups:
            _refuse_during_capture("the set of parameters with gradients")
            _upload(ds.tensor_group, groups, torch.int32)
            ds.uploaded_groups = groups

    def _check_grad(self, p, grad):
        name = self._names[p]
        if grad.is_sparse:
            raise TypeError(f"grad of {name}: sparse gradients are not supported")
        if grad.device != p.device:
            raise ValueError(f"grad of {name}: on {grad.device}, its parameter on {p.device}")
        if grad.dtype != p.dtype or grad.shape != p.shape:
            raise ValueError(f"grad of {name}: {grad.dtype} {tuple(grad.shape)} does not match "
                             f"the parameter's {p.dtype} {tuple(p.shape)}")

    def _upload_hyper(self, ds):
        rows, tensor_lrs = [], []
        for gi, group in enumerate(self.param_groups):
            lr = group["lr"]
            if torch.is_tensor(lr):
                tensor_lrs.append((gi, lr))
            # A tensor lr is copied on the device below; 0.0 holds its column in the host rows
            # (a NaN would compare unequal to itself and force an upload every step).
            rows.append(tuple(self._hyper_row(group, 0.0 if torch.is_tensor(lr) else lr)))
        rows = tuple(rows)
        if rows != ds.uploaded_hyper:
            _refuse_during_capture("a hyperparameter held as a Python number (use a tensor lr)")
            for group in self.param_groups:
                self._validate_group(group)
            _upload(ds.hyper, rows, torch.float32)
            ds.uploaded_hyper = rows
        for gi, lr in tensor_lrs:
            ds.hyper[gi, flat.LR].copy_(lr.reshape(()), non_blocking=True)

    # ----------------------------------------------------------------- the step
    @torch.no_grad()
    def step(self, closure=None):
        loss, scaling = self._prepare_step(closure)
        kernel_devices = [ds for ds in self._devices.values() if ds.backend != "reference"]
        if kernel_devices:
            self._kernel_step(kernel_devices, scaling)
        reference_devices = [ds for ds in self._devices.values() if ds.backend == "reference"]
        if reference_devices:
            if kernel_devices:
                raise RuntimeError("params: one optimizer cannot mix the reference backend "
                                   "with a kernel backend across devices")
            self._reference_step(reference_devices, scaling)
        return loss

    def _prepare_step(self, closure, owner=None):
        """Everything before the first kernel: run the closure, read the loss scaler (set on
        `owner`, the optimizer the user steps, e.g. a ShardedOptimizer wrapping this one) and
        make the gradients and hyperparameters of every device ready."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        scaling = _ScaleInputs.from_optimizer(owner or self)
        for ds in self._devices.values():
            self._gather_grads(ds)
            self._upload_hyper(ds)
        return loss, scaling

    def _kernel_step(self, devices, scaling):
        if scaling.scaler is not None and scaling.scale.device not in self._devices:
            raise RuntimeError(f"GradScaler: its scale is on {scaling.scale.device}, where this "
                               "optimizer has no parameters")
        # Copy the scale to every device before any finalize updates it in place: a copy taken
        # later would read the updated scale and unscale that device's gradients with it.
        scales = {ds.device: scaling.scale_on(ds.device) for ds in devices}
        for ds in devices:
            kernels = backends.kernels(ds.backend)
            scale = None if scaling.already_unscaled else scales[ds.device]
            for buf in ds.buffers:
                kernels.grad_norm(buf.grad, buf.block_tensor, ds.tensor_end, ds.tensor_group,
                                  scale, buf.block_sums)
                kernels.tensor_reduce(buf.block_sums, buf.tensor_block_start, flat.GRAD_SUM_OPS,
                                      ds.tensor_sums, buf.tensor_offset)
        for ds in devices:
            kernels = backends.kernels(ds.backend)
            # Every device sums the same per-tensor values in the same order, so all of them
            # agree on the norm and the skip decision to the bit.
            sums = ds.tensor_sums if len(devices) == 1 else torch.cat(
                [d.tensor_sums.to(ds.device, non_blocking=True) for d in devices], dim=1)
            updates_scale = scaling.updates_on(ds.device)
            kernels.finalize(sums, ds.tensor_group, ds.tensor_step, ds.globals,
                             scales[ds.device],
                             scaling.growth_tracker if updates_scale else None,
                             scaling.found_inf_on(ds.device), self.max_grad_norm or 0.0,
                             scaling.growth_factor, scaling.backoff_factor,
                             scaling.growth_interval, updates_scale)
            if scaling.already_unscaled:
                ds.globals[flat.INV_SCALE].fill_(1.0)
            for buf in ds.buffers:
                partials = buf.stat_partials if self.collect_stats else None
                kernels.update(self.KIND, buf.param, buf.grad, *self._moments(buf),
                               buf.block_tensor, ds.tensor_end, ds.tensor_group, ds.tensor_step,
                               ds.hyper, ds.globals, partials)
                if partials is not None:
                    kernels.tensor_reduce(partials, buf.tensor_block_start, self.STAT_OPS,
                                          ds.stat_values, buf.tensor_offset)

    def _moments(self, buf):
        names = self.MOMENTS
        return buf.moments[names[0]], (buf.moments[names[1]] if len(names) > 1 else None)

    def _reference_step(self, devices, scaling):
        """The same step through fusedopt.reference, one tensor at a time (syncs)."""
        slots = []
        for ds, buf, i, position, p in self._slots():
            if ds not in devices:
                continue
            group = self.param_groups[self._group_of[p]]
            state = {name: buf.view(buf.moments[name], i) for name in self.MOMENTS}
            tensor = ReferenceTensor(param=p.data, grad=p.grad, state=state,
                                     hyper=self._reference_hyper(group),
                                     step=int(ds.tensor_step[position]))
            slots.append((ds, position, tensor))
        scale = scaling.scale_value()
        result = reference_step(self.KIND, [t for _, _, t in slots], scale=scale,
                                max_grad_norm=self.max_grad_norm,
                                external_found_inf=scaling.external_found_inf_value(),
                                want_stats=self.collect_stats)
        found = result["found_inf"]
        new_scale = scaling.update_value(found)
        for ds in devices:
            g = ds.globals
            g[flat.GRAD_NORM] = result["grad_norm"]
            g[flat.CLIP_COEF] = result["clip_coef"]
            g[flat.FOUND_INF] = float(found)
            g[flat.INV_SCALE] = 1.0 / scale
            g[flat.SKIPPED_STEPS] += float(found)
            g[flat.SCALE] = new_scale
        for ds, position, t in slots:
            ds.tensor_step[position] = t.step
            active = t.grad is not None
            ds.tensor_sums[0, position] = t.stats["grad_norm"] ** 2 if active else 0.0
            ds.tensor_sums[1, position] = float(active and t.stats["nonfinite"])
            if self.collect_stats and active:
                for c, value in enumerate(self._stat_values_from_reference(t)):
                    ds.stat_values[c, position] = value

    # ----------------------------------------------------------------- statistics
    def stats(self) -> StepStats:
        """The statistics of the last step as device tensors (no sync until they are read)."""
        parts = [(ds, ds.numel) for ds in self._devices.values()]
        names = [self._names[p] for ds in self._devices.values() for b in ds.buffers
                 for p in b.params]
        return StepStats.from_device_arrays(self.KIND, names, parts, self.STAT_COLUMNS,
                                            self.collect_stats)

    # ----------------------------------------------------------------- checkpoints
    def state_dict(self):
        """torch.optim's format: per-param step (a CPU float32 tensor) and moments (copies)."""
        return self._state_dict_from(lambda buf, i, name: buf.view(buf.moments[name], i))

    def _state_dict_from(self, moment_of):
        """torch.optim's format with each param's moments from moment_of(buffer, index, name)
        (a view into this optimizer's flat moments, or a gathered copy for ShardedOptimizer)."""
        index_of = {p: index for index, _, _, p in self._ordered_params()}
        steps = {device: ds.tensor_step.tolist() for device, ds in self._devices.items()}
        state = {}
        for ds, buf, i, position, p in self._slots():
            step = steps[ds.device][position]
            if step == 0:
                continue
            entry = {"step": torch.tensor(step, dtype=torch.float32)}
            for name in self.MOMENTS:
                entry[name] = moment_of(buf, i, name).clone()
            state[index_of[p]] = entry
        return {"state": state, "param_groups": self._saved_groups(index_of)}

    def _saved_groups(self, index_of):
        """The param groups as torch.optim saves them: hyperparameters and param indices."""
        groups = []
        for group in self.param_groups:
            saved = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in group.items()
                     if k != "params"}
            saved["params"] = [index_of[p] for p in group["params"]]
            groups.append(saved)
        return groups

    def load_state_dict(self, state_dict):
        """Load a fusedopt or torch.optim state_dict (same optimizer family, same groups)."""
        self._load_groups(state_dict["param_groups"])
        with torch.no_grad():
            for ds, buf, i, position, p, entry, step in self._saved_entries(state_dict):
                ds.tensor_step[position] = step
                for name in self.MOMENTS:
                    value = entry.get(name)
                    target = buf.view(buf.moments[name], i)
                    if value is None:
                        target.zero_()
                    elif value.shape != target.shape:
                        raise ValueError(f"state_dict: {name} of {self._names[p]} has shape "
                                         f"{tuple(value.shape)}, expected {tuple(target.shape)}")
                    else:
                        target.copy_(value)
        for ds in self._devices.values():
            ds.uploaded_hyper = None

    def _load_groups(self, groups):
        """Check a saved state_dict's groups against ours and take their hyperparameters."""
        if len(groups) != len(self.param_groups):
            raise ValueError(f"state_dict: {len(groups)} param groups, the optimizer has "
                             f"{len(self.param_groups)}")
        for gi, (group, saved) in enumerate(zip(self.param_groups, groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"state_dict: group {gi} has {len(saved['params'])} params, "
                                 f"the optimizer's has {len(group['params'])}")
            self._check_foreign_group(saved)
            for key, value in saved.items():
                if key in group and key not in ("params", "param_names"):
                    group[key] = value.clone() if torch.is_tensor(value) else value
            self._validate_group(group)

    def _saved_entries(self, state_dict):
        """(device state, buffer, index in buffer, device-local index, param, saved per-param
        state, step count) for every param, matched to the saved state by group position."""
        saved_index = {(gi, i): index for gi, saved in enumerate(state_dict["param_groups"])
                       for i, index in enumerate(saved["params"])}
        position_of = {p: (gi, i) for gi, g in enumerate(self.param_groups)
                       for i, p in enumerate(g["params"])}
        for ds, buf, i, position, p in self._slots():
            entry = state_dict["state"].get(saved_index[position_of[p]], {})
            # torch.optim.SGD keeps no step count; a saved momentum buffer means at least one
            # step was taken, which is all SGD's first-step rule needs to know.
            has_moments = any(entry.get(name) is not None for name in self.MOMENTS)
            yield ds, buf, i, position, p, entry, float(entry.get("step", 1 if has_moments else 0))

    def _check_foreign_group(self, saved):
        """torch.optim groups carry options fusedopt does not implement: refuse the ones set."""
        for key in ("amsgrad", "maximize", "differentiable"):
            if saved.get(key):
                raise ValueError(f"state_dict: {key}=True is not supported by fusedopt")


class _ScaleInputs:
    """Where this step's loss scale and external inf flag come from.

    fusedopt.GradScaler: its scale and growth tracker, updated inside finalize.
    torch.amp.GradScaler: optimizer.grad_scale / optimizer.found_inf, read only (torch updates
    the scale in scaler.update()). Neither: scale 1.
    """

    def __init__(self, scale=None, growth_tracker=None, found_inf=None, scaler=None,
                 already_unscaled=False):
        self.scale = scale
        self.growth_tracker = growth_tracker
        self.found_inf = found_inf
        self.scaler = scaler
        self.already_unscaled = already_unscaled
        self.growth_factor = scaler.get_growth_factor() if scaler else 2.0
        self.backoff_factor = scaler.get_backoff_factor() if scaler else 0.5
        self.growth_interval = scaler.get_growth_interval() if scaler else 2000

    @classmethod
    def from_optimizer(cls, optimizer):
        scaler = getattr(optimizer, "_fusedopt_scaler", None)
        if scaler is not None:
            unscaled = scaler._consume_unscaled(optimizer)
            return cls(scale=scaler._scale, growth_tracker=scaler._growth_tracker, scaler=scaler,
                       already_unscaled=unscaled)
        return cls(scale=getattr(optimizer, "grad_scale", None),
                   found_inf=getattr(optimizer, "found_inf", None))

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
        return self.scaler is not None and self.scale.device == device

    def scale_value(self):
        if self.scale is None or self.already_unscaled:
            return 1.0
        return float(self.scale)

    def external_found_inf_value(self):
        return self.found_inf is not None and bool(self.found_inf.ne(0).any())

    def update_value(self, found_inf):
        """Reference path: apply the scale rule on the host and write it back."""
        if self.scaler is None:
            return float(self.scale) if self.scale is not None else 1.0
        scale, tracker = scaler_update_reference(
            float(self.scale), int(self.growth_tracker), found_inf,
            growth_factor=self.growth_factor, backoff_factor=self.backoff_factor,
            growth_interval=self.growth_interval)
        self.scale.fill_(scale)
        self.growth_tracker.fill_(tracker)
        return scale


def _refuse_during_capture(what):
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(f"{what} changed while a CUDA graph is being captured; warm up with "
                           "the final values before capturing")


def _upload(target, rows, dtype):
    """Copy host values into a persistent device tensor without waiting for the GPU."""
    host = torch.tensor(rows, dtype=dtype).reshape(target.shape)
    if target.device.type == "cuda":
        # Pinned staging from torch's caching host allocator: the block is not reused before
        # this copy has run, so the copy can be asynchronous.
        host = host.pin_memory()
    target.copy_(host, non_blocking=True)
