"""convert_model, fuse_activations, BatchNormAct2d (timm-style) and fuse_conv_bn on ResNet-like models."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fusedbn
from cnn_models import BasicBlock
from helpers import TOL

F64 = TOL[torch.float64]


class TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.SiLU())
        self.layer1 = BasicBlock(8, 8)
        self.layer2 = BasicBlock(8, 16, 2, nn.Sequential(nn.Conv2d(8, 16, 1, 2, bias=False), nn.BatchNorm2d(16)))
        self.head_bn = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        x = F.leaky_relu(self.head_bn(x), 0.1)
        return self.fc(x.mean(dim=(2, 3)))


def randomise_bn(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2)


def forward_backward(model, x):
    model.zero_grad()
    x = x.detach().clone().requires_grad_()
    y = model(x)
    y.backward(torch.ones_like(y))
    return y, x.grad, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_converted_and_fused_resnet_matches_original(training):
    torch.manual_seed(0)
    original = TinyResNet().double()
    randomise_bn(original)
    checkpoint = {k: v.clone() for k, v in original.state_dict().items()}
    converted = fusedbn.convert_model(TinyResNet().double())
    converted.load_state_dict(checkpoint)  # the original's checkpoint loads after conversion
    fused = fusedbn.fuse_activations(converted)
    assert list(fused.state_dict().keys()) == list(checkpoint.keys())
    n_fused = sum(isinstance(m, fusedbn.FusedBatchNorm2d) and m.activation != "identity" for m in fused.modules())
    # stem (SiLU), bn1 → ReLU in both blocks, bn2 → add → ReLU in layer1 (its residual, the block input, is stored
    # anyway) but not in layer2 (the residual is the downsample's output, which only the add uses), head (LeakyReLU)
    assert n_fused == 5
    original.train(training), fused.train(training)
    x = torch.randn(4, 3, 12, 12, dtype=torch.float64) + 1
    y_ref, dx_ref, grads_ref = forward_backward(original, x)
    y, dx, grads = forward_backward(fused, x)
    torch.testing.assert_close(y, y_ref, **F64)
    torch.testing.assert_close(dx, dx_ref, **F64)
    for name, g in grads_ref.items():
        torch.testing.assert_close(grads[name], g, **F64, msg=name)
    for (k, a), b in zip(original.state_dict().items(), fused.state_dict().values()):
        torch.testing.assert_close(b, a, **F64, msg=k)
    # and the fused model's checkpoint loads back into the original architecture
    TinyResNet().double().load_state_dict(fused.state_dict())


def test_convert_model_shares_state_and_flags():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, momentum=None, eps=1e-3)).eval()
    weight = model[1].weight
    converted = fusedbn.convert_model(model, small_batch="blend")
    bn = converted[1]
    assert isinstance(bn, fusedbn.FusedBatchNorm2d) and bn.weight is weight
    assert not bn.training and bn.momentum is None and bn.eps == 1e-3 and bn.small_batch == "blend"
    assert isinstance(fusedbn.convert_model(nn.BatchNorm2d(3)), fusedbn.FusedBatchNorm2d)


def test_fuse_activations_reports_untraceable_models():
    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow
                return F.relu(self.bn(x))
            return x

    model = Untraceable()
    with pytest.warns(UserWarning, match="cannot be traced"):
        assert fusedbn.fuse_activations(model) is model


def test_batchnormact2d_timm_style():
    bn = fusedbn.BatchNormAct2d(8)  # act_layer=nn.ReLU: fused
    assert bn.activation == "relu" and isinstance(bn.act, nn.ReLU) and isinstance(bn.drop, nn.Identity)  # as timm
    assert list(bn.state_dict().keys()) == list(nn.BatchNorm2d(8).state_dict().keys())
    leaky = fusedbn.BatchNormAct2d(8, act_layer=nn.LeakyReLU, act_kwargs=dict(negative_slope=0.2))
    assert leaky.activation == "leaky_relu" and leaky.negative_slope == 0.2
    assert fusedbn.BatchNormAct2d(8, act_layer="swish").activation == "silu"
    assert fusedbn.BatchNormAct2d(8, apply_act=False).activation == "identity"
    gelu = fusedbn.BatchNormAct2d(8, act_layer=nn.GELU)  # the exact GELU is fused
    assert gelu.activation == "gelu" and isinstance(gelu.act, nn.GELU)
    tanh_gelu = fusedbn.BatchNormAct2d(8, act_layer=nn.GELU, act_kwargs=dict(approximate="tanh"))
    assert tanh_gelu.activation == "identity"  # not what the kernels compute: run after BN
    elu = fusedbn.BatchNormAct2d(8, act_layer=nn.ELU)  # not fusable: run after BN
    assert elu.activation == "identity" and isinstance(elu.act, nn.ELU)
    dropped = fusedbn.BatchNormAct2d(8, drop_layer=nn.Dropout)  # drop between BN and act: unfused
    assert dropped.activation == "identity" and isinstance(dropped.act, nn.ReLU)

    x = torch.randn(4, 8, 5, 5)
    for module, act in ((bn, F.relu), (leaky, lambda v: F.leaky_relu(v, 0.2)), (gelu, F.gelu),
                        (tanh_gelu, lambda v: F.gelu(v, approximate="tanh")), (elu, F.elu)):
        ref = nn.BatchNorm2d(8)
        ref.load_state_dict(module.state_dict())
        torch.testing.assert_close(module(x), act(ref(x)), rtol=1e-5, atol=1e-5)
    as_norm_layer = nn.Sequential(nn.Conv2d(3, 8, 3), fusedbn.BatchNormAct2d(8, act_layer=nn.SiLU, inplace=False))
    assert as_norm_layer(torch.randn(2, 3, 6, 6)).shape == (2, 8, 4, 4)


@pytest.mark.parametrize("bn_class", [nn.BatchNorm2d, fusedbn.FusedBatchNorm2d])
@pytest.mark.parametrize("conv_bias, groups", [(True, 1), (False, 1), (True, 2)])
def test_fuse_conv_bn_equals_conv_then_bn(bn_class, conv_bias, groups):
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=conv_bias, groups=groups).double()
    bn = bn_class(6).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.normal_(), bn.running_mean.normal_(), bn.running_var.uniform_(0.5, 2)
    bn.eval()
    folded = fusedbn.fuse_conv_bn(conv, bn)
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    torch.testing.assert_close(folded(x), bn(conv(x)), **F64)


def test_fuse_conv_bn_rejects_training_mode_and_activation():
    conv = nn.Conv2d(3, 4, 1)
    with pytest.raises(ValueError, match="eval-mode"):
        fusedbn.fuse_conv_bn(conv, nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match="fused activation"):
        fusedbn.fuse_conv_bn(conv, fusedbn.FusedBatchNorm2d(4, activation="relu").eval())
    with pytest.raises(ValueError, match="out_channels"):
        fusedbn.fuse_conv_bn(conv, nn.BatchNorm2d(5).eval())
