"""Fused activations and residual add: equal to nn.BatchNorm2d followed by the torch activation."""

import math
import random
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fusedbn
from helpers import TOL, module_pair, random_input

F64 = TOL[torch.float64]
ops = torch.ops.fusedbn
ACTS = {"identity": lambda v: v, "relu": F.relu, "leaky_relu": lambda v: F.leaky_relu(v, 0.2), "silu": F.silu,
        "relu6": F.relu6, "hardswish": F.hardswish, "gelu": F.gelu}


def run(module, x, z, act, grad):
    x = x.detach().clone().requires_grad_()
    z = z.detach().clone().requires_grad_() if z is not None else None
    if isinstance(module, fusedbn.FusedBatchNorm2d):
        y = module(x, residual=z)
    else:
        y = ACTS[act](module(x) + (z if z is not None else 0))
    y.backward(grad)
    return y, x.grad, None if z is None else z.grad


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("act", list(ACTS))
def test_activation_and_residual_match_nn(act, residual, training, memory_format):
    shape = (4, 5, 6, 3)
    ref, fused = module_pair(5, activation=act, negative_slope=0.2)
    for step in range(2):
        ref.train(training), fused.train(training)
        x = random_input(shape, memory_format=memory_format)
        z = random_input(shape, memory_format=memory_format) if residual else None
        g = torch.randn(shape, dtype=torch.float64)
        ref.zero_grad(), fused.zero_grad()
        y_ref, dx_ref, dz_ref = run(ref, x, z, act, g)
        y, dx, dz = run(fused, x, z, act, g)
        torch.testing.assert_close(y, y_ref, **F64)
        torch.testing.assert_close(dx, dx_ref, **F64)
        if residual:
            torch.testing.assert_close(dz, dz_ref, **F64)
        torch.testing.assert_close(fused.weight.grad, ref.weight.grad, **F64)
        torch.testing.assert_close(fused.bias.grad, ref.bias.grad, **F64)
        torch.testing.assert_close(fused.running_var, ref.running_var, **F64)


