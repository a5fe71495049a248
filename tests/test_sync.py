"""SyncFusedBatchNorm2d on torch.distributed with gloo over loopback, 2 to 4 processes."""

import os
import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fusedbn

TOL = dict(rtol=1e-9, atol=1e-9)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, case, args, timeout_s, backend):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
    globals()[case](rank, world, *args)
    if case != "_case_timeout":
        # Every rank done with its collectives before any tears its process group down: a rank that left early could
        # close connections that another rank's gloo threads still use (seen as an abort, "terminate called without an
        # active exception", in about one DDP run in ten on torch 2.14.1 on a loaded machine).
        dist.barrier()
        dist.destroy_process_group()


def run_world(case, world, *args, timeout_s=60, backend="gloo"):
    mp.spawn(_worker, args=(world, free_port(), case, args, timeout_s, backend), nprocs=world, join=True)


def _slice(sizes, rank):
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def _case_equals_one_big_batch(rank, world, sizes, spatial, options, device="cpu"):
    device = f"cuda:{rank}" if device == "cuda" else device
    torch.manual_seed(0)
    c = 3
    ref = nn.BatchNorm2d(c, **options).double().to(device)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5), ref.bias.normal_()
    sync = fusedbn.SyncFusedBatchNorm2d(c, **options).double().to(device)
    sync.load_state_dict(ref.state_dict())
    part = _slice(sizes, rank)
    for step in range(3):
        full = (torch.randn(sum(sizes), c, *spatial, dtype=torch.float64) * 2 + 3).to(device).requires_grad_()
        g = torch.randn(full.shape, dtype=torch.float64).to(device)
        ref.zero_grad(), sync.zero_grad()
        y_ref = ref(full)
        y_ref.backward(g)
        x = full.detach()[part].clone().requires_grad_()
        y = sync(x)
        y.backward(g[part])
        torch.testing.assert_close(y, y_ref.detach()[part], **TOL)
        torch.testing.assert_close(x.grad, full.grad[part], **TOL)
        for name in ("weight", "bias"):
            total = getattr(sync, name).grad.clone()
            dist.all_reduce(total)  # per-rank shares sum to the single-process gradient
            torch.testing.assert_close(total, getattr(ref, name).grad, **TOL)
        for (name, a), b in zip(ref.state_dict().items(), sync.state_dict().values()):
            torch.testing.assert_close(b, a, **TOL, msg=name)
    sync.eval(), ref.eval()
    x = torch.randn(max(sizes[rank], 1), c, *spatial, dtype=torch.float64).to(device)
    torch.testing.assert_close(sync(x), ref(x), **TOL)


@pytest.mark.parametrize("sizes", [[3, 5], [1, 1], [1, 4, 0], [2, 2, 2, 1]], ids=str)
def test_equals_single_process_on_the_concatenated_batch(sizes):
    run_world("_case_equals_one_big_batch", len(sizes), sizes, (4, 3), {})


def test_momentum_none_and_one_value_per_rank():
    # (N, C, 1, 1) with one sample per rank: each rank alone would fall back; together they are a batch of 3.
    run_world("_case_equals_one_big_batch", 3, [1, 1, 1], (1, 1), dict(momentum=None))


def _case_fallback_on_global_count(rank, world):
    sync = fusedbn.SyncFusedBatchNorm2d(4).double()
    with torch.no_grad():
        sync.running_mean.uniform_(-1, 1), sync.running_var.uniform_(0.5, 2)
    before = {k: v.clone() for k, v in sync.state_dict().items()}
    x = torch.randn(1 if rank == 0 else 0, 4, 1, 1, dtype=torch.float64)  # one value per channel in total
    y = sync(x)
    expected = nn.functional.batch_norm(x, before["running_mean"], before["running_var"], sync.weight, sync.bias)
    torch.testing.assert_close(y, expected, **TOL)
    for k, v in sync.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_small_batch_fallback_looks_at_the_global_count():
    run_world("_case_fallback_on_global_count", 2)


def _case_blend_on_global_count(rank, world):
    # min_count = 8, global count 3 (2 + 1 values per channel): blended with the prior, as one process would.
    torch.manual_seed(3)
    full = torch.randn(3, 4, 1, 1, dtype=torch.float64) + 2
    single = fusedbn.FusedBatchNorm2d(4, small_batch="blend", min_count=8, prior_count=5.0).double()
    with torch.no_grad():
        single.running_mean.uniform_(-1, 1), single.running_var.uniform_(0.5, 2)
    sync = fusedbn.SyncFusedBatchNorm2d(4, small_batch="blend", min_count=8, prior_count=5.0).double()
    sync.load_state_dict(single.state_dict())
    part = _slice([2, 1], rank)
    x_full, x = full.clone().requires_grad_(), full[part].clone().requires_grad_()
    y_full, y = single(x_full), sync(x)
    g = torch.linspace(-1, 1, 12, dtype=torch.float64).view(3, 4, 1, 1)
    y_full.backward(g), y.backward(g[part])
    torch.testing.assert_close(y, y_full.detach()[part], **TOL)
    torch.testing.assert_close(x.grad, x_full.grad[part], **TOL)
    for (name, a), b in zip(single.state_dict().items(), sync.state_dict().values()):
        torch.testing.assert_close(b, a, **TOL, msg=name)


