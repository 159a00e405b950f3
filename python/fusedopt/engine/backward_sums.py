"""Gradient norms reduced during the backward, in buckets (an experiment, off by default).

The step's gradient pass reads every gradient once more (4 B/param fp32: 1.5 ms at 1.1B on an
H100). Here a post-accumulate-grad hook notes each gradient as autograd finishes it; once about
BUCKET_BYTES of gradients are noted, one multi-tensor norm (torch._foreach_norm) over them runs
on a side stream, overlapping the rest of the backward, and the step runs finalize + update
only. A first version launched one norm per tensor from the hook: 201 launches inside the
LLaMA-1B backward made it 13 ms slower (bench/NOTES.md); a bucket costs one launch per ~32 MB.

The hook notes each gradient's address and version counter; a gradient changed since (DDP's
bucket averaging, an unscale_, a hand-set .grad) fails the check at step() and the whole step
falls back to its gradient pass, so the norm is always that of the gradient the update reads.
A micro-batch accumulated into a gradient runs its hook again, so the last norm counts.

The hook cannot know the loss scale: it reduces the raw gradient, and the step divides the norm
by the scale (exact for the power-of-two scales of dynamic loss scaling). The non-finite flag is
read off the norm (a non-finite element makes it inf or NaN).
"""
from __future__ import annotations

import functools

import torch

from fusedopt.engine import layout

# Gradient bytes per multi-tensor norm launch: few launches (about 140 at 1.1B fp32), each
# long enough to stream at full bandwidth.
BUCKET_BYTES = 32 * 2 ** 20


class BackwardGradSums:
    """Hooks on one device's params and the norms of the gradients they saw."""

    def __init__(self, device, params):
        self.device = device
        self.side = torch.cuda.Stream(device)
        self.sizes = [p.numel() * p.element_size() for p in params]
        self.zero = torch.zeros((), dtype=torch.float32, device=device)
        # The last norm of each tensor (0-d, made on the side stream). Kept until the next one
        # replaces it: the side stream waits for the main stream before every launch, so its
        # memory is not reused before the step that reads it has run.
        self.norms = [self.zero] * len(params)
        self.seen = [None] * len(params)
        self.pending, self.pending_bytes = [], 0
        self.handles = [p.register_post_accumulate_grad_hook(functools.partial(self._note, i))
                        for i, p in enumerate(params)]

    def remove(self):
        for handle in self.handles:
            handle.remove()

    def _note(self, i, p):
        grad = p.grad
        self.seen[i] = (grad.data_ptr(), grad._version)
        self.pending.append((i, grad))
        self.pending_bytes += self.sizes[i]
        if self.pending_bytes >= BUCKET_BYTES:
            self.launch()

    def launch(self):
        """One multi-tensor norm over the noted gradients, on the side stream."""
        if not self.pending:
            return
        indices = [i for i, _ in self.pending]
        grads = [g for _, g in self.pending]
        self.pending, self.pending_bytes = [], 0
        self.side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.no_grad(), torch.cuda.stream(self.side):
            norms = torch._foreach_norm(grads, 2, dtype=torch.float32)
        for grad in grads:
            # zero_grad(set_to_none=True) frees grads on the main stream: their memory must
            # not be handed out before the side stream has read it.
            grad.record_stream(self.side)
        for i, norm in zip(indices, norms):
            self.norms[i] = norm

    def complete(self, grads):
        """True if every present grad was noted as it is now (same address and version)."""
        return all(g is None or seen == (g.data_ptr(), g._version)
                   for g, seen in zip(grads, self.seen))

    def fill(self, tensor_sums, table, scale):
        """tensor_sums from the norms: (norm / scale)^2 and the non-finite flag; tensors without
        a grad this step give 0, 0. The main stream waits for the side stream (no host sync)."""
        self.launch()
        torch.cuda.current_stream(self.device).wait_stream(self.side)
        active = table[layout.GROUP] >= 0
        norms = torch.stack(self.norms)
        if scale is not None:
            norms = norms / scale
        tensor_sums[0].copy_(torch.where(active, norms.square(), 0.0))
        tensor_sums[1].copy_(torch.where(active, (~torch.isfinite(norms)).float(), 0.0))
        self.seen = [None] * len(self.seen)
