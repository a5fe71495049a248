"""Forward-mode AD and torch.func transforms, float64, against nn.BatchNorm2d where nn supports the case and against
finite differences (gradcheck's forward-AD check) where nn has no counterpart."""

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn
from torch.autograd import gradcheck
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, jvp, vmap

import fusedbn
from helpers import TOL, module_pair, random_input

NN_ACTIVATION = {"identity": lambda v: v, "relu": F.relu, "leaky_relu": lambda v: F.leaky_relu(v, 0.2),
                 "silu": F.silu, "relu6": F.relu6, "hardswish": F.hardswish, "gelu": F.gelu}


def pair(activation="identity", training=True, **kwargs):
    """(nn reference as a function, fusedbn module) with the same random state."""
    ref, fused = module_pair(3, activation=activation, negative_slope=0.2, **kwargs)
    if ref.track_running_stats:
        with torch.no_grad():
            ref.running_mean.normal_()
            ref.running_var.uniform_(0.5, 2.0)
        fused.load_state_dict(ref.state_dict())
    ref.train(training), fused.train(training)
    act = NN_ACTIVATION[activation]
    return (lambda x, z=None: act(ref(x) if z is None else ref(x) + z)), fused, ref


def tangent_of(y):
    return fwAD.unpack_dual(y).tangent


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("activation", list(NN_ACTIVATION))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_forward_ad_matches_nn(training, activation, residual, memory_format):
    ref_fn, fused, ref = pair(activation, training)
    x = random_input((4, 3, 5, 3), memory_format=memory_format, requires_grad=False)
    z = torch.randn_like(x) if residual else None
    tangents = {name: torch.randn_like(p) for name, p in ref.named_parameters()}
    dx, dz = torch.randn_like(x), torch.randn_like(x) if residual else None
    outputs = []
    for fn, module in ((ref_fn, ref), (fused, fused)):
        with fwAD.dual_level():
            for name, p in list(module.named_parameters()):
                delattr(module, name)
                setattr(module, name, fwAD.make_dual(p.detach(), tangents[name]))
            xd = fwAD.make_dual(x, dx)
            zd = fwAD.make_dual(z, dz) if residual else None
            y = fn(xd, zd) if residual else fn(xd)
            outputs.append((fwAD.unpack_dual(y).primal.clone(), tangent_of(y).clone()))
    (y_ref, t_ref), (y_fused, t_fused) = outputs
    torch.testing.assert_close(y_fused, y_ref, **TOL[torch.float64])
    torch.testing.assert_close(t_fused, t_ref, **TOL[torch.float64])


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_forward_ad_never_drops_a_tangent_without_grad_parameters(training):
    # The fast path (no autograd node) is taken when nothing requires grad; a dual input must still get its tangent.
    ref_fn, fused, _ = pair("relu", training)
    fused.requires_grad_(False)
    x = random_input((2, 3, 4, 4), requires_grad=False)
    dx = torch.randn_like(x)
    with fwAD.dual_level():
        expected = tangent_of(ref_fn(fwAD.make_dual(x, dx)))
        got = tangent_of(fused(fwAD.make_dual(x, dx)))
    assert got is not None
    torch.testing.assert_close(got, expected, **TOL[torch.float64])


def test_a_tangent_on_the_running_statistics_raises():
    _, fused, _ = pair(training=False)
    x = random_input((2, 3, 4, 4), requires_grad=False)
    with fwAD.dual_level():
        fused.running_mean = fwAD.make_dual(fused.running_mean, torch.ones(3, dtype=torch.float64))
        with pytest.raises(RuntimeError, match="running_mean and running_var .* carry a forward-mode tangent"):
            fused(x)


def test_the_ops_refuse_a_tangent_rather_than_drop_it():
    x = random_input((2, 3, 4, 4), requires_grad=False)
    stats = (torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64))
    with fwAD.dual_level(), pytest.raises(RuntimeError, match="jvp"):
        torch.ops.fusedbn.normalize(fwAD.make_dual(x, torch.ones_like(x)), None, None, None, *stats, 1e-5,
                                    "identity", 0.0)


