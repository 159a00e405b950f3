"""fusedopt on FSDP2 (fully_shard) models.

Each test spawns ranks (gloo on CPU, NCCL on GPUs for the gpu-marked ones) and checks, on every
rank:

- 10 steps of fusedopt.AdamW(max_grad_norm) on an FSDP2 model equal torch.optim.AdamW +
  clip_grad_norm_ on the same FSDP2 model, with two param groups and uneven shards: a param with
  fewer rows than ranks (an empty shard), and one sharded on dim 1 (shard_placement_fn);
  statistics equal a single-process run of the same model on the whole batch;
- HSDP (a replicate x shard mesh): the sums go over the shard dimension only;
- an inf in one rank's shard skips the step on all ranks, params and states bit-identical, and
  fusedopt.GradScaler backs off on all ranks alike;
- torch.distributed.checkpoint: get/set_optimizer_state_dict round trip (bit-exact resume),
  torch AdamW -> fusedopt and back, and a checkpoint of 2 ranks loaded at 1 and at 4;
- layouts whose figures cannot be combined are refused with the param's name.
"""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import (get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
from torch.distributed.tensor import DTensor, Partial, Shard, distribute_tensor

import fusedopt
from fusedopt.engine import backends
from ranks import (assert_same_params, assert_same_stats, four_gpus, full, gpu_backends, spawn,
                   two_gpus)

STEPS = 10
BATCH = 8
F64 = dict(rtol=1e-9, atol=1e-12)
# fp32 kernels against torch's fp32 AdamW: rounding of the clip coefficient and of the update
# (tests/test_distributed.py's bound; eps=1e-3 keeps Adam's update smooth in g).
F32 = dict(rtol=2e-5, atol=2e-6)
EPS_F32 = 1e-3
# The statistic columns are float32 on every backend: each rank's partial sum is rounded to fp32
# before the ranks' sums are added, where a single process rounds the whole sum once.
STATS_TOL = dict(rtol=1e-6, atol=1e-9)


class Net(torch.nn.Module):
    """out.weight has 1 row, fewer than the ranks: the other ranks hold empty shards."""

    def __init__(self, dtype):
        super().__init__()
        torch.manual_seed(0)
        self.inp = torch.nn.Linear(16, 24).to(dtype)
        self.mid = torch.nn.Linear(24, 24).to(dtype)
        self.gain = torch.nn.Parameter(torch.ones(24, dtype=dtype))
        self.out = torch.nn.Linear(24, 1).to(dtype)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        return self.out(torch.tanh(self.mid(h)) * self.gain)


def shard(net, mesh=None):
    # The mesh on the model's device type: fully_shard's default mesh is on CUDA wherever a GPU
    # is present, and would move a CPU model there.
    if mesh is None:
        mesh = init_device_mesh(next(net.parameters()).device.type, (dist.get_world_size(),))
    # mid.weight on dim 1: FSDP2 allows any Shard(d); the figures combine the same way.
    fully_shard(net.mid, mesh=mesh,
                shard_placement_fn=lambda p: Shard(1) if p.ndim == 2 else None)
    fully_shard(net.inp, mesh=mesh)
    fully_shard(net, mesh=mesh)
    return net


def groups(net, names=False):
    matrices = [net.inp.weight, net.mid.weight, net.out.weight]
    rest = [net.inp.bias, net.mid.bias, net.gain, net.out.bias]
    return [{"params": matrices, "weight_decay": 0.1},
            {"params": rest, "weight_decay": 0.0, "lr": 5e-3}]


def batch(step, dtype, device):
    gen = torch.Generator().manual_seed(100 + step)
    x = torch.randn(BATCH, 16, generator=gen, dtype=torch.float64)
    y = torch.randn(BATCH, 1, generator=gen, dtype=torch.float64)
    return x.to(device, dtype), y.to(device, dtype)


def loss_on_rows(model, x, y, rank, world):
    """This rank's rows; FSDP2 averages the gradients over ranks: the full-batch gradient."""
    rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    return (model(x[rows]) - y[rows]).square().mean()


def fused(params, backend, dtype, stats=True, cls=fusedopt.AdamW):
    eps = 1e-8 if dtype == torch.float64 else EPS_F32
    return cls(params, lr=1e-2, eps=eps, max_grad_norm=0.05, backend=backend, stats=stats)


def torch_adamw(params, dtype):
    eps = 1e-8 if dtype == torch.float64 else EPS_F32
    return torch.optim.AdamW(params, lr=1e-2, eps=eps, foreach=False)


def train(model, opt, steps, rank, world, dtype, device, start=0, clip=False):
    for step in range(start, start + steps):
        x, y = batch(step, dtype, device)
        opt.zero_grad()
        loss_on_rows(model, x, y, rank, world).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        opt.step()


def same_on_all_ranks(value):
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return all(v == gathered[0] for v in gathered)


# ----------------------------------------------------------------------------- scenarios
def matches_torch_and_single_process(rank, world, device, backend, dtype, tol, stats=True,
                                     mesh_shape=None):
    mesh = None if mesh_shape is None else init_device_mesh(
        device.type, mesh_shape, mesh_dim_names=("replicate", "shard"))
    ours = shard(Net(dtype).to(device), mesh)
    theirs = shard(Net(dtype).to(device), mesh)
    named = dict(ours.named_parameters())
    if mesh_shape is None:
        assert named["out.weight"].to_local().numel() == (24 if rank == 0 else 0)
    opt = fused(groups(ours), backend, dtype, stats)
    train(ours, opt, STEPS, rank, world, dtype, device)
    train(theirs, torch_adamw(groups(theirs), dtype), STEPS, rank, world, dtype, device,
          clip=True)
    assert_same_params(ours, theirs, tol)
    # The state is exposed as DTensors with the param's placements (views of the local state).
    assert isinstance(opt.state[named["mid.weight"]]["exp_avg"], DTensor)
    if stats:
        single = Net(dtype).to(device)
        single_opt = fused(groups(single), backend, dtype, stats)
        train(single, single_opt, STEPS, 0, 1, dtype, device)
        assert_same_params(ours, single, tol)
        assert_same_stats(opt.stats(), single_opt.stats(),
                          STATS_TOL if dtype == torch.float64 else tol)
    if device.type == "cuda":
        # The step, with its all-reduce, never waits for the GPU.
        x, y = batch(STEPS, dtype, device)
        loss_on_rows(ours, x, y, rank, world).backward()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")


def other_algorithms_match_single_process(rank, world, device, cls, kwargs):
    """SGD and Lion run through the same engine: FSDP2 against one process on the whole batch."""
    sharded = shard(Net(torch.float64).to(device))
    single = Net(torch.float64).to(device)
    runs = []
    for net, r, w in ((sharded, rank, world), (single, 0, 1)):
        opt = cls(groups(net), lr=1e-2, weight_decay=0.1, max_grad_norm=0.05,
                  backend="reference", stats=True, **kwargs)
        train(net, opt, STEPS, r, w, torch.float64, device)
        runs.append(opt)
    assert_same_params(sharded, single, F64)
    assert_same_stats(runs[0].stats(), runs[1].stats(), STATS_TOL)


def inf_on_one_rank_skips_everywhere(rank, world, device, backend, dtype, torch_scaler=False):
    """fusedopt.GradScaler: the step's all-reduce carries the flag, every rank updates its scale
    from it. torch's ShardedGradScaler: its unscale_ all-reduces found_inf (its step alone
    would not: torch's fused-optimizer path checks each rank's own shards)."""
    net = shard(Net(dtype).to(device))
    opt = fused(groups(net), backend, dtype)
    if torch_scaler:
        scaler = ShardedGradScaler(device.type, init_scale=2.0 ** 10, growth_interval=1)
    else:
        scaler = fusedopt.GradScaler(init_scale=2.0 ** 10, growth_interval=1)
    for step in range(3):
        x, y = batch(step, dtype, device)
        opt.zero_grad()
        scaler.scale(loss_on_rows(net, x, y, rank, world)).backward()
        if step == 1 and rank == 0:
            # After the reduce-scatter: only rank 0's shard holds it.
            with torch.no_grad():
                net.inp.weight.grad.to_local()[0, 0] = float("inf")
        before = [p.detach().to_local().clone() for p in net.parameters()]
        state_before = {p: {k: full(v).clone() for k, v in opt.state[p].items()}
                        for p in net.parameters()}
        if torch_scaler:
            scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
        found = opt.stats().to_dict()["global"]
        assert found["found_inf"] == (step == 1)
        assert found["skipped_steps"] == (0 if step == 0 else 1)
        if step == 1:
            for p, q in zip(net.parameters(), before):
                assert torch.equal(p.detach().to_local(), q)
            for p, entry in state_before.items():
                for key, value in entry.items():
                    assert torch.equal(full(opt.state[p][key]), value), key
    # 1024, grown to 2048, backed off to 1024 on the inf, grown to 2048: on every rank.
    assert scaler.get_scale() == 2.0 ** 11
    assert same_on_all_ranks(scaler.get_scale())
    assert same_on_all_ranks([full(p.detach()).tolist() for p in net.parameters()])


def checkpoint_round_trips(rank, world, device, backend, dtype, path):
    """Resume through DCP is bit-exact; torch AdamW's checkpoint loads into fusedopt and back."""
    def run(make_opt, steps_before, load_from=None, save_to=None, start=0):
        net = shard(Net(dtype).to(device))
        opt = make_opt(groups(net))
        if load_from is not None:
            model_sd = net.state_dict()
            osd = get_optimizer_state_dict(net, opt)
            # Across optimizers the groups' options differ (fusedopt's corrected and max_lr,
            # torch's foreach, fused, ...): the options the checkpoint lacks keep their values.
            planner = DefaultLoadPlanner(allow_partial_load=True)
            dcp.load({"model": model_sd, "optim": osd}, checkpoint_id=load_from,
                     planner=planner)
            net.load_state_dict(model_sd)
            set_optimizer_state_dict(net, opt, osd)
        train(net, opt, steps_before, rank, world, dtype, device, start=start)
        if save_to is not None:
            dcp.save({"model": net.state_dict(), "optim": get_optimizer_state_dict(net, opt)},
                     checkpoint_id=save_to)
        return net, opt

    ours = lambda params: fused(params, backend, dtype, stats=False)  # noqa: E731
    plain = lambda params: fusedopt.AdamW(params, lr=1e-2, eps=1e-8, backend=backend)  # noqa: E731
    straight, _ = run(ours, 6)
    run(ours, 3, save_to=f"{path}/fused")
    resumed, _ = run(ours, 3, load_from=f"{path}/fused", start=3)
    for p, q in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(p.to_local(), q.to_local())

    theirs = lambda params: torch_adamw(params, dtype)  # noqa: E731
    torch_straight, torch_opt = run(theirs, 6)
    run(theirs, 3, save_to=f"{path}/torch")
    into_ours, _ = run(plain, 3, load_from=f"{path}/torch", start=3, save_to=f"{path}/back")
    assert_same_params(into_ours, torch_straight, F64)
    back_in_torch, back_opt = run(theirs, 0, load_from=f"{path}/back")
    reference = get_optimizer_state_dict(torch_straight, torch_opt)
    loaded = get_optimizer_state_dict(back_in_torch, back_opt)
    for fqn, entry in reference["state"].items():
        for key, value in entry.items():
            torch.testing.assert_close(full(loaded["state"][fqn][key]).double(),
                                       full(value).double(), **F64)


def low_precision_resumes_bit_exactly(rank, world, device, path, bits, state_dtype):
    """bf16 params with masters and bf16 or 8-bit state: the remainders and the moments (8-bit
    ones decoded, each shard's groups its own) go through DCP as DTensors and the resumed run
    is bit-identical."""
    def run(steps, load_from=None, save_to=None, start=0):
        net = shard(Net(torch.bfloat16).to(device))
        opt = fusedopt.AdamW(groups(net), lr=1e-2, max_grad_norm=0.05, backend="reference",
                             master_weight_bits=bits, state_dtype=state_dtype)
        if load_from is not None:
            state = {"model": net.state_dict(), "optim": get_optimizer_state_dict(net, opt)}
            dcp.load(state, checkpoint_id=load_from)
            net.load_state_dict(state["model"])
            set_optimizer_state_dict(net, opt, state["optim"])
        train(net, opt, steps, rank, world, torch.bfloat16, device, start=start)
        if save_to is not None:
            osd = get_optimizer_state_dict(net, opt)
            assert isinstance(osd["state"]["inp.weight"]["master_remainder"], DTensor)
            dcp.save({"model": net.state_dict(), "optim": osd}, checkpoint_id=save_to)
        return net, opt

    straight, opt = run(6)
    run(3, save_to=f"{path}/low")
    resumed, resumed_opt = run(3, load_from=f"{path}/low", start=3)
    for p, q in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(p.to_local(), q.to_local())
        for key, value in opt.state[p].items():
            assert torch.equal(full(value), full(resumed_opt.state[q][key])), key


def save_for_reshard(rank, world, device, backend, dtype, path):
    net = shard(Net(dtype).to(device))
    opt = fused(groups(net), backend, dtype, stats=False)
    train(net, opt, 3, rank, world, dtype, device)
    osd = get_optimizer_state_dict(net, opt)
    dcp.save({"optim": osd}, checkpoint_id=f"{path}/reshard")
    expected = {fqn: {k: full(v) for k, v in entry.items()} for fqn, entry in osd["state"].items()}
    if rank == 0:
        torch.save(expected, f"{path}/expected.pt")


def load_resharded(rank, world, device, backend, dtype, path):
    net = shard(Net(dtype).to(device))
    opt = fused(groups(net), backend, dtype, stats=False)
    osd = get_optimizer_state_dict(net, opt)
    dcp.load({"optim": osd}, checkpoint_id=f"{path}/reshard")
    set_optimizer_state_dict(net, opt, osd)
    expected = torch.load(f"{path}/expected.pt")
    again = get_optimizer_state_dict(net, opt)
    for fqn, entry in expected.items():
        for key, value in entry.items():
            assert torch.equal(full(again["state"][fqn][key]), value), (fqn, key)
    train(net, opt, 1, rank, world, dtype, device, start=3)


def refuses_what_it_cannot_reduce(rank, world, device):
    mesh = init_device_mesh(device.type, (world,))
    weight = torch.nn.Parameter(distribute_tensor(torch.ones(4, 4), mesh, [Shard(0)]))
    partial = torch.nn.Parameter(DTensor.from_local(torch.ones(4), mesh, [Partial()]))
    plain = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match="params: param1 has placement Partial"):
        fusedopt.AdamW([weight, partial])
    with pytest.raises(ValueError, match="params: param1 is a plain tensor"):
        fusedopt.AdamW([weight, plain])
    mesh2 = init_device_mesh(device.type, (world, 1), mesh_dim_names=("a", "b"))
    both = torch.nn.Parameter(distribute_tensor(torch.ones(4, 4), mesh2, [Shard(0), Shard(1)]))
    with pytest.raises(ValueError, match="params: param0 is sharded over 2 mesh dimensions"):
        fusedopt.AdamW([both])


