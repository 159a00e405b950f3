"""The per-device tables through which the kernels reach tensors that stay with their owners.

Parameters are the module's tensors and gradients whatever `.grad` holds; the optimizer never
moves them. Per device, one int64 tensor table (layout.TABLE_ROWS x T) holds every tensor's
param and grad address, group (-1: no grad this step), numel and state offset; the host rewrites
it only when an address or the set of tensors with gradients changed (one small asynchronous
copy from pinned memory, no sync), so in a steady training loop it is never re-sent.

The optimizer owns only its state: per (device, param dtype) a *segment*. Its kernel blocks
cover one tensor each (a tensor takes ceil(numel / BLOCK) blocks), so per-tensor figures are sums
of per-block partials in a fixed order (deterministic, no float atomics). Its flat state buffers
hold each tensor's state from a multiple of STATE_ALIGN (32 elements) on: padding costs at most
31 elements per tensor and state, and no traffic (the kernels mask by the tensor's numel).
`opt.state[p]` entries are views of the flat state with p's strides.
"""
from __future__ import annotations

import torch

from fusedopt import distributed
from fusedopt.engine import int8, layout, master


def is_dense(tensor) -> bool:
    """True if the elements fill one span of memory without gaps or overlaps, in any order
    (contiguous, channels_last, a transpose): the kernels then visit them in memory order."""
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(tensor.stride(), tensor.shape) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def same_layout(a, b) -> bool:
    """Element i of a and b sit at the same offset from their first element (size-1 dims,
    whose strides are arbitrary, do not count)."""
    return all(sa == sb for sa, sb, n in zip(a.stride(), b.stride(), a.shape) if n != 1)


def state_dtype(param_dtype):
    # fp32 state for half params (a bf16 second moment loses the small updates that
    # beta2 = 0.999 makes: 1 - 0.999 is below bf16's 2^-8 relative step); float64 stays float64
    # for the high-precision reference.
    return torch.float64 if param_dtype == torch.float64 else torch.float32


