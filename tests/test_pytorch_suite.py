"""PyTorch's own test material for nn.BatchNorm2d, read from the installed torch at run time and run against fusedbn:
every sample of the ModuleInfo of nn.BatchNorm2d (and its error inputs), the 4-D samples of the
nn.functional.batch_norm OpInfo, and the generic module tests of test/test_modules.py that apply to it (factory
kwargs, repr, pickle and weights_only loading, non-contiguous inputs, gradcheck and gradgradcheck, memory formats,
.to() and to_empty(), hooks, meta-device construction)."""

import copy
import io
import pickle

import pytest
import torch
from torch import nn
from torch.autograd import gradcheck, gradgradcheck
from torch.func import functional_call
from torch.testing._internal.common_methods_invocations import op_db
from torch.testing._internal.common_modules import module_db

import fusedbn
from helpers import tolerance

MODULE_INFO = next(info for info in module_db if info.module_cls is nn.BatchNorm2d)
OP_INFO = next(info for info in op_db if info.name == "nn.functional.batch_norm" and not info.variant_test_name)
DTYPES = [torch.float32, torch.float64]


def samples(dtype, training, requires_grad=True):
    return MODULE_INFO.module_inputs_func(MODULE_INFO, device="cpu", dtype=dtype, requires_grad=requires_grad,
                                          training=training)


def sample_ids(dtype=torch.float64):
    return [s.desc or "default" for s in samples(dtype, True)]


def nonempty_samples(dtype, training):
    return [s for s in samples(dtype, training) if s.forward_input.args[0].numel() > 0]


def build_pair(sample, dtype):
    args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
    ref = nn.BatchNorm2d(*args, **kwargs, dtype=dtype)
    fused = fusedbn.FusedBatchNorm2d(*args, **kwargs, dtype=dtype)
    fused.load_state_dict(ref.state_dict())
    return ref, fused


def assert_same_state(ref, fused, tol):
    assert fused.state_dict().keys() == ref.state_dict().keys()
    for name, a in ref.state_dict().items():
        torch.testing.assert_close(fused.state_dict()[name], a, **tol, msg=name)


@pytest.mark.parametrize("index", range(len(sample_ids())), ids=sample_ids())
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_module_info_samples_three_steps(dtype, training, index):
    sample = samples(dtype, training)[index]
    ref, fused = build_pair(sample, dtype)
    ref.train(training), fused.train(training)
    x = sample.forward_input.args[0]
    tol = tolerance(tuple(x.shape), dtype)
    for step in range(3):
        inputs = [(x.detach() * (step + 1) + step).requires_grad_() for _ in range(2)]
        outputs = [m(i) for m, i in zip((ref, fused), inputs)]
        torch.testing.assert_close(outputs[1], outputs[0], **tol)
        grad = torch.randn_like(outputs[0])
        for m, y in zip((ref, fused), outputs):
            m.zero_grad()
            y.backward(grad)
        torch.testing.assert_close(inputs[1].grad, inputs[0].grad, **tol)
        for (name, a), b in zip(ref.named_parameters(), fused.parameters()):
            torch.testing.assert_close(b.grad, a.grad, **tol, msg=name)
        assert_same_state(ref, fused, tol)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_module_info_error_inputs(training):
    errors = MODULE_INFO.module_error_inputs_func(MODULE_INFO, device="cpu", dtype=torch.float32,
                                                  requires_grad=False, training=training)
    assert errors
    for error in errors:
        sample = error.module_error_input
        ref = nn.BatchNorm2d(*sample.constructor_input.args, **sample.constructor_input.kwargs).train(training)
        fused = fusedbn.FusedBatchNorm2d(*sample.constructor_input.args, **sample.constructor_input.kwargs)
        fused.train(training)
        x = sample.forward_input.args[0]
        outcomes = []
        for m in (ref, fused):
            try:
                m(x)
                outcomes.append(None)
            except error.error_type as e:
                assert error.error_regex in str(e) or training is False
                outcomes.append(str(e))
        assert outcomes[1] == outcomes[0]  # the same error, or none where nn raises none


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_op_info_4d_samples_against_functional(dtype):
    found = 0
    for sample in OP_INFO.sample_inputs("cpu", dtype, requires_grad=True):
        if sample.input.dim() != 4:
            continue
        found += 1
        running_mean, running_var, weight, bias = sample.args
        kwargs = dict(sample.kwargs)
        tol = tolerance(tuple(sample.input.shape), dtype)
        results = []
        for fn in (torch.nn.functional.batch_norm, fusedbn.fused_batch_norm):
            x, w, b = (t.detach().clone().requires_grad_() for t in (sample.input, weight, bias))
            rm, rv = running_mean.clone(), running_var.clone()
            y = fn(x, rm, rv, w, b, **kwargs)
            y.backward(torch.ones_like(y))
            results.append((y, rm, rv, x.grad, w.grad, b.grad))
        for a, b in zip(*results):
            torch.testing.assert_close(b, a, **tol)
    assert found >= 2


