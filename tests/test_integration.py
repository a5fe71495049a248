"""PyTorch integration: torch.compile (fullgraph, training and eval), torch.export, autocast, typing."""

import importlib.util
import inspect
import os
import typing
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import fusedbn
from conftest import requires_cuda


def make_model(**bn_kwargs):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), fusedbn.FusedBatchNorm2d(4, **bn_kwargs), nn.Conv2d(4, 2, 1))


def train_steps(model, inputs):
    outputs = []
    for x in inputs:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            y = model(x)
        y.square().sum().backward()
        outputs.append(y.detach())
    return outputs


# m = N·H·W after the 3×3 conv: (4,3,6,6) → 64 values per channel; (1,3,3,3) → 1 value; (2,3,3,3) → 2.
CASES = [
    dict(shape=(4, 3, 6, 6)),
    dict(shape=(4, 3, 6, 6), momentum=None),
    dict(shape=(1, 3, 3, 3), small_batch="running"),
    dict(shape=(1, 3, 3, 3), small_batch="running", momentum=None),
    dict(shape=(1, 3, 3, 3), small_batch="blend"),
    dict(shape=(2, 3, 3, 3), small_batch="blend", min_count=4, momentum=None),
    dict(shape=(1, 3, 3, 3), min_count=1),
    dict(shape=(4, 3, 6, 6), activation="relu"),
    dict(shape=(4, 3, 6, 6), activation="leaky_relu", negative_slope=0.3),
    dict(shape=(2, 3, 4, 4), activation="silu", small_batch="blend", min_count=16),
    dict(shape=(4, 3, 6, 6), affine=False, track_running_stats=False),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_compile_fullgraph_training_matches_eager(case):
    case = dict(case)
    shape = case.pop("shape")
    eager, compiled = make_model(**case), make_model(**case)
    torch._dynamo.reset()
    compiled_fn = torch.compile(compiled, fullgraph=True)
    inputs = [torch.randn(shape) + 1 for _ in range(3)]
    for y_eager, y_compiled in zip(train_steps(eager, inputs), train_steps(compiled_fn, inputs)):
        torch.testing.assert_close(y_compiled, y_eager, rtol=1e-5, atol=1e-5)
    # Buffers after the compiled steps (a stale-buffer read would show here) and accumulated gradients.
    for (name, a), b in zip(eager.state_dict().items(), compiled.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-4, msg=name)
    # Eval mode, compiled too.
    eager.eval(), compiled.eval()
    x = torch.randn(shape)
    torch.testing.assert_close(compiled_fn(x), eager(x), rtol=1e-5, atol=1e-5)


def test_compile_residual_functional():
    def block(x, z, rm, rv, w, b):
        return fusedbn.fused_batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5, activation="relu", residual=z)

    args = [torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.zeros(3), torch.ones(3),
            torch.rand(3, requires_grad=True), torch.randn(3, requires_grad=True)]
    eager_args = [a.detach().clone().requires_grad_(a.requires_grad) for a in args]
    y = torch.compile(block, fullgraph=True)(*args)
    y_eager = block(*eager_args)
    torch.testing.assert_close(y, y_eager)
    torch.testing.assert_close(args[2], eager_args[2])  # running_mean updated in place under compile


