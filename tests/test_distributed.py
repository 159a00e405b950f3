"""fusedopt inside torch.distributed: DDP and the sharded (ZeRO-1) optimizer.

Each test spawns 2 or 3 processes (gloo on CPU over 127.0.0.1, NCCL on GPUs for the gpu-marked
ones), and every rank compares its run with a single-process run of the same model on the
concatenated batch, computed in the same process. The model's flat buffer has 9 blocks, so at
world sizes 2 and 3 a weight matrix (blocks 4..6) spans two shards, and one param never gets a
gradient.
"""
import os
import sys
import socket
import tempfile
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fusedopt
from fusedopt.distributed import ShardedOptimizer, shard_blocks
from fusedopt.flat import BLOCK

STEPS = 4
BATCH = 12          # splits evenly over 2 and 3 ranks
MICRO_BATCHES = 2   # gradient accumulation steps per optimizer step
# float64: the sharded and single-process runs differ only in summation order (reduce-scatter,
# per-shard partial sums), i.e. rounding of 1e-16 relative, amplified a little by Adam's division.
F64 = dict(rtol=1e-9, atol=1e-12)
# fp32 kernels: the same bound as tests/tolerances.py for kernels against the reference. The
# ranks' averaged gradients differ from the full-batch ones by fp32 rounding; the fp32 runs use
# eps=1e-3 (EPS_F32) so that Adam's update is smooth in g and that rounding stays rounding
# (with eps=1e-8 a gradient element near 0 turns a 1e-9 difference into a 1e-5 one).
F32 = dict(rtol=2e-5, atol=2e-6)
EPS_F32 = 1e-3


class Net(torch.nn.Module):
    """Linear(16, 600) + Linear(600, 16): tensors of 9600, 600, 9600, 16 and 5 elements (3 + 1
    + 3 + 1 + 1 blocks); the last param no loss reaches (grad None: skipped, as in torch.optim)."""

    def __init__(self, dtype):
        super().__init__()
        torch.manual_seed(0)
        self.inp = torch.nn.Linear(16, 600).to(dtype)
        self.out = torch.nn.Linear(600, 16).to(dtype)
        self.unused = torch.nn.Parameter(torch.ones(5, dtype=dtype))

    def forward(self, x):
        return self.out(torch.tanh(self.inp(x)))


def groups(net):
    """Two groups: corrected decay on the matrices, none on biases (and the unused param)."""
    matrices = [net.inp.weight, net.out.weight]
    rest = [net.inp.bias, net.out.bias, net.unused]
    return [{"params": matrices, "weight_decay": 0.1, "corrected": True},
            {"params": rest, "weight_decay": 0.0}]


def make_optimizer(kind, params, backend, dtype, stats=True):
    if kind == "adam":
        eps = 1e-8 if dtype == torch.float64 else EPS_F32
        return fusedopt.AdamW(params, lr=1e-2, eps=eps, max_grad_norm=0.05, backend=backend,
                              stats=stats)
    return fusedopt.SGD(params, lr=0.05, momentum=0.9, nesterov=True, max_grad_norm=0.05,
                        backend=backend, stats=stats)


def batches(step, dtype, device):
    gen = torch.Generator().manual_seed(100 + step)
    x = torch.randn(MICRO_BATCHES, BATCH, 16, generator=gen, dtype=torch.float64)
    y = torch.randn(MICRO_BATCHES, BATCH, 16, generator=gen, dtype=torch.float64)
    return x.to(device, dtype), y.to(device, dtype)


def backward(net, x, y, rank, world):
    """Mean loss over this rank's rows of each micro-batch, averaged over micro-batches: the
    mean over ranks (what DDP and the reduce-scatter compute) is the full-batch loss's gradient."""
    rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    for k in range(MICRO_BATCHES):
        loss = (net(x[k, rows]) - y[k, rows]).square().mean() / MICRO_BATCHES
        loss.backward()


def single_process(kind, dtype, device, backend, steps=STEPS):
    net = Net(dtype).to(device)
    opt = make_optimizer(kind, groups(net), backend, dtype)
    for step in range(steps):
        x, y = batches(step, dtype, device)
        opt.zero_grad()
        backward(net, x, y, 0, 1)
        opt.step()
    return net, opt


def assert_same_params(net, expected, tol):
    for (name, p), q in zip(net.named_parameters(), expected.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), **tol, msg=lambda m: f"{name}: {m}")


