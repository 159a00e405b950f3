"""The Python front end: arguments, layout, gradients, schedulers, names and checkpoints."""
import io

import pytest
import torch

import fusedopt
from fusedopt.flat import BLOCK


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16),
                               torch.nn.Linear(16, 4))


def train(opt, net, steps, seed=0, scheduler=None):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(32, 8, generator=gen)
        opt.zero_grad()
        net(x).square().mean().backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()


@pytest.mark.parametrize("kwargs,argument", [
    (dict(lr=-1.0), "lr"), (dict(eps=-1e-8), "eps"), (dict(betas=(1.0, 0.9)), "betas"),
    (dict(betas=(0.9, -0.1)), "betas"), (dict(weight_decay=-0.1), "weight_decay"),
    (dict(max_grad_norm=0.0), "max_grad_norm"), (dict(max_lr=0.0), "max_lr"),
    (dict(backend="tpu"), "backend"), (dict(stats="yes"), "stats"),
    (dict(corrected=1), "corrected"),
])
def test_bad_adam_arguments_name_the_argument(kwargs, argument):
    with pytest.raises((ValueError, TypeError), match=argument):
        fusedopt.AdamW(model().parameters(), **kwargs)


@pytest.mark.parametrize("kwargs,argument", [
    (dict(lr=0.1, momentum=-0.5), "momentum"), (dict(lr=0.1, dampening=2.0), "dampening"),
    (dict(lr=0.1, nesterov=True), "nesterov"), (dict(lr=0.1, weight_decay=-1.0), "weight_decay"),
])
def test_bad_sgd_arguments_name_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        fusedopt.SGD(model().parameters(), **kwargs)


def test_non_float_and_complex_params_are_refused():
    with pytest.raises(TypeError, match="params"):
        fusedopt.AdamW([torch.zeros(3, dtype=torch.int64)])
    with pytest.raises(TypeError, match="params"):
        fusedopt.AdamW([torch.zeros(3, dtype=torch.complex64, requires_grad=True)])


def test_kernel_backends_refuse_float64():
    with pytest.raises(TypeError, match="params"):
        fusedopt.AdamW([torch.zeros(3, dtype=torch.float64, requires_grad=True)], backend="triton")


def test_cuda_backend_on_cpu_tensors_says_so():
    with pytest.raises(RuntimeError, match="backend='cuda'"):
        fusedopt.AdamW(model().parameters(), backend="cuda")


def test_triton_on_cpu_without_interpreter_says_so(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        fusedopt.AdamW(model().parameters(), backend="triton")


def test_auto_on_cpu_is_the_reference():
    opt = fusedopt.AdamW(model().parameters())
    assert {ds.backend for ds in opt._devices.values()} == {"reference"}


def test_bad_gradients_are_named():
    net = model()
    opt = fusedopt.AdamW(net.named_parameters())
    net[0].weight.grad = torch.zeros_like(net[0].weight).to_sparse()
    with pytest.raises(TypeError, match="0.weight: sparse"):
        opt.step()


def test_params_are_rehomed_into_aligned_flat_buffers():
    net = model()
    before = [p.detach().clone() for p in net.parameters()]
    opt = fusedopt.AdamW(net.parameters())
    (ds,) = opt._devices.values()
    (buf,) = ds.buffers
    for p, old, start in zip(net.parameters(), before, buf.starts):
        assert torch.equal(p.detach(), old)
        assert start % BLOCK == 0
        assert p.data_ptr() == buf.param.data_ptr() + start * p.element_size()


def test_grads_become_views_and_zero_grad_clears_them_in_place():
    net = model()
    opt = fusedopt.AdamW(net.parameters(), backend="reference")
    train(opt, net, 1)
    (buf,) = next(iter(opt._devices.values())).buffers
    views = [p.grad for p in net.parameters()]
    assert all(v is g for v, g in zip(views, buf.grad_views))
    opt.zero_grad()
    assert all(p.grad is v for p, v in zip(net.parameters(), views))
    assert buf.grad.abs().sum() == 0


def test_replaced_grad_is_copied_in_not_ignored():
    a, b = torch.ones(10, requires_grad=True), torch.ones(10, requires_grad=True)
    opt_a = fusedopt.SGD([a], lr=0.1, backend="reference")
    opt_b = torch.optim.SGD([b], lr=0.1)
    for step in range(3):
        a.grad = torch.full((10,), float(step + 1))  # a fresh tensor every step
        b.grad = torch.full((10,), float(step + 1))
        opt_a.step()
        opt_b.step()
    assert torch.equal(a, b)


def test_replaced_param_data_is_rehomed():
    p = torch.ones(10, requires_grad=True)
    opt = fusedopt.SGD([p], lr=0.1, backend="reference")
    p.data = torch.full((10,), 5.0)
    p.grad = torch.ones(10)
    opt.step()
    assert torch.allclose(p.detach(), torch.full((10,), 4.9))
    (buf,) = next(iter(opt._devices.values())).buffers
    assert p.data_ptr() == buf.param.data_ptr()


def test_schedulers_drive_the_lr():
    net_a, net_b = model(), model()
    opt_a = fusedopt.AdamW(net_a.parameters(), lr=1e-2, backend="reference")
    opt_b = torch.optim.AdamW(net_b.parameters(), lr=1e-2)
    for opt, net in ((opt_a, net_a), (opt_b, net_b)):
        warmup = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=3)
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=5)
        sched = torch.optim.lr_scheduler.SequentialLR(opt, [warmup, cosine], milestones=[3])
        train(opt, net, 8, scheduler=sched)
    for a, b in zip(net_a.parameters(), net_b.parameters()):
        torch.testing.assert_close(a, b)


