"""Real model libraries: optional test extras, torchvision and timm. Each test skips with the reason where its library
cannot be imported; `make test` runs them beside torch 2.14.1. Random weights, float64: a converted model gives the
unconverted model's outputs, gradients and running statistics over two SGD steps, keeps its state_dict, and loads
strictly both ways; the libraries' own batch-norm tools treat fusedbn's layers as they treat nn's."""

import copy
import importlib

import pytest
import torch
from torch import nn

import fusedbn

def assert_close(actual, expected, msg=None):
    """float64 to 1e-8 of the tensor's scale. fusedbn sums in another order than nn (last-bit differences per layer),
    and a deep random network over several steps amplifies them: one gradient element of 221 184 in EfficientNet-B0
    after four steps differed by 2.0e-9 relative."""
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=1e-8, atol=1e-8 * scale,
                               msg=(lambda m: f"{msg}: {m}") if msg else None)


def library(name):
    try:
        return importlib.import_module(name)
    except Exception as e:  # noqa: BLE001  (torchvision beside a CPU-only torch raises RuntimeError, not ImportError)
        pytest.skip(f"{name} cannot be imported here ({type(e).__name__}: {e})")


def randomise_statistics(model):
    torch.manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5), m.bias.normal_(0, 0.2)
                m.running_mean.normal_(0, 0.2), m.running_var.uniform_(0.5, 2)
    return model


def sgd_steps(model, x, steps=2):
    """(outputs, parameter gradients) of `steps` SGD steps in training mode, then the eval output. The random stream
    is reset first, so that dropout and stochastic depth draw the same masks in both models."""
    torch.manual_seed(2)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    model.train()
    outputs, grads = [], []
    for step in range(steps):
        opt.zero_grad()
        y = model(x)
        target = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y) * (step + 1)
        (y * target).mean().backward()
        outputs.append(y.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        opt.step()
    model.eval()
    with torch.no_grad():
        outputs.append(model(x))
    return outputs, grads


def assert_same_training(original, converted, x):
    assert list(converted.state_dict()) == list(original.state_dict())
    y_ref, g_ref = sgd_steps(original, x)
    y, g = sgd_steps(converted, x)
    for a, b in zip(y, y_ref):
        assert_close(a, b)
    for step, step_ref in zip(g, g_ref):
        assert step.keys() == step_ref.keys()
        for name in step_ref:
            assert_close(step[name], step_ref[name], msg=name)
    for (name, a), b in zip(original.state_dict().items(), converted.state_dict().values()):
        assert_close(b, a, msg=name)
    type(original).load_state_dict(copy.deepcopy(original), converted.state_dict(), strict=True)
    converted.load_state_dict(original.state_dict(), strict=True)


def count(model, cls):
    return sum(isinstance(m, cls) for m in model.modules())


# ---- torchvision ------------------------------------------------------------------------------------------

TORCHVISION_MODELS = ["resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0"]


@pytest.mark.parametrize("name", TORCHVISION_MODELS)
def test_torchvision_model_converted_trains_as_the_original(name):
    models = library("torchvision.models")
    torch.manual_seed(0)
    original = randomise_statistics(getattr(models, name)(num_classes=10).double())
    converted = fusedbn.convert_model(copy.deepcopy(original))
    assert count(converted, nn.BatchNorm2d) == count(converted, fusedbn.FusedBatchNorm2d) > 0
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    assert_same_training(original, converted, x)


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "mobilenet_v2"])
def test_torchvision_model_with_conv_bn_blocks_trains_as_the_original(name):
    models = library("torchvision.models")
    torch.manual_seed(0)
    original = randomise_statistics(getattr(models, name)(num_classes=10).double())
    converted = fusedbn.fuse_conv_bn_blocks(copy.deepcopy(original))
    assert count(converted, fusedbn.FusedConvBatchNorm2d) == count(original, nn.BatchNorm2d)
    assert_same_training(original, converted, torch.randn(2, 3, 64, 64, dtype=torch.float64))


def test_torchvision_norm_layer_and_conv_norm_activation():
    models = library("torchvision.models")
    ops = library("torchvision.ops")
    torch.manual_seed(0)
    original = randomise_statistics(models.resnet18(num_classes=10).double())
    built = models.resnet18(num_classes=10, norm_layer=fusedbn.FusedBatchNorm2d).double()
    built.load_state_dict(original.state_dict(), strict=True)
    assert count(built, fusedbn.FusedBatchNorm2d) == count(original, nn.BatchNorm2d)
    assert_same_training(original, built, torch.randn(2, 3, 64, 64, dtype=torch.float64))

    block = ops.Conv2dNormActivation(3, 8, norm_layer=fusedbn.FusedBatchNorm2d).double()
    reference = ops.Conv2dNormActivation(3, 8).double()
    reference.load_state_dict(block.state_dict(), strict=True)
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    assert_close(block(x), reference(x))