def assert_same_stats(opt, expected, tol):
    got, want = opt.stats().to_dict(), expected.stats().to_dict()
    for key in ("grad_norm", "clip_coef", "found_inf", "skipped_steps"):
        torch.testing.assert_close(torch.tensor(got["global"][key], dtype=torch.float64),
                                   torch.tensor(want["global"][key], dtype=torch.float64), **tol)
    for name, fields in want["tensors"].items():
        for field, value in fields.items():
            torch.testing.assert_close(torch.tensor(got["tensors"][name][field]),
                                       torch.tensor(value), equal_nan=True, **tol,
                                       msg=lambda m: f"{name}.{field}: {m}")


def assert_same_state(state, expected, tol):
    assert sorted(state["state"]) == sorted(expected["state"])
    for index, entry in expected["state"].items():
        for key, value in entry.items():
            torch.testing.assert_close(state["state"][index][key].cpu(), value.cpu(), **tol,
                                       msg=lambda m: f"state {index}.{key}: {m}")
    assert [g["params"] for g in state["param_groups"]] == \
        [g["params"] for g in expected["param_groups"]]


# ----------------------------------------------------------------------------- process harness
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, device_type, scenario, kwargs):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    if device_type == "cuda":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        device = torch.device("cpu")
    # A collective that never completes fails the test instead of hanging CI.
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo",
                            init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    SCENARIOS[scenario](rank, world, device, **kwargs)
    # Without this barrier, gloo processes intermittently aborted at teardown ("terminate called
    # without an active exception") when one rank destroyed the group while another was still
    # finishing its last collective. On failure the process just exits: spawn reports it.
    dist.barrier()
    dist.destroy_process_group()
    # Even after the barrier, 2 of 12 runs of the inf scenario aborted the same way while the
    # interpreter shut down, after every assertion had passed: leave without running static
    # destructors. A failed assertion raises above and still fails the test.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(world, scenario, device_type="cpu", **kwargs):
    mp.spawn(_worker, args=(world, _free_port(), device_type, scenario, kwargs), nprocs=world)


# ----------------------------------------------------------------------------- scenarios
def ddp_matches_single_process(rank, world, device, bucket_view, backend, dtype, tol):
    from torch.nn.parallel import DistributedDataParallel as DDP

    net = Net(dtype).to(device)
    # The unused param has no gradient on any rank: DDP must be told, as usual.
    ddp = DDP(net, gradient_as_bucket_view=bucket_view, find_unused_parameters=True,
              device_ids=[device.index] if device.type == "cuda" else None)
    opt = make_optimizer("adam", groups(net), backend, dtype)
    flat_grad = opt._devices[device].buffers[0].grad
    in_flat = []
    for step in range(STEPS):
        x, y = batches(step, dtype, device)
        opt.zero_grad()
        rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        with ddp.no_sync():
            (ddp(x[0, rows]) - y[0, rows]).square().mean().div(MICRO_BATCHES).backward()
        (ddp(x[1, rows]) - y[1, rows]).square().mean().div(MICRO_BATCHES).backward()
        in_flat.append(all(_inside(p.grad, flat_grad) for p in (net.inp.weight, net.out.bias)))
        opt.step()
    expected, expected_opt = single_process("adam", dtype, device, backend)
    assert_same_params(net, expected, tol)
    assert_same_stats(opt, expected_opt, tol)
    # The first backward always allocates fresh grads (the step copies them in). From then on,
    # without bucket views DDP writes the averaged gradients into fusedopt's flat views; with
    # bucket views DDP re-points .grad at its buckets and every step copies them in.
    assert in_flat[1:] == [not bucket_view] * (STEPS - 1)


def _inside(grad, flat):
    start = flat.data_ptr()
    return start <= grad.data_ptr() < start + flat.numel() * flat.element_size()


def sharded_matches_single_process(rank, world, device, kind, backend, dtype, tol, steps=STEPS):
    net = Net(dtype).to(device)
    opt = ShardedOptimizer(make_optimizer(kind, groups(net), backend, dtype))
    for step in range(steps):
        x, y = batches(step, dtype, device)
        opt.zero_grad()
        backward(net, x, y, rank, world)
        opt.step()
    expected, expected_opt = single_process(kind, dtype, device, backend, steps)
    assert_same_params(net, expected, tol)
    assert_same_stats(opt, expected_opt, tol)
    full = opt.state_dict()
    if rank == 0:
        assert_same_state(full, expected_opt.state_dict(), tol)
    else:
        assert full is None
    # Optimizer state per rank: this rank's whole blocks of each buffer, a 1/world share.
    # Moments are fp32, or float64 for float64 params.
    per_element = (2 if kind == "adam" else 1) * (8 if dtype == torch.float64 else 4)
    layout_blocks = [b.num_blocks for b in opt._devices[device].buffers]
    memory = opt.memory()
    assert memory["state"] == sum(shard_blocks(n, world) for n in layout_blocks) * BLOCK * per_element
    assert memory["unsharded_state"] == sum(layout_blocks) * BLOCK * per_element


