"""FusedBatchNorm2d as a drop-in module: state_dict, checkpoints, resets, empty batches, bad arguments."""

import copy
import math

import pytest
import torch
from torch import nn

import fusedbn
from helpers import TOL, assert_modules_match, module_pair, random_input, step_both


def test_state_dict_keys_and_version_match_nn():
    ref, fused = nn.BatchNorm2d(4), fusedbn.FusedBatchNorm2d(4)
    assert list(fused.state_dict().keys()) == list(ref.state_dict().keys())
    assert fused.state_dict()._metadata[""]["version"] == ref.state_dict()._metadata[""]["version"] == 2
    assert fusedbn.FusedBatchNorm2d(4, track_running_stats=False).state_dict().keys() == {"weight", "bias"}
    assert fusedbn.FusedBatchNorm2d(4, affine=False).weight is None


def test_load_state_dict_strict_both_ways():
    ref, fused = module_pair(3)
    step_both(ref, fused, random_input((4, 3, 3, 3)), torch.randn(4, 3, 3, 3, dtype=torch.float64))
    back = nn.BatchNorm2d(3).double()
    back.load_state_dict(fused.state_dict(), strict=True)
    fresh = fusedbn.FusedBatchNorm2d(3).double()
    fresh.load_state_dict(ref.state_dict(), strict=True)
    for a, b in zip(fused.state_dict().values(), back.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(ref.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)


def test_old_checkpoint_without_num_batches_tracked():
    ref = nn.BatchNorm2d(3)
    state = ref.state_dict()
    del state["num_batches_tracked"]
    state._metadata[""]["version"] = 1
    fused = fusedbn.FusedBatchNorm2d(3)
    fused.load_state_dict(state, strict=True)
    assert fused.num_batches_tracked.item() == 0


def test_reset_parameters_and_running_stats():
    fused = fusedbn.FusedBatchNorm2d(3)
    fused(random_input((4, 3, 2, 2), torch.float32))
    with torch.no_grad():
        fused.weight.fill_(3)
    fused.reset_parameters()
    assert torch.equal(fused.weight, torch.ones(3)) and torch.equal(fused.bias, torch.zeros(3))
    assert torch.equal(fused.running_mean, torch.zeros(3)) and torch.equal(fused.running_var, torch.ones(3))
    assert fused.num_batches_tracked.item() == 0


def test_device_and_dtype_arguments():
    fused = fusedbn.FusedBatchNorm2d(3, device="cpu", dtype=torch.float64)
    assert fused.weight.dtype == fused.running_mean.dtype == torch.float64
    assert isinstance(fused, nn.modules.batchnorm._BatchNorm)
    assert "activation" not in repr(fused) and "FusedBatchNorm2d(3" in repr(fused)


def test_deepcopy_and_pickle_roundtrip(tmp_path):
    fused = fusedbn.FusedBatchNorm2d(3, activation="relu", small_batch="blend")
    copy.deepcopy(fused)
    torch.save(fused, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    assert loaded.activation == "relu" and loaded.small_batch == "blend"


class _Doubled(nn.Module):
    def forward(self, w):
        return 2 * w


@pytest.mark.parametrize("training", [True, False])
def test_parametrized_weight_is_used(training):
    # The module reads its parameters from nn.Module's dicts on the fast path; a parametrization moves the weight
    # out of them (into module.parametrizations) and must still be honoured, with its gradient.
    ref, fused = module_pair(3)
    for m in (ref, fused):
        nn.utils.parametrize.register_parametrization(m, "weight", _Doubled())
        m.train(training)
    step_both(ref, fused, random_input((4, 3, 5, 5)), torch.randn(4, 3, 5, 5, dtype=torch.float64),
              **TOL[torch.float64])
    assert fused.parametrizations.weight.original.grad is not None


@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 3, 0, 4)], ids=str)
@pytest.mark.parametrize("training", [True, False])
def test_empty_batch_behaves_as_nn(shape, training):
    ref, fused = module_pair(3)
    ref.train(training), fused.train(training)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    y_ref, y_fused = ref(x), fused(x)
    assert y_fused.shape == y_ref.shape
    y_fused.sum().backward()
    y_ref.sum().backward()
    for a, b in zip(ref.state_dict().values(), fused.state_dict().values()):
        assert torch.equal(a, b)
    torch.testing.assert_close(fused.weight.grad, ref.weight.grad)