def call_with_output_just_above(op, shape, dtype, memory_format, gap=64, attempts=200):
    """Runs op(t) on a random tensor t of `shape` placed so that op's output (its first result) lies `gap` bytes
    above t modulo 4 KiB, where the kernels store in blocks of vectors (csrc/batch_norm/cpu/blocked_stores.h).
    The output lands in one of the blocks that earlier outputs were freed from (the allocator hands them out again
    in turn; cycles of up to seven were seen in this test suite): each call guesses one of the last 16 at random.
    Returns (t, the results), or fails if the placement was never reached."""
    n = math.prod(shape)
    element = torch.empty((), dtype=dtype).element_size()
    buffer = torch.empty(n + 4096 // element, dtype=dtype)
    values = random_input(shape, dtype, requires_grad=False)
    outputs = [op(values.contiguous(memory_format=memory_format))[0].data_ptr()]
    chooser = random.Random(0)
    for _ in range(attempts):
        guess = chooser.choice(sorted(set(outputs[-16:])))
        start = (guess - gap - buffer.data_ptr()) % 4096 // element
        flat = buffer[start:start + n]
        if memory_format == torch.channels_last:
            t = flat.view(shape[0], shape[2], shape[3], shape[1]).permute(0, 3, 1, 2)
        else:
            t = flat.view(shape)
        t.copy_(values)
        results = op(t)
        if (results[0].data_ptr() - t.data_ptr()) % 4096 == gap:
            return t, results
        outputs.append(results[0].data_ptr())
        del results
    pytest.fail(f"no output placed {gap} bytes above its input modulo 4 KiB in {attempts} calls")


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("act", ["identity", "relu", "leaky_relu", "relu6", "hardswish"])
def test_outputs_stored_in_blocks_of_vectors_match_nn(act, dtype, memory_format):
    # An output 64 bytes above an input modulo 4 KiB is stored four vectors at a time. Rows of 67 channels
    # (channels_last) and spans of 67 values (NCHW): whole blocks (64 floats or 32 doubles with AVX-512, half that
    # with AVX) and a remainder. Outputs are poisoned with NaN before the kernels write them (conftest.py).
    shape, eps, tol = (3, 67, 1, 67), 1e-5, TOL[dtype]
    weight = torch.rand(67, dtype=dtype) + 0.5
    bias, running_mean = torch.randn(67, dtype=dtype), torch.randn(67, dtype=dtype)
    running_var = torch.rand(67, dtype=dtype) + 0.5
    act_fn = ACTS[act]

    def expected(x, training):
        x64 = x.double().requires_grad_()
        statistics = (None, None) if training else (running_mean.double(), running_var.double())
        y = act_fn(F.batch_norm(x64, *statistics, weight.double(), bias.double(), training=training, eps=eps))
        return x64, y

    for training in (True, False):
        if training:
            def forward(x):
                return ops.forward_train(x, weight, bias, None, None, None, 0.0, eps, act, 0.2, None, None, None, 0.1)
        else:
            def forward(x):
                return ops.normalize(x, weight, bias, None, running_mean, running_var, eps, act, 0.2)
        x, (y, mean, invstd, *_) = call_with_output_just_above(forward, shape, dtype, memory_format)
        x64, y_ref = expected(x, training)
        torch.testing.assert_close(y, y_ref.to(dtype), **tol)

        count = float(shape[0] * shape[2] * shape[3]) if training else None

        def backward(grad):
            return ops.backward(grad, x, None, mean, invstd, weight, bias, count, act, 0.2)
        grad, (dx, *_) = call_with_output_just_above(backward, shape, dtype, memory_format)
        (dx_ref,) = torch.autograd.grad(y_ref, x64, grad.double())
        torch.testing.assert_close(dx, dx_ref.to(dtype), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("act", ["relu", "leaky_relu", "silu", "relu6", "hardswish", "gelu"])
def test_nan_passes_through_the_activation_as_in_torch(act, dtype):
    # A NaN batch is not hidden by the fused activation: nn.BatchNorm2d + act gives NaN for the poisoned channel.
    x = random_input((3, 4, 5, 5), dtype, requires_grad=False)
    x[1, 2, 3, 3] = float("nan")
    x[0, 1, 1, 2] = float("nan")
    ref = nn.BatchNorm2d(4).to(dtype)
    fused = fusedbn.FusedBatchNorm2d(4, activation=act, negative_slope=0.2).to(dtype)
    for train in (False, True):  # eval first: nn's training step writes NaN into its running statistics
        ref.train(train), fused.train(train)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the non-finite guard's warning
            expected, y = ACTS[act](ref(x)), fused(x)
        assert torch.equal(y.isnan(), expected.isnan()), f"training={train}"
        assert y.isnan().any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_relu_residual_low_precision(dtype):
    shape = (3, 6, 5, 5)
    ref, fused = module_pair(6, dtype=torch.float32, activation="relu")
    x, z = random_input(shape, dtype), random_input(shape, dtype)
    g = torch.randn(shape).to(dtype)
    y_ref, dx_ref, dz_ref = run(ref, x, z, "relu", g)
    y, dx, dz = run(fused, x, z, "relu", g)
    tol = TOL[dtype]
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(dz, dz_ref, **tol)
    # dx through ReLU: elements at the kink may round to the other side in low precision; compare the bulk.
    close = torch.isclose(dx.float(), dx_ref.float(), **tol)
    assert close.float().mean() > 0.99


@pytest.mark.parametrize("mode", ["running", "blend"])
def test_activations_with_small_batch_modes(mode):
    ref, fused = module_pair(4, activation="silu", small_batch=mode, min_count=4, prior_count=1e12)
    ref.eval()
    x, z = random_input((1, 4, 1, 1)), random_input((1, 4, 1, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        y = fused(x, residual=z)
    # running mode is exactly eval mode; blend with a huge prior is eval mode in the limit.
    torch.testing.assert_close(y, F.silu(ref(x) + z), rtol=1e-6, atol=1e-6)


def saved_bytes(fn, *args):
    """Bytes of activation-sized tensors autograd saves during fn(*args) (packed by saved_tensors_hooks)."""
    seen = {}

    def pack(t):
        if t.numel() > 1024:  # ignore per-channel vectors
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return sum(seen.values())


def test_fused_bn_relu_saves_only_the_input():
    x = torch.randn(8, 16, 16, 16, requires_grad=True)
    nn_layers = nn.Sequential(nn.BatchNorm2d(16), nn.ReLU())
    fused = fusedbn.FusedBatchNorm2d(16, activation="relu")
    assert saved_bytes(fused, x) == x.numel() * 4
    assert saved_bytes(nn_layers, x) == 2 * x.numel() * 4


def test_fuse_activations_recognises_relu6_hardswish_and_exact_gelu():
    # MobileNetV2 (ReLU6), MobileNetV3 (Hardswish), GELU; the tanh-approximated GELU is not what the kernels compute.
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.bns = nn.ModuleList(nn.BatchNorm2d(3) for _ in range(5))
            self.acts = nn.ModuleList([nn.ReLU6(), nn.Hardswish(), nn.GELU(), nn.GELU(approximate="tanh")])

        def forward(self, x):
            for bn, act in zip(self.bns, self.acts):
                x = act(bn(x))
            return F.gelu(self.bns[4](x))

    model = Net().double()
    x = random_input((4, 3, 5, 5), requires_grad=False)
    expected = model(x)
    fused = fusedbn.fuse_activations(fusedbn.convert_model(model))
    activations = [fused.get_submodule(f"bns.{i}").activation for i in range(5)]
    assert activations == ["relu6", "hardswish", "gelu", "identity", "gelu"]
    torch.testing.assert_close(fused(x), expected, **F64)
