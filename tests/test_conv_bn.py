"""The conv-BN block (FusedConvBatchNorm2d, fused_conv_batch_norm, FusedConvBatchNormFunction) against nn.Conv2d →
nn.BatchNorm2d (→ + residual) → activation: outputs, every gradient and the running statistics, for every recompute
policy; what each policy stores; running statistics updated once under recomputation."""

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fusedbn
from fusedbn import FusedConvBatchNorm2d, fused_conv_batch_norm
from fusedbn.reference import activation_fn
from helpers import TOL, random_input, tolerance

POLICIES = ("none", "output", "conv", "auto")
ops = torch.ops.fusedbn


def reference_pair(cin, cout, dtype=torch.float64, activation="identity", negative_slope=0.01, recompute="auto",
                   param_dtype=None, bn_kwargs=None, **conv_kwargs):
    """(nn.Conv2d, nn.BatchNorm2d, FusedConvBatchNorm2d) with the same random state."""
    bn_kwargs = bn_kwargs or {}
    conv_kwargs.setdefault("bias", False)
    conv = nn.Conv2d(cin, cout, **conv_kwargs).to(dtype)
    bn = nn.BatchNorm2d(cout, **bn_kwargs).to(param_dtype or dtype)
    with torch.no_grad():
        if bn.affine:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_()
        if bn.track_running_stats:
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
    block = FusedConvBatchNorm2d(cin, cout, **conv_kwargs, **bn_kwargs, activation=activation,
                                 negative_slope=negative_slope, recompute=recompute).to(dtype)
    block.bn.to(param_dtype or dtype)
    block.conv.load_state_dict(conv.state_dict())
    block.bn.load_state_dict(bn.state_dict())
    return conv, bn, block


def run_reference(conv, bn, x, residual, activation, negative_slope=0.01):
    out = bn(conv(x))
    if residual is not None:
        out = out + residual
    return activation_fn(activation, out, negative_slope)


def compare_step(conv, bn, block, x, residual=None, activation="identity", tol=None, steps=2):
    """Forward and backward through both, `steps` times; compares output, the gradients of input, residual and every
    parameter, and the buffers."""
    tol = tol or TOL[torch.float64]
    for _ in range(steps):
        xs = [x.detach().clone().requires_grad_() for _ in range(2)]
        rs = [None, None] if residual is None else [residual.detach().clone().requires_grad_() for _ in range(2)]
        ref = run_reference(conv, bn, xs[0], rs[0], activation, block.bn.negative_slope)
        out = block(xs[1], rs[1])
        torch.testing.assert_close(out, ref, **tol)
        grad = torch.randn_like(ref)
        ref.backward(grad)
        out.backward(grad)
        torch.testing.assert_close(xs[1].grad, xs[0].grad, **tol)
        if residual is not None:
            torch.testing.assert_close(rs[1].grad, rs[0].grad, **tol)
    for a, b in zip([*conv.parameters(), *bn.parameters()], [*block.conv.parameters(), *block.bn.parameters()]):
        torch.testing.assert_close(b.grad, a.grad, **tol)
    for name, a in bn.state_dict().items():
        torch.testing.assert_close(block.bn.state_dict()[name], a, **tol, msg=lambda m: f"{name}: {m}")


CONV_OPTIONS = [
    dict(kernel_size=3, padding=1),
    dict(kernel_size=1, stride=2, bias=True),
    dict(kernel_size=3, stride=2, padding=2, dilation=2, groups=2),
    dict(kernel_size=(2, 3), padding="same", dilation=(1, 2)),
    dict(kernel_size=3, padding="valid", bias=True),
    dict(kernel_size=3, padding=1, padding_mode="reflect"),
    dict(kernel_size=3, padding=(1, 2), padding_mode="circular", bias=True),
    dict(kernel_size=3, padding=1, padding_mode="replicate"),
]


@pytest.mark.parametrize("conv_kwargs", CONV_OPTIONS, ids=lambda k: "-".join(f"{a}{b}" for a, b in k.items()))
@pytest.mark.parametrize("recompute", POLICIES)
def test_float64_matches_nn_over_conv_options(conv_kwargs, recompute):
    activation = "relu" if recompute in ("none", "conv") else "silu"
    conv, bn, block = reference_pair(4, 6, activation=activation, recompute=recompute, **conv_kwargs)
    x = random_input((3, 4, 7, 6))
    with torch.no_grad():
        shape = conv(x).shape
    compare_step(conv, bn, block, x, torch.randn(shape, dtype=torch.float64), activation)
    conv.eval(), bn.eval(), block.eval()
    compare_step(conv, bn, block, x, torch.randn(shape, dtype=torch.float64), activation, steps=1)