# ---- bad arguments: clear errors, raised before any buffer is touched -------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    (dict(eps=math.inf), "eps must be a finite number"),
    (dict(eps=math.nan), "eps must be a finite number"),
    (dict(eps="1e-5"), "eps must be a finite number"),
    (dict(momentum=math.nan), "momentum must be a finite number or None"),
    (dict(momentum=-math.inf), "momentum must be a finite number or None"),
    (dict(activation="tanh"), "activation must be one of 'identity', 'relu', 'leaky_relu', 'silu', 'relu6', "
                              "'hardswish', 'gelu'"),
    (dict(small_batch="ignore"), "small_batch must be one of 'running', 'blend', 'error'"),
    (dict(min_count=0), "min_count must be an integer >= 1"),
    (dict(min_count=2.5), "min_count must be an integer >= 1"),
    (dict(prior_count=-1.0), "prior_count must be a finite number >= 0"),
    (dict(prior_count=math.inf), "prior_count must be a finite number >= 0"),
    (dict(negative_slope=math.nan), "negative_slope must be a finite number"),
], ids=lambda v: str(v) if isinstance(v, dict) else "")
def test_module_rejects_bad_options_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fusedbn.FusedBatchNorm2d(3, **kwargs)


@pytest.mark.parametrize("eps, momentum", [(0.0, -1.0), (-1e-3, 2.0), (1e-3, None)])
def test_eps_and_momentum_take_nn_ranges(eps, momentum):
    # nn accepts any eps at construction and raises when a batch is normalised: eps > 0 in training, eps >= 0 in
    # eval, with the same messages; momentum may be any number, (1 − m)·running + m·batch.
    x = random_input((4, 3, 2, 2))
    for training in (True, False):
        ref, fused = module_pair(3, eps=eps, momentum=momentum)
        ref.train(training), fused.train(training)
        try:
            expected = ref(x)
        except ValueError as e:
            before = {k: v.clone() for k, v in fused.state_dict().items()}
            with pytest.raises(ValueError, match=str(e)):
                fused(x)
            for k, v in fused.state_dict().items():
                assert torch.equal(v, before[k]), k
            continue
        torch.testing.assert_close(fused(x), expected, **TOL[torch.float64])
        assert_modules_match(ref, fused, **TOL[torch.float64])


def test_module_rejects_bad_num_features():
    with pytest.raises(ValueError, match="num_features must be a positive integer"):
        fusedbn.FusedBatchNorm2d(0)


