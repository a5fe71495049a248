"""Numerical stability: a large mean and a tiny spread in float32 (where E[x²] − E[x]² collapses)."""

import pytest
import torch

import fusedbn


def float64_reference(x32, weight, bias, eps):
    x = x32.double()
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    y = (x - mean) / torch.sqrt(var + eps) * weight.double().view(1, -1, 1, 1) + bias.double().view(1, -1, 1, 1)
    return y, x.var(dim=(0, 2, 3), unbiased=True)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
def test_large_offset_small_spread_float32(memory_format):
    worst_out, worst_var = 0.0, 0.0
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        x = (1e4 + 1e-2 * torch.randn(8, 4, 16, 16, generator=g)).contiguous(memory_format=memory_format)
        bn = fusedbn.FusedBatchNorm2d(4, momentum=1.0)
        y = bn(x)
        y_ref, var_ref = float64_reference(x, bn.weight.detach(), bn.bias.detach(), bn.eps)
        worst_out = max(worst_out, (y.double() - y_ref).abs().max().item())
        worst_var = max(worst_var, ((bn.running_var.double() - var_ref).abs() / var_ref).max().item())
    assert worst_out < 0.06, worst_out
    assert worst_var < 0.01, worst_var


def test_batch_statistics_are_one_float32_ulp_accurate():
    # The mean is accumulated in double: within one float32 ulp of the exact mean of the float32 values.
    x = 1e4 + 1e-2 * torch.randn(4, 3, 64, 64)
    mean, m2 = torch.ops.fusedbn.batch_stats(x)
    exact = x.double().mean(dim=(0, 2, 3))
    ulp = torch.finfo(torch.float32).eps * 1e4
    assert ((mean.double() - exact).abs() <= ulp).all()
    exact_m2 = ((x.double() - exact.view(1, 3, 1, 1)) ** 2).sum(dim=(0, 2, 3))
    torch.testing.assert_close(m2.double(), exact_m2, rtol=1e-3, atol=0)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
@pytest.mark.parametrize("shape", [(4, 40, 32, 32), (8, 40, 128, 128)], ids=str)
def test_first_value_far_from_the_mean(memory_format, shape):
    # The moments are summed around each work item's first value; here that value lies 100 standard deviations
    # from the mean (first NCHW items of 4096 values: M2 ≈ 1.4 against Σd² ≈ 4000), where one pass would cancel about
    # 12 bits of M2. Forty channels cover the channels_last blocks of 32 channels and the single channels after them.
    g = torch.Generator().manual_seed(0)
    x = 1e3 + 1e-2 * torch.randn(shape, generator=g)
    x[0, :, 0, 0] += 1.0
    x = x.contiguous(memory_format=memory_format)
    mean, m2 = torch.ops.fusedbn.batch_stats(x)
    exact = x.double().mean(dim=(0, 2, 3))
    exact_m2 = ((x.double() - exact.view(1, -1, 1, 1)) ** 2).sum(dim=(0, 2, 3))
    assert ((mean.double() - exact).abs() <= torch.finfo(torch.float32).eps * 1e3).all()
    torch.testing.assert_close(m2.double(), exact_m2, rtol=1e-4, atol=0)
    # The training forward (channel at a time for the larger NCHW shape, 21 MB) gives bitwise the same statistics.
    _, _, _, batch_mean, batch_m2, _ = torch.ops.fusedbn.forward_train(x, None, None, None, None, None, 0.0, 1e-5,
                                                               "identity", 0.0)
    assert torch.equal(batch_mean, mean) and torch.equal(batch_m2, m2)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
def test_squared_deviations_from_the_first_value_overflow(memory_format):
    # Values ±5e18: around the first value the squared deviations add up past the float32 range (Σd² = 4e38),
    # around the mean they do not (M2 = 2e38, the largest float32 is 3.4e38).
    x = torch.empty(2, 3, 2, 2)
    x[0], x[1] = 5e18, -5e18
    mean, m2 = torch.ops.fusedbn.batch_stats(x.contiguous(memory_format=memory_format))
    torch.testing.assert_close(mean, torch.zeros(3), rtol=0, atol=5e18 * 2**-23)
    torch.testing.assert_close(m2, torch.full((3,), 2e38), rtol=1e-6, atol=0)


def test_channels_last_sums_over_long_work_items():
    # A channels_last work item of (2, 8, 128, 128) holds 8192 rows. Summed in float32 over a whole item, M2
    # was off by 1.3-2.2e-6 and the eval-mode weight gradient (running mean away from the batch mean) by 8-10e-7;
    # flushed into double every 64 rows (RowSums), by at most 8e-8 and 2e-7 in these five draws.
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        x = (torch.randn(2, 8, 128, 128, generator=g) + 30).contiguous(memory_format=torch.channels_last)
        _, m2 = torch.ops.fusedbn.batch_stats(x)
        xd = x.double()
        exact_m2 = ((xd - xd.mean(dim=(0, 2, 3), keepdim=True)) ** 2).sum(dim=(0, 2, 3))
        assert ((m2.double() - exact_m2).abs() / exact_m2).max() < 4e-7, seed

        x = (torch.randn(2, 8, 128, 128, generator=g) * 2 + 3).contiguous(memory_format=torch.channels_last)
        dy = torch.randn(x.shape, generator=g).contiguous(memory_format=torch.channels_last)
        bn = fusedbn.FusedBatchNorm2d(8).eval()
        with torch.no_grad():
            bn.running_mean.uniform_(-1, 1, generator=g)
            bn.running_var.uniform_(0.5, 2, generator=g)
        bn(x).backward(dy)
        xmu = x.double() - bn.running_mean.double().view(1, -1, 1, 1)
        exact = (dy.double() * xmu).sum(dim=(0, 2, 3)) * (bn.running_var.double() + bn.eps).rsqrt()
        assert (bn.weight.grad.double() - exact).norm() / exact.norm() < 4e-7, seed