def test_blend_mode_on_the_global_count():
    run_world("_case_blend_on_global_count", 2)


def _net(bn):
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(3, 4, 3), bn, nn.Conv2d(4, 2, 1))


def _case_ddp_training(rank, world, sizes):
    single = _net(fusedbn.FusedBatchNorm2d(4, activation="relu")).double()
    ddp = nn.parallel.DistributedDataParallel(
        _net(fusedbn.SyncFusedBatchNorm2d(4, activation="relu")).double())
    ddp.module.load_state_dict(single.state_dict())
    opt_single = torch.optim.SGD(single.parameters(), lr=0.1)
    opt_ddp = torch.optim.SGD(ddp.parameters(), lr=0.1)
    total = sum(sizes)
    for step in range(4):
        torch.manual_seed(100 + step)
        full = torch.randn(total, 3, 6, 6, dtype=torch.float64) + 1
        opt_single.zero_grad(), opt_ddp.zero_grad()
        (single(full) ** 2).sum().div(total).backward()
        # DDP averages gradients over ranks: scale each rank's loss by world / total.
        (ddp(full[_slice(sizes, rank)]) ** 2).sum().mul(world / total).backward()
        opt_single.step(), opt_ddp.step()
    for (name, a), b in zip(single.state_dict().items(), ddp.module.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-8, atol=1e-10, msg=name)


def test_ddp_training_matches_single_process():
    run_world("_case_ddp_training", 2, [3, 5])


def _case_world_size_one(rank, world):
    sync, plain = fusedbn.SyncFusedBatchNorm2d(3), fusedbn.FusedBatchNorm2d(3)
    x = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(sync(x), plain(x), rtol=0, atol=0)
    torch.testing.assert_close(sync.running_var, plain.running_var, rtol=0, atol=0)


def test_world_size_one_is_fused_batch_norm():
    run_world("_case_world_size_one", 1)


def test_without_process_group_is_fused_batch_norm():
    assert not dist.is_initialized()
    sync, plain = fusedbn.SyncFusedBatchNorm2d(3), fusedbn.FusedBatchNorm2d(3)
    x = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(sync(x), plain(x), rtol=0, atol=0)


def _case_timeout(rank, world, flag_path):
    # Both ranks are in (the rendezvous had the default timeout, which a loaded machine may need); the layer's
    # group times out after 3 s.
    group = dist.new_group(timeout=timedelta(seconds=3))
    sync = fusedbn.SyncFusedBatchNorm2d(3, process_group=group)
    if rank == 1:
        time.sleep(6)  # never joins the collective
        os._exit(0)  # a group whose collective timed out cannot be shut down cleanly: leave without destructors
    start = time.time()
    with pytest.raises(RuntimeError, match="fusedbn SyncFusedBatchNorm2d: all_gather of the batch statistics failed "
                                           "on rank 0 of 2"):
        sync(torch.randn(2, 3, 4, 4))
    assert time.time() - start < 20
    with open(flag_path, "w") as f:
        f.write("raised")
    os._exit(0)


def test_a_rank_that_does_not_join_raises_a_clear_error(tmp_path):
    flag = tmp_path / "flag"
    run_world("_case_timeout", 2, str(flag))
    assert flag.read_text() == "raised"


def test_convert_sync_batchnorm_and_convert_model():
    model = nn.Sequential(nn.BatchNorm2d(3), nn.SyncBatchNorm(4), fusedbn.FusedBatchNorm2d(5, activation="silu"))
    weight = model[0].weight
    converted = fusedbn.SyncFusedBatchNorm2d.convert_sync_batchnorm(model)
    assert all(isinstance(m, fusedbn.SyncFusedBatchNorm2d) for m in converted)
    assert converted[0].weight is weight and converted[2].activation == "silu"
    again = fusedbn.convert_model(nn.Sequential(nn.BatchNorm2d(3)), sync=True)
    assert isinstance(again[0], fusedbn.SyncFusedBatchNorm2d)


@pytest.mark.skipif(torch.cuda.device_count() < 2 or not fusedbn.cuda_available(),
                    reason="the NCCL variant needs 2 GPUs and fusedbn built with CUDA")
def test_nccl_equals_single_process():
    run_world("_case_equals_one_big_batch", 2, [3, 2], (4, 3), {}, "cuda", backend="nccl")