# ----------------------------------------------------------------------------- CPU tests (gloo)
def test_fsdp_matches_torch_and_single_process():
    spawn(2, matches_torch_and_single_process, backend="reference", dtype=torch.float64,
          tol=F64)


@pytest.mark.parametrize("cls, kwargs", [(fusedopt.SGDC, {"momentum": 0.9}), (fusedopt.LionC, {})],
                         ids=["SGDC", "LionC"])
def test_fsdp_sgd_and_lion_match_single_process(cls, kwargs):
    spawn(2, other_algorithms_match_single_process, cls=cls, kwargs=kwargs)


@pytest.mark.parametrize("mesh_shape", [(2, 1), (1, 2)])
def test_hsdp_reduces_over_the_shard_dimension_only(mesh_shape):
    spawn(2, matches_torch_and_single_process, backend="reference", dtype=torch.float64,
          tol=F64, mesh_shape=mesh_shape)


def test_fsdp_triton_kernels():
    """The kernel path through the Triton interpreter (statistics off: see
    tests/test_distributed.py, test_ddp_triton_kernels_read_the_bucket_in_place)."""
    if not backends.available("triton") or not backends.triton_interpreted():
        pytest.skip("CPU tensors run the Triton kernels only under TRITON_INTERPRET=1")
    spawn(2, matches_torch_and_single_process, backend="triton", dtype=torch.float32, tol=F32,
          stats=False)


