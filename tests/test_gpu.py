"""GPU-only properties of the fused step: no host sync, CUDA-graph capture, agreement of the
CUDA and Triton backends with the reference over many steps, 64-bit indexing."""
import pytest
import torch

import fusedopt
from conftest import kernel_backends

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

GPU_BACKENDS = [b for b in ("triton", "cuda") if b in kernel_backends()] if torch.cuda.is_available() else []


@pytest.fixture(params=GPU_BACKENDS or [pytest.param("none", marks=pytest.mark.skip(
    reason="no GPU backend available"))])
def gpu_backend(request):
    return request.param


def make_model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.LayerNorm(256),
                               torch.nn.Linear(256, 64)).cuda().to(dtype)


def test_step_never_syncs(gpu_backend):
    net = make_model()
    opt = fusedopt.AdamC(net.parameters(), lr=1e-3, weight_decay=0.1, max_grad_norm=1.0,
                         backend=gpu_backend, stats=True)
    scaler = fusedopt.GradScaler(init_scale=1024.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    x = torch.randn(32, 64, device="cuda")

    def iteration():
        scaler.scale(net(x).square().mean()).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
        opt.zero_grad()
        return opt.stats()

    iteration()  # first step: compiles kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            iteration()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert opt.stats().to_dict()["global"]["skipped_steps"] == 0


def test_cuda_graph_replay_with_changing_lr(gpu_backend):
    """Capture step() once, replay it with a new tensor lr each time, and match eager steps."""
    eager_net, graph_net = make_model(1), make_model(1)
    lr = torch.tensor(1e-2, device="cuda")
    graph_opt = fusedopt.AdamC(graph_net.parameters(), lr=lr, max_lr=1e-2, weight_decay=0.1,
                               max_grad_norm=0.5, backend=gpu_backend)
    eager_opt = fusedopt.AdamC(eager_net.parameters(), lr=1e-2, weight_decay=0.1,
                               max_grad_norm=0.5, backend=gpu_backend)
    gen = torch.Generator(device="cuda").manual_seed(0)
    grads = [torch.randn(p.shape, device="cuda", generator=gen) for p in graph_net.parameters()]

    def load_grads(net):
        for p, g in zip(net.parameters(), grads):
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            load_grads(graph_net)
            graph_opt.step()
    torch.cuda.current_stream().wait_stream(side)
    for _ in range(2):
        load_grads(eager_net)
        eager_opt.step()

    graph = torch.cuda.CUDAGraph()
    load_grads(graph_net)
    with torch.cuda.graph(graph):
        graph_opt.step()
    for value in (5e-3, 2e-3, 1e-3, 0.0):
        lr.fill_(value)
        for g in grads:
            g.mul_(1.1)
        load_grads(graph_net)
        graph.replay()
        eager_opt.param_groups[0]["lr"] = value
        load_grads(eager_net)
        eager_opt.step()
    torch.cuda.synchronize()
    for a, b in zip(graph_net.parameters(), eager_net.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("cls", [fusedopt.AdamC, fusedopt.SGDC, fusedopt.LionC],
                         ids=lambda c: c.__name__)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_cuda_triton_reference_agree_over_50_steps(cls, dtype):
    backends_ = ["reference"] + GPU_BACKENDS
    shapes = [(1,), (127,), (4095,), (4097,), (278011,)] + [(37, 11)] * 60
    finals = {}
    for backend in backends_:
        gen = torch.Generator().manual_seed(0)
        params = [torch.randn(s, generator=gen).cuda().to(dtype).requires_grad_() for s in shapes]
        opt = cls(params, lr=1e-3, weight_decay=0.1, max_grad_norm=1.0, backend=backend,
                  stats=True)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=50)
        grad_gen = torch.Generator().manual_seed(1)
        for step in range(50):
            for p in params:
                p.grad = torch.randn(p.shape, generator=grad_gen).cuda().to(dtype)
            if step == 20:
                params[3].grad.view(-1)[7] = float("nan")
            opt.step()
            sched.step()
        finals[backend] = ([p.detach().float().clone() for p in params], opt.stats().to_dict())
    ref_params, ref_stats = finals["reference"]
    for backend in GPU_BACKENDS:
        params, stats = finals[backend]
        assert stats["global"]["skipped_steps"] == ref_stats["global"]["skipped_steps"] == 1
        for a, b in zip(params, ref_params):
            if cls is fusedopt.LionC:
                # sign(c) is discontinuous at 0: where c lands within rounding of 0, the two
                # sides move a coordinate by lr in opposite directions. Rare and bounded by
                # 2 lr per step (lr <= 1e-3 here); every other coordinate agrees.
                far = (a - b).abs() > 1e-5 + 1e-4 * b.abs()
                assert far.float().mean() < 0.01 and (a - b).abs().max() <= 2e-3 * 50
            elif dtype == torch.float32:
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
            else:
                # 50 steps may each round a stored half value the other way: allow a few ulps.
                ulp = torch.finfo(dtype).eps
                assert ((a - b).abs() <= 4 * ulp * b.abs().clamp(min=1.0)).float().mean() > 0.999


def test_cuda_and_triton_agree_bitwise_on_statistics_layout():
    if len(GPU_BACKENDS) < 2:
        pytest.skip("needs both GPU backends")
    results = []
    for backend in GPU_BACKENDS:
        net = make_model(3)
        opt = fusedopt.AdamW(net.named_parameters(), lr=1e-3, backend=backend, stats=True)
        x = torch.randn(16, 64, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
        net(x).square().mean().backward()
        opt.step()
        results.append(opt.stats().to_dict())
    a, b = results
    assert a["tensors"].keys() == b["tensors"].keys()
    for name in a["tensors"]:
        for key in a["tensors"][name]:
            assert a["tensors"][name][key] == pytest.approx(b["tensors"][name][key], rel=1e-4, abs=1e-9)


def test_64bit_indexing_above_2_pow_31_elements(gpu_backend):
    numel = 2 ** 31 + 3 * 4096 + 5
    # bf16 param and grad, fp32 momentum buffer (allocated even without momentum), 2 GiB spare.
    need = numel * (2 + 2 + 4) + (1 << 31)
    if torch.cuda.mem_get_info()[0] < need:
        pytest.skip(f"needs {need / 2**30:.1f} GiB of free GPU memory")
    p = torch.zeros(numel, dtype=torch.bfloat16, device="cuda")
    p[-5:] = 2.0
    p[:5] = -2.0
    p.requires_grad_()
    opt = fusedopt.SGD([p], lr=0.5, backend=gpu_backend, stats=True)
    p.grad = torch.zeros_like(p)
    p.grad[-5:] = 1.0
    p.grad[:5] = -1.0
    opt.step()
    assert torch.equal(p[-5:].detach().float().cpu(), torch.full((5,), 1.5))
    assert torch.equal(p[:5].detach().float().cpu(), torch.full((5,), -1.5))
    stats = opt.stats().to_dict()
    assert stats["global"]["grad_norm"] == pytest.approx(10 ** 0.5, rel=1e-6)
    del p, opt
    torch.cuda.empty_cache()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_one_optimizer_across_two_devices_shares_the_clip_norm(gpu_backend):
    """Params on cuda:0 and cuda:1 in one optimizer: every device sums the same per-tensor
    values in the same order, so the norm, the clip and the skip decision agree across them,
    and the result equals the reference on one device."""
    gen = torch.Generator().manual_seed(0)
    values = [torch.randn(5000, generator=gen), torch.randn(300, 7, generator=gen)]
    grads = [torch.randn(v.shape, generator=gen) for v in values]
    split = [values[0].to("cuda:0").requires_grad_(), values[1].to("cuda:1").requires_grad_()]
    single = [v.to("cuda:0").requires_grad_() for v in values]
    results = []
    for params, backend in ((split, gpu_backend), (single, "reference")):
        opt = fusedopt.AdamW(params, lr=1e-2, max_grad_norm=0.5, backend=backend, stats=True)
        scaler = fusedopt.GradScaler(init_scale=4.0)
        for step in range(3):
            loss = sum((p * g.to(p.device)).sum().to("cuda:0") for p, g in zip(params, grads))
            if step == 1:
                loss = loss * float("inf")
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
        results.append(([p.detach().cpu() for p in params], opt.stats().to_dict()["global"],
                        scaler.get_scale()))
    (a, ga, sa), (b, gb, sb) = results
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5)
    assert ga["skipped_steps"] == gb["skipped_steps"] == 1
    assert ga["grad_norm"] == pytest.approx(gb["grad_norm"], rel=1e-6)
    assert sa == sb


def test_state_dict_survives_a_device_change(gpu_backend):
    """Save on the GPU, load into a CPU (reference) optimizer and back; both continue alike."""
    gpu_net = make_model(4)
    gpu_opt = fusedopt.AdamC(gpu_net.parameters(), lr=1e-2, weight_decay=0.1, backend=gpu_backend)
    x = torch.randn(8, 64, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    for _ in range(3):
        gpu_opt.zero_grad()
        gpu_net(x).square().mean().backward()
        gpu_opt.step()
    cpu_net = make_model(4).cpu()
    cpu_net.load_state_dict({k: v.cpu() for k, v in gpu_net.state_dict().items()})
    cpu_opt = fusedopt.AdamC(cpu_net.parameters(), lr=1e-2, weight_decay=0.1)
    cpu_opt.load_state_dict(gpu_opt.state_dict())
    for net, opt, inp in ((gpu_net, gpu_opt, x), (cpu_net, cpu_opt, x.cpu())):
        opt.zero_grad()
        net(inp).square().mean().backward()
        opt.step()
    for a, b in zip(gpu_net.parameters(), cpu_net.parameters()):
        torch.testing.assert_close(a.detach().cpu(), b.detach(), atol=1e-5, rtol=1e-4)
    back = fusedopt.AdamC(make_model(4).parameters(), lr=1e-2, weight_decay=0.1, backend=gpu_backend)
    back.load_state_dict(cpu_opt.state_dict())
    for p, q in zip(back.state, cpu_opt.state):
        assert torch.equal(back.state[p]["exp_avg"].cpu(), cpu_opt.state[q]["exp_avg"])


@pytest.mark.parametrize("cls", [fusedopt.AdamW, fusedopt.SGD, fusedopt.Lion],
                         ids=lambda c: c.__name__)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_views_at_unaligned_offsets_and_channels_last_match_the_reference(gpu_backend, cls, dtype):
    """Params carved out of one buffer at offsets that break 16-byte alignment (the kernels'
    scalar path), a channels_last weight and a grad in a foreign layout: the kernels update
    them where they are, like the reference backend does."""
    def build(backend):
        gen = torch.Generator().manual_seed(0)
        buffer = torch.randn(1 + 9000 + 3 * 4096, generator=gen).cuda().to(dtype)
        conv = torch.randn(16, 8, 3, 3, generator=gen).cuda().to(dtype)
        params = [torch.nn.Parameter(buffer[1:9001]),
                  torch.nn.Parameter(buffer[9001:].view(3, 4096)),
                  torch.nn.Parameter(conv.to(memory_format=torch.channels_last))]
        opt = cls(params, lr=1e-3, weight_decay=0.1, max_grad_norm=1.0, backend=backend,
                  stats=True)
        grad_gen = torch.Generator().manual_seed(1)
        for step in range(4):
            for p in params:
                p.grad = torch.randn(p.shape, generator=grad_gen).cuda().to(dtype)
            params[2].grad = params[2].grad.contiguous()  # laid out unlike its param
            opt.step()
        return buffer, params, opt.stats().to_dict()
    buffer, params, stats = build(gpu_backend)
    ref_buffer, ref_params, ref_stats = build("reference")
    assert params[0].data_ptr() == buffer.data_ptr() + buffer.element_size()
    assert params[2].is_contiguous(memory_format=torch.channels_last)
    tolerance = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(buffer.float(), ref_buffer.float(), **tolerance)
    torch.testing.assert_close(params[2].float(), ref_params[2].float(), **tolerance)
    for name, figures in stats["tensors"].items():
        assert figures["grad_norm"] == pytest.approx(ref_stats["tensors"][name]["grad_norm"],
                                                     rel=1e-4)


def test_an_empty_param_with_a_gradient_does_not_skip_the_step(gpu_backend):
    """A tensor with no elements has no blocks: its non-finite flag is the max over none, -inf,
    which must not count as an inf (FSDP2 gives ranks past a small param's rows empty shards)."""
    weight = torch.ones(64, device="cuda", requires_grad=True)
    empty = torch.ones(0, 8, device="cuda", requires_grad=True)
    opt = fusedopt.AdamW([weight, empty], lr=1e-2, backend=gpu_backend)
    ((weight * 2).sum() + empty.sum()).backward()
    assert empty.grad is not None
    opt.step()
    assert not opt.stats().to_dict()["global"]["found_inf"]
    assert not torch.equal(weight.detach(), torch.ones_like(weight))
