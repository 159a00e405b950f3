"""Per-tensor gradient norms computed during the backward (an experiment, off by default).

The step's gradient pass reads every gradient once more (4 B/param fp32: 1.5 ms at 1.1B on an
H100). Here a post-accumulate-grad hook launches, on a side stream, the fp32 norm of each
gradient as autograd finishes it, so the reduction overlaps the backward's matmuls and the step
runs finalize + update only. The hook notes each gradient's address and version counter; a
gradient changed since (a later micro-batch before its own hook, DDP's bucket averaging, an
unscale_, a hand-set .grad) fails the check at step() and the whole step falls back to the
gradient pass, so the norm is always that of the gradient the update reads.

Unscaling: the hook cannot know the loss scale, so it reduces the raw gradient; the step
multiplies the norm by 1/scale (exact for the power-of-two scales of dynamic loss scaling).
The non-finite flag is read off the norm (a non-finite element makes it inf or NaN).
"""
from __future__ import annotations

import functools

import torch

from fusedopt.engine import layout


class BackwardGradSums:
    """Hooks on one device's params; `norms[i]` is tensor i's raw gradient norm (fp32)."""

    def __init__(self, device, params):
        self.device = device
        self.side = torch.cuda.Stream(device)
        self.norms = torch.zeros(len(params), dtype=torch.float32, device=device)
        self.seen = [None] * len(params)
        self.handles = [p.register_post_accumulate_grad_hook(functools.partial(self._reduce, i))
                        for i, p in enumerate(params)]

    def remove(self):
        for handle in self.handles:
            handle.remove()

    def _reduce(self, i, p):
        grad = p.grad
        self.side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.side):
            torch.linalg.vector_norm(grad, dtype=torch.float32, out=self.norms[i])
        # The caching allocator must not hand the grad's memory out before the side stream
        # has read it (zero_grad(set_to_none=True) frees it on the main stream).
        grad.record_stream(self.side)
        self.seen[i] = (grad.data_ptr(), grad._version)

    def complete(self, grads):
        """True if every present grad was reduced as it is now (same address and version)."""
        return all(g is None or seen == (g.data_ptr(), g._version)
                   for g, seen in zip(grads, self.seen))

    def fill(self, tensor_sums, table, scale):
        """tensor_sums from the norms: (norm / scale)^2 and the non-finite flag; tensors without
        a grad this step give 0, 0. The main stream waits for the side stream (no host sync)."""
        torch.cuda.current_stream(self.device).wait_stream(self.side)
        active = table[layout.GROUP] >= 0
        norms = self.norms if scale is None else self.norms / scale
        tensor_sums[0].copy_(torch.where(active, norms.square(), 0.0))
        tensor_sums[1].copy_(torch.where(active, (~torch.isfinite(norms)).float(), 0.0))
        self.seen = [None] * len(self.seen)