def test_factory_kwargs_and_meta_device():
    for dtype in DTYPES:
        fused = fusedbn.FusedBatchNorm2d(3, device="meta", dtype=dtype)
        assert all(t.device.type == "meta" for t in fused.state_dict().values())
        assert fused.weight.dtype == fused.running_mean.dtype == dtype
        assert fused.num_batches_tracked.dtype == torch.long
        materialised = fused.to_empty(device="cpu")
        materialised.reset_parameters()
        ref = nn.BatchNorm2d(3, dtype=dtype)
        assert_same_state(ref, materialised, dict(rtol=0, atol=0))


@pytest.mark.parametrize("index", range(len(sample_ids())), ids=sample_ids())
def test_repr_equals_nn(index):
    sample = samples(torch.float32, True)[index]
    ref, fused = build_pair(sample, torch.float32)
    assert repr(fused) == repr(ref).replace("BatchNorm2d", "FusedBatchNorm2d", 1)


def test_pickle_deepcopy_and_weights_only_load():
    sample = samples(torch.float64, True)[0]
    _, fused = build_pair(sample, torch.float64)
    fused(sample.forward_input.args[0])
    for clone in (copy.deepcopy(fused), pickle.loads(pickle.dumps(fused))):
        assert type(clone) is type(fused)
        assert_same_state(fused, clone, dict(rtol=0, atol=0))
    buffer = io.BytesIO()
    torch.save(fused.state_dict(), buffer)
    buffer.seek(0)
    fresh = fusedbn.FusedBatchNorm2d(3, dtype=torch.float64)
    fresh.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    assert_same_state(fused, fresh, dict(rtol=0, atol=0))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_non_contiguous_inputs_and_memory_formats(training):
    for sample in nonempty_samples(torch.float64, training):
        x = sample.forward_input.args[0]
        variants = {"strided": x.detach().repeat(1, 1, 1, 2)[..., ::2],
                    "channels_last": x.detach().contiguous(memory_format=torch.channels_last),
                    "transposed": x.detach().transpose(2, 3).contiguous().transpose(2, 3)}
        for name, v in variants.items():
            ref, fused = build_pair(sample, torch.float64)
            ref.train(training), fused.train(training)
            expected = ref(v)
            got = fused(v)
            torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9, msg=name)
            assert got.is_contiguous(memory_format=torch.channels_last) == \
                expected.is_contiguous(memory_format=torch.channels_last), name


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_grad_and_gradgrad_of_module_inputs(training):
    for sample in nonempty_samples(torch.float64, training):
        x = sample.forward_input.args[0]
        _, fused = build_pair(sample, torch.float64)
        fused.train(training)
        if not fused.track_running_stats or not training:
            params = {k: v.detach().requires_grad_() for k, v in fused.named_parameters()}
            names = list(params)

            def fn(x, *p):  # no running statistics change inside gradcheck's repeated calls
                return functional_call(fused, dict(zip(names, p)), (x,))
            inputs = (x.detach().requires_grad_(), *params.values())
        else:
            def fn(x):
                return copy.deepcopy(fused)(x)
            inputs = (x.detach().requires_grad_(),)
        assert gradcheck(fn, inputs)
        assert gradgradcheck(fn, inputs)


def test_to_changes_dtype_and_keeps_state():
    sample = samples(torch.float32, True)[0]
    ref, fused = build_pair(sample, torch.float32)
    fused(sample.forward_input.args[0])
    ref(sample.forward_input.args[0])
    for module in (ref, fused):
        module.to(torch.float64)
    assert fused.weight.dtype == fused.running_var.dtype == torch.float64
    assert_same_state(ref, fused, dict(rtol=1e-6, atol=1e-6))


def test_hooks_fire_as_for_nn():
    sample = samples(torch.float64, True)[0]
    calls = {}
    for module in build_pair(sample, torch.float64):
        seen = calls.setdefault(type(module).__name__, [])
        module.register_forward_pre_hook(lambda m, i, seen=seen: seen.append("pre"))
        module.register_forward_hook(lambda m, i, o, seen=seen: seen.append("forward"))
        module.register_full_backward_pre_hook(lambda m, g, seen=seen: seen.append("backward_pre"))
        module.register_full_backward_hook(lambda m, gi, go, seen=seen: seen.append("backward"))
        x = sample.forward_input.args[0].detach().requires_grad_()
        module(x).sum().backward()
    assert calls["FusedBatchNorm2d"] == calls["BatchNorm2d"] == ["pre", "forward", "backward_pre", "backward"]