@pytest.mark.parametrize("torch_scaler", [False, True])
def test_fsdp_inf_on_one_rank_skips_everywhere(torch_scaler):
    spawn(2, inf_on_one_rank_skips_everywhere, backend="reference", dtype=torch.float64,
          torch_scaler=torch_scaler)


def test_fsdp_checkpoints_through_dcp(tmp_path):
    spawn(2, checkpoint_round_trips, backend="reference", dtype=torch.float64,
          path=str(tmp_path))


@pytest.mark.parametrize("bits, state_dtype", [(32, "bf16"), (24, "int8")])
def test_fsdp_low_precision_tier_resumes_through_dcp(tmp_path, bits, state_dtype):
    spawn(2, low_precision_resumes_bit_exactly, path=str(tmp_path), bits=bits,
          state_dtype=state_dtype)


@pytest.mark.parametrize("world", [1, 4])
def test_fsdp_checkpoint_of_2_ranks_loads_at_other_sizes(tmp_path, world):
    spawn(2, save_for_reshard, backend="reference", dtype=torch.float64, path=str(tmp_path))
    spawn(world, load_resharded, backend="reference", dtype=torch.float64, path=str(tmp_path))


def test_fsdp_refuses_layouts_it_cannot_reduce():
    spawn(2, refuses_what_it_cannot_reduce)


