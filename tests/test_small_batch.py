"""Small-batch fallback (m = N·H·W < min_count in training) and the non-finite guard."""

import warnings

import pytest
import torch
from torch import nn

import fusedbn
from helpers import TOL, module_pair, random_input, step_both

F64 = TOL[torch.float64]


def trained_pair(c=3, **kwargs):
    """A module pair whose running statistics moved away from (0, 1)."""
    ref, fused = module_pair(c, **kwargs)
    for _ in range(3):
        step_both(ref, fused, random_input((8, c, 4, 4)), torch.randn(8, c, 4, 4, dtype=torch.float64))
    return ref, fused


def snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_state_unchanged(module, before):
    for k, v in module.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_default_min_count_is_nn_everywhere_nn_works():
    # N = 1 with H·W > 1 is an ordinary batch: nn's numbers.
    ref, fused = trained_pair()
    step_both(ref, fused, random_input((1, 3, 5, 4)), torch.randn(1, 3, 5, 4, dtype=torch.float64), **F64)
    step_both(ref, fused, random_input((2, 3, 1, 1)), torch.randn(2, 3, 1, 1, dtype=torch.float64), **F64)


def test_running_mode_equals_eval_mode_and_keeps_buffers():
    ref, fused = trained_pair()
    before = snapshot(fused)
    x = random_input((1, 3, 1, 1))
    with pytest.warns(UserWarning, match="min_count=2"):
        y = fused(x)
    g = torch.randn(1, 3, 1, 1, dtype=torch.float64)
    y.backward(g)
    ref.eval()
    x_ref = x.detach().clone().requires_grad_()
    y_ref = ref(x_ref)
    y_ref.backward(g)
    torch.testing.assert_close(y, y_ref, **F64)
    torch.testing.assert_close(x.grad, x_ref.grad, **F64)  # eval-mode gradient: g·w/sqrt(running_var + eps)
    torch.testing.assert_close(fused.weight.grad, ref.weight.grad, **F64)
    torch.testing.assert_close(fused.bias.grad, ref.bias.grad, **F64)
    assert_state_unchanged(fused, before)