@pytest.mark.parametrize("recompute", POLICIES)
@pytest.mark.parametrize("activation", ["identity", "relu", "leaky_relu", "relu6", "hardswish", "gelu"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_activations_layouts_and_depthwise(recompute, activation, memory_format):
    conv, bn, block = reference_pair(6, 6, activation=activation, negative_slope=0.2, recompute=recompute,
                                     kernel_size=3, padding=1, groups=6)
    conv.to(memory_format=memory_format), block.to(memory_format=memory_format)
    x = random_input((2, 6, 5, 4), memory_format=memory_format)
    compare_step(conv, bn, block, x, None, activation)
    compare_step(conv, bn, block, x, random_input((2, 6, 5, 4), memory_format=memory_format), activation)


@pytest.mark.parametrize("affine, track", [(False, True), (True, False), (False, False)])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_batch_norm_options(affine, track, momentum):
    conv, bn, block = reference_pair(3, 5, activation="relu", kernel_size=3, padding=1,
                                     bn_kwargs=dict(affine=affine, track_running_stats=track, momentum=momentum))
    x = random_input((4, 3, 6, 6))
    compare_step(conv, bn, block, x, None, "relu", steps=3)
    conv.eval(), bn.eval(), block.eval()
    compare_step(conv, bn, block, x, None, "relu", steps=1)


@pytest.mark.parametrize("small_batch", ["running", "blend", "error"])
@pytest.mark.parametrize("recompute", POLICIES)
def test_small_batch_modes_match_conv_then_fused_batch_norm(small_batch, recompute):
    # One value per channel (N = 1, 1×1 output): nn raises; the block does what FusedBatchNorm2d does after the conv.
    conv = nn.Conv2d(3, 4, 3).double()
    bn = fusedbn.FusedBatchNorm2d(4, activation="relu", small_batch=small_batch, prior_count=4.0).double()
    with torch.no_grad():
        bn.running_mean.normal_(), bn.running_var.uniform_(0.5, 2)
    block = FusedConvBatchNorm2d.from_modules(copy.deepcopy(conv), copy.deepcopy(bn), recompute=recompute)
    x = random_input((1, 3, 3, 3))
    if small_batch == "error":
        with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
            block(x)
        assert block.bn.num_batches_tracked.item() == 0
        return
    with pytest.warns(UserWarning) if small_batch == "running" else _no_warning():
        compare_step(conv, bn, block, x, None, "relu", steps=2)


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("recompute", ["none", "output", "conv"])
def test_reduced_precision_within_nns_own_error(dtype, recompute):
    """Against a float64 reference: the block's error is at most a small multiple of nn's own (float32), or within
    the dtype's tolerance (bfloat16 and float16 with float32 batch norm parameters)."""
    param_dtype = torch.float32 if dtype != torch.float32 else None
    conv64, bn64, _ = reference_pair(8, 16, kernel_size=3, padding=1, activation="relu")
    conv, bn = copy.deepcopy(conv64).to(dtype), copy.deepcopy(bn64).to(param_dtype or dtype)
    block = FusedConvBatchNorm2d.from_modules(copy.deepcopy(conv), copy.deepcopy(bn), activation="relu",
                                              recompute=recompute)
    x64 = random_input((4, 8, 10, 10))
    ref64 = run_reference(conv64, bn64, x64, None, "relu")
    grad = torch.randn_like(ref64)
    ref64.backward(grad)
    x_nn, x_block = (x64.detach().to(dtype).requires_grad_() for _ in range(2))
    out_nn = run_reference(conv, bn, x_nn, None, "relu")
    out_nn.backward(grad.to(dtype))
    out = block(x_block)
    out.backward(grad.to(dtype))
    tol = tolerance(x64.shape, dtype)
    for got, nn_value, exact in [(out, out_nn, ref64), (x_block.grad, x_nn.grad, x64.grad),
                                 (block.conv.weight.grad, conv.weight.grad, conv64.weight.grad),
                                 (block.bn.weight.grad, bn.weight.grad, bn64.weight.grad),
                                 (block.bn.running_var, bn.running_var, bn64.running_var)]:
        err = (got.double() - exact).abs().max().item()
        nn_err = (nn_value.double() - exact).abs().max().item()
        scale = exact.abs().max().item()
        assert err <= max(4 * nn_err, tol["atol"] * max(1.0, scale)), (err, nn_err)


@pytest.mark.parametrize("recompute", POLICIES)
def test_autocast_runs_the_block_as_nn_runs_conv_then_batch_norm(recompute):
    conv, bn, block = reference_pair(4, 8, dtype=torch.float32, kernel_size=3, padding=1, activation="relu",
                                     recompute=recompute)
    x = random_input((2, 4, 6, 6), dtype=torch.float32)
    for train in (True, False):
        conv.train(train), bn.train(train), block.train(train)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, ref = block(x), F.relu(bn(conv(x)))
        assert out.dtype == ref.dtype == torch.bfloat16
        torch.testing.assert_close(out, ref, **TOL[torch.bfloat16])
        if not train:  # eval folds BN into the conv: rounding differs, and a ReLU mask may flip where pre ≈ 0
            continue
        weights = torch.randn(out.shape)  # (a plain sum's input gradient cancels to bfloat16 rounding noise)
        (grad,) = torch.autograd.grad((out.float() * weights).sum(), x)
        (grad_ref,) = torch.autograd.grad((ref.float() * weights).sum(), x)
        torch.testing.assert_close(grad, grad_ref, rtol=0, atol=0.05 * grad_ref.abs().max().item())
    torch.testing.assert_close(block.bn.running_var, bn.running_var, **TOL[torch.bfloat16])


@pytest.mark.parametrize("recompute", ["none", "conv"])
@pytest.mark.parametrize("activation", ["identity", "silu", "relu"])
def test_gradcheck_and_gradgradcheck(recompute, activation):
    x = random_input((3, 2, 4, 4))
    cw = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    cb = torch.randn(3, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    r = torch.randn(3, 3, 4, 4, dtype=torch.float64, requires_grad=True)

    def f(x, cw, cb, w, b, r):
        return fused_conv_batch_norm(x, cw, cb, None, None, w, b, training=True, padding=1, activation=activation,
                                     residual=r, recompute=recompute)

    assert torch.autograd.gradcheck(f, (x, cw, cb, w, b, r))
    assert torch.autograd.gradgradcheck(f, (x, cw, cb, w, b, r))


def test_double_backward_through_a_recipe_raises():
    blocks = nn.Sequential(FusedConvBatchNorm2d(2, 2, 3, padding=1, activation="relu", recompute="output"),
                           FusedConvBatchNorm2d(2, 2, 3, padding=1, activation="relu", recompute="output")).double()
    x = random_input((2, 2, 4, 4))
    out = blocks(x)
    (grad,) = torch.autograd.grad(out.sum(), x, create_graph=False)
    assert torch.isfinite(grad).all()
    with pytest.raises(RuntimeError, match="recipe"):
        torch.autograd.grad(blocks(x).sum(), x, create_graph=True)


def saved_activation_bytes(model, x):
    params = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    return out, sum(saved.values())


def chain(recompute, n=4, c=8):
    torch.manual_seed(0)
    return nn.Sequential(*[FusedConvBatchNorm2d(c, c, 3, padding=1, activation="relu", recompute=recompute)
                           for _ in range(n)])


def test_what_each_policy_stores_in_a_chain():
    """4 blocks conv3×3-BN-ReLU: nn stores x, and y and the output of each block (9 activations; the last output
    too, as ReLU saves it); "none" does not keep the last output (8), "output" keeps x and the 4 conv outputs (5),
    "conv" x and the 3 outputs (4)."""
    x = random_input((2, 8, 6, 6), dtype=torch.float32)
    act = x.numel() * 4  # the per-channel statistics add a few bytes, less than one activation in all
    stored = {policy: saved_activation_bytes(chain(policy), x)[1] // act for policy in ("none", "output", "conv")}
    nn_chain = nn.Sequential(*[nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
                               for _ in range(4)])
    assert saved_activation_bytes(nn_chain, x)[1] // act == 9
    assert stored == {"none": 8, "output": 5, "conv": 4}


def test_rebuilt_input_is_bitwise_the_stored_one():
    x = random_input((3, 8, 5, 5), dtype=torch.float32)
    grads = {}
    for policy in ("none", "output"):
        model = chain(policy)
        out = model(x)
        (grads[policy],) = torch.autograd.grad(out.square().sum(), x)
        weight_grads = torch.autograd.grad(model(x).square().sum(), [b.conv.weight for b in model])
        grads[policy + "-w"] = torch.cat([g.flatten() for g in weight_grads])
    assert torch.equal(grads["none"], grads["output"])
    assert torch.equal(grads["none-w"], grads["output-w"])


def test_output_changed_in_place_is_stored_not_rebuilt():
    torch.manual_seed(0)
    first = FusedConvBatchNorm2d(3, 3, 3, padding=1, activation="relu", recompute="output").double()
    second = FusedConvBatchNorm2d(3, 3, 3, padding=1, activation="relu", recompute="output").double()
    reference = [copy.deepcopy(first), copy.deepcopy(second)]
    for b in reference:
        b.recompute = "none"
    x = random_input((2, 3, 4, 4))
    results = []
    for a, b in ([first, second], reference):
        h = a(x)
        h.mul_(2.0)  # changed in place after the block made it: the recipe no longer describes it
        b(h).sum().backward()
        results.append([p.grad.clone() for p in b.parameters()])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("recompute", POLICIES)
def test_running_statistics_updated_once_where_checkpoint_updates_twice(recompute):
    from torch.utils.checkpoint import checkpoint

    conv, bn, block = reference_pair(3, 4, kernel_size=3, padding=1, activation="relu", recompute=recompute)
    x = random_input((4, 3, 5, 5))
    block(x).sum().backward()
    assert block.bn.num_batches_tracked.item() == 1
    with torch.no_grad():
        expected = 0.9 * bn.running_mean + 0.1 * conv(x).mean((0, 2, 3))
    torch.testing.assert_close(block.bn.running_mean, expected, rtol=1e-12, atol=1e-12)
    checkpoint(lambda t: F.relu(bn(conv(t))), x, use_reentrant=False).sum().backward()
    assert bn.num_batches_tracked.item() == 2  # nn under torch.utils.checkpoint: once in forward, once recomputed


def test_functional_matches_module_and_checks_arguments():
    conv, bn, block = reference_pair(4, 6, kernel_size=3, padding=1, activation="leaky_relu", negative_slope=0.3)
    x = random_input((2, 4, 5, 5))
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    out = fused_conv_batch_norm(x, conv.weight, None, rm, rv, bn.weight, bn.bias, training=True, padding=1,
                                activation="leaky_relu", negative_slope=0.3)
    torch.testing.assert_close(out, F.leaky_relu(bn(conv(x)), 0.3), **TOL[torch.float64])
    torch.testing.assert_close(rm, bn.running_mean, **TOL[torch.float64])
    before = rm.clone()
    bad = [
        (dict(input=random_input((2, 5, 5, 5))), ValueError, "input has 5 channels"),
        (dict(stride=0), ValueError, "stride must be"),
        (dict(groups=3), ValueError, "expects 12"),
        (dict(padding="same", stride=2), ValueError, "strided"),
        (dict(padding="full"), ValueError, "padding must be"),
        (dict(recompute="some"), ValueError, "recompute must be one of"),
        (dict(activation="tanh"), ValueError, "activation must be one of"),
        (dict(residual=torch.zeros(2, 6, 4, 4, dtype=torch.float64)), ValueError, "residual must match"),
        (dict(running_mean=torch.zeros(4, dtype=torch.float64)), ValueError, "running_mean must have shape"),
        (dict(conv_weight=conv.weight.float()), TypeError, "conv_weight must have the input's dtype"),
    ]
    for change, error, message in bad:
        args = dict(input=x, conv_weight=conv.weight, conv_bias=None, running_mean=rm, running_var=rv,
                    weight=bn.weight, bias=bn.bias, training=True, padding=1)
        args.update(change)
        with pytest.raises(error, match=message):
            fused_conv_batch_norm(**args)
        assert torch.equal(rm, before)


def test_module_api_and_from_modules_share_tensors():
    block = FusedConvBatchNorm2d(4, 8, 3, padding=1, activation="relu6")
    assert list(block.state_dict()) == ["conv.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var",
                                        "bn.num_batches_tracked"]
    assert isinstance(block.conv, nn.Conv2d) and isinstance(block.bn, fusedbn.FusedBatchNorm2d)
    assert block.bn.activation == "relu6" and "recompute='auto'" in repr(block)
    conv, bn = nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8)
    shared = FusedConvBatchNorm2d.from_modules(conv, bn, activation="hardswish", recompute="conv")
    assert shared.conv is conv and shared.bn.weight is bn.weight and shared.bn.running_var is bn.running_var
    assert shared.bn.num_batches_tracked is bn.num_batches_tracked and shared.conv.bias is conv.bias
    with pytest.raises(ValueError, match="must equal bn.num_features"):
        FusedConvBatchNorm2d.from_modules(conv, nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match="recompute must be one of"):
        FusedConvBatchNorm2d(4, 8, 3, recompute="never")
    with pytest.raises(ValueError):
        FusedConvBatchNorm2d(4, 8, 3, stride=2, padding="same")  # nn.Conv2d's own check


def test_eval_folding_is_cached_and_follows_changes():
    conv, bn, block = reference_pair(3, 4, kernel_size=3, padding=1, activation="relu")
    conv.eval(), bn.eval(), block.eval()
    x = random_input((2, 3, 5, 5), requires_grad=False)
    with torch.no_grad():
        first = block(x)
        assert block._folded is not None
        folded = block._folded
        block(x)
        assert block._folded is folded  # nothing changed: the folding is reused
        block.bn.running_var.mul_(2)
        bn.running_var.mul_(2)
        torch.testing.assert_close(block(x), F.relu(bn(conv(x))), **TOL[torch.float64])
        assert block._folded is not folded
    assert not torch.equal(first, block(x).detach())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("activation", ["identity", "relu", "relu6", "silu"])
def test_cached_eval_is_the_folded_conv_then_the_activation_bit_for_bit(dtype, memory_format, activation):
    block = FusedConvBatchNorm2d(6, 8, 3, stride=2, padding=1, groups=2, activation=activation).to(dtype).eval()
    with torch.no_grad():
        block.bn.running_mean.normal_(), block.bn.running_var.uniform_(0.5, 2)
        x = random_input((3, 6, 9, 7), dtype, memory_format, requires_grad=False)
        block(x)  # fills the cache
        folded_weight, folded_bias = block._folded
        expected = activation_fn(activation, F.conv2d(x, folded_weight, folded_bias, 2, 1, 1, 2), 0.01)
        assert torch.equal(block(x), expected)


def test_eval_gradients_flow_to_every_parameter():
    conv, bn, block = reference_pair(3, 4, kernel_size=3, padding=1, activation="silu")
    conv.eval(), bn.eval(), block.eval()
    compare_step(conv, bn, block, random_input((2, 3, 5, 5)), None, "silu", steps=1)


def test_opcheck_renormalize():
    x = random_input((3, 4, 5, 2), torch.float32, requires_grad=False)
    w, b = torch.rand(4) + 0.5, torch.randn(4)
    out, mean, invstd, *_ = ops.forward_train(x, w, b, None, None, None, 0.0, 1e-5, "relu", 0.01)
    torch.library.opcheck(ops.renormalize, (x, w, b, None, mean, invstd, "relu", 0.01))
    assert torch.equal(ops.renormalize(x, w, b, None, mean, invstd, "relu", 0.01), out)


@pytest.mark.parametrize("dtype, memory_format, activation", list(itertools.product(
    [torch.float32, torch.bfloat16, torch.float64], [torch.contiguous_format, torch.channels_last],
    ["relu", "silu", "gelu", "hardswish"])))
def test_renormalize_reproduces_the_training_output_bitwise(dtype, memory_format, activation):
    x = random_input((4, 16, 9, 7), dtype, memory_format, requires_grad=False)
    pdtype = torch.float64 if dtype == torch.float64 else torch.float32
    w, b = torch.rand(16, dtype=pdtype) + 0.5, torch.randn(16, dtype=pdtype)
    out, mean, invstd, *_ = ops.forward_train(x, w, b, None, None, None, 0.0, 1e-5, activation, 0.01)
    again = ops.renormalize(x, w, b, None, mean, invstd, activation, 0.01)
    assert torch.equal(again, out) and again.stride() == out.stride()
