"""The Python front end: arguments, ownership of params and grads, the cases users hit,
schedulers, names, copies, hooks and checkpoints."""
import copy
import io
import pickle

import pytest
import torch

import fusedopt


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
    (dict(max_grad_norm=0.0), "max_grad_norm"), (dict(max_lr=-1.0), "max_lr"),
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
    assert {ds.backend for ds in opt.engine.devices.values()} == {"reference"}


def test_bad_gradients_are_named():
    net = model()
    opt = fusedopt.AdamW(net.named_parameters())
    net[0].weight.grad = torch.zeros_like(net[0].weight).to_sparse()
    with pytest.raises(TypeError, match="0.weight: sparse"):
        opt.step()


def backends_to_try():
    """The backends that run the CPU tensors of these tests: the reference, and Triton where it
    is interpreted (on a GPU machine the Triton kernels are tested on CUDA tensors in
    tests/test_gpu.py)."""
    names = ["reference"]
    if fusedopt.engine.backends.available("triton") and fusedopt.engine.backends.triton_interpreted():
        names.append("triton")
    return names


@pytest.mark.parametrize("backend", backends_to_try())
def test_params_and_grads_stay_with_their_owners(backend):
    """The optimizer moves nothing: params keep their storage, grads stay the tensors autograd
    made, and zero_grad frees them (set_to_none=True) or zeroes them in place, as torch does."""
    net = model()
    ptrs = [p.data_ptr() for p in net.parameters()]
    opt = fusedopt.AdamW(net.parameters(), backend=backend)
    net(torch.randn(4, 8)).square().mean().backward()
    grads = [p.grad for p in net.parameters()]
    before = [p.detach().clone() for p in net.parameters()]
    opt.step()
    assert [p.data_ptr() for p in net.parameters()] == ptrs
    assert all(p.grad is g for p, g in zip(net.parameters(), grads))
    assert all(not torch.equal(p, b) for p, b in zip(net.parameters(), before))
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is g and not g.any() for p, g in zip(net.parameters(), grads))
    opt.zero_grad()
    assert all(p.grad is None for p in net.parameters())


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


@pytest.mark.parametrize("backend", backends_to_try())
def test_replaced_param_data_is_followed(backend):
    p = torch.ones(10, requires_grad=True)
    opt = fusedopt.SGD([p], lr=0.1, backend=backend)
    p.grad = torch.ones(10)
    opt.step()
    p.data = torch.full((10,), 5.0)
    p.grad = torch.ones(10)  # a new grad tensor too
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((10,), 4.9))


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


# ----------------------------------------------------------------- the cases users hit
@pytest.mark.parametrize("backend", backends_to_try())
def test_model_to_float64_after_construction_trains_in_float64_like_torch(backend):
    """Before the first step torch creates its state in the new dtype: so does fusedopt (the
    kernel backends do not run float64, so there it is a clear error instead)."""
    net_a, net_b = model(), model()
    opt_a = fusedopt.AdamW(net_a.parameters(), lr=1e-2, backend=backend)
    opt_b = torch.optim.AdamW(net_b.parameters(), lr=1e-2)
    net_a.double()
    net_b.double()
    x = torch.randn(16, 8, dtype=torch.float64)
    if backend != "reference":
        net_a(x).square().mean().backward()
        with pytest.raises(TypeError, match="float64"):
            opt_a.step()
        return
    for opt, net in ((opt_a, net_a), (opt_b, net_b)):
        for _ in range(3):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
    for a, b in zip(net_a.parameters(), net_b.parameters()):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
    assert opt_a.state[net_a[0].weight]["exp_avg"].dtype == torch.float64


@pytest.mark.parametrize("backend", backends_to_try())
def test_model_half_after_steps_keeps_training_in_half_with_the_state(backend):
    net = model()
    opt = fusedopt.AdamW(net.parameters(), lr=1e-2, backend=backend)
    train(opt, net, 2)
    moment = opt.state[net[0].weight]["exp_avg"].clone()
    net.half()
    assert torch.equal(opt.state[net[0].weight]["exp_avg"], moment)  # not moved yet
    before = [p.detach().clone() for p in net.parameters()]
    for p in net.parameters():
        p.grad = torch.full_like(p, 0.5)
    opt.step()
    for p, old in zip(net.parameters(), before):
        assert p.dtype == torch.float16 and not torch.equal(p, old)
    state = opt.state[net[0].weight]
    assert float(state["step"]) == 3 and state["exp_avg"].dtype == torch.float32
    torch.testing.assert_close(state["exp_avg"], 0.9 * moment + 0.1 * 0.5)


def test_a_param_whose_shape_changed_is_named():
    net = model()
    opt = fusedopt.AdamW(net.named_parameters())
    net[0].weight.data = torch.zeros(3, 3)
    net[0].weight.grad = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="0.weight changed shape"):
        opt.step()


@pytest.mark.parametrize("copier", ["deepcopy", "pickle"])
def test_copies_of_the_optimizer_keep_training_exactly(copier):
    net = model()
    opt = fusedopt.AdamW(net.parameters(), lr=1e-2, backend="reference")
    train(opt, net, 2)
    pair = (net, opt)
    net2, opt2 = copy.deepcopy(pair) if copier == "deepcopy" else pickle.loads(pickle.dumps(pair))
    train(opt, net, 3, seed=1)
    train(opt2, net2, 3, seed=1)
    for a, b in zip(net.parameters(), net2.parameters()):
        assert torch.equal(a, b)
    assert float(opt2.state[net2[0].weight]["step"]) == 5


