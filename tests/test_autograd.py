"""gradcheck and gradgradcheck of fused_batch_norm (float64), every activation, residual and statistics mode."""

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import fusedbn
from fusedbn.reference import reference_batch_norm, reference_input_gradients
from helpers import random_input

ACTIVATIONS = ["identity", "relu", "leaky_relu", "silu", "relu6", "hardswish", "gelu"]


def make_args(shape, residual):
    c = shape[1]
    x = random_input(shape)
    # Shift each channel by a different amount so that no pre-activation sits at ReLU's kink.
    w = (torch.rand(c, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(c, dtype=torch.float64).requires_grad_()
    z = torch.randn(shape, dtype=torch.float64, requires_grad=True) if residual else None
    return x, w, b, z


def fn(training, activation, small_batch="running", min_count=2, running=True, prior_count=16.0):
    def f(x, w, b, z=None):
        c = x.shape[1]
        rm = torch.linspace(-1, 1, c, dtype=torch.float64) if running else None
        rv = torch.linspace(0.5, 2, c, dtype=torch.float64) if running else None
        return fusedbn.fused_batch_norm(x, rm, rv, w, b, training, 0.1, 1e-3, activation=activation,
                                        negative_slope=0.2, residual=z, small_batch=small_batch,
                                        min_count=min_count, prior_count=prior_count)
    return f


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
def test_gradcheck(training, activation, residual, memory_format):
    x, w, b, z = make_args((3, 4, 3, 2), residual)
    x = x.detach().contiguous(memory_format=memory_format).requires_grad_()
    inputs = (x, w, b, z) if residual else (x, w, b)
    assert gradcheck(fn(training, activation), inputs)


@pytest.mark.parametrize("mode", ["running", "blend"])
@pytest.mark.parametrize("count", [1, 2, 3, 8], ids=lambda m: f"m{m}")
def test_gradcheck_small_batch_modes(mode, count):
    # min_count = 4: m = 1, 2, 3 fall back (to running or blend), m = 8 is ordinary batch norm.
    x, w, b, _ = make_args((1, 3, count, 1), False)
    assert gradcheck(fn(True, "identity", small_batch=mode, min_count=4), (x, w, b))


def test_gradcheck_min_count_one_at_m1():
    x, w, b, _ = make_args((1, 3, 1, 1), False)
    assert gradcheck(fn(True, "identity", min_count=1), (x, w, b))


def test_gradcheck_without_running_stats_and_no_affine():
    x = random_input((2, 3, 2, 2))
    assert gradcheck(lambda x: fusedbn.fused_batch_norm(x, None, None, training=True), (x,))


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradgradcheck(training, activation):
    x, w, b, z = make_args((2, 3, 2, 2), True)
    assert gradgradcheck(fn(training, activation), (x, w, b, z))


@pytest.mark.parametrize("mode", ["running", "blend"])
def test_gradgradcheck_small_batch(mode):
    x, w, b, _ = make_args((1, 3, 2, 1), False)
    assert gradgradcheck(fn(True, "silu", small_batch=mode, min_count=4), (x, w, b))


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("batch_stats, prior_count", [(True, 0.0), (True, 5.0), (False, 0.0)],
                         ids=["batch", "blend", "given"])
def test_kernels_and_composite_gradients_agree_with_the_reference(activation, batch_stats, prior_count):
    # reference.py states what the kernels compute; its gradients in torch operations (the backward under
    # create_graph=True and torch.func) must be autograd's gradients of that statement.
    x, w, b, z = make_args((2, 3, 3, 2), True)
    prior_mean, prior_var = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
    given = dict(mean=prior_mean, invstd=torch.rsqrt(prior_var + 1e-3)) if not batch_stats else {}
    options = dict(batch_stats=batch_stats, eps=1e-3, activation=activation, negative_slope=0.2,
                   prior_mean=prior_mean, prior_var=prior_var, prior_count=prior_count, **given)
    y = reference_batch_norm(x, w, b, z, **options)
    ops = torch.ops.fusedbn
    with torch.no_grad():
        kernels = (ops.forward_train(x, w, b, z, prior_mean, prior_var, prior_count, 1e-3, activation, 0.2)[0]
                   if batch_stats else ops.normalize(x, w, b, z, prior_mean, prior_var, 1e-3, activation, 0.2)[0])
    torch.testing.assert_close(kernels, y.detach(), rtol=1e-9, atol=1e-9)
    dy = torch.randn_like(y)
    expected = torch.autograd.grad(y, (x, w, b, z), dy)
    got = reference_input_gradients(dy, x, w, b, z, **options)
    for name, a, e in zip(("input", "weight", "bias", "residual"), got, expected):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-9, msg=lambda m: f"{name}: {m}")