def test_export_eval_model():
    model = make_model(activation="relu").eval()
    x = torch.randn(2, 3, 6, 6)
    program = torch.export.export(model, (x,))
    torch.testing.assert_close(program.module()(x), model(x))


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
def test_autocast_cpu_bfloat16_behaves_as_nn(memory_format):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3).to(memory_format=memory_format)
    ref_bn, fused_bn = nn.BatchNorm2d(8), fusedbn.FusedBatchNorm2d(8)
    x = torch.randn(4, 3, 10, 10).contiguous(memory_format=memory_format)
    results = []
    for bn in (ref_bn, fused_bn):
        conv.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = bn(conv(x))
        y.float().square().sum().backward()
        results.append((y, conv.weight.grad.clone(), bn.running_mean.clone()))
    (y_ref, g_ref, rm_ref), (y, g, rm) = results
    assert y.dtype == y_ref.dtype == torch.bfloat16
    assert fused_bn.running_mean.dtype == fused_bn.weight.grad.dtype == torch.float32
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=2e-2, atol=3e-2)
    torch.testing.assert_close(rm, rm_ref, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(g, g_ref, rtol=5e-2, atol=5e-1)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_autocast_cuda(dtype):
    conv = nn.Conv2d(3, 8, 3).cuda()
    bn = fusedbn.FusedBatchNorm2d(8).cuda()
    with torch.autocast("cuda", dtype=dtype):
        y = bn(conv(torch.randn(4, 3, 10, 10, device="cuda")))
    assert y.dtype == dtype
    y.float().sum().backward()


def test_public_api_is_typed_and_documented():
    package_dir = os.path.dirname(fusedbn.__file__)
    assert os.path.exists(os.path.join(package_dir, "py.typed"))
    for obj in (fusedbn.fused_batch_norm, fusedbn.FusedBatchNorm2d.__init__, fusedbn.FusedBatchNorm2d.forward,
                fusedbn.convert_model, fusedbn.fuse_activations, fusedbn.fuse_conv_bn):
        hints = typing.get_type_hints(obj)
        assert "return" in hints, obj
    for obj in (fusedbn.fused_batch_norm, fusedbn.FusedBatchNorm2d, fusedbn.FusedBatchNormFunction,
                fusedbn.BatchNormAct2d, fusedbn.convert_model):
        assert obj.__doc__ and len(obj.__doc__) > 80, obj
    doc = fusedbn.fused_batch_norm.__doc__ + fusedbn.FusedBatchNorm2d.__doc__
    assert "small" in doc.lower() and "finite" in doc.lower()


def signature_of(fn):
    return [(p.name, p.kind.name, p.default) for p in inspect.signature(fn).parameters.values()]


def test_signatures_are_exactly_the_documented_ones():
    K, P = "KEYWORD_ONLY", "POSITIONAL_OR_KEYWORD"
    empty = inspect.Parameter.empty
    assert signature_of(fusedbn.FusedBatchNorm2d.__init__)[1:] == [
        ("num_features", P, empty), ("eps", P, 1e-5), ("momentum", P, 0.1), ("affine", P, True),
        ("track_running_stats", P, True), ("device", P, None), ("dtype", P, None), ("bias", K, True),
        ("activation", K, "identity"), ("negative_slope", K, 0.01), ("small_batch", K, "running"), ("min_count", K, 2),
        ("prior_count", K, 16.0)]
    assert signature_of(fusedbn.fused_batch_norm) == [
        ("input", P, empty), ("running_mean", P, empty), ("running_var", P, empty), ("weight", P, None),
        ("bias", P, None), ("training", P, False), ("momentum", P, 0.1), ("eps", P, 1e-5),
        ("activation", K, "identity"), ("negative_slope", K, 0.01), ("residual", K, None),
        ("small_batch", K, "running"), ("min_count", K, 2), ("prior_count", K, 16.0)]
    assert signature_of(fusedbn.BatchNormAct2d.__init__)[1:13] == [
        ("num_features", P, empty), ("eps", P, 1e-5), ("momentum", P, 0.1), ("affine", P, True),
        ("track_running_stats", P, True), ("apply_act", P, True), ("act_layer", P, nn.ReLU),
        ("act_kwargs", P, None), ("inplace", P, True), ("drop_layer", P, None), ("device", P, None),
        ("dtype", P, None)]


@pytest.mark.parametrize("version, supported", [("2.10.1", False), ("2.11.0+cu130", True), ("2.13.0+cpu", True),
                                                ("2.14.1", True), ("2.15.0", False)])
def test_build_refuses_a_torch_outside_the_supported_range(monkeypatch, version, supported):
    spec = importlib.util.spec_from_file_location("fusedbn_setup", Path(__file__).parents[1] / "setup.py")
    setup_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup_module)  # defines, does not build: setup() runs only as __main__
    monkeypatch.setattr(setup_module.torch, "__version__", version)
    if supported:
        setup_module.check_torch()
    else:
        with pytest.raises(RuntimeError, match=r"fusedbn supports torch 2\.11 to 2\.14; this is torch " + version):
            setup_module.check_torch()
