"""fusedopt under DistributedDataParallel.

The optimizer has no communication of its own: DDP averages the gradients and the step reads
them where DDP left them. Each test spawns 2 processes (gloo on CPU over 127.0.0.1, NCCL on GPUs
for the gpu-marked ones) and checks, on every rank:

- trajectories and statistics equal those of a single-process run of the same model on the
  concatenated batch (computed in the same process), with gradient accumulation under
  `no_sync()` and both `gradient_as_bucket_view` settings;
- the optimizer never replaces `.grad`: with bucket views every gradient stays a view of DDP's
  bucket through the step, and the kernels read it at that address (no copy);
- an inf on one rank, averaged into every rank's gradient by the all-reduce, skips the step on
  all ranks and leaves params and state bit-identical;
- fusedopt.GradScaler backs off and grows its scale on every rank as in a single process.

The model has one param no loss reaches: its grad stays None on every rank and it is skipped,
as in torch.optim.
"""
import contextlib

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import fusedopt
from fusedopt.engine import backends, layout
from ranks import assert_same_params, assert_same_stats, gpu_backends, spawn, two_gpus

STEPS = 4
BATCH = 12          # splits evenly over 2 ranks
MICRO_BATCHES = 2   # gradient accumulation steps per optimizer step
# float64: the DDP and single-process runs differ only in summation order (each rank's partial
# gradient, then the all-reduce), i.e. rounding of 1e-16 relative, amplified a little by Adam's
# division.
F64 = dict(rtol=1e-9, atol=1e-12)
# fp32 kernels: the same bound as tests/tolerances.py for kernels against the reference. The
# ranks' averaged gradients differ from the full-batch ones by fp32 rounding; the fp32 runs use
# eps=1e-3 (EPS_F32) so that Adam's update is smooth in g and that rounding stays rounding
# (with eps=1e-8 a gradient element near 0 turns a 1e-9 difference into a 1e-5 one).
F32 = dict(rtol=2e-5, atol=2e-6)
EPS_F32 = 1e-3


class Net(torch.nn.Module):
    """Linear(16, 600) + Linear(600, 16) and a param no loss reaches (grad None: skipped, as in
    torch.optim)."""

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


def make_optimizer(params, backend, dtype, stats=True):
    eps = 1e-8 if dtype == torch.float64 else EPS_F32
    return fusedopt.AdamW(params, lr=1e-2, eps=eps, max_grad_norm=0.05, backend=backend,
                          stats=stats)


def wrap(net, device, bucket_view=False):
    # The unused param has no gradient on any rank: DDP must be told, as usual.
    return DDP(net, gradient_as_bucket_view=bucket_view, find_unused_parameters=True,
               device_ids=[device.index] if device.type == "cuda" else None)


def batches(step, dtype, device):
    gen = torch.Generator().manual_seed(100 + step)
    x = torch.randn(MICRO_BATCHES, BATCH, 16, generator=gen, dtype=torch.float64)
    y = torch.randn(MICRO_BATCHES, BATCH, 16, generator=gen, dtype=torch.float64)
    return x.to(device, dtype), y.to(device, dtype)