class Segment:
    """The tensors of one (device, dtype): block table and the optimizer's flat state.

    `tensor_offset` is the device-local index of the first tensor: the segment's tensor i is
    column tensor_offset + i of the device's tensor table, which all its segments share.
    `tensor_block_start` holds each tensor's first kernel block and the segment's block count;
    the kernels find a block's tensor by a search over it.
    """

    def __init__(self, params, device, dtype, tensor_offset, state_names, master_bits=None,
                 state_storage=None, state_codes=None):
        self.params = list(params)
        # What the kernels walk: the params themselves, or this rank's shards of DTensor params.
        self.tensors = [distributed.local(p) for p in self.params]
        self.device = device
        self.dtype = dtype
        self.tensor_offset = tensor_offset
        self.state_starts, block_start, total = [], [0], 0
        for p in self.tensors:
            self.state_starts.append(total)
            total += layout.state_span(p.numel())
            block_start.append(block_start[-1] + layout.blocks_of(p.numel()))
        self.num_blocks = block_start[-1]
        self.tensor_block_start = torch.tensor(block_start, dtype=torch.int32, device=device)
        self.state_storage = state_storage or state_dtype(dtype)
        self.states = {name: torch.zeros(total, dtype=self.state_storage, device=device)
                       for name in state_names}
        # 8-bit state: each state's format and the scale byte of each group of int8.GROUP
        # elements (STATE_ALIGN is a multiple of the group, so no group spans two tensors).
        self.int8 = self.state_storage == int8.CODES_DTYPE
        self.codes = dict(zip(state_names, state_codes or ()))
        self.scales = {name: torch.zeros(total // int8.GROUP, dtype=torch.uint8, device=device)
                       for name in state_names} if self.int8 else None
        # bf16 params with master weights: the masters' low bits (fusedopt/engine/master.py),
        # laid out like the state. Zero: each master starts equal to its param.
        self.master_bits = master_bits if dtype == torch.bfloat16 else None
        self.remainder = None if self.master_bits is None else torch.zeros(
            total, dtype=master.REMAINDER_DTYPES[self.master_bits], device=device)

    def state_view(self, name, i):
        """Tensor i's state `name` as a view with the (local) param's shape and memory layout."""
        return self._view(self.states[name], i)

    def state_index(self, i):
        """Each element's index in the state buffers, shaped like tensor i's state: the random
        bits of stochastic rounding are a function of it (fusedopt/engine/stochastic.py)."""
        start = self.state_starts[i]
        span = torch.arange(start, start + layout.state_span(self.tensors[i].numel()),
                            device=self.device)
        return self._view(span, i, offset=0)

    def scale_view(self, name, i):
        """Tensor i's scale bytes of 8-bit state `name`, one per group of its state."""
        start = self.state_starts[i] // int8.GROUP
        return self.scales[name][start:start + layout.state_span(self.tensors[i].numel())
                                 // int8.GROUP]

    def state_groups(self, i):
        """Each element's group among tensor i's scale_view, shaped like its state."""
        return (self.state_index(i) - self.state_starts[i]) // int8.GROUP

    def state_value(self, name, i):
        """Tensor i's state `name` as numbers: the view itself, or for 8-bit state the decoded
        fp32 values (a new tensor)."""
        view = self.state_view(name, i)
        if not self.int8:
            return view
        groups = self.state_groups(i)
        return int8.decode(view, self.scale_view(name, i).long()[groups], self.codes[name])

    def load_state(self, name, i, value):
        """Set tensor i's state `name` to value (any float dtype, the state's shape), converted
        to the storage; 8-bit state is quantized rounding to nearest."""
        view = self.state_view(name, i)
        if not self.int8:
            view.copy_(value)
            return
        scales = self.scale_view(name, i)
        code = self.codes[name]
        codes, scale_bytes = int8.quantize(value.to(self.device, torch.float32),
                                           self.state_groups(i), scales.numel(),
                                           int8.nearest(code), code)
        view.copy_(codes)
        scales.copy_(scale_bytes)

    def remainder_view(self, i):
        """Tensor i's master-weight remainder (None without master weights)."""
        return None if self.remainder is None else self._view(self.remainder, i)

    def _view(self, buffer, i, offset=None):
        """Tensor i's part of a buffer laid out like the state (from `offset`, by default the
        tensor's state start), with the param's shape and memory layout."""
        p = self.tensors[i]
        strides = p.stride() if is_dense(p) else torch.empty(p.shape, device="meta").stride()
        return buffer.as_strided(p.shape, strides,
                                 self.state_starts[i] if offset is None else offset)

    def block_workspace(self, rows):
        """Per-block partials [rows, blocks] for one step. Taken from the caching allocator each
        step rather than kept: they live only while the step runs, so they do not add to the
        training iteration's peak (2 rows at 1.1B params are 2.1 MB; AdamW's statistics 6 more)."""
        return torch.empty(rows, self.num_blocks, dtype=torch.float32, device=self.device)

    def state_pair(self):
        """(state1, state2) as the update kernel takes them (None for a missing second)."""
        return self._pair(self.states)

    def scale_pair(self):
        """(scale1, scale2) of 8-bit state, as the update kernel takes them; None otherwise."""
        return self._pair(self.scales) if self.int8 else (None, None)

    @staticmethod
    def _pair(buffers):
        values = list(buffers.values()) + [None] * (layout.MAX_STATES - len(buffers))
        return values[0], values[1]


class DeviceTables:
    """Everything one device's kernels share: the tensor table, hyperparameters, results."""

    def __init__(self, device, segments, group_of, num_groups, num_stats, backend):
        self.device = device
        self.segments = segments
        self.backend = backend
        self.params = [p for s in segments for p in s.params]
        tensors = [t for s in segments for t in s.tensors]
        self.sharded = any(distributed.is_dtensor(p) for p in self.params)
        num_tensors = len(self.params)
        # Per position, what the per-step walk compares against: lists indexed by position, not
        # dicts keyed by params (Tensor.__hash__ is a Python call: 0.2 ms a step at 1200 tensors).
        self.groups = [group_of[p] for p in self.params]
        self.known_ptrs = [t.data_ptr() for t in tensors]
        self.contiguous = [t.is_contiguous() for t in tensors]
        self.all_contiguous = all(self.contiguous)
        self.static_rows = ([t.numel() for t in tensors],
                            [start for s in segments for start in s.state_starts])
        self.table = torch.zeros(layout.TABLE_ROWS, num_tensors, dtype=torch.int64, device=device)
        self.uploaded = None
        # The whole tensors' element counts (a DTensor's global numel): what the statistics'
        # means divide by once their sums are reduced over the shards.
        self.numel = torch.tensor([p.numel() for p in self.params], dtype=torch.int64,
                                  device=device)
        self.tensor_step = torch.zeros(num_tensors, dtype=torch.float32, device=device)
        self.hyper = torch.zeros(num_groups, layout.HYPER_COLUMNS, dtype=torch.float32,
                                 device=device)
        self.uploaded_hyper = None
        self.tensor_sums = torch.zeros(2, num_tensors, dtype=torch.float32, device=device)
        self.globals = torch.zeros(layout.GLOBAL_SLOTS, dtype=torch.float32, device=device)
        self.globals[layout.CLIP_COEF] = 1.0
        self.globals[layout.INV_SCALE] = 1.0
        self.globals[layout.SCALE] = 1.0
        self.stat_values = torch.zeros(num_stats, num_tensors, dtype=torch.float32,
                                       device=device)

    def walked(self):
        """(tensors, grads) the kernels read this step: the params and their grads, or their
        local shards for DTensor params."""
        if self.sharded:
            return [distributed.local(p) for p in self.params], distributed.local_grads(self.params)
        return self.params, [p.grad for p in self.params]

    def note_moved(self, position, tensor):
        """Tensor `position` now lives at a new storage."""
        self.known_ptrs[position] = tensor.data_ptr()
        self.contiguous[position] = tensor.is_contiguous()
        self.all_contiguous = all(self.contiguous)

    def uploaded_groups(self):
        """Each tensor's group in the last upload (-1: no grad that step)."""
        return self.uploaded[2]

    def active(self):
        """Which tensors had a gradient in the last step (device bool tensor)."""
        return self.table[layout.GROUP] >= 0

    def upload_addresses(self, params, grads, groups):
        """Send the dynamic rows if anything changed since the last upload (no sync)."""
        rows = (params, grads, groups)
        if rows == self.uploaded:
            return
        refuse_during_capture("a parameter or gradient address, or which params have "
                              "gradients,")
        upload(self.table, [*params, *grads, *groups,
                            *(value for row in self.static_rows for value in row)], torch.int64)
        self.uploaded = rows

    def upload_hyper(self, rows):
        """Send the per-group hyperparameter rows (no sync)."""
        refuse_during_capture("a hyperparameter held as a Python number (use a tensor lr)")
        upload(self.hyper, [v for row in rows for v in row], torch.float32)
        self.uploaded_hyper = rows


def refuse_during_capture(what):
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(f"{what} changed while a CUDA graph is being captured; warm up with "
                           "the final values, and keep gradients in static tensors, before "
                           "capturing")


def upload(target, values, dtype):
    """Copy host values into a persistent device tensor without waiting for the GPU."""
    host = torch.tensor(values, dtype=dtype).reshape(target.shape)
    if target.device.type == "cuda":
        # Pinned staging from torch's caching host allocator: the block is not reused before
        # this copy has run, so the copy can be asynchronous.
        host = host.pin_memory()
    target.copy_(host, non_blocking=True)
