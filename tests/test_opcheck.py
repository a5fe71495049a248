"""torch.library.opcheck on every fusedbn op, with the argument combinations the Python layers use."""

import pytest
import torch

import fusedbn  # noqa: F401  (registers the ops)
from helpers import random_input

ops = torch.ops.fusedbn


def samples(dtype=torch.float32, memory_format=torch.contiguous_format):
    x = random_input((3, 4, 5, 2), dtype, memory_format, requires_grad=False)
    pdtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    w, b = torch.rand(4, dtype=pdtype) + 0.5, torch.randn(4, dtype=pdtype)
    z = torch.randn_like(x)
    rm, rv = torch.randn(4, dtype=pdtype), torch.rand(4, dtype=pdtype) + 0.5
    return x, w, b, z, rm, rv


CASES = [
    (torch.float32, torch.contiguous_format, "identity", False, True),
    (torch.float64, torch.channels_last, "relu", True, True),
    (torch.bfloat16, torch.contiguous_format, "silu", True, False),
    (torch.float16, torch.channels_last, "leaky_relu", False, True),
]


@pytest.mark.parametrize("dtype, memory_format, activation, residual, affine", CASES, ids=str)
def test_opcheck_all_ops(dtype, memory_format, activation, residual, affine):
    x, w, b, z, rm, rv = samples(dtype, memory_format)
    w, b = (w, b) if affine else (None, None)
    z = z if residual else None
    check = torch.library.opcheck
    check(ops.batch_stats, (x,))
    check(ops.check_batch_norm, (x, w, b, z, rm, rv, 1e-5, True))
    check(ops.forward_train, (x, w, b, z, None, None, 0.0, 1e-5, activation, 0.1))
    check(ops.forward_train, (x, w, b, z, rm, rv, 16.0, 1e-5, activation, 0.1))
    check(ops.forward_train, (x, w, b, z, None, None, 0.0, 1e-5, activation, 0.1, rm.clone(), rv.clone(), None, 0.1))
    check(ops.normalize, (x, w, b, z, rm, rv, 1e-5, activation, 0.1))
    _, mean, invstd, bm, bm2, _ = ops.forward_train(x, w, b, z, None, None, 0.0, 1e-5, activation, 0.1)
    check(ops.update_running_stats, (rm.clone(), rv.clone(), torch.tensor(3), bm, bm2, 30, None))
    check(ops.update_running_stats, (rm.clone(), rv.clone(), None, bm, bm2, 30, 0.1))
    dy = torch.randn_like(x)
    for count in (30.0, 46.0, None):
        check(ops.backward, (dy, x, z, mean, invstd, w, b, count, activation, 0.1))
    check(ops.backward_reduce, (dy, x, z, mean, invstd, w, b, activation, 0.1))
    s1, s2, _ = ops.backward_reduce(dy, x, z, mean, invstd, w, b, activation, 0.1)
    check(ops.backward_elemt, (dy, x, z, mean, invstd, w, b, s1, s2, 30.0, activation, 0.1))


def test_update_running_stats_mutates_only_declared_buffers():
    x, w, b, z, rm, rv = samples()
    _, _, _, bm, bm2, _ = ops.forward_train(x, w, b, None, None, None, 0.0, 1e-5, "identity", 0.0)
    nbt = torch.tensor(0)
    rm0, rv0 = rm.clone(), rv.clone()
    updated = ops.update_running_stats(rm, rv, nbt, bm, bm2, 30, None)
    assert updated.item() and nbt.item() == 1
    torch.testing.assert_close(rm, bm)  # cumulative average of one batch is that batch
    torch.testing.assert_close(rv, bm2 / 29)
    assert not torch.equal(rm, rm0) and not torch.equal(rv, rv0)


@pytest.mark.parametrize("dtype, memory_format, activation, residual, affine", CASES, ids=str)
def test_opcheck_differentiable_ops_with_requires_grad(dtype, memory_format, activation, residual, affine):
    # forward_train and normalize carry their own backward (csrc/batch_norm/autograd/): opcheck's autograd-registration
    # and AOT-dispatch tests run on inputs that require grad. backward_composite is that backward's differentiable form.
    x, w, b, z, rm, rv = samples(dtype, memory_format)
    w, b = (w.requires_grad_(), b.requires_grad_()) if affine else (None, None)
    z = z.requires_grad_() if residual else None
    x.requires_grad_()
    check = torch.library.opcheck
    check(ops.forward_train, (x, w, b, z, None, None, 0.0, 1e-5, activation, 0.1))
    check(ops.forward_train, (x, w, b, z, rm, rv, 16.0, 1e-5, activation, 0.1))
    # The training forward that also updates the running statistics in place (mutable arguments).
    check(ops.forward_train, (x, w, b, z, None, None, 0.0, 1e-5, activation, 0.1, rm.clone(), rv.clone(),
                              torch.tensor(3), None))
    check(ops.normalize, (x, w, b, z, rm, rv, 1e-5, activation, 0.1))
    with torch.no_grad():
        _, mean, invstd, _, _, _ = ops.forward_train(x, w, b, z, rm, rv, 16.0, 1e-5, activation, 0.1)
    dy = torch.randn_like(x)
    check(ops.backward_composite, (dy, x, w, b, z, mean, invstd, rm, rv, True, 16.0, 1e-5, activation, 0.1))