def test_fsdp_example_trains_and_resumes_bit_exactly():
    """examples/fsdp_fusedopt.py as a user runs it: torchrun, 2 CPU ranks."""
    example = Path(__file__).resolve().parents[1] / "examples" / "fsdp_fusedopt.py"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node", "2", str(example), "--steps", "4"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "parameters bit-identical to the uninterrupted run" in result.stdout


# ----------------------------------------------------------------------------- GPU tests (NCCL)
@pytest.mark.gpu
@two_gpus
@pytest.mark.parametrize("backend", gpu_backends())
def test_gpu_fsdp_matches_torch_and_single_gpu(backend):
    spawn(2, matches_torch_and_single_process, "cuda", backend=backend, dtype=torch.float32,
          tol=F32)


@pytest.mark.gpu
@four_gpus
@pytest.mark.parametrize("backend", gpu_backends())
def test_gpu_hsdp_on_4_gpus(backend):
    spawn(4, matches_torch_and_single_process, "cuda", backend=backend, dtype=torch.float32,
          tol=F32, mesh_shape=(2, 2))


@pytest.mark.gpu
@two_gpus
@pytest.mark.parametrize("backend", gpu_backends())
def test_gpu_fsdp_inf_on_one_rank_skips_everywhere(backend):
    spawn(2, inf_on_one_rank_skips_everywhere, "cuda", backend=backend, dtype=torch.float32)
