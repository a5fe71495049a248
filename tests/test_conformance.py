"""FusedBatchNorm2d against nn.BatchNorm2d: outputs, gradients, running buffers, over shapes and options."""

import random

import pytest
import torch

from fusedbn import fused_batch_norm
from helpers import TOL, module_pair, random_input, step_both, tolerance

FORMATS = [torch.contiguous_format, torch.channels_last]

# Odd and degenerate shapes: N = 1 with H·W > 1, C = 1, H = W = 1 with N > 1, sizes around the kernels'
# work-item boundaries (4096 values per planar item, 65536 per channels_last item: (4, 40, 24, 24) has two).
SHAPES = [(4, 3, 5, 7), (1, 5, 3, 3), (1, 1, 2, 1), (7, 2, 1, 1), (2, 1, 9, 9), (3, 17, 1, 2),
          (2, 3, 64, 65), (1, 2, 91, 91), (5, 33, 11, 3), (64, 300, 1, 1), (4, 40, 24, 24)]


def random_shapes(count, seed):
    rng = random.Random(seed)
    shapes = []
    while len(shapes) < count:
        s = (rng.randint(1, 6), rng.randint(1, 12), rng.randint(1, 10), rng.randint(1, 10))
        if s[0] * s[2] * s[3] > 1:
            shapes.append(s)
    return shapes


