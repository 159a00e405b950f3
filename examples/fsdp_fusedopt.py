"""fusedopt on an FSDP2 model: fully_shard, AdamC with clipping and statistics, a DCP checkpoint.

A small residual MLP language model over random tokens, sharded with fully_shard (each block,
then the root). The optimizer takes the sharded params as they are; every rank clips with the
same global norm (one all-reduce inside the step) and the statistics are the full tensors'.
The script trains, saves a torch.distributed.checkpoint at the middle step, resumes from it in a
fresh model and optimizer, and checks that the resumed run ends on the same parameters bit for
bit.

    torchrun --standalone --nproc_per_node 2 examples/fsdp_fusedopt.py           # CPU, gloo
    torchrun --standalone --nproc_per_node 2 examples/fsdp_fusedopt.py --device cuda
"""
from __future__ import annotations

import argparse
import os
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import fusedopt

VOCAB, WIDTH, DEPTH, BATCH, SEQ = 256, 64, 4, 8, 32


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(WIDTH)
        self.up = nn.Linear(WIDTH, 4 * WIDTH)
        self.down = nn.Linear(4 * WIDTH, WIDTH)

    def forward(self, x):
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.blocks = nn.ModuleList(Block() for _ in range(DEPTH))
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, tokens):
        """Logits [tokens, VOCAB], flattened: a 3-D Linear output would be a view, which FSDP2
        warns about."""
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(x.reshape(-1, WIDTH))


def build(device, mesh):
    torch.manual_seed(0)  # the same initial weights on every rank and in every run
    model = TinyLM().to(device)
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    # AdamC's corrected decay on the blocks' matrices (their outputs are normalized by the next
    # block's LayerNorm); plain decay on the embedding and head; none on norms and biases.
    matrices = [p for b in model.blocks for p in (b.up.weight, b.down.weight)]
    head = [model.embed.weight, model.head.weight]
    rest = [p for p in model.parameters()
            if not any(p is q for q in matrices + head)]
    opt = fusedopt.AdamC([{"params": matrices},
                          {"params": head, "corrected": False},
                          {"params": rest, "weight_decay": 0.0}],
                         lr=3e-3, weight_decay=0.1, max_grad_norm=1.0, stats=True,
                         backend="auto" if device.type == "cuda" else "reference")
    return model, opt


def train(model, opt, steps, start, device, rank, log):
    for step in range(start, start + steps):
        gen = torch.Generator().manual_seed(1000 * step + rank)  # each rank its own batch
        tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=gen).to(device)
        logits = model(tokens[:, :-1])
        loss = nn.functional.cross_entropy(logits, tokens[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        if log and rank == 0:
            # Local reads: the step already reduced the figures over the ranks.
            figures = opt.stats().to_dict()
            largest = max(t["grad_norm"] for t in figures["tensors"].values())
            print(f"step {step}: loss {loss.item():.4f}, global grad norm "
                  f"{figures['global']['grad_norm']:.4f}, largest tensor grad norm "
                  f"{largest:.4f}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    rank = dist.get_rank()
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    half = args.steps // 2

    model, opt = build(device, mesh)
    train(model, opt, args.steps, 0, device, rank, log=True)
    straight = [p.detach().full_tensor() for p in model.parameters()]

    checkpoint = tempfile.mkdtemp() if rank == 0 else None
    shared = [checkpoint]
    dist.broadcast_object_list(shared)
    checkpoint = shared[0]
    model, opt = build(device, mesh)
    train(model, opt, half, 0, device, rank, log=False)
    dcp.save({"model": model.state_dict(), "optim": get_optimizer_state_dict(model, opt)},
             checkpoint_id=checkpoint)

    model, opt = build(device, mesh)
    state = {"model": model.state_dict(), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(state, checkpoint_id=checkpoint)
    model.load_state_dict(state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])
    train(model, opt, args.steps - half, half, device, rank, log=False)
    resumed = [p.detach().full_tensor() for p in model.parameters()]
    same = all(torch.equal(a, b) for a, b in zip(straight, resumed))
    if rank == 0:
        print(f"resumed from the step-{half} checkpoint: parameters "
              f"{'bit-identical' if same else 'DIFFERENT'} to the uninterrupted run", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
