"""fuse_conv_bn_blocks on torchvision- and timm-style CNNs (tests/cnn_models.py): same numbers as nn, same state_dict,
what each fusion stores against nn; torch.compile and torch.export of block models."""

import copy
import io
import warnings

import pytest
import torch
from torch import nn

import fusedbn
from cnn_models import MODELS
from fusedbn import FusedConvBatchNorm2d
from helpers import TOL
from test_conv_bn import saved_activation_bytes

EXPECTED_BLOCKS = {"resnet50_like": 20, "resnet18_like": 12, "mobilenet_v2_like": 16, "efficientnet_like": 11,
                   "mobilenet_v3_like": 11}


def model_input(dtype=torch.float64):
    return torch.randn(4, 3, 32, 32, dtype=dtype) * 2 + 0.5


@pytest.mark.parametrize("recompute", ["auto", "output", "conv", "none"])
@pytest.mark.parametrize("name", list(MODELS))
def test_blocks_train_and_evaluate_as_nn_does(name, recompute):
    ref = MODELS[name]().double()
    model = copy.deepcopy(ref)
    state = model.state_dict(keep_vars=True)
    gm = fusedbn.fuse_conv_bn_blocks(model, recompute=recompute)
    blocks = [m for m in gm.modules() if isinstance(m, FusedConvBatchNorm2d)]
    assert len(blocks) == EXPECTED_BLOCKS[name]
    if recompute == "auto":
        assert {b.recompute for b in blocks} <= {"output", "conv"}
    after = gm.state_dict(keep_vars=True)
    assert list(after) == list(state) and all(after[k] is state[k] for k in state)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)  # built on the original model's parameters
    for _ in range(2):
        x = model_input()
        for m, o in ((ref, opt_ref), (gm, opt)):
            o.zero_grad()
            m(x).square().sum().backward()
            o.step()
    for (k, a), b in zip(ref.state_dict().items(), gm.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-8, atol=1e-8, msg=lambda m: f"{k}: {m}")
    ref.eval(), gm.eval()
    x = model_input()
    torch.testing.assert_close(gm(x), ref(x), **TOL[torch.float64])


def test_converted_model_copies_and_pickles():
    gm = fusedbn.fuse_conv_bn_blocks(MODELS["resnet18_like"]().double())
    x = model_input()
    twin = copy.deepcopy(gm)
    buffer = io.BytesIO()
    torch.save(gm, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for m in (twin, loaded):
        blocks = [b for b in m.modules() if isinstance(b, FusedConvBatchNorm2d)]
        registered = {id(c) for c in m.modules()}
        assert blocks and all(id(b.conv) in registered and id(b.bn) in registered for b in blocks)
        m.eval()
    gm.eval()
    torch.testing.assert_close(twin(x), gm(x), rtol=0, atol=0)
    torch.testing.assert_close(loaded(x), gm(x), rtol=0, atol=0)


def test_untraceable_model_is_returned_unchanged_with_a_warning():
    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
                return self.bn(self.conv(x))
            return x

    model = Untraceable()
    with pytest.warns(UserWarning, match="cannot be traced"):
        assert fusedbn.fuse_conv_bn_blocks(model) is model
    with pytest.raises(ValueError, match="recompute must be one of"):
        fusedbn.fuse_conv_bn_blocks(model, recompute="sometimes")


FUSIONS = {
    "convert_model": lambda m: fusedbn.convert_model(m),
    "fuse_activations": lambda m: fusedbn.fuse_activations(fusedbn.convert_model(m)),
    "blocks:auto": lambda m: fusedbn.fuse_conv_bn_blocks(m),
    "blocks:none": lambda m: fusedbn.fuse_conv_bn_blocks(m, recompute="none"),
    "blocks:output": lambda m: fusedbn.fuse_conv_bn_blocks(m, recompute="output"),
    "blocks:conv": lambda m: fusedbn.fuse_conv_bn_blocks(m, recompute="conv"),
}


@pytest.mark.parametrize("name", ["resnet50_like", "resnet18_like", "mobilenet_v2_like"])
def test_no_fusion_stores_more_than_nn(name):
    torch.manual_seed(0)
    ref = MODELS[name]()
    x = model_input(torch.float32)
    _, nn_bytes = saved_activation_bytes(ref, x)
    stored = {fusion: saved_activation_bytes(make(copy.deepcopy(ref)), x)[1] for fusion, make in FUSIONS.items()}
    assert all(b <= nn_bytes for b in stored.values()), (nn_bytes, stored)
    assert stored["blocks:auto"] < 0.8 * nn_bytes


def test_resnet50_like_auto_stores_at_most_055_of_nn():
    """The bar of the conv-BN issue, on a ResNet-50-shaped network (bottlenecks 3-4-6-3, widths 64-128-256-512) at a
    small input (bench/memory.py measures (16, 3, 160, 160) and time)."""
    torch.manual_seed(0)
    from cnn_models import resnet50_like

    ref = resnet50_like()
    x = torch.randn(1, 3, 64, 64)
    _, nn_bytes = saved_activation_bytes(ref, x)
    _, block_bytes = saved_activation_bytes(fusedbn.fuse_conv_bn_blocks(copy.deepcopy(ref)), x)
    assert block_bytes <= 0.55 * nn_bytes, block_bytes / nn_bytes


def _compile_model():
    torch.manual_seed(0)
    return nn.Sequential(FusedConvBatchNorm2d(3, 8, 3, padding=1, activation="relu"),
                         FusedConvBatchNorm2d(8, 8, 3, padding=1, groups=8, activation="hardswish"),
                         FusedConvBatchNorm2d(8, 8, 1, activation="silu", recompute="conv"))


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_torch_compile_fullgraph(train):
    model, compiled_source = _compile_model(), _compile_model()
    model.train(train), compiled_source.train(train)
    compiled = torch.compile(compiled_source, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 6, 6) + 1
    for _ in range(2):
        ref, out = model(x), compiled(x)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        if train:
            ref.sum().backward()
            out.sum().backward()
    for a, b in zip(model.state_dict().values(), compiled_source.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    if train:
        for a, b in zip(model.parameters(), compiled_source.parameters()):
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-4)


def test_torch_export_in_eval():
    model = _compile_model().eval()
    x = torch.randn(2, 3, 6, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exported = torch.export.export(model, (x,))
    torch.testing.assert_close(exported.module()(x), model(x), rtol=1e-6, atol=1e-6)
