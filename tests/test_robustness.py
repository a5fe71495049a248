"""Robustness: memory stays flat, no reference cycles, determinism across runs and thread counts, concurrent
use from several Python threads, and indexing beyond 2^31 elements."""

import gc
import threading

import pytest
import torch

import fusedbn
from helpers import random_input


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def train_step(module, x):
    y = module(x)
    y.square().sum().backward()


def test_resident_memory_is_flat_over_10000_steps():
    module = fusedbn.FusedBatchNorm2d(8, activation="relu")
    x = torch.randn(4, 8, 6, 6, requires_grad=True)
    for _ in range(1000):  # warm-up: allocator caches, lazy initialisation
        train_step(module, x)
    before = rss_bytes()
    for _ in range(9000):
        train_step(module, x)
    growth = rss_bytes() - before
    assert growth < 8 * 2**20, f"resident memory grew by {growth / 2**20:.1f} MiB over 9000 steps"


def test_autograd_function_holds_no_reference_cycles():
    module = fusedbn.FusedBatchNorm2d(4, activation="silu")
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)  # keep what a collection would free, to look at it
    try:
        for _ in range(20):
            module(x, residual=z).sum().backward()
        gc.collect()
        # Only our objects count (plain tensors, our autograd nodes): earlier tests' compile caches and fake
        # tensors may be collected here too.
        ours = [o for o in gc.garbage if type(o) is torch.Tensor or "FusedBatchNorm" in type(o).__name__]
        assert not ours, f"objects freed only by cycle collection: {ours[:5]}"
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


def run_once(threads, memory_format):
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(7)
        x = (torch.randn(16, 24, 33, 31, generator=gen) * 3 + 5).contiguous(memory_format=memory_format)
        x.requires_grad_()
        g = torch.randn(x.shape, generator=gen)
        bn = fusedbn.FusedBatchNorm2d(24, activation="relu")
        y = bn(x)
        y.backward(g)
        return [t.detach().clone() for t in (y, x.grad, bn.weight.grad, bn.bias.grad, bn.running_mean,
                                               bn.running_var)]
    finally:
        torch.set_num_threads(2)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
def test_bitwise_deterministic_across_runs_and_thread_counts(memory_format):
    reference = run_once(2, memory_format)
    for threads in (2, 1, 3):
        for a, b in zip(reference, run_once(threads, memory_format)):
            assert torch.equal(a, b), f"differs with {threads} threads"