def inf_on_one_rank_skips_everywhere(rank, world, device, backend, dtype):
    net = Net(dtype).to(device)
    opt = ShardedOptimizer(make_optimizer("adam", groups(net), backend, dtype))
    for step in range(3):
        x, y = batches(step, dtype, device)
        opt.zero_grad()
        backward(net, x, y, rank, world)
        if step == 1 and rank == world - 1:
            # Lands in the shard of rank 0 (the first block of the first tensor), not this one's.
            net.inp.weight.grad[0, 0] = float("inf")
        before = [p.detach().clone() for p in net.parameters()]
        opt.step()
        found = opt.stats().to_dict()["global"]
        assert found["found_inf"] == (step == 1)
        assert found["skipped_steps"] == (0 if step == 0 else 1)
        if step == 1:
            for p, q in zip(net.parameters(), before):
                assert torch.equal(p.detach(), q)
    steps = opt._devices[device].tensor_step.tolist()
    assert steps == [2.0, 2.0, 2.0, 2.0, 0.0]


def checkpoint_save(rank, world, device, backend, dtype, path):
    net = Net(dtype).to(device)
    opt = ShardedOptimizer(make_optimizer("adam", groups(net), backend, dtype))
    for step in range(2):
        x, y = batches(step, dtype, device)
        opt.zero_grad()
        backward(net, x, y, rank, world)
        opt.step()
    import torch.distributed.checkpoint as dcp

    dcp.save(opt.sharded_state_dict(), checkpoint_id=os.path.join(path, "dcp"))
    full = opt.state_dict()
    if rank == 0:
        torch.save({"model": net.state_dict(), "optimizer": full}, os.path.join(path, "full.pt"))


def checkpoint_load(rank, world, device, backend, dtype, path, tol):
    import torch.distributed.checkpoint as dcp

    saved = torch.load(os.path.join(path, "full.pt"), map_location=device)
    expected, expected_opt = single_process("adam", dtype, device, backend)
    for form in ("full", "sharded"):
        net = Net(dtype).to(device)
        net.load_state_dict(saved["model"])
        opt = ShardedOptimizer(make_optimizer("adam", groups(net), backend, dtype))
        if form == "full":
            opt.load_state_dict(saved["optimizer"])
        else:
            state = opt.sharded_state_dict()
            dcp.load(state, checkpoint_id=os.path.join(path, "dcp"))
            opt.load_state_dict(state)
        for step in range(2, STEPS):
            x, y = batches(step, dtype, device)
            opt.zero_grad()
            backward(net, x, y, rank, world)
            opt.step()
        assert_same_params(net, expected, tol)
        full = opt.state_dict()
        if rank == 0:
            assert_same_state(full, expected_opt.state_dict(), tol)
    # The gathered state also loads into a plain optimizer and continues there.
    plain_net = Net(dtype).to(device)
    plain_net.load_state_dict(saved["model"])
    plain = make_optimizer("adam", groups(plain_net), backend, dtype)
    plain.load_state_dict(saved["optimizer"])
    for step in range(2, STEPS):
        x, y = batches(step, dtype, device)
        plain.zero_grad()
        backward(plain_net, x, y, 0, 1)
        plain.step()
    assert_same_params(plain_net, expected, tol)