def rows(rank, world):
    return slice(rank * BATCH // world, (rank + 1) * BATCH // world)


def micro_loss(model, x, y, k, rank, world):
    """Mean loss over this rank's rows of micro-batch k, divided by the number of
    micro-batches: the mean over ranks (what DDP's all-reduce computes) of its gradient, summed
    over micro-batches, is the gradient of the full-batch loss."""
    r = rows(rank, world)
    return (model(x[k, r]) - y[k, r]).square().mean() / MICRO_BATCHES


def ddp_backward(ddp, x, y, rank, world):
    """Accumulate all micro-batches; only the last backward all-reduces."""
    with ddp.no_sync():
        for k in range(MICRO_BATCHES - 1):
            micro_loss(ddp, x, y, k, rank, world).backward()
    micro_loss(ddp, x, y, MICRO_BATCHES - 1, rank, world).backward()


def single_process(dtype, device, backend, stats):
    net = Net(dtype).to(device)
    opt = make_optimizer(groups(net), backend, dtype, stats)
    for step in range(STEPS):
        x, y = batches(step, dtype, device)
        opt.zero_grad()
        for k in range(MICRO_BATCHES):
            micro_loss(net, x, y, k, 0, 1).backward()
        opt.step()
    return net, opt


def assert_reads_grads_in_place(opt, net, device):
    """A kernel backend's tensor table holds the address of each `.grad` as it is: the step
    read the gradients where DDP put them, without staging a copy."""
    tables = opt.engine.devices[device]
    if tables.backend == "reference":
        return
    addresses = tables.table[layout.GRAD_ADDR].tolist()
    for p, address in zip(tables.params, addresses):
        assert address == (0 if p.grad is None else p.grad.data_ptr())


# ----------------------------------------------------------------------------- scenarios
def ddp_matches_single_process(rank, world, device, bucket_view, backend, dtype, tol,
                               stats=True):
    net = Net(dtype).to(device)
    ddp = wrap(net, device, bucket_view)
    opt = make_optimizer(groups(net), backend, dtype, stats)
    for step in range(STEPS):
        x, y = batches(step, dtype, device)
        opt.zero_grad()
        ddp_backward(ddp, x, y, rank, world)
        grads = {p: (p.grad, p.grad.data_ptr()) for p in net.parameters() if p.grad is not None}
        assert net.unused not in grads
        if bucket_view:
            # DDP points every .grad into one flat bucket it all-reduces in place (the model is
            # smaller than DDP's first bucket, so there is one).
            buckets = {g._base for g, _ in grads.values()}
            assert len(buckets) == 1 and None not in buckets
        opt.step()
        for p, (grad, address) in grads.items():
            assert p.grad is grad and p.grad.data_ptr() == address
        assert_reads_grads_in_place(opt, net, device)
    expected, expected_opt = single_process(dtype, device, backend, stats)
    assert_same_params(net, expected, tol)
    if stats:
        assert_same_stats(opt.stats(), expected_opt.stats(), tol)


def inf_on_one_rank_skips_everywhere(rank, world, device, backend, dtype):
    net = Net(dtype).to(device)
    ddp = wrap(net, device)
    opt = make_optimizer(groups(net), backend, dtype)
    for step in range(3):
        x, y = batches(step, dtype, device)
        opt.zero_grad()
        with ddp.no_sync():
            micro_loss(ddp, x, y, 0, rank, world).backward()
        if step == 1 and rank == world - 1:
            # Into this rank's accumulated gradient, before the all-reduce of the last backward.
            with torch.no_grad():
                net.inp.weight.grad[0, 0] = float("inf")
        micro_loss(ddp, x, y, 1, rank, world).backward()
        if step == 1:
            # The all-reduce averaged the inf into every rank's gradient.
            assert net.inp.weight.grad[0, 0].item() == float("inf")
        before = [p.detach().clone() for p in net.parameters()]
        state_before = {p: {k: v.clone() for k, v in opt.state[p].items()} for p in opt.state}
        opt.step()
        found = opt.stats().to_dict()["global"]
        assert found["found_inf"] == (step == 1)
        assert found["skipped_steps"] == (0 if step == 0 else 1)
        if step == 1:
            for p, q in zip(net.parameters(), before):
                assert torch.equal(p.detach(), q)
            for p, entry in state_before.items():
                for key, value in entry.items():
                    assert torch.equal(opt.state[p][key], value), key
    steps = [float(opt.state[p]["step"]) for g in opt.param_groups for p in g["params"]]
    assert steps == [2.0, 2.0, 2.0, 2.0, 0.0]


def ddp_with_grad_scaler(rank, world, device, backend, dtype, tol):
    """fusedopt.GradScaler on the DDP model and on a single-process one: the scaled gradients
    are averaged before the step, so every rank sees the same inf and updates its scale as the
    single process does."""
    runs = []
    for r, w in ((rank, world), (0, 1)):
        net = Net(dtype).to(device)
        model = wrap(net, device) if w > 1 else net
        opt = make_optimizer(groups(net), backend, dtype)
        scaler = fusedopt.GradScaler(init_scale=2.0 ** 10, growth_interval=2)
        runs.append((net, model, opt, scaler, r, w))
    for step in range(4):
        x, y = batches(step, dtype, device)
        for net, model, opt, scaler, r, w in runs:
            opt.zero_grad()
            for k in range(MICRO_BATCHES):
                # DDP decides in the forward whether the backward all-reduces, so the whole
                # micro-batch runs inside no_sync().
                last = k == MICRO_BATCHES - 1
                with model.no_sync() if w > 1 and not last else contextlib.nullcontext():
                    loss = micro_loss(model, x, y, k, r, w)
                    if step == 2 and r == w - 1:
                        loss = loss * float("inf")
                    scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    (net, _, opt, scaler, _, _), (ref_net, _, _, ref_scaler, _, _) = runs
    # 1024, grows to 2048 after two clean steps, backs off to 1024 on the inf, one clean step.
    assert scaler.get_scale() == ref_scaler.get_scale() == 2.0 ** 10
    assert opt.stats().to_dict()["global"]["skipped_steps"] == 1
    assert_same_params(net, ref_net, tol)


# ----------------------------------------------------------------------------- CPU tests (gloo)
@pytest.mark.parametrize("bucket_view", [False, True])
def test_ddp_matches_single_process(bucket_view):
    spawn(2, ddp_matches_single_process, bucket_view=bucket_view, backend="reference",
          dtype=torch.float64, tol=F64)


def test_ddp_triton_kernels_read_the_bucket_in_place():
    """The kernel path through the Triton interpreter on CPU tensors: the tensor table points at
    DDP's bucket views. Statistics off: the interpreter takes about a second per 4096-element
    block for the update kernel's statistics variant (two minutes for this test with them on);
    tests/test_update.py checks the kernels' statistics against the reference."""
    if not backends.available("triton"):
        pytest.skip("triton is not installed")
    if not backends.triton_interpreted():
        pytest.skip("CPU tensors run the Triton kernels only under TRITON_INTERPRET=1")
    spawn(2, ddp_matches_single_process, bucket_view=True, backend="triton",
          dtype=torch.float32, tol=F32, stats=False)


def test_inf_on_one_rank_skips_the_step_on_all_ranks():
    spawn(2, inf_on_one_rank_skips_everywhere, backend="reference", dtype=torch.float64)


def test_grad_scaler_under_ddp():
    spawn(2, ddp_with_grad_scaler, backend="reference", dtype=torch.float64, tol=F64)


# ----------------------------------------------------------------------------- GPU tests (NCCL)
@pytest.mark.gpu
@two_gpus
@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("bucket_view", [False, True])
def test_gpu_ddp_matches_single_gpu(backend, bucket_view):
    spawn(2, ddp_matches_single_process, "cuda", bucket_view=bucket_view, backend=backend,
          dtype=torch.float32, tol=F32)


@pytest.mark.gpu
@two_gpus
@pytest.mark.parametrize("backend", gpu_backends())
def test_gpu_inf_on_one_rank_skips_everywhere(backend):
    spawn(2, inf_on_one_rank_skips_everywhere, "cuda", backend=backend, dtype=torch.float32)


@pytest.mark.gpu
@two_gpus
@pytest.mark.parametrize("backend", gpu_backends())
def test_gpu_grad_scaler_under_ddp(backend):
    spawn(2, ddp_with_grad_scaler, "cuda", backend=backend, dtype=torch.float32, tol=F32)
