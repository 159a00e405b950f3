"""The low-precision tier on the CUDA backend (csrc/update.cu): master weights for bf16 params
(fusedopt/engine/master.py), bf16 state rounded stochastically (fusedopt/engine/stochastic.py)
and 8-bit state (fusedopt/engine/int8.py).

CPU (CI): backend selection takes the tier on backend="cuda" ('auto' takes Triton first, CUDA
where Triton is not installed), the wrapper names a bad remainder, master_bits, state dtype or
scale before any launch, and the compiled module's own checks of the new raw arguments.

GPU (marked gpu), bit for bit:
- launch by launch against the specification, on test_cuda_backend's segment (views at
  unaligned offsets, tails, channels_last, a tensor without a gradient, another segment's tensor):
  the contract's element math in fp32 torch ops in the kernels' order (expected_step) on the
  fp32 master (master.combine), split back (master.split), states rounded with stochastic.py's
  bits, 8-bit states decoded (int8.decode) and quantized again (int8.quantize with hash32's
  bits: codes and group scales); nothing else written; found_inf writes nothing at all; the
  statistics partials of the fp32 values;
- whole optimizers over 20 steps with statistics (AdamC, SGD with momentum and Nesterov, Lion;
  24- and 32-bit masters, fp32, bf16 and 8-bit state; a view at an odd offset, tails, an inf
  step that changes nothing): 32-bit masters equal an fp32 run; params, remainders and states equal
  Triton's with its fused multiply-adds off (nvcc's -fmad=false rounds every product), the
  statistics up to summation order; all close to the reference (which forms its scalars in
  Python doubles: not bit for bit).
"""
import math

import pytest
import torch

import fusedopt
from fusedopt import cuda_backend
from fusedopt.engine import backends, int8, layout, master, stochastic
import test_cuda_backend
from test_cuda_backend import (BLOCK, CONFIGS, Segment, _extension, algorithm_module,
                               assert_same_bits, call_update, check_grads_and_gaps, cpu_layout,
                               expected_partials, expected_step, hyper_of, memory_order)

# test_cuda_backend's fixtures: cuda (the device, or a skip saying what is missing) and recorder
# (the wrapper on CPU tensors with a recording extension).
cuda, recorder = test_cuda_backend.cuda, test_cuda_backend.recorder

BF16 = torch.bfloat16
TIER = ("master_weight_bits", "state_dtype='bf16'", "state_dtype='int8'")


# ---------------------------------------------------------------------------------------------
# CPU: backend selection and argument checks
# ---------------------------------------------------------------------------------------------

def test_cuda_backend_takes_the_tier(monkeypatch):
    backends.check_features("cuda", TIER)  # no longer refused by name
    # On CPU tensors what stops backend='cuda' is the device, not the features.
    with pytest.raises(RuntimeError, match="backend='cuda' runs on CUDA tensors"):
        backends.resolve("cuda", torch.device("cpu"), [BF16], TIER)
    # 'auto' takes Triton where it is installed, the CUDA extension where it is not, for the
    # tier as for the rest; either can be asked for by name.
    gpu = torch.device("cuda", 0)
    for installed, expected in (({"triton", "cuda"}, "triton"), ({"cuda"}, "cuda")):
        monkeypatch.setattr(backends, "available", lambda name: name in installed | {"reference"})
        for needs in ((), TIER[:1], TIER[1:2], TIER[2:], TIER):
            assert backends.resolve("auto", gpu, [BF16, torch.float32], needs) == expected, needs
            assert backends.resolve("cuda", gpu, [BF16], needs) == "cuda", needs