@pytest.mark.parametrize("memory_format", FORMATS, ids=["nchw", "channels_last"])
@pytest.mark.parametrize("shape", SHAPES + random_shapes(12, seed=1), ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_training_steps_then_eval(shape, dtype, memory_format):
    ref, fused = module_pair(shape[1], dtype)
    tol = tolerance(shape, dtype)
    for _ in range(3):
        x = random_input(shape, dtype, memory_format)
        step_both(ref, fused, x, torch.randn(shape, dtype=dtype), **tol)
    ref.eval(), fused.eval()
    x = random_input(shape, dtype, memory_format)
    y = step_both(ref, fused, x, torch.randn(shape, dtype=dtype), **tol)
    assert y.is_contiguous(memory_format=memory_format)


@pytest.mark.parametrize(
    "options",
    [dict(momentum=None), dict(momentum=0.0), dict(momentum=1.0), dict(momentum=0.3, eps=1e-3),
     dict(affine=False), dict(track_running_stats=False), dict(affine=False, track_running_stats=False)],
    ids=str)
@pytest.mark.parametrize("memory_format", FORMATS, ids=["nchw", "channels_last"])
def test_options(options, memory_format):
    shape = (3, 4, 6, 5)
    ref, fused = module_pair(shape[1], **options)
    for _ in range(4):
        step_both(ref, fused, random_input(shape, memory_format=memory_format), torch.randn(shape,
                  dtype=torch.float64), **TOL[torch.float64])
    ref.eval(), fused.eval()
    step_both(ref, fused, random_input(shape, memory_format=memory_format), torch.randn(shape, dtype=torch.float64),
              **TOL[torch.float64])


def test_tracking_switched_off_after_construction():
    ref, fused = module_pair(3)
    step_both(ref, fused, random_input((4, 3, 2, 2)), torch.randn(4, 3, 2, 2, dtype=torch.float64))
    ref.track_running_stats = fused.track_running_stats = False
    step_both(ref, fused, random_input((4, 3, 2, 2)), torch.randn(4, 3, 2, 2, dtype=torch.float64))
    ref.eval(), fused.eval()  # eval still uses the buffers, which exist
    step_both(ref, fused, random_input((4, 3, 2, 2)), torch.randn(4, 3, 2, 2, dtype=torch.float64))


def test_sum_gradient_with_stride_zero():
    # y.sum().backward() hands the backward an expanded (stride-0) gradient.
    ref, fused = module_pair(5)
    x = random_input((3, 5, 4, 4))
    xr, xf = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    (ref(xr) * torch.arange(5.0, dtype=torch.float64).view(1, 5, 1, 1)).sum().backward()
    (fused(xf) * torch.arange(5.0, dtype=torch.float64).view(1, 5, 1, 1)).sum().backward()
    torch.testing.assert_close(xf.grad, xr.grad, **TOL[torch.float64])
    yr, yf = ref(xr), fused(xf)
    yr.sum().backward(), yf.sum().backward()
    torch.testing.assert_close(fused.bias.grad, ref.bias.grad, **TOL[torch.float64])


@pytest.mark.parametrize("view", ["sliced_batch", "sliced_width", "transposed_hw", "sliced_channels_last"])
def test_non_contiguous_inputs(view):
    base = random_input((6, 3, 8, 10), requires_grad=False)
    x = {"sliced_batch": lambda: base[::2],
         "sliced_width": lambda: base[..., 1:7],
         "transposed_hw": lambda: base.transpose(2, 3),
         "sliced_channels_last": lambda: base.contiguous(memory_format=torch.channels_last)[:, :, ::2]}[view]()
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    ref, fused = module_pair(3)
    step_both(ref, fused, x, torch.randn(x.shape, dtype=torch.float64), **TOL[torch.float64])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("memory_format", FORMATS, ids=["nchw", "channels_last"])
# (3, 5, 70, 61): spans of 4270 values, split into two pieces each, and a 16-bit conversion buffer (512 values)
# filled across rows and channels.
@pytest.mark.parametrize("shape", [(4, 6, 7, 9), (3, 5, 70, 61)], ids=str)
def test_half_precision_input_with_float32_parameters(dtype, memory_format, shape):
    # nn's mixed-precision path: low-precision input, float32 parameters and running statistics.
    ref, fused = module_pair(shape[1], dtype=torch.float32)
    for _ in range(2):
        x = random_input(shape, dtype, memory_format)
        y = step_both(ref, fused, x, torch.randn(shape).to(dtype), **TOL[dtype])
        assert y.dtype == dtype and fused.running_mean.dtype == torch.float32
        assert fused.weight.grad.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_module(dtype):
    # The whole module converted with .to(dtype), as model.half() does.
    ref, fused = module_pair(4, dtype=dtype)
    step_both(ref, fused, random_input((3, 4, 5, 5), dtype), torch.randn(3, 4, 5, 5).to(dtype), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("memory_format", FORMATS, ids=["nchw", "channels_last"])
def test_half_precision_rounding_matches_torch(dtype, memory_format):
    # The kernels convert float32 to float16/bfloat16 with their own vectorisable code. With mean 0 and
    # var + eps = 1 exactly, the output is x·weight in float32, rounded: it must be bitwise torch's rounding,
    # including ties, subnormals, overflow to Inf, Inf and NaN.
    info = torch.finfo(dtype)
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), info.max, -info.max, info.tiny,
                            info.tiny / 4, -info.tiny / 3, info.eps, 1.0, -1.0])
    x = torch.cat([special, torch.randn(5000) * torch.logspace(-9, 4, 5000)]).to(dtype)
    x = x[: x.numel() // 13 * 13].reshape(1, 13, -1, 1)
    weight = torch.randn(13) * torch.logspace(-2, 3, 13)  # scales float16 values into overflow and subnormals
    # Exact ties, which random products almost never are: ±2^k·(1 + eps/2) lies halfway between two 16-bit
    # values and rounds down to the even one, ±2^k·(1 + 1.5·eps) rounds up. Channel 0 (the special values) gets
    # the first weight too: max·(1 + eps/2) is finite in float32 and rounds to Inf, and tiny/4 stays subnormal.
    powers = torch.tensor([2.0 ** k for k in range(-12, 12)])
    x[0, 1:3, :48, 0] = torch.cat([powers, -powers]).to(dtype)
    weight[:3] = torch.tensor([1 + info.eps / 2, 1 + info.eps / 2, 1 + 1.5 * info.eps])
    x = x.contiguous(memory_format=memory_format)
    eps = 2.0 ** -10
    y = fused_batch_norm(x, torch.zeros(13), torch.full((13,), 1 - eps), weight, None, training=False, eps=eps)
    expected = (x.float() * weight.view(1, -1, 1, 1) + 0.0).to(dtype)  # + bias 0 as the kernel adds it
    assert torch.equal(y.view(torch.int16)[~y.isnan()], expected.view(torch.int16)[~expected.isnan()])
    assert torch.equal(y.isnan(), expected.isnan())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("memory_format", FORMATS, ids=["nchw", "channels_last"])
@pytest.mark.parametrize("channels", [5, 21])
@pytest.mark.parametrize("hw", [(1, 1), (2, 2), (3, 5), (4, 4), (1, 17), (7, 7)], ids=str)
@pytest.mark.parametrize("activation", ["relu", "leaky_relu"])
@pytest.mark.parametrize("residual", [False, True], ids=["", "residual"])
def test_half_precision_output_for_every_span_length(dtype, memory_format, channels, hw, activation, residual):
    # 16-bit outputs are converted 16 values at a time with a scalar tail (bfloat16: computed in AVX2 registers),
    # or, for spans (channels_last: rows of `channels` values) shorter than 16, through a buffer shared by several
    # spans. Every path must give torch's rounding of the float result: with mean 0, var + eps = 1 and no bias that
    # is act(x·weight [+ z]), rounded once.
    x = random_input((7, channels) + hw, dtype, memory_format, requires_grad=False)
    z = random_input(x.shape, dtype, memory_format, requires_grad=False) if residual else None
    weight = torch.randn(channels) * 3
    eps = 2.0 ** -10
    y = fused_batch_norm(x, torch.zeros(channels), torch.full((channels,), 1 - eps), weight, None, training=False,
                         eps=eps, activation=activation, negative_slope=0.1, residual=z)
    pre = x.float() * weight.view(1, -1, 1, 1) + (z.float() if residual else 0.0)
    expected = torch.where(pre < 0, pre * torch.tensor(0.1) if activation == "leaky_relu" else 0.0, pre).to(dtype)
    assert torch.equal(y.view(torch.int16), expected.view(torch.int16))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("memory_format", FORMATS, ids=["nchw", "channels_last"])
@pytest.mark.parametrize("channels", [5, 21])
@pytest.mark.parametrize("hw", [(1, 1), (2, 2), (3, 5), (1, 17), (7, 7), (2, 300), (163, 191)], ids=str)
def test_half_precision_input_gradient_for_every_span_length(dtype, memory_format, channels, hw):
    # The backward writes 16-bit dx from several loops (spans, runs of short spans, channels_last rows, the
    # channel-at-a-time pass: NCHW, 21 channels of 163 x 191, x and dy 18 MB), each with its vector body and scalar
    # tail. With constant statistics (eval), mean 0, var + eps = 1 and no bias, dx = dy·[x·weight > 0]·weight, rounded
    # once; -0 and +0 compare equal.
    x = random_input((7, channels) + hw, dtype, memory_format)
    dy = torch.randn(x.shape).to(dtype).contiguous(memory_format=memory_format)
    weight = torch.randn(channels) * 3
    eps = 2.0 ** -10
    y = fused_batch_norm(x, torch.zeros(channels), torch.full((channels,), 1 - eps), weight, None, training=False,
                         eps=eps, activation="relu")
    (dx,) = torch.autograd.grad(y, x, dy)
    w = weight.view(1, -1, 1, 1)
    expected = (dy.float() * (x.float() * w > 0) * w).to(dtype)
    assert torch.equal(dx.float(), expected.float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_large_count_single_channel(dtype):
    # One channel with 2^21 values: many work items merged per channel.
    shape = (2, 1, 1024, 1024)
    ref, fused = module_pair(1, dtype)
    step_both(ref, fused, random_input(shape, dtype, requires_grad=False), torch.randn(shape, dtype=dtype),
              **TOL[dtype])


def test_functional_matches_f_batch_norm():
    x = random_input((4, 3, 5, 5), requires_grad=False)
    for training in (True, False):
        rm, rv = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
        rm2, rv2 = rm.clone(), rv.clone()
        w, b = torch.rand(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
        import fusedbn
        y = fusedbn.fused_batch_norm(x, rm, rv, w, b, training, 0.2, 1e-4)
        y_ref = torch.nn.functional.batch_norm(x, rm2, rv2, w, b, training, 0.2, 1e-4)
        torch.testing.assert_close(y, y_ref, **TOL[torch.float64])
        torch.testing.assert_close(rm, rm2, **TOL[torch.float64])
        torch.testing.assert_close(rv, rv2, **TOL[torch.float64])
    # Batch statistics without running buffers, in eval too.
    y = fusedbn.fused_batch_norm(x, None, None, training=False)
    torch.testing.assert_close(y, torch.nn.functional.batch_norm(x, None, None, training=True),
                               **TOL[torch.float64])