def test_concurrent_python_threads_match_serial():
    inputs = [random_input((4, 6, 9, 9), torch.float32) for _ in range(4)]

    def work(i, out):
        torch.manual_seed(i)
        bn = fusedbn.FusedBatchNorm2d(6, activation="leaky_relu")
        x = inputs[i].detach().clone().requires_grad_()
        for _ in range(20):
            y = bn(x)
            y.backward(torch.ones_like(y))
        out[i] = [t.detach().clone() for t in (y, x.grad, bn.running_mean, bn.running_var, bn.weight.grad)]

    serial, concurrent = {}, {}
    for i in range(4):
        work(i, serial)
    threads = [threading.Thread(target=work, args=(i, concurrent)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(4):
        for a, b in zip(serial[i], concurrent[i]):
            assert torch.equal(a, b)


@pytest.mark.slow
def test_indexing_beyond_2_pow_31_elements():
    # bfloat16, 2 channels, > 2^31 elements (4.3 GB): each channel repeats −3 … 3 along W, channel 1 shifted by
    # 10, so mean = (0, 10), biased var = 4, and every output is known: (w − 3)/sqrt(4 + eps).
    h = 153_391_690
    pattern = torch.arange(-3, 4, dtype=torch.bfloat16)
    x = pattern.view(1, 1, 1, 7).expand(1, 2, h, 7).contiguous()
    assert x.numel() > 2**31
    x[:, 1] += 10
    bn = fusedbn.FusedBatchNorm2d(2, momentum=1.0)
    with torch.no_grad():
        y = bn(x)
    del x
    expected = (torch.arange(-3, 4, dtype=torch.float32) / (4 + bn.eps) ** 0.5).to(torch.bfloat16)
    for c in (0, 1):
        for row in (0, h // 2, h - 1):  # the last rows lie beyond element 2^31
            torch.testing.assert_close(y[0, c, row], expected, rtol=0, atol=1e-6, msg=f"channel {c}, row {row}")
    n = 7 * h
    torch.testing.assert_close(bn.running_mean, torch.tensor([0.0, 10.0]), rtol=0, atol=1e-4)
    torch.testing.assert_close(bn.running_var, torch.full((2,), 4.0 * n / (n - 1)), rtol=1e-5, atol=0)


# NCHW tensors whose data is at least 16 MB and whose channel (x, or x and dy) fits in L2 run forward and backward
# one channel at a time (csrc/batch_norm/cpu/work_items.h, channel_at_a_time); every value must be bitwise the
# separate kernels', which the other shapes and channels_last use. Activations, a residual and dtypes vary.
BY_CHANNEL_CASES = [("relu", False, torch.float32), ("silu", True, torch.float32),
                    ("leaky_relu", True, torch.bfloat16), ("identity", True, torch.float64)]


def parameters(c, dtype):
    """Weight and bias in the dtype the ops take for this input dtype."""
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    return torch.rand(c, dtype=param_dtype) + 0.5, torch.randn(c, dtype=param_dtype)


@pytest.mark.parametrize("act, with_residual, dtype", BY_CHANNEL_CASES, ids=str)
def test_channel_at_a_time_forward_equals_the_separate_kernels(act, with_residual, dtype):
    ops = torch.ops.fusedbn
    shape = (32, 48, 56, 56) if dtype != torch.bfloat16 else (64, 48, 56, 56)  # 19-39 MB, 0.4-0.8 MB per channel
    x = random_input(shape, dtype, requires_grad=False)
    z = random_input(shape, dtype, requires_grad=False) if with_residual else None
    w, b = parameters(shape[1], dtype)
    y, mean, invstd, batch_mean, batch_m2, _ = ops.forward_train(x, w, b, z, None, None, 0.0, 1e-5, act, 0.1)
    separate_mean, separate_m2 = ops.batch_stats(x)
    assert torch.equal(batch_mean, separate_mean) and torch.equal(batch_m2, separate_m2)
    assert torch.equal(mean, batch_mean)
    assert torch.equal(y, ops.renormalize(x, w, b, z, mean, invstd, act, 0.1))


@pytest.mark.parametrize("act, with_residual, dtype", BY_CHANNEL_CASES, ids=str)
def test_channel_at_a_time_backward_equals_the_separate_kernels(act, with_residual, dtype):
    ops = torch.ops.fusedbn
    shape = (32, 48, 32, 56) if dtype != torch.bfloat16 else (64, 48, 32, 64)  # x and dy 22-44 MB, spans >= 4 KiB
    x = random_input(shape, dtype, requires_grad=False)
    z = random_input(shape, dtype, requires_grad=False) if with_residual else None
    dy = torch.randn_like(x)
    w, b = parameters(48, dtype)
    _, mean, invstd, _, _, _ = ops.forward_train(x, w, b, z, None, None, 0.0, 1e-5, act, 0.1)
    count = float(shape[0] * shape[2] * shape[3])
    dx, dz, dw, db = ops.backward(dy, x, z, mean, invstd, w, b, count, act, 0.1)
    s1, s2, dw_reduced = ops.backward_reduce(dy, x, z, mean, invstd, w, b, act, 0.1)
    dx_separate, dz_separate = ops.backward_elemt(dy, x, z, mean, invstd, w, b, s1, s2, count, act, 0.1)
    assert torch.equal(db, s1) and torch.equal(dw, s2 * invstd) and torch.equal(dw, dw_reduced)
    assert torch.equal(dx, dx_separate) and torch.equal(dz, dz_separate)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("act, with_residual", [("identity", False), ("relu", True)], ids=["plain", "relu_residual"])
def test_streamed_outputs_equal_cached_ones(dtype, memory_format, act, with_residual):
    # A forward pass that moves more bytes than the last-level cache writes its output with streaming stores
    # (csrc/batch_norm/cpu/streaming_stores.h): here 110 to 330 MB, more than one core complex's cache on current
    # CPUs, against at most 21 MB for the first image alone. The streamed values must be bitwise those that ordinary
    # stores write for the same elements. Spans (509 x 1123) and rows (3 channels) of odd length start the streamed
    # lines unaligned.
    ops = torch.ops.fusedbn
    shape = (16, 3, 509, 1123)
    x = random_input(shape, dtype, memory_format, requires_grad=False)
    z = random_input(shape, dtype, memory_format, requires_grad=False) if with_residual else None
    w, b = torch.rand(3) + 0.5, torch.randn(3)
    first = (x[:1], None if z is None else z[:1])
    running_mean, running_var = torch.randn(3), torch.rand(3) + 0.5
    y, _, _ = ops.normalize(x, w, b, z, running_mean, running_var, 1e-5, act, 0.0)
    y_first, _, _ = ops.normalize(first[0], w, b, first[1], running_mean, running_var, 1e-5, act, 0.0)
    assert torch.equal(y[:1], y_first)
    y, mean, invstd, _, _, _ = ops.forward_train(x, w, b, z, None, None, 0.0, 1e-5, act, 0.0)
    assert torch.equal(y[:1], ops.renormalize(first[0], w, b, first[1], mean, invstd, act, 0.0))
    assert torch.isfinite(y).all() and (not with_residual or (y >= 0).all())


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_weight_gradient_is_the_stored_sum_times_invstd(dtype, memory_format):
    # The backward's reduction writes grad_weight itself; it must be bitwise sum_dy_xmu·invstd of the stored values
    # (what backward_reduce returns), on the separate-kernel path that these shapes take.
    ops = torch.ops.fusedbn
    x = random_input((6, 10, 5, 7), dtype, memory_format, requires_grad=False)
    dy = torch.randn_like(x)
    w, b = torch.rand(10, dtype=dtype) + 0.5, torch.randn(10, dtype=dtype)
    _, mean, invstd, _, _, _ = ops.forward_train(x, w, b, None, None, None, 0.0, 1e-5, "relu", 0.0)
    _, _, dw, db = ops.backward(dy, x, None, mean, invstd, w, b, float(6 * 5 * 7), "relu", 0.0)
    s1, s2, dw_reduced = ops.backward_reduce(dy, x, None, mean, invstd, w, b, "relu", 0.0)
    assert torch.equal(db, s1) and torch.equal(dw, s2 * invstd) and torch.equal(dw, dw_reduced)


def test_ops_on_an_empty_batch_give_zero_sums_and_gradients():
    # Called directly (the modules return early for an empty batch): every per-channel output is written.
    ops = torch.ops.fusedbn
    x = torch.empty(0, 3, 4, 4)
    w, b = torch.rand(3) + 0.5, torch.randn(3)
    _, mean, invstd, batch_mean, batch_m2, _ = ops.forward_train(x, w, b, None, None, None, 0.0, 1e-5, "relu", 0.0)
    assert torch.equal(batch_mean, torch.zeros(3)) and torch.equal(batch_m2, torch.zeros(3))
    # The statistics of no values are NaN (0/0); given finite ones, the backward's sums over no values are 0.
    assert torch.isnan(invstd).all()
    mean, invstd = torch.zeros(3), torch.ones(3)
    dx, _, dw, db = ops.backward(torch.empty_like(x), x, None, mean, invstd, w, b, 1.0, "relu", 0.0)
    assert dx.shape == x.shape and torch.equal(dw, torch.zeros(3)) and torch.equal(db, torch.zeros(3))