def sharded_with_grad_scaler(rank, world, device, backend, dtype, tol):
    """fusedopt.GradScaler drives the sharded step: every rank backs off and grows its scale
    exactly as a single process does, and an inf on one rank skips the step everywhere."""
    runs = []
    for r, w in ((rank, world), (0, 1)):
        net = Net(dtype).to(device)
        opt = make_optimizer("adam", groups(net), backend, dtype)
        if w > 1:
            opt = ShardedOptimizer(opt)
        runs.append((net, opt, fusedopt.GradScaler(init_scale=2.0 ** 10, growth_interval=2), r, w))
    for step in range(4):
        x, y = batches(step, dtype, device)
        for net, opt, scaler, r, w in runs:
            opt.zero_grad()
            rows = slice(r * BATCH // w, (r + 1) * BATCH // w)
            for k in range(MICRO_BATCHES):
                loss = (net(x[k, rows]) - y[k, rows]).square().mean() / MICRO_BATCHES
                if step == 2 and r == w - 1:
                    loss = loss * float("inf")
                scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    (net, opt, scaler, _, _), (ref_net, ref_opt, ref_scaler, _, _) = runs
    # 1024, grows to 2048 after two clean steps, backs off to 1024 on the inf, one clean step.
    assert scaler.get_scale() == ref_scaler.get_scale() == 2.0 ** 10
    assert opt.stats().to_dict()["global"]["skipped_steps"] == 1
    assert_same_params(net, ref_net, tol)


SCENARIOS = {f.__name__: f for f in (ddp_matches_single_process, sharded_matches_single_process,
                                     sharded_with_grad_scaler,
                                     inf_on_one_rank_skips_everywhere, checkpoint_save,
                                     checkpoint_load)}


# ----------------------------------------------------------------------------- CPU tests (gloo)
@pytest.mark.parametrize("bucket_view", [False, True])
def test_ddp_matches_single_process(bucket_view):
    spawn(2, "ddp_matches_single_process", bucket_view=bucket_view, backend="reference",
          dtype=torch.float64, tol=F64)


@pytest.mark.parametrize("world,kind", [(2, "adam"), (3, "adam"), (3, "sgd")])
def test_sharded_matches_single_process(world, kind):
    spawn(world, "sharded_matches_single_process", kind=kind, backend="reference",
          dtype=torch.float64, tol=F64)


def test_sharded_triton_kernels_match_single_process():
    """The kernel path (shard-local tables) through the Triton interpreter on CPU tensors; two
    steps, since the interpreter takes seconds per step (the second step is the first with
    moments to carry)."""
    if not fusedopt.backends.available("triton"):
        pytest.skip("triton is not installed")
    if not fusedopt.backends.triton_interpreted():
        pytest.skip("CPU tensors run the Triton kernels only under TRITON_INTERPRET=1")
    spawn(2, "sharded_matches_single_process", kind="adam", backend="triton",
          dtype=torch.float32, tol=F32, steps=2)


def test_grad_scaler_drives_the_sharded_step():
    spawn(2, "sharded_with_grad_scaler", backend="reference", dtype=torch.float64, tol=F64)


def test_inf_on_one_rank_skips_the_step_on_all_ranks():
    spawn(2, "inf_on_one_rank_skips_everywhere", backend="reference", dtype=torch.float64)


def test_checkpoint_saved_at_world_size_2_loads_at_3():
    with tempfile.TemporaryDirectory() as path:
        spawn(2, "checkpoint_save", backend="reference", dtype=torch.float64, path=path)
        spawn(3, "checkpoint_load", backend="reference", dtype=torch.float64, path=path, tol=F64)


def test_arguments_are_checked_before_any_collective():
    net = Net(torch.float32)
    with pytest.raises(TypeError, match="optimizer_class"):
        ShardedOptimizer(net.parameters(), optimizer_class=torch.optim.AdamW)
    with pytest.raises(TypeError, match="optimizer_class"):
        ShardedOptimizer(fusedopt.AdamW(net.parameters()), optimizer_class=fusedopt.AdamW)
    with pytest.raises(RuntimeError, match="init_process_group"):
        ShardedOptimizer(net.parameters(), optimizer_class=fusedopt.AdamW, lr=1e-3)


def test_shard_blocks_split_like_torch_chunk():
    for num_blocks in (1, 2, 5, 8, 9, 270_000):
        for world in (1, 2, 3, 8):
            rows = torch.arange(num_blocks).chunk(world)
            c = shard_blocks(num_blocks, world)
            assert [len(r) for r in rows] == [min(c, num_blocks - i * c) for i in range(len(rows))]


# ----------------------------------------------------------------------------- GPU tests (NCCL)
two_gpus = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                              reason="needs 2 CUDA devices")


def gpu_backends():
    names = []
    if fusedopt.backends.available("triton"):
        names.append("triton")
    if torch.cuda.is_available() and fusedopt.backends.available("cuda"):
        names.append("cuda")
    return names or ["triton"]


@pytest.mark.gpu
@two_gpus
@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("bucket_view", [False, True])
def test_gpu_ddp_matches_single_gpu(backend, bucket_view):
    spawn(2, "ddp_matches_single_process", "cuda", bucket_view=bucket_view, backend=backend,
          dtype=torch.float32, tol=F32)


@pytest.mark.gpu
@two_gpus
@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_gpu_sharded_matches_single_gpu(backend, kind):
    spawn(2, "sharded_matches_single_process", "cuda", kind=kind, backend=backend,
          dtype=torch.float32, tol=F32)


@pytest.mark.gpu
@two_gpus
@pytest.mark.parametrize("backend", gpu_backends())
def test_gpu_inf_on_one_rank_skips_everywhere(backend):
    spawn(2, "inf_on_one_rank_skips_everywhere", "cuda", backend=backend, dtype=torch.float32)
