"""Spawning ranks for the distributed tests (gloo on CPU over 127.0.0.1, NCCL on GPUs), and the
comparisons they share.

`spawn(world, scenario, device_type, **kwargs)` runs `scenario(rank, world, device, **kwargs)`
in `world` fresh processes; a failed assertion in any of them fails the calling test.
"""
import os
import socket
import sys
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fusedopt.engine import backends


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
    scenario(rank, world, device, **kwargs)
    # Without this barrier, gloo processes intermittently aborted at teardown ("terminate called
    # without an active exception") when one rank destroyed the group while another was still
    # finishing its last collective. On failure the process just exits: spawn reports it.
    dist.barrier()
    dist.destroy_process_group()
    # Even after the barrier, 2 of 12 runs of a scenario aborted the same way while the
    # interpreter shut down, after every assertion had passed: leave without running static
    # destructors. A failed assertion raises above and still fails the test.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(world, scenario, device_type="cpu", **kwargs):
    """`scenario` must be a module-level function (the child processes import it by name)."""
    mp.spawn(_worker, args=(world, _free_port(), device_type, scenario, kwargs), nprocs=world)


two_gpus = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                              reason="needs 2 CUDA devices")
four_gpus = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 4,
                               reason="needs 4 CUDA devices")


def gpu_backends():
    """The kernel backends the GPU tests run: Triton, and CUDA where the extension is built."""
    names = []
    if backends.available("triton"):
        names.append("triton")
    if torch.cuda.is_available() and backends.available("cuda"):
        names.append("cuda")
    return names or ["triton"]


def full(t):
    """The whole tensor of a DTensor (a collective: every rank calls it), a tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def assert_same_params(net, expected, tol):
    for (name, p), q in zip(net.named_parameters(), expected.parameters()):
        torch.testing.assert_close(full(p.detach()), full(q.detach()), **tol,
                                   msg=lambda m: f"{name}: {m}")


def assert_same_stats(got, want, tol):
    """Two StepStats: the global figures and every tensor's."""
    got, want = got.to_dict(), want.to_dict()
    for key in ("grad_norm", "clip_coef", "found_inf", "skipped_steps"):
        torch.testing.assert_close(torch.tensor(got["global"][key], dtype=torch.float64),
                                   torch.tensor(want["global"][key], dtype=torch.float64), **tol)
    for name, fields in want["tensors"].items():
        for field, value in fields.items():
            torch.testing.assert_close(torch.tensor(got["tensors"][name][field]),
                                       torch.tensor(value), equal_nan=True, **tol,
                                       msg=lambda m: f"{name}.{field}: {m}")