def test_torchvision_frozen_batch_norm_equals_fusedbn_in_eval():
    ops = library("torchvision.ops")
    bn = randomise_statistics(nn.Sequential(fusedbn.FusedBatchNorm2d(6))).double()[0].eval()
    frozen = ops.FrozenBatchNorm2d(6, eps=bn.eps).double()
    frozen.load_state_dict(bn.state_dict())
    x = torch.randn(3, 6, 5, 5, dtype=torch.float64) * 2 + 1
    assert_close(bn(x), frozen(x))


# ---- timm -------------------------------------------------------------------------------------------------

TIMM_MODELS = ["resnet18", "efficientnet_b0", "mobilenetv3_small_100", "regnetx_002"]


def timm_pair(name):
    timm = library("timm")
    torch.manual_seed(0)
    original = randomise_statistics(timm.create_model(name, pretrained=False, num_classes=10).double())
    converted = fusedbn.convert_model(copy.deepcopy(original))
    return timm, original, converted


@pytest.mark.parametrize("name", TIMM_MODELS)
def test_timm_model_converted_trains_as_the_original(name):
    timm, original, converted = timm_pair(name)
    norm_act = timm.layers.BatchNormAct2d
    # Every batch norm is fusedbn's, and timm's BatchNormAct2d layers stay BatchNormAct2d to timm.
    assert count(converted, nn.BatchNorm2d) == count(converted, fusedbn.FusedBatchNorm2d) > 0
    assert count(converted, norm_act) == count(original, norm_act)
    assert_same_training(original, converted, torch.randn(2, 3, 64, 64, dtype=torch.float64))


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0"])
def test_timm_model_with_conv_bn_blocks_trains_as_the_original(name):
    timm, original, _ = timm_pair(name)
    converted = fusedbn.fuse_conv_bn_blocks(copy.deepcopy(original))
    assert count(converted, fusedbn.FusedConvBatchNorm2d) > 0.8 * count(original, nn.BatchNorm2d)
    assert_same_training(original, converted, torch.randn(2, 3, 64, 64, dtype=torch.float64))


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0"])
def test_timm_tools_on_converted_models(name):
    timm, original, converted = timm_pair(name)
    optim, utils = library("timm.optim"), library("timm.utils")
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    # freeze_batch_norm_2d: fusedbn layers are frozen as nn's are (norm-act layers keep their activation).
    frozen, frozen_ref = (timm.layers.freeze_batch_norm_2d(copy.deepcopy(m)) for m in (converted, original))
    assert count(frozen, fusedbn.FusedBatchNorm2d) == 0
    assert [type(m) for m in frozen.modules()] == [type(m) for m in frozen_ref.modules()]
    assert_close(frozen.train()(x), frozen_ref.train()(x))
    # convert_sync_batchnorm: the same layer types as for the original.
    synced, synced_ref = (timm.layers.convert_sync_batchnorm(copy.deepcopy(m)) for m in (converted, original))
    assert [type(m) for m in synced.modules()] == [type(m) for m in synced_ref.modules()]
    # create_optimizer_v2: the same no-weight-decay set.
    groups, groups_ref = (optim.create_optimizer_v2(m, "sgd", lr=0.1, weight_decay=1e-4).param_groups
                          for m in (converted, original))
    assert [(g["weight_decay"], [p.shape for p in g["params"]]) for g in groups] == \
        [(g["weight_decay"], [p.shape for p in g["params"]]) for g in groups_ref]
    # ModelEmaV3 after two steps, and gradient checkpointing (which runs each stage's forward twice).
    emas = []
    for model in (converted, original):
        ema = utils.ModelEmaV3(model, decay=0.5)
        sgd_steps(model, x)
        ema.update(model)
        emas.append(ema.module.state_dict())
    for (k, a), b in zip(emas[1].items(), emas[0].values()):
        assert_close(b, a, msg=k)
    for model in (converted, original):
        model.set_grad_checkpointing(True)
    assert_same_training(original, converted, x)


def test_unknown_batch_norm_subclasses_are_left_alone_with_a_warning():
    class ScaledBatchNorm(nn.BatchNorm2d):
        def forward(self, x):
            return 2 * super().forward(x)

    model = nn.Sequential(nn.Conv2d(3, 4, 1), ScaledBatchNorm(4), nn.BatchNorm2d(4))
    with pytest.warns(UserWarning, match="ScaledBatchNorm subclasses nn.BatchNorm2d .* left unchanged"):
        converted = fusedbn.convert_model(model)
    assert type(converted[1]) is ScaledBatchNorm and type(converted[2]) is fusedbn.FusedBatchNorm2d