def test_wrapper_passes_the_tier_to_the_binding(recorder):
    lay = cpu_layout()
    m, v = lay.state1.to(BF16), lay.state2.to(BF16)
    remainder32 = torch.zeros(m.shape, dtype=torch.int16)
    remainder24 = torch.zeros(m.shape, dtype=torch.uint8)
    call_update(lay, "adamw", BF16, state1=m, state2=v, remainder=remainder32, master_bits=32)
    call_update(lay, "lion", BF16, state1=m, remainder=remainder24, master_bits=24)
    call_update(lay, "sgd", torch.float16, state1=m)
    call_update(lay, "adamw", torch.float32)
    m8, v8 = lay.state1.to(torch.uint8), lay.state2.to(torch.uint8)
    s1, s2 = (torch.zeros(m.numel() // int8.GROUP, dtype=torch.uint8) for _ in range(2))
    call_update(lay, "adamw", BF16, state1=m8, state2=v8, remainder=remainder24, master_bits=24,
                scale1=s1, scale2=s2)
    call_update(lay, "sgd", torch.float32, state1=m8, scale1=s1)
    got = [(kw["dtype"], kw["state_dtype"], kw["state1"], kw["state2"], kw["remainder"],
            kw["master_bits"], kw["scale1"], kw["scale2"]) for _, kw in recorder.calls]
    assert got == [(1, 1, m.data_ptr(), v.data_ptr(), remainder32.data_ptr(), 32, 0, 0),
                   (1, 1, m.data_ptr(), 0, remainder24.data_ptr(), 24, 0, 0),
                   (2, 1, m.data_ptr(), 0, 0, 0, 0, 0),
                   (0, 0, lay.state1.data_ptr(), lay.state2.data_ptr(), 0, 0, 0, 0),
                   (1, 3, m8.data_ptr(), v8.data_ptr(), remainder24.data_ptr(), 24,
                    s1.data_ptr(), s2.data_ptr()),
                   (0, 3, m8.data_ptr(), 0, 0, 0, s1.data_ptr(), 0)]


def test_wrapper_names_bad_tier_arguments(recorder):
    lay = cpu_layout()
    n = lay.state1.numel()
    r32 = torch.zeros(n, dtype=torch.int16)
    refused = [
        (ValueError, r"state2 must have state1's dtype \(bfloat16\), got float32",
         dict(state1=lay.state1.to(BF16))),
        (ValueError, r"state2 must have state1's dtype \(float32\), got bfloat16",
         dict(state2=lay.state2.to(BF16))),
        (TypeError, r"state1 must have dtype float32, bfloat16, got float16",
         dict(algorithm="lion", state1=lay.state1.half())),
        (ValueError, r"master_bits must be 0, 24 or 32, got 16",
         dict(dtype=BF16, remainder=r32, master_bits=16)),
        (ValueError, r"remainder is required with master_bits 32",
         dict(dtype=BF16, master_bits=32)),
        (ValueError, r"remainder must be None when master_bits is 0",
         dict(dtype=BF16, remainder=r32)),
        (ValueError, r"remainder: master weights are kept for bfloat16 params, got dtype float32",
         dict(dtype=torch.float32, remainder=r32, master_bits=32)),
        (ValueError, r"remainder: master weights are kept for bfloat16 params, got dtype float16",
         dict(dtype=torch.float16, remainder=r32, master_bits=32)),
        (ValueError, r"remainder must have dtype uint8 for master_bits 24, got int16",
         dict(dtype=BF16, remainder=r32, master_bits=24)),
        (ValueError, r"remainder must have dtype int16 for master_bits 32, got uint8",
         dict(dtype=BF16, remainder=r32.to(torch.uint8), master_bits=32)),
        (ValueError, r"remainder must have dtype int16 for master_bits 32, got float32",
         dict(dtype=BF16, remainder=r32.float(), master_bits=32)),
        (ValueError, rf"remainder must have shape \({n},\), got \({n - 1},\)",
         dict(dtype=BF16, remainder=r32[1:], master_bits=32)),
        (ValueError, r"remainder must be contiguous",
         dict(dtype=BF16, remainder=torch.zeros(2 * n, dtype=torch.int16)[::2], master_bits=32)),
    ]
    # 8-bit state: uint8 codes beside one uint8 scale byte per 32 elements, one buffer a state.
    m8, v8 = lay.state1.to(torch.uint8), lay.state2.to(torch.uint8)
    s8 = torch.zeros(n // int8.GROUP, dtype=torch.uint8)
    int8_state = dict(state1=m8, state2=v8, scale1=s8, scale2=s8.clone())
    refused += [
        (ValueError, r"scale1 is required with uint8 state \(8-bit codes",
         dict(int8_state, scale1=None)),
        (ValueError, r"scale2 is required with uint8 state \(8-bit codes",
         dict(int8_state, scale2=None)),
        (ValueError, r"scale1 must be None unless the state is uint8 \(8-bit codes\), got state1 "
                     r"of float32", dict(scale1=s8)),
        (ValueError, r"scale2 must be None unless the state is uint8 \(8-bit codes\), got state1 "
                     r"of bfloat16",
         dict(state1=lay.state1.to(BF16), state2=lay.state2.to(BF16), scale2=s8)),
        (ValueError, r"scale2 must be None for algorithm 'lion' \(one state buffer\)",
         dict(algorithm="lion", state1=m8, scale1=s8, scale2=s8)),
        (TypeError, r"scale1 must have dtype uint8, got int8",
         dict(int8_state, scale1=s8.to(torch.int8))),
        (ValueError, rf"scale2 must have shape \({n // int8.GROUP},\), got "
                     rf"\({n // int8.GROUP - 1},\)", dict(int8_state, scale2=s8[1:])),
        (ValueError, r"scale1 must be contiguous",
         dict(int8_state, scale1=torch.zeros(2 * n // int8.GROUP, dtype=torch.uint8)[::2])),
        (TypeError, r"state2 must have dtype uint8, got float32",
         dict(int8_state, state2=lay.state2)),
        (ValueError, r"state1 of 8-bit state must hold whole groups of 32 codes, got 12287",
         dict(algorithm="sgd", state1=m8[1:], scale1=s8)),
    ]
    for error, message, changes in refused:
        with pytest.raises(error, match=message):
            call_update(lay, **changes)
    assert recorder.calls == []


def test_compiled_module_checks_tier_arguments():
    """The binding's checks of the new raw arguments run before any CUDA call: no GPU needed."""
    c = _extension()
    if c is None:
        pytest.skip("fusedopt._C is not built (pip install -e . with nvcc on PATH)")
    up = dict(algorithm="adamw", dtype=1, tensor_block_start=16, num_segment_tensors=1,
              num_blocks=1, tensor_offset=0, tensor_table=16, num_tensors=1, state1=16, state2=16,
              state_dtype=1, tensor_step=16, hyper=16, globals=16, stats_partials=0,
              stats_stride=0, remainder=16, master_bits=32, scale1=0, scale2=0, device=0, stream=0)
    with pytest.raises(ValueError, match=r"update: state_dtype must be 0 \(float32\), 1 "
                                         r"\(bfloat16\) or 3 \(uint8: 8-bit state\), got 2"):
        c.update(**{**up, "state_dtype": 2})
    # 8-bit state (state_dtype 3): a scale buffer beside each state buffer, and none otherwise.
    up8 = {**up, "state_dtype": 3, "scale1": 16, "scale2": 16}
    with pytest.raises(ValueError, match=r"update: scale1 must be a non-null device pointer"):
        c.update(**{**up8, "scale1": 0})
    with pytest.raises(ValueError, match=r"update: scale2 must be a non-null device pointer"):
        c.update(**{**up8, "scale2": 0})
    with pytest.raises(ValueError, match=r"update: scale2 must be null \(0\) for lion"):
        c.update(**{**up8, "algorithm": "lion", "state2": 0})
    for scales in ({"scale1": 16}, {"scale2": 16}):
        with pytest.raises(ValueError, match=r"update: scale1 and scale2 must be null \(0\) unless "
                                             r"state_dtype is 3"):
            c.update(**{**up, **scales})
    with pytest.raises(ValueError, match=r"update: master_bits must be 0, 24 or 32, got 16"):
        c.update(**{**up, "master_bits": 16})
    for dtype in (0, 2):
        with pytest.raises(ValueError, match=rf"update: master_bits must be 0 for dtype {dtype}: "
                                             r"master weights are for bfloat16"):
            c.update(**{**up, "dtype": dtype})
    with pytest.raises(ValueError, match=r"update: remainder must be a non-null device pointer"):
        c.update(**{**up, "remainder": 0})
    with pytest.raises(ValueError, match=r"update: remainder must be null \(0\) when master_bits "
                                         r"is 0"):
        c.update(**{**up, "master_bits": 0})
    # An empty segment launches nothing, with or without the tier.
    c.update(**{**up, "num_blocks": 0, "tensor_block_start": 0, "state1": 0, "state2": 0,
                "remainder": 0})
    c.update(**{**up8, "num_blocks": 0, "tensor_block_start": 0, "state1": 0, "state2": 0,
                "remainder": 0, "scale1": 0, "scale2": 0})


# ---------------------------------------------------------------------------------------------
# GPU: launch by launch against the specification
# ---------------------------------------------------------------------------------------------

# (param dtype, master bits, state dtype): every instantiation the tier adds (uint8: 8-bit
# state's codes; fp32 params move them 4 a lane, 2-byte params 8).
INT8 = torch.uint8
MODES = [(torch.float32, 0, BF16), (torch.float16, 0, BF16), (BF16, 0, BF16),
         (BF16, 32, torch.float32), (BF16, 32, BF16), (BF16, 24, torch.float32), (BF16, 24, BF16),
         (torch.float32, 0, INT8), (torch.float16, 0, INT8), (BF16, 0, INT8), (BF16, 32, INT8),
         (BF16, 24, INT8)]
REMAINDER_PAD = 0x55  # in the remainder's padding: never written
INT8_PAD = 0xA5  # in the 8-bit state's padding (codes, and scale bytes of groups past the end)


def mode_id(mode):
    dtype, bits, state = mode
    return f"{str(dtype)[6:]}-master{bits}-state_{str(state)[6:]}"


def tier_segment(device, mode, **kwargs):
    dtype, bits, state_dtype = mode
    if state_dtype == INT8:
        return Int8Segment(device, dtype, bits, **kwargs)
    return TierSegment(device, dtype, bits, state_dtype, **kwargs)


class TierSegment(Segment):
    """test_cuda_backend's segment with bf16 state and, for bits 24 / 32, random remainders (so
    that the masters carry low bits), REMAINDER_PAD in the remainder's padding."""

    def __init__(self, device, dtype, bits, state_dtype, **kwargs):
        super().__init__(device, dtype, **kwargs)
        self.bits = bits
        self.states = [s.to(state_dtype) for s in self.states]
        self.scales = []  # 8-bit state's (Int8Segment)
        self.remainder = None
        if bits:
            gen = torch.Generator().manual_seed(7)
            high = 1 << 16 if bits == 32 else 1 << 8
            values = torch.randint(0, high, (self.num_blocks * BLOCK,), generator=gen)
            values[self.padding_mask().cpu()] = REMAINDER_PAD
            if bits == 32:
                values = values - ((values >> 15) << 16)  # the same 16 bits as int16
            self.remainder = values.to(master.REMAINDER_DTYPES[bits]).to(device)

    def padding_mask(self):
        mask = torch.ones(self.num_blocks * BLOCK, dtype=torch.bool, device=self.device)
        for t in self.members:
            mask[self.state_start[t]:self.state_start[t] + self.params[t].numel()] = False
        return mask

    def run_update(self, hyper, stats):
        rows = len(algorithm_module(self.algorithm).STATS)
        partials = (torch.full((rows, self.num_blocks), -5.0, device=self.device) if stats
                    else None)
        second = (lambda buffers: buffers[1] if len(buffers) > 1 else None)
        cuda_backend.update(self.algorithm, self.dtype, *self.segment_args(), self.states[0],
                            second(self.states), self.step, hyper, self.globals, partials,
                            self.remainder, self.bits, self.scales[0] if self.scales else None,
                            second(self.scales))
        return partials

    def snapshot(self):
        shot = super().snapshot()
        shot.remainder = None if self.remainder is None else self.remainder.clone()
        return shot

    def value(self, t, shot):
        """Tensor t's param in a snapshot as the update sees it (CPU fp32, memory order): the
        master where there is a remainder."""
        p = shot.params[t].cpu()
        if shot.remainder is None:
            return p.float()
        start, n = self.state_start[t], p.numel()
        return master.combine(p, shot.remainder[start:start + n].cpu(), self.bits)

    def state_values(self, t, shot):
        """Tensor t's states in a snapshot as the update sees them (CPU fp32)."""
        return [s.float().cpu() for s in self.state_of(t, shot.states)]

    def stored(self, t, holder):
        """{name: CPU tensor} of what tensor t keeps of its state in holder (the segment or a
        snapshot)."""
        return {f"state{i + 1}": s.cpu() for i, s in enumerate(self.state_of(t, holder.states))}

    def check_padding(self, before):
        """The state's and the remainder's padding hold what they held."""
        padding = self.padding_mask()
        for i, (ours, orig) in enumerate(zip(self.states, before.states)):
            assert_same_bits(ours[padding], orig[padding], f"padding of state{i + 1}")
        if self.remainder is not None:
            assert_same_bits(self.remainder[padding], before.remainder[padding],
                             "remainder padding")

    def expected(self, t, hyper, before):
        """(fp32 value before, fp32 update, fp32 states after, stored param, stored remainder,
        stored state as `stored` names it) of tensor t by the specification."""
        old = self.value(t, before)
        step = self.step[t].item()
        new, states = expected_step(self.algorithm, old, self.unscaled_grad(t),
                                    self.state_values(t, before), hyper_of(self, hyper, t), step,
                                    int8_state=self.states[0].dtype == INT8)
        if self.bits:
            param, remainder = master.split(new, self.bits)
        else:
            param, remainder = new.to(self.dtype), None
        return old, new, states, param, remainder, self.stored_after(t, hyper, before, states)

    def stored_after(self, t, hyper, before, states):
        """`stored`'s entries for tensor t's fp32 states after the update: as they are, or bf16
        rounded with stochastic.py's bits (streams 1, 2; index STATE_START + element)."""
        if self.states[0].dtype == BF16:
            start = self.state_start[t]
            index = torch.arange(start, start + self.params[t].numel())
            step = int(self.step[t].item())
            states = [stochastic.to_bf16(s, step, index, stream)
                      for stream, s in enumerate(states, start=1)]
        return {f"state{i + 1}": s for i, s in enumerate(states)}


class Int8Segment(TierSegment):
    """TierSegment with 8-bit state: random moments over 6 decades (squares for "sqrt" formats,
    zeros among them, and a group below the smallest scale, stored as zeros) quantized to
    nearest into uint8 codes and group scale bytes; INT8_PAD in the codes' padding and in the
    scale bytes of groups wholly past a tensor's end (a group partly past it is the tensor's)."""

    def __init__(self, device, dtype, bits, **kwargs):
        super().__init__(device, dtype, bits, torch.float32, **kwargs)
        self.codes = algorithm_module(self.algorithm).STATE_CODES
        gen = torch.Generator().manual_seed(13)
        size = self.num_blocks * BLOCK
        codes = [torch.full((size,), INT8_PAD, dtype=INT8) for _ in self.codes]
        scales = [torch.full((size // int8.GROUP,), INT8_PAD, dtype=INT8) for _ in self.codes]
        for t in self.members:
            start, n = self.state_start[t], self.params[t].numel()
            first, groups, count = self.groups_of(t)
            for buffer, scale_buffer, code in zip(codes, scales, self.codes):
                value = torch.randn(n, generator=gen) * 10.0 ** torch.empty(n).uniform_(
                    -6, 0, generator=gen)
                value[::7] = 0.0
                value[int8.GROUP:2 * int8.GROUP] *= 1e-30  # below 2^(MIN_SCALE - 127)
                if code == "sqrt":
                    value = value.square()
                c, b = int8.quantize(value, groups, count, int8.nearest(code), code)
                buffer[start:start + n] = c
                scale_buffer[first:first + count] = b
        self.states = [c.to(device) for c in codes]
        self.scales = [b.to(device) for b in scales]

    def groups_of(self, t):
        """(first group in the scale buffers, each element's group among the tensor's, groups)
        of tensor t."""
        n = self.params[t].numel()
        return self.state_start[t] // int8.GROUP, torch.arange(n) // int8.GROUP, -(-n // int8.GROUP)

    def snapshot(self):
        shot = super().snapshot()
        shot.scales = [b.clone() for b in self.scales]
        return shot

    def state_values(self, t, shot):
        start, n = self.state_start[t], self.params[t].numel()
        first, groups, count = self.groups_of(t)
        return [int8.decode(c[start:start + n].cpu(), b[first:first + count].cpu().long()[groups],
                            code) for c, b, code in zip(shot.states, shot.scales, self.codes)]

    def stored(self, t, holder):
        first, _, count = self.groups_of(t)
        stored = super().stored(t, holder)
        stored.update({f"scale{i + 1}": b[first:first + count].cpu()
                       for i, b in enumerate(holder.scales)})
        return stored

    def check_padding(self, before):
        super().check_padding(before)
        past = torch.ones(self.num_blocks * BLOCK // int8.GROUP, dtype=torch.bool,
                          device=self.device)
        for t in self.members:
            first, _, count = self.groups_of(t)
            past[first:first + count] = False
        for i, (ours, orig) in enumerate(zip(self.scales, before.scales)):
            assert_same_bits(ours[past], orig[past], f"scale{i + 1} of groups past the ends")

    def stored_after(self, t, hyper, before, states):
        """Codes and scale bytes: int8.quantize of the fp32 states with hash32's bits (streams 1,
        2; index STATE_START + element); an SGD buffer without momentum is not touched."""
        if self.algorithm == "sgd" and hyper_of(self, hyper, t)["momentum"] == 0:
            return self.stored(t, before)
        start, n = self.state_start[t], self.params[t].numel()
        _, groups, count = self.groups_of(t)
        index = torch.arange(start, start + n)
        step = int(self.step[t].item())
        stored = {}
        for i, (value, code) in enumerate(zip(states, self.codes)):
            random = int8.random_offsets(stochastic.random16(step, index, i + 1), code)
            # On the device: its sqrt is IEEE's, as the kernel's (torch's CPU sqrt was 1 ulp off
            # for 1 value in ~6000, expected_step).
            c, b = int8.quantize(value.to(self.device), groups.to(self.device), count,
                                 random.to(self.device), code)
            stored[f"state{i + 1}"], stored[f"scale{i + 1}"] = c.cpu(), b.cpu()
        return stored


def check_tier_update(seg, hyper, before, partials, *, found_inf):
    """Params, remainders and states bit for bit against the specification; nothing written
    where nothing may be (skipped and foreign tensors, grads, gaps, paddings, steps, globals);
    then the statistics partials against float64 sums of the fp32 values."""
    for t in range(len(seg.specs)):
        p_after = memory_order(seg.params[t]).cpu()
        if t not in seg.members:
            assert_same_bits(p_after, before.params[t].cpu(), f"param {t} (another segment)")
            continue
        start, n = seg.state_start[t], seg.params[t].numel()
        s_after = seg.stored(t, seg)
        r_after = None if seg.remainder is None else seg.remainder[start:start + n].cpu()
        if found_inf or seg.groups[t] < 0:
            param = before.params[t].cpu()
            remainder = None if r_after is None else before.remainder[start:start + n].cpu()
            states = seg.stored(t, before)
        else:
            _, _, _, param, remainder, states = seg.expected(t, hyper, before)
        assert_same_bits(p_after, param, f"param {t}")
        if r_after is not None:
            assert_same_bits(r_after, remainder, f"remainder of tensor {t}")
        assert s_after.keys() == states.keys()
        for name, ours in s_after.items():
            assert_same_bits(ours, states[name], f"{name} of tensor {t}")
    check_grads_and_gaps(seg, before)
    seg.check_padding(before)
    assert_same_bits(seg.step, before.step, "tensor_step")
    assert_same_bits(seg.globals, before.globals, "globals")
    if partials is not None:
        check_tier_partials(seg, hyper, before, partials, found_inf=found_inf)


def check_tier_partials(seg, hyper, before, partials, *, found_inf):
    """Each block's statistics against float64 sums of what the Triton kernel's see: the new
    param as stored, or with master weights the fp32 update (before a 24-bit rounding) and the
    old master; the states in fp32 before they are rounded to bf16 or 8 bits. A skipped step:
    the combined master and the widened or decoded state."""
    ops = [op for _, op in algorithm_module(seg.algorithm).STATS]
    neutral = [{layout.OP_SUM: 0.0, layout.OP_MIN: math.inf, layout.OP_MAX: -math.inf}[op]
               for op in ops]
    got = partials.cpu().double()
    cache = {}
    for b in range(seg.num_blocks):
        t, first, count = seg.block_span(b)
        column = got[:, b]
        if seg.groups[t] < 0:
            assert column.tolist() == neutral, f"block {b}"
            continue
        if t not in cache:
            if found_inf:
                old = seg.value(t, before)
                states = seg.state_values(t, before)
                cache[t] = (old, old, states, None)
            else:
                old, new, states, param, _, _ = seg.expected(t, hyper, before)
                seen = new if seg.bits else param.float()
                v_prev = seg.state_values(t, before)
                cache[t] = (old, seen, states, v_prev)
        old, seen, states, v_prev = cache[t]
        span = slice(first, first + count)
        exp = expected_partials(seg, hyper, t, span, old[span].double(), seen[span].double(),
                                [s[span] for s in states],
                                v_prev[1][span] if v_prev is not None and len(v_prev) > 1 else None,
                                found_inf=found_inf)
        torch.testing.assert_close(column, exp, rtol=1e-5, atol=1e-30, msg=f"block {b}")


@pytest.mark.gpu
@pytest.mark.parametrize("stats", [False, True], ids=["plain", "stats"])
@pytest.mark.parametrize("mode", MODES, ids=mode_id)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_update_matches_the_specification_bit_for_bit(cuda, config, mode, stats):
    algorithm, rows = CONFIGS[config]
    seg = tier_segment(cuda, mode, algorithm=algorithm, seed=11)
    hyper = seg.hyper_table(rows)
    before = seg.snapshot()
    partials = seg.run_update(hyper, stats)
    check_tier_update(seg, hyper, before, partials, found_inf=False)


@pytest.mark.gpu
@pytest.mark.parametrize("stats", [False, True], ids=["plain", "stats"])
@pytest.mark.parametrize("mode", MODES, ids=mode_id)
@pytest.mark.parametrize("config", ["adamw", "sgd", "lion"])
def test_update_found_inf_writes_nothing(cuda, config, mode, stats):
    algorithm, rows = CONFIGS[config]
    seg = tier_segment(cuda, mode, algorithm=algorithm, seed=12)
    memory_order(seg.grads[6])[10] = float("nan")
    seg.globals[layout.FOUND_INF] = 1.0
    hyper = seg.hyper_table(rows)
    before = seg.snapshot()
    partials = seg.run_update(hyper, stats)
    check_tier_update(seg, hyper, before, partials, found_inf=True)


# ---------------------------------------------------------------------------------------------
# GPU: whole optimizers over 20 steps
# ---------------------------------------------------------------------------------------------

STEPS = 20
INF_STEP = 7
OPTIMIZERS = {
    "AdamC": (fusedopt.AdamC, dict(lr=1e-3, weight_decay=0.1)),
    "SGD": (fusedopt.SGD, dict(lr=1e-2, momentum=0.9, dampening=0.1, weight_decay=0.01)),
    "SGD_nesterov": (fusedopt.SGD, dict(lr=1e-2, momentum=0.9, nesterov=True)),
    "Lion": (fusedopt.Lion, dict(lr=1e-4, weight_decay=0.1)),
}


def build_params(dtype, device):
    """A view at an odd offset of a bigger buffer (the scalar path; 9000 elements = 2 blocks and
    a tail), a 16-byte aligned view of whole blocks and own allocations with tails (37 x 11, one
    element, 4097) and without (2 x 4096)."""
    gen = torch.Generator().manual_seed(0)
    # bf16 values for every dtype: an fp32 run starts where a bf16 one does.
    buffer = torch.randn(1 + 9000 + 7 + 2 * BLOCK, generator=gen).to(BF16).to(dtype).to(device)
    own = [torch.randn(s, generator=gen).to(BF16).to(dtype).to(device)
           for s in [(37, 11), (1,), (4097,), (2, BLOCK)]]
    views = [buffer[1:9001], buffer[9008:].view(2, BLOCK)]
    assert views[1].data_ptr() % 16 == 0 and views[0].data_ptr() % 16 != 0
    return buffer, [torch.nn.Parameter(t) for t in views + own]


def run(name, dtype, backend, *, bits=None, state_dtype="fp32", device="cuda"):
    """STEPS steps of optimizer `name` with statistics and a cosine lr; at INF_STEP one grad
    holds an inf, and that step must change nothing (checked here). Returns the params' masters
    (fp32), params, remainders, states (8-bit state's codes), 8-bit state's scale bytes, the last
    statistics and the views' buffer."""
    cls, kwargs = OPTIMIZERS[name]
    buffer, params = build_params(dtype, device)
    opt = cls(params, backend=backend, stats=True, master_weight_bits=bits,
              state_dtype=state_dtype, **kwargs)
    peak = kwargs["lr"]
    grad_gen = torch.Generator().manual_seed(1)

    def states():
        return [opt.state[p][name] for p in params for name in opt.engine.algorithm.STATE]

    def scales():
        if state_dtype != "int8":
            return []
        return [opt.engine.scale_view(p, name) for p in params
                for name in opt.engine.algorithm.STATE]

    def snapshot():
        return ([p.detach().clone() for p in params],
                [r.clone() for r in map(opt.engine.remainder_view, params) if r is not None],
                [s.clone() for s in states()], [s.clone() for s in scales()])

    for step in range(STEPS):
        opt.param_groups[0]["lr"] = peak * 0.5 * (1 + math.cos(math.pi * step / STEPS))
        for p in params:
            p.grad = torch.randn(p.shape, generator=grad_gen).to(BF16).to(dtype).to(device)
        if step == INF_STEP:
            params[2].grad.view(-1)[5] = float("inf")
            before = snapshot()
        opt.step()
        if step == INF_STEP:
            assert opt.stats().to_dict()["global"]["found_inf"]
            for group, (olds, news) in zip(("params", "remainders", "states", "scales"),
                                           zip(before, snapshot())):
                for i, (old, new) in enumerate(zip(olds, news)):
                    assert_same_bits(new, old, f"{backend}: {group}[{i}] changed on the inf step")
    remainders = [opt.engine.remainder_view(p) for p in params]
    masters = [p.detach().float() if r is None else master.combine(p.detach(), r, bits)
               for p, r in zip(params, remainders)]
    assert opt.stats().to_dict()["global"]["skipped_steps"] == (STEPS > INF_STEP)
    return dict(masters=masters, params=[p.detach() for p in params], remainders=remainders,
                states=states(), scales=scales(), stats=opt.stats().to_dict()["tensors"],
                buffer=buffer)


def assert_stats_close(a, b, rel=1e-4):
    """Per-tensor statistics: the backends' fixed-order sums differ in order, not in values."""
    assert a.keys() == b.keys()
    for name in a:
        for field, value in a[name].items():
            assert value == pytest.approx(b[name][field], rel=rel, abs=1e-12), (name, field)


@pytest.fixture
def gpu_backends(cuda):
    if not backends.available("triton"):
        pytest.skip("triton is not installed")
    return cuda


@pytest.mark.gpu
@pytest.mark.parametrize("state_dtype", ["fp32", "bf16", "int8"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_32_bit_masters_equal_the_fp32_run_bit_for_bit(cuda, name, state_dtype):
    """The master path runs the fp32 path's math on the combined master without rounding: the
    masters of a bf16 run equal the params of an fp32 run fed the same (bf16) values, and so do
    the states (bf16 and 8-bit ones with the same random bits: the same state indices; 8-bit
    codes and scale bytes alike, though the fp32 run moves 4 codes a lane and the bf16 run 8)."""
    fp32 = run(name, torch.float32, "cuda", state_dtype=state_dtype)
    ours = run(name, BF16, "cuda", bits=32, state_dtype=state_dtype)
    for i, (a, b) in enumerate(zip(ours["masters"], fp32["params"])):
        assert_same_bits(a, b, f"master {i}")
        assert_same_bits(ours["params"][i], master.split(b, 32)[0], f"param {i}")
    for key in ("states", "scales"):
        for i, (a, b) in enumerate(zip(ours[key], fp32[key])):
            assert_same_bits(a, b, f"{key}[{i}]")
    assert_stats_close(ours["stats"], fp32["stats"], rel=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("state_dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("bits", [32, 24])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_cuda_matches_triton_bit_for_bit_and_the_reference(gpu_backends, monkeypatch, name,
                                                           bits, state_dtype):
    # Triton contracts a * b + c into fused multiply-adds by default; the CUDA kernels round
    # every product (-fmad=false). Without contraction both do the contract's fp32 operations
    # in the same order, and the tier's integer parts are the same by specification.
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "0")
    results = {backend: run(name, BF16, backend, bits=bits, state_dtype=state_dtype)
               for backend in ("cuda", "triton", "reference")}
    ours, triton, reference = results["cuda"], results["triton"], results["reference"]
    for key in ("params", "remainders", "states"):
        for i, (a, b) in enumerate(zip(ours[key], triton[key])):
            assert_same_bits(a, b, f"{key}[{i}] against Triton")
    assert_same_bits(ours["buffer"], triton["buffer"], "the views' buffer against Triton")
    assert_stats_close(ours["stats"], triton["stats"])
    # The reference forms its scalars in Python doubles (1 - beta2 differs from the kernels'
    # fp32 beta2 by 1e-5 relative) and lets torch fuse: close, not equal. Lion's sign(c) may
    # flip where c is within rounding of 0; a bf16 state may round the other way where the two
    # fp32 values straddle a rounding boundary (then one bf16 ulp apart, and the masters
    # follow).
    tolerance = dict(atol=1e-5, rtol=1e-4) if state_dtype == "fp32" else dict(atol=4e-5, rtol=4e-4)
    for i, (a, b) in enumerate(zip(ours["masters"], reference["masters"])):
        if name == "Lion":
            far = (a - b).abs() > 1e-5 + 1e-4 * b.abs()
            assert far.float().mean() < 0.01, f"master {i}"
        else:
            torch.testing.assert_close(a, b, **tolerance, msg=f"master {i}")
        assert_same_bits(ours["params"][i], master.split(a, bits)[0], f"param {i}")
    for i, (a, b) in enumerate(zip(ours["states"], reference["states"])):
        if state_dtype == "bf16":
            assert (a == b).float().mean() > 0.99, f"state {i}"
            near = (a.float() - b.float()).abs() <= 2 ** -6 * b.float().abs() + 1e-6
            assert near.float().mean() > 0.999, f"state {i}"
        else:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=f"state {i}")
    assert_stats_close(ours["stats"], reference["stats"])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, bits", [(torch.float32, None), (torch.float16, None), (BF16, 32),
                                         (BF16, 24)], ids=["fp32", "fp16", "master32", "master24"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_int8_state_matches_triton_bit_for_bit(gpu_backends, monkeypatch, name, dtype, bits):
    """8-bit state: params, remainders, codes and scale bytes equal Triton's with its fused
    multiply-adds off (as above): both do the contract's fp32 operations in the same order, an
    IEEE sqrt, and int8.py's integer operations with the same random bits; the statistics up to
    summation order."""
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "0")
    ours, triton = (run(name, dtype, backend, bits=bits, state_dtype="int8")
                    for backend in ("cuda", "triton"))
    for key in ("params", "remainders", "states", "scales"):
        assert len(ours[key]) == len(triton[key]), key
        for i, (a, b) in enumerate(zip(ours[key], triton[key])):
            if a is not None or b is not None:
                assert_same_bits(a, b, f"{key}[{i}] against Triton")
    assert_same_bits(ours["buffer"], triton["buffer"], "the views' buffer against Triton")
    assert_stats_close(ours["stats"], triton["stats"])
