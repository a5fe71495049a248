"""Shared test helpers: random inputs with a non-zero mean, nn/fusedbn module pairs, comparisons."""

import torch
from torch import nn

import fusedbn

TOL = {torch.float64: dict(rtol=1e-9, atol=1e-9), torch.float32: dict(rtol=1e-4, atol=1e-4),
       torch.bfloat16: dict(rtol=2e-2, atol=3e-2), torch.float16: dict(rtol=2e-3, atol=3e-3)}


def tolerance(shape, dtype):
    """TOL[dtype], widened for float32 by √(values per channel / 1024): nn's float32 sums over large channels
    carry rounding errors of that order (the parameter gradients are such sums), and fusedbn, which sums in a
    different order, does not share them."""
    tol = dict(TOL[dtype])
    if dtype == torch.float32:
        widen = max(1.0, (shape[0] * shape[2] * shape[3] / 1024) ** 0.5)
        tol = {k: v * widen for k, v in tol.items()}
    return tol


def random_input(shape, dtype=torch.float64, memory_format=torch.contiguous_format, device="cpu",
                 requires_grad=True):
    """Per-channel random mean and scale, so that statistics are far from N(0, 1)."""
    c = shape[1]
    mean = torch.randn(1, c, 1, 1, dtype=torch.float64) * 3 + 2
    scale = torch.rand(1, c, 1, 1, dtype=torch.float64) * 2 + 0.5
    x = (torch.randn(shape, dtype=torch.float64) * scale + mean).to(dtype=dtype, device=device)
    x = x.contiguous(memory_format=memory_format)
    return x.requires_grad_(requires_grad)


def module_pair(c, dtype=torch.float64, param_dtype=None, **kwargs):
    """An nn.BatchNorm2d with random affine parameters and a FusedBatchNorm2d with the same state."""
    fused_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in
                    ("activation", "negative_slope", "small_batch", "min_count", "prior_count")}
    ref = nn.BatchNorm2d(c, **kwargs).to(param_dtype or dtype)
    if ref.affine:
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            ref.bias.normal_()
    fused = fusedbn.FusedBatchNorm2d(c, **kwargs, **fused_kwargs).to(param_dtype or dtype)
    fused.load_state_dict(ref.state_dict())
    return ref, fused


def assert_modules_match(ref, fused, **tol):
    for (name, a), (_, b) in zip(ref.state_dict().items(), fused.state_dict().items()):
        if a.dtype == torch.long:
            assert torch.equal(a, b), name
        else:
            torch.testing.assert_close(b, a, **tol, msg=lambda m: f"{name}: {m}")
    for (name, a), (_, b) in zip(ref.named_parameters(), fused.named_parameters()):
        if a.grad is not None or b.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, **tol, msg=lambda m: f"{name}.grad: {m}")


def step_both(ref, fused, x, grad=None, **tol):
    """One forward (+ backward with `grad`) through both modules on the same input; compares everything."""
    x_ref = x.detach().clone().requires_grad_()
    x_fused = x.detach().clone().requires_grad_()
    y_ref, y_fused = ref(x_ref), fused(x_fused)
    torch.testing.assert_close(y_fused, y_ref, **tol)
    if grad is not None:
        y_ref.backward(grad)
        y_fused.backward(grad)
        torch.testing.assert_close(x_fused.grad, x_ref.grad, **tol)
    assert_modules_match(ref, fused, **tol)
    return y_fused