@pytest.mark.parametrize("make_input, error, match", [
    (lambda: torch.randn(4, 3, 5), ValueError, r"expected 4D input \(got 3D input\)"),
    (lambda: torch.randn(2, 4, 3, 5, 5), ValueError, r"expected 4D input \(got 5D input\)"),
    (lambda: torch.randn(4, 5, 2, 2), ValueError, r"expected input with 3 channels \(num_features\), got 5"),
    (lambda: torch.ones(4, 3, 2, 2, dtype=torch.int64), TypeError, "input must be float64, float32"),
    (lambda: torch.ones(4, 3, 2, 2, dtype=torch.bool), TypeError, "input must be float64, float32"),
    (lambda: torch.ones(4, 3, 2, 2, dtype=torch.complex64), TypeError, "input must be float64, float32"),
    (lambda: torch.randn(4, 3, 2, 2, dtype=torch.float64), TypeError, "running_mean must have dtype torch.float64"),
], ids=["3d", "5d", "channels", "int64", "bool", "complex", "float64_vs_float32_params"])
def test_bad_input_leaves_buffers_untouched(make_input, error, match):
    fused = fusedbn.FusedBatchNorm2d(3)
    fused(random_input((4, 3, 2, 2), torch.float32))
    before = {k: v.clone() for k, v in fused.state_dict().items()}
    with pytest.raises(error, match=match):
        fused(make_input())
    for k, v in fused.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("change, error, match", [
    (dict(running_mean=torch.zeros(4)), ValueError, r"running_mean must have shape \(3,\)"),
    (dict(running_var=torch.ones(3, dtype=torch.float64)), TypeError, "running_var must have dtype torch.float32"),
    (dict(running_var=None), ValueError, "running_mean and running_var must both be tensors or both be None"),
    (dict(weight=torch.ones(3, 1)), ValueError, r"weight must have shape \(3,\)"),
    (dict(bias=torch.zeros(2)), ValueError, r"bias must have shape \(3,\)"),
    (dict(running_mean=torch.zeros(3, requires_grad=True)), ValueError, "running_mean must not require grad"),
    (dict(momentum=math.nan), ValueError, "momentum must be a finite number"),
    (dict(momentum=None), ValueError, "momentum must be a finite number, got None"),
    (dict(eps=0.0), ValueError, "batch_norm eps must be positive"),
    (dict(eps=-1e-5, training=False), ValueError, "batch_norm eps must be"),
    (dict(activation="tanh"), ValueError, "activation must be one of"),
    (dict(small_batch="skip"), ValueError, "small_batch must be one of"),
    (dict(min_count=0), ValueError, "min_count must be an integer >= 1"),
    (dict(prior_count=-2.0), ValueError, "prior_count must be a finite number >= 0"),
    (dict(residual=torch.zeros(4, 3, 2, 3)), ValueError, "residual must match the input's shape"),
    (dict(residual=torch.zeros(4, 3, 2, 2, dtype=torch.float64)), ValueError, "residual must match"),
    (dict(residual="x"), RuntimeError, "for argument 'residual'"),
], ids=lambda v: "-".join(v) if isinstance(v, dict) else "")
def test_functional_rejects_bad_arguments_before_touching_buffers(change, error, match):
    args = dict(running_mean=torch.zeros(3), running_var=torch.ones(3), weight=torch.ones(3), bias=torch.zeros(3),
                training=True, momentum=0.1, eps=1e-5)
    args.update(change)
    kept = {k: v.clone() for k, v in args.items() if isinstance(v, torch.Tensor)}
    with pytest.raises(error, match=match):
        fusedbn.fused_batch_norm(torch.randn(4, 3, 2, 2), **args)
    for k, v in kept.items():
        assert torch.equal(args[k], v), k


@pytest.mark.parametrize("change, error, match", [
    (dict(weight=torch.ones(4)), ValueError, r"weight must have shape \(3,\)"),
    (dict(running_var=torch.ones(3, dtype=torch.float64)), TypeError, "running_var must have dtype torch.float32"),
    (dict(residual=torch.zeros(0, 3, 2, 3)), ValueError, "residual must match the input's shape"),
    (dict(eps=0.0), ValueError, "batch_norm eps must be positive"),
], ids=lambda v: "-".join(v) if isinstance(v, dict) else "")
def test_empty_batch_checks_its_arguments_like_any_batch(change, error, match):
    # No op normalises an empty batch (nn's empty-batch behaviour is rebuilt in Python), so the ops' checks run alone
    # (fusedbn::check_batch_norm): the same errors, and num_batches_tracked is not counted.
    args = dict(running_mean=torch.zeros(3), running_var=torch.ones(3), weight=torch.ones(3), bias=torch.zeros(3),
                training=True, momentum=0.1, eps=1e-5)
    args.update(change)
    with pytest.raises(error, match=match):
        fusedbn.fused_batch_norm(torch.randn(0, 3, 2, 2), **args)
    module = fusedbn.FusedBatchNorm2d(3)
    if "weight" in change:
        module.weight = nn.Parameter(change["weight"])
        with pytest.raises(error, match=match):
            module(torch.randn(0, 3, 2, 2))
        assert module.num_batches_tracked.item() == 0


def test_bias_false_is_carried_through_every_conversion():
    # nn.BatchNorm2d(..., bias=False): a weight and no bias, no "bias" key in the state_dict.
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, bias=False), nn.ReLU()).double()
    keys = list(model.state_dict())
    x = random_input((2, 3, 4, 4), requires_grad=False)
    expected = model(x)
    converted = fusedbn.convert_model(model)
    assert converted[1].bias is None and list(converted.state_dict()) == keys
    fused = fusedbn.fuse_activations(converted)
    assert fused.get_submodule("1").activation == "relu" and list(fused.state_dict()) == keys
    torch.testing.assert_close(fused(x), expected, **TOL[torch.float64])
    synced = fusedbn.SyncFusedBatchNorm2d.convert_sync_batchnorm(nn.BatchNorm2d(4, bias=False))
    assert isinstance(synced, fusedbn.SyncFusedBatchNorm2d) and synced.bias is None
    assert fusedbn.BatchNormAct2d(4, bias=False).bias is None