def test_named_parameters_carry_names_into_stats():
    net = model()
    opt = fusedopt.AdamW(net.named_parameters(), stats=True)
    train(opt, net, 1)
    stats = opt.stats()
    assert stats.names == [n for n, _ in net.named_parameters()]
    assert set(stats.to_dict()["tensors"]) == set(stats.names)


def test_a_param_in_two_groups_is_refused():
    p = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError):
        fusedopt.AdamW([{"params": [p]}, {"params": [p]}])


def test_add_param_group_keeps_existing_state():
    net = model()
    opt = fusedopt.AdamW(list(net[0].parameters()), backend="reference")
    train(opt, net, 2)
    moment = opt.state[net[0].weight]["exp_avg"].clone()
    opt.add_param_group({"params": list(net[2].parameters()), "lr": 1e-4})
    assert torch.equal(opt.state[net[0].weight]["exp_avg"], moment)
    assert float(opt.state[net[0].weight]["step"]) == 2
    train(opt, net, 1)
    assert float(opt.state[net[2].weight]["step"]) == 1


def roundtrip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("cls,kwargs", [(fusedopt.AdamW, dict(lr=1e-2)),
                                        (fusedopt.AdamC, dict(lr=1e-2, weight_decay=0.1)),
                                        (fusedopt.SGD, dict(lr=1e-2, momentum=0.9))])