@pytest.mark.parametrize("options", [
    dict(small_batch="running", min_count=4), dict(small_batch="blend", min_count=4),
    dict(small_batch="blend", min_count=4, activation="silu"), dict(running=False), dict(min_count=1),
], ids=str)
def test_forward_ad_of_fusedbn_only_modes_against_finite_differences(options):
    # "blend", the fallback to running statistics and batch norm of a single value have no nn counterpart:
    # gradcheck compares the jvp (and the vjp) with finite differences.
    options = dict(options)
    running, activation = options.pop("running", True), options.pop("activation", "identity")
    shape = (1, 3, 1, 1) if options.get("min_count") == 1 else (1, 3, 3, 1)
    x = random_input(shape)
    w = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(3, dtype=torch.float64).requires_grad_()
    rm = torch.linspace(-1, 1, 3, dtype=torch.float64) if running else None
    rv = torch.linspace(0.5, 2, 3, dtype=torch.float64) if running else None

    def f(x, w, b):
        return fusedbn.fused_batch_norm(x, None if rm is None else rm.clone(), None if rv is None else rv.clone(), w, b,
                                        True, 0.1, 1e-3, activation=activation, **options)
    assert gradcheck(f, (x, w, b), check_forward_ad=True, check_batched_forward_grad=True)


# ---- torch.func -------------------------------------------------------------------------------------------

def func_pair(training, activation="silu"):
    """nn and fusedbn as functions of (params, x) for functional_call; training without running statistics."""
    ref_fn, fused, ref = pair(activation, training, track_running_stats=not training)
    params = {k: v.detach() for k, v in ref.named_parameters()}
    act = NN_ACTIVATION[activation]
    return (lambda p, x: act(functional_call(ref, p, (x,)))), (lambda p, x: functional_call(fused, p, (x,))), params


@pytest.mark.parametrize("training", [True, False], ids=["train_untracked", "eval"])
def test_torch_func_jvp_grad_jacobians_hessian_match_nn(training):
    f_ref, f_fused, params = func_pair(training)
    x = random_input((3, 3, 2, 2), requires_grad=False)
    dx = torch.randn_like(x)
    dp = {k: torch.randn_like(v) for k, v in params.items()}
    checks = {
        "jvp": lambda f: jvp(f, (params, x), (dp, dx))[1],
        "grad": lambda f: grad(lambda p, x: f(p, x).pow(2).sum(), argnums=(0, 1))(params, x),
        "jacrev": lambda f: jacrev(f, argnums=1)(params, x),
        "jacfwd": lambda f: jacfwd(f, argnums=1)(params, x),
        "hessian": lambda f: hessian(lambda x: f(params, x).pow(3).sum())(x),
    }
    for name, check in checks.items():
        torch.testing.assert_close(check(f_fused), check(f_ref), **TOL[torch.float64], msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("in_dims", [0, 2], ids=["dim0", "dim2"])
@pytest.mark.parametrize("training", [True, False], ids=["train_untracked", "eval"])
def test_vmap_over_inputs_and_parameters_matches_nn(training, in_dims):
    f_ref, f_fused, params = func_pair(training, "relu")
    xs = random_input((4, 3, 3, 2), requires_grad=False).unsqueeze(in_dims).expand(
        *[5 if d == in_dims else -1 for d in range(5)]).clone()
    xs = xs + torch.randn_like(xs)  # every map its own batch
    stacked = {k: torch.stack([v + 0.1 * i for i in range(5)]) for k, v in params.items()}
    for f_in_dims, args in (((None, in_dims), (params, xs)), ((0, in_dims), (stacked, xs)),
                            ((0, None), (stacked, xs.select(in_dims, 0)))):
        expected = vmap(f_ref, in_dims=f_in_dims)(*args)
        torch.testing.assert_close(vmap(f_fused, in_dims=f_in_dims)(*args), expected, **TOL[torch.float64])


def test_vmap_in_training_with_running_statistics_raises_before_touching_them():
    # nn raises too: the buffers are not batched and would be updated in place.
    ref, fused = module_pair(3)
    xs = random_input((10, 3, 2, 2), requires_grad=False).view(5, 2, 3, 2, 2)
    with pytest.raises(RuntimeError):
        vmap(ref)(xs)
    before = {k: v.clone() for k, v in fused.state_dict().items()}
    with pytest.raises(RuntimeError, match="vmap over a batch norm in training mode would update running_mean"):
        vmap(fused)(xs)
    for k, v in fused.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_grad_transform_in_training_updates_running_statistics_once():
    # nn.BatchNorm2d refuses this (an in-place update of a captured buffer); fusedbn updates the buffers once, as an
    # eager step does, and differentiates as autograd does.
    ref, fused = module_pair(3)
    x = random_input((4, 3, 2, 2), requires_grad=False)
    g = grad(lambda x: fused(x).pow(2).sum())(x)
    xr = x.clone().requires_grad_()
    ref(xr).pow(2).sum().backward()
    torch.testing.assert_close(g, xr.grad, **TOL[torch.float64])
    torch.testing.assert_close(fused.running_var, ref.running_var, **TOL[torch.float64])
    assert fused.num_batches_tracked.item() == ref.num_batches_tracked.item() == 1