def test_running_mode_warns_once_per_module():
    fused = fusedbn.FusedBatchNorm2d(3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(5):
            fused(torch.randn(1, 3, 1, 1))
        fusedbn.FusedBatchNorm2d(3)(torch.randn(1, 3, 1, 1))
    assert sum(issubclass(w.category, UserWarning) for w in caught) == 2


def test_hundred_steps_at_batch_one_leave_running_var_bit_identical():
    for mode in ("running", "blend"):
        _, fused = trained_pair(small_batch=mode)
        before = snapshot(fused)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(100):
                fused(random_input((1, 3, 1, 1))).sum().backward()
        assert_state_unchanged(fused, before)


def test_cold_start():
    fused = fusedbn.FusedBatchNorm2d(3)
    with torch.no_grad():
        fused.weight.copy_(torch.tensor([1.0, 2.0, 3.0]))
        fused.bias.copy_(torch.tensor([0.5, -1.0, 0.0]))
    x = torch.randn(1, 3, 1, 1)
    with pytest.warns(UserWarning):
        y = fused(x)
    expected = fused.weight.view(1, 3, 1, 1) * x / (1 + fused.eps) ** 0.5 + fused.bias.view(1, 3, 1, 1)
    torch.testing.assert_close(y, expected)


def blend_reference(x, running_mean, running_var, weight, bias, prior_count, eps):
    """The blend formula of the issue, spelled out: μ̃ = μ_B − m0·δ/n, σ̃² = (M2_B + m0·σ²_R + δ²·m·m0/n)/n."""
    m = x.shape[0] * x.shape[2] * x.shape[3]
    mu_b = x.mean(dim=(0, 2, 3))
    m2_b = ((x - mu_b.view(1, -1, 1, 1)) ** 2).sum(dim=(0, 2, 3))
    n = m + prior_count
    delta = mu_b - running_mean
    mu = mu_b - prior_count * delta / n
    var = (m2_b + prior_count * running_var + delta**2 * m * prior_count / n) / n
    shape = (1, -1, 1, 1)
    return (x - mu.view(shape)) / torch.sqrt(var.view(shape) + eps) * weight.view(shape) + bias.view(shape)


@pytest.mark.parametrize("shape", [(1, 3, 1, 1), (1, 3, 2, 1), (3, 3, 1, 1)], ids=str)
def test_blend_formula(shape):
    _, fused = trained_pair(small_batch="blend", min_count=4, prior_count=5.0)
    rm, rv = fused.running_mean.clone(), fused.running_var.clone()
    x = random_input(shape)
    y = fused(x)
    expected = blend_reference(x.detach(), rm, rv, fused.weight.detach(), fused.bias.detach(), 5.0, fused.eps)
    torch.testing.assert_close(y, expected, **F64)


def test_blend_updates_running_stats_from_batch_only_when_m_at_least_two():
    ref, fused = trained_pair(small_batch="blend", min_count=8)
    x = random_input((1, 3, 3, 1))  # m = 3 < min_count: blended output, running stats from the batch itself
    ref(x.detach())  # nn computes the update from the batch's own statistics
    fused(x.detach())
    torch.testing.assert_close(fused.running_mean, ref.running_mean, **F64)
    torch.testing.assert_close(fused.running_var, ref.running_var, **F64)
    assert fused.num_batches_tracked.item() == ref.num_batches_tracked.item()


def test_blend_limits():
    # prior_count = 0 is ordinary batch norm; a huge prior_count is eval mode.
    ref, zero = trained_pair(small_batch="blend", min_count=10, prior_count=0.0)
    step_both(ref, zero, random_input((1, 3, 2, 2)), torch.randn(1, 3, 2, 2, dtype=torch.float64), **F64)
    ref, huge = trained_pair(small_batch="blend", min_count=10, prior_count=1e12)
    x = random_input((1, 3, 1, 1), requires_grad=False)
    y = huge(x)
    ref.eval()
    torch.testing.assert_close(y, ref(x), rtol=1e-6, atol=1e-6)


def test_blend_does_not_warn():
    fused = fusedbn.FusedBatchNorm2d(3, small_batch="blend")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused(torch.randn(1, 3, 1, 1))


@pytest.mark.parametrize("min_count, message", [
    (2, r"Expected more than 1 value per channel when training, got input size torch.Size\(\[1, 3, 1, 1\]\)"),
    (5, r"Expected more than 4 values per channel when training, got input size torch.Size\(\[1, 3, 2, 2\]\)"),
])
def test_error_mode_message(min_count, message):
    fused = fusedbn.FusedBatchNorm2d(3, small_batch="error", min_count=min_count)
    shape = (1, 3, 1, 1) if min_count == 2 else (1, 3, 2, 2)
    before = snapshot(fused)
    with pytest.raises(ValueError, match=message):
        fused(torch.randn(shape))
    assert_state_unchanged(fused, before)


def test_error_mode_message_equals_pytorch():
    with pytest.raises(ValueError) as theirs:
        nn.BatchNorm2d(3)(torch.randn(1, 3, 1, 1))
    with pytest.raises(ValueError) as ours:
        fusedbn.FusedBatchNorm2d(3, small_batch="error")(torch.randn(1, 3, 1, 1))
    assert str(ours.value) == str(theirs.value)


def test_min_count_one_outputs_bias_and_keeps_running_stats():
    fused = fusedbn.FusedBatchNorm2d(3, min_count=1)
    with torch.no_grad():
        fused.bias.copy_(torch.tensor([0.5, -1.0, 2.0]))
    before = snapshot(fused)
    x = torch.randn(1, 3, 1, 1, requires_grad=True)
    y = fused(x)
    torch.testing.assert_close(y, fused.bias.detach().view(1, 3, 1, 1))
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert_state_unchanged(fused, before)


def test_without_running_stats():
    for mode in ("running", "blend"):
        fused = fusedbn.FusedBatchNorm2d(3, track_running_stats=False, small_batch=mode, min_count=4)
        with pytest.raises(ValueError, match="Expected more than 3 values per channel"):
            fused(torch.randn(1, 3, 1, 1))
        x = torch.randn(1, 3, 2, 1, dtype=torch.float32)  # 1 < m < min_count: batch statistics
        torch.testing.assert_close(fused(x), nn.functional.batch_norm(x, None, None, fused.weight, fused.bias,
                                                                     True))


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_non_finite_batch_leaves_running_stats_untouched(poison):
    _, fused = trained_pair()
    before = snapshot(fused)
    x = random_input((4, 3, 2, 2), requires_grad=False)
    x[1, 2, 0, 1] = poison
    with pytest.warns(RuntimeWarning, match="not finite"):
        y = fused(x)
    assert torch.isnan(y[:, 2]).all()  # the math, not hidden
    assert torch.isfinite(y[:, :2]).all()
    assert_state_unchanged(fused, before)


def test_functional_small_batch_modes():
    x = torch.randn(1, 3, 1, 1)
    rm, rv = torch.randn(3), torch.rand(3) + 0.5
    y = fusedbn.fused_batch_norm(x, rm, rv, training=True)
    torch.testing.assert_close(y, nn.functional.batch_norm(x, rm, rv, training=False))
    with pytest.raises(ValueError, match="Expected more than 1 value"):
        fusedbn.fused_batch_norm(x, rm, rv, training=True, small_batch="error")


def test_seed_network_at_batch_one():
    from fusedbn.demo import SeedNet

    torch.manual_seed(0)
    net = SeedNet(norm=fusedbn.FusedBatchNorm2d).train()
    x1 = torch.randn(1, 3, 160, 160, requires_grad=True)
    x2 = torch.randn(1, 3, 160, 160)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out1, out2 = net(x1), net(x2)
    assert torch.isfinite(out1).all() and out1.abs().max() > 0.01
    assert (out1 - out2).abs().max() > 0.01
    out1.sum().backward()
    assert x1.grad.abs().max() > 0