def test_state_dict_round_trip_mid_run_continues_exactly(cls, kwargs):
    net = model()
    opt = cls(net.parameters(), **kwargs)
    train(opt, net, 3)
    saved_model = roundtrip(net.state_dict())
    saved = roundtrip(opt.state_dict())
    train(opt, net, 3, seed=1)
    expected = [p.detach().clone() for p in net.parameters()]

    net2 = model()
    net2.load_state_dict(saved_model)
    opt2 = cls(net2.parameters(), **kwargs)
    opt2.load_state_dict(saved)
    train(opt2, net2, 3, seed=1)
    for a, b in zip(expected, net2.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_torch_optim_state_dict_interop_both_ways(kind):
    net_t, net_f = model(), model()
    if kind == "adam":
        torch_opt = torch.optim.AdamW(net_t.parameters(), lr=1e-2)
        fused = fusedopt.AdamW(net_f.parameters(), lr=1e-2)
    else:
        torch_opt = torch.optim.SGD(net_t.parameters(), lr=1e-2, momentum=0.9)
        fused = fusedopt.SGD(net_f.parameters(), lr=1e-2, momentum=0.9)
    train(torch_opt, net_t, 3)
    net_f.load_state_dict(net_t.state_dict())
    fused.load_state_dict(roundtrip(torch_opt.state_dict()))
    train(torch_opt, net_t, 2, seed=1)
    train(fused, net_f, 2, seed=1)
    for a, b in zip(net_t.parameters(), net_f.parameters()):
        torch.testing.assert_close(a, b)
    # and back: torch continues from fusedopt's state
    torch_opt.load_state_dict(roundtrip(fused.state_dict()))
    train(torch_opt, net_t, 2, seed=2)
    train(fused, net_f, 2, seed=2)
    for a, b in zip(net_t.parameters(), net_f.parameters()):
        torch.testing.assert_close(a, b)


def test_amsgrad_state_dict_is_refused():
    net = model()
    torch_opt = torch.optim.AdamW(net.parameters(), amsgrad=True)
    opt = fusedopt.AdamW(model().parameters())
    with pytest.raises(ValueError, match="amsgrad"):
        opt.load_state_dict(torch_opt.state_dict())


def test_state_dict_with_wrong_groups_is_refused():
    opt = fusedopt.AdamW(model().parameters())
    other = fusedopt.AdamW(list(model().parameters())[:2])
    with pytest.raises(ValueError, match="params"):
        opt.load_state_dict(other.state_dict())


def test_grad_scaler_state_dict_interop_with_torch():
    ours = fusedopt.GradScaler(init_scale=512.0, growth_interval=7)
    theirs = torch.amp.GradScaler("cpu", init_scale=4.0)
    theirs.load_state_dict(ours.state_dict())
    assert theirs.get_scale() == 512.0 and theirs.get_growth_interval() == 7
    back = fusedopt.GradScaler()
    back.load_state_dict(theirs.state_dict())
    assert back.get_scale() == 512.0


def test_grad_scaler_refuses_torch_optimizers():
    scaler = fusedopt.GradScaler()
    net = model()
    scaler.scale(net(torch.randn(2, 8)).sum()).backward()
    with pytest.raises(TypeError, match="torch.amp.GradScaler"):
        scaler.step(torch.optim.SGD(net.parameters(), lr=0.1))


def test_fused_optimizer_under_torch_amp_grad_scaler():
    """torch.amp.GradScaler hands grad_scale/found_inf to the fused optimizer and it skips."""
    net_a, net_b = model(), model()
    opt_a = fusedopt.AdamW(net_a.parameters(), lr=1e-2, backend="reference")
    opt_b = torch.optim.AdamW(net_b.parameters(), lr=1e-2)
    scalers = [torch.amp.GradScaler("cpu", init_scale=64.0) for _ in range(2)]
    gen = torch.Generator().manual_seed(0)
    for step in range(4):
        x = torch.randn(8, 8, generator=gen)
        for opt, net, scaler in ((opt_a, net_a, scalers[0]), (opt_b, net_b, scalers[1])):
            opt.zero_grad()
            loss = net(x).square().mean() * (float("inf") if step == 1 else 1.0)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    for a, b in zip(net_a.parameters(), net_b.parameters()):
        torch.testing.assert_close(a, b)
    assert scalers[0].get_scale() == scalers[1].get_scale() == 32.0


def test_unscale_then_custom_clip_then_step():
    net_a, net_b = model(), model()
    opt_a = fusedopt.AdamW(net_a.parameters(), lr=1e-2, backend="reference")
    opt_b = torch.optim.AdamW(net_b.parameters(), lr=1e-2)
    ours, theirs = fusedopt.GradScaler(init_scale=64.0), torch.amp.GradScaler("cpu", init_scale=64.0)
    x = torch.randn(8, 8)
    for opt, net, scaler in ((opt_a, net_a, ours), (opt_b, net_b, theirs)):
        scaler.scale(net(x).square().mean()).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(net.parameters(), 0.1)
        scaler.step(opt)
        scaler.update()
    for a, b in zip(net_a.parameters(), net_b.parameters()):
        torch.testing.assert_close(a, b)


def test_stats_without_update_stats_still_report_grad_norms():
    net = model()
    opt = fusedopt.AdamW(net.parameters(), max_grad_norm=1e-3)
    train(opt, net, 1)
    stats = opt.stats()
    assert set(stats.per_tensor) == {"grad_norm"}
    g = stats.to_dict()["global"]
    assert g["clip_coef"] < 1.0 and g["loss_scale"] == 1.0 and not g["found_inf"]