def test_state_dict_hooks_are_called_as_torch_calls_them():
    opt = fusedopt.AdamW(model().parameters())
    calls = []
    opt.register_state_dict_pre_hook(lambda o: calls.append("pre"))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "extra": 1})
    opt.register_load_state_dict_pre_hook(
        lambda o, sd: calls.append("load_pre") or {k: v for k, v in sd.items() if k != "extra"})
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load_post"))
    saved = opt.state_dict()
    assert saved["extra"] == 1
    opt.load_state_dict(saved)
    assert calls == ["pre", "load_pre", "load_post"]


@pytest.mark.parametrize("backend", backends_to_try())
@pytest.mark.parametrize("cls", [fusedopt.AdamW, fusedopt.AdamC, fusedopt.LionC])
def test_lr_zero_is_accepted_and_changes_nothing(backend, cls):
    net = model()
    opt = cls(net.parameters(), lr=0.0, weight_decay=0.1, backend=backend)
    before = [p.detach().clone() for p in net.parameters()]
    train(opt, net, 2)
    for p, old in zip(net.parameters(), before):
        assert torch.equal(p, old)


def test_stats_of_an_optimizer_without_params():
    opt = fusedopt.AdamW([{"params": []}], stats=True)
    opt.step()
    stats = opt.stats().to_dict()
    assert stats["tensors"] == {} and stats["global"]["grad_norm"] == 0.0


@pytest.mark.parametrize("backend", backends_to_try())
def test_stats_with_an_empty_group_and_a_zero_element_param(backend):
    p, empty = torch.ones(5, requires_grad=True), torch.zeros(0, requires_grad=True)
    opt = fusedopt.AdamW([{"params": []}, {"params": [p, empty]}], backend=backend, stats=True)
    p.grad, empty.grad = torch.ones(5), torch.zeros(0)
    opt.step()
    tensors = opt.stats().to_dict()["tensors"]
    assert tensors["param0"]["grad_norm"] == pytest.approx(5 ** 0.5)
    assert tensors["param1"]["grad_norm"] == 0.0 and tensors["param1"]["weight_norm"] == 0.0


def test_the_same_param_twice_in_a_group_warns_as_torch_and_steps_once():
    a, b = torch.ones(4, requires_grad=True), torch.ones(4, requires_grad=True)
    with pytest.warns(UserWarning, match="duplicate parameters"):
        opt = fusedopt.SGD([a, a], lr=0.1, momentum=0.9)
    ref = torch.optim.SGD([b], lr=0.1, momentum=0.9)
    for step in range(3):
        a.grad, b.grad = torch.full((4,), step + 1.0), torch.full((4,), step + 1.0)
        opt.step()
        ref.step()
    assert torch.equal(a, b) and len(opt.param_groups[0]["params"]) == 1


@pytest.mark.parametrize("backend", backends_to_try())
def test_params_that_are_views_of_one_buffer_keep_aliasing_it(backend):
    """Two params carved out of one flat buffer (as FSDP1 / Megatron do): the update lands in
    the buffer, and the trajectory is torch's."""
    buffer = torch.randn(4097 + 300)
    ours = [torch.nn.Parameter(v) for v in (buffer[:4097], buffer[4097:].view(30, 10))]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = fusedopt.AdamW(ours, lr=1e-2, backend=backend)
    ref = torch.optim.AdamW(theirs, lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        for a, b in zip(ours, theirs):
            a.grad = torch.randn(a.shape, generator=gen)
            b.grad = a.grad.clone()
        opt.step()
        ref.step()
    assert ours[0].data_ptr() == buffer.data_ptr()
    torch.testing.assert_close(buffer, torch.cat([t.detach().reshape(-1) for t in theirs]))


@pytest.mark.parametrize("second", [slice(50, None), slice(0, 60)], ids=["partly", "the same"])
def test_overlapping_params_are_named(second):
    buffer = torch.zeros(100)
    a, b = torch.nn.Parameter(buffer[:60]), torch.nn.Parameter(buffer[second])
    with pytest.raises(ValueError, match="param0 and param1 overlap"):
        fusedopt.AdamW([a, b])


@pytest.mark.parametrize("backend", backends_to_try())
def test_channels_last_params_and_foreign_grad_layouts_match_the_reference(backend):
    """A channels_last conv weight keeps its layout; a grad set by hand in another layout (and a
    non-dense one) gives the same update as the reference."""
    conv = torch.nn.Conv2d(3, 8, 3).to(memory_format=torch.channels_last)
    twin = copy.deepcopy(conv)
    opt = fusedopt.AdamW(conv.parameters(), lr=1e-2, backend=backend)
    ref = torch.optim.AdamW(twin.parameters(), lr=1e-2)
    x = torch.randn(2, 3, 9, 9).to(memory_format=torch.channels_last)
    for step in range(3):
        for net, o in ((conv, opt), (twin, ref)):
            o.zero_grad()
            net(x).square().mean().backward()
        if step == 1:
            conv.weight.grad = conv.weight.grad.contiguous()
        if step == 2:
            conv.bias.grad = torch.stack([conv.bias.grad, conv.bias.grad], 1)[:, 0]
        opt.step()
        ref.step()
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert opt.state[conv.weight]["exp_avg"].stride() == conv.weight.stride()
    for a, b in zip(conv.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b)


def test_a_bad_value_set_between_steps_is_refused_every_time():
    net = model()
    opt = fusedopt.AdamW(net.parameters())
    train(opt, net, 1)
    opt.param_groups[0]["lr"] = -1.0
    for _ in range(2):  # caught and stepped again: still refused, nothing uploaded
        with pytest.raises(ValueError, match="lr"):
            train(opt, net, 1)
    opt.param_groups[0]["betas"] = (0.9, 1.5)
    opt.param_groups[0]["lr"] = 1e-3
    with pytest.raises(ValueError, match="betas"):
        train(opt, net, 1)
