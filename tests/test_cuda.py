"""CUDA backend: the same semantics as the CPU backend and nn.BatchNorm2d on CUDA. Skipped without a GPU."""

import copy
import warnings
from operator import attrgetter

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fusedbn
from conftest import CUDA
from helpers import TOL, module_pair, random_input, step_both, tolerance

pytestmark = [
    pytest.mark.skipif(not CUDA, reason="no CUDA GPU on this machine"),
    pytest.mark.skipif(CUDA and not fusedbn.cuda_available(), reason="fusedbn was built without CUDA kernels"),
]

FORMATS = [torch.contiguous_format, torch.channels_last]
# C not a power of two (apex issue 1768), H·W large, N = 1, H = W = 1, odd sizes.
SHAPES = [(4, 3, 5, 7), (1, 5, 3, 3), (7, 2, 1, 1), (2, 1, 257, 255), (16, 33, 7, 7), (3, 100, 1, 1),
          (1, 64, 112, 112), (256, 17, 2, 2)]


def cuda_pair(c, dtype=torch.float32, **kwargs):
    ref, fused = module_pair(c, dtype=dtype, **kwargs)
    return ref.cuda(), fused.cuda()


@pytest.mark.parametrize("memory_format", FORMATS, ids=["nchw", "cl"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_against_nn_on_cuda(shape, dtype, memory_format):
    ref, fused = cuda_pair(shape[1], dtype)
    tol = tolerance(shape, dtype)
    for _ in range(2):
        x = random_input(shape, dtype, memory_format, device="cuda")
        step_both(ref, fused, x, torch.randn(shape, dtype=dtype, device="cuda"), **tol)
    ref.eval(), fused.eval()
    y = step_both(ref, fused, random_input(shape, dtype, memory_format, device="cuda"),
                  torch.randn(shape, dtype=dtype, device="cuda"), **tol)
    assert y.is_contiguous(memory_format=memory_format)


@pytest.mark.parametrize("memory_format", FORMATS, ids=["nchw", "cl"])
def test_more_channels_than_a_grid_dimension_cuda(memory_format):
    shape = (2, 66000, 2, 1)  # C > 65535, the largest y (and z) dimension of a CUDA grid
    ref, fused = cuda_pair(shape[1], torch.float64)
    x = random_input(shape, torch.float64, memory_format, device="cuda")
    step_both(ref, fused, x, torch.randn(shape, dtype=torch.float64, device="cuda"), **TOL[torch.float64])


@pytest.mark.parametrize("memory_format", FORMATS, ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_against_nn_and_float64_on_cuda(dtype, memory_format):
    """Outputs, input gradients and running statistics against nn in the same dtype; everything, parameter
    gradients included, against float64 on the same (rounded) inputs. nn's CUDA kernels for 16-bit inputs round
    each dy·(x − mean) to the input dtype before summing it (Float2's constructor in Normalization.cuh): on this
    shape that moves its bfloat16 weight gradient by up to ~0.3 from the exact value, while fusedbn sums in float."""
    shape = (8, 24, 9, 9)
    ref, fused = cuda_pair(shape[1], torch.float32)
    exact = copy.deepcopy(ref).double()
    for _ in range(2):
        x = random_input(shape, dtype, memory_format, device="cuda", requires_grad=False)
        grad = torch.randn(shape, device="cuda").to(dtype)
        results = []
        for module, inp in ((fused, x), (ref, x), (exact, x.double())):
            inp = inp.clone().requires_grad_()
            y = module(inp)
            y.backward(grad.to(y.dtype))
            results.append((y, inp.grad))
        (y, dx), (y_nn, dx_nn), (y_exact, dx_exact) = results
        assert y.dtype == dx.dtype == dtype
        torch.testing.assert_close(y, y_nn, **TOL[dtype])
        torch.testing.assert_close(dx, dx_nn, **TOL[dtype])
        torch.testing.assert_close(y.double(), y_exact, **TOL[dtype])
        torch.testing.assert_close(dx.double(), dx_exact, **TOL[dtype])
        for name in ("running_mean", "running_var"):
            torch.testing.assert_close(getattr(fused, name), getattr(ref, name), **TOL[dtype])
        for name in ("running_mean", "running_var", "weight.grad", "bias.grad"):
            value, reference = attrgetter(name)(fused), attrgetter(name)(exact)
            torch.testing.assert_close(value.double(), reference, rtol=1e-4, atol=1e-3, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("act", ["identity", "relu", "leaky_relu", "silu", "relu6", "hardswish", "gelu"])
@pytest.mark.parametrize("memory_format", FORMATS, ids=["nchw", "cl"])
def test_cuda_matches_cpu_backend(act, memory_format):
    shape = (6, 12, 10, 10)
    x = random_input(shape, memory_format=memory_format, requires_grad=False)
    z = random_input(shape, memory_format=memory_format, requires_grad=False)
    g = torch.randn(shape, dtype=torch.float64)
    results = []
    for device in ("cpu", "cuda"):
        xs, zs = x.to(device).detach().requires_grad_(), z.to(device).detach().requires_grad_()
        w = torch.linspace(0.5, 1.5, 12, dtype=torch.float64, device=device, requires_grad=True)
        b = torch.linspace(-1, 1, 12, dtype=torch.float64, device=device, requires_grad=True)
        rm, rv = torch.zeros(12, dtype=torch.float64, device=device), torch.ones(12, dtype=torch.float64, device=device)
        y = fusedbn.fused_batch_norm(xs, rm, rv, w, b, True, 0.1, 1e-5, activation=act, negative_slope=0.2,
                                     residual=zs)
        y.backward(g.to(device))
        results.append([t.detach().cpu() for t in (y, xs.grad, zs.grad, w.grad, b.grad, rm, rv)])
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, **TOL[torch.float64])


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("act", ["identity", "relu", "silu", "hardswish", "gelu"])
def test_gradcheck_cuda(training, act):
    x = random_input((3, 4, 3, 2), device="cuda")
    w = torch.rand(4, dtype=torch.float64, device="cuda", requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, device="cuda", requires_grad=True)
    rm = torch.zeros(4, dtype=torch.float64, device="cuda")
    rv = torch.ones(4, dtype=torch.float64, device="cuda")
    fn = lambda x, w, b: fusedbn.fused_batch_norm(x, rm.clone(), rv.clone(), w, b, training, activation=act)  # noqa
    # the C++ autograd node's backward on CUDA, and its double backward (backward_composite)
    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


@pytest.mark.parametrize("mode", ["running", "blend"])
def test_small_batch_fallback_cuda(mode):
    ref, fused = cuda_pair(5, torch.float64, small_batch=mode, prior_count=1e12)
    before = {k: v.clone() for k, v in fused.state_dict().items()}
    x = random_input((1, 5, 1, 1), device="cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        y = fused(x)
    ref.eval()
    torch.testing.assert_close(y, ref(x), rtol=1e-6, atol=1e-6)
    for k, v in fused.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_non_finite_batch_cuda():
    fused = fusedbn.FusedBatchNorm2d(3).cuda()
    x = torch.randn(4, 3, 2, 2, device="cuda")
    x[0, 1, 0, 0] = float("nan")
    fused(x)  # silent on CUDA (no host synchronisation), but the buffers are guarded on the device
    assert fused.num_batches_tracked.item() == 0 and torch.equal(fused.running_var.cpu(), torch.ones(3))


def test_opcheck_cuda():
    ops = torch.ops.fusedbn
    x = random_input((3, 4, 5, 2), torch.float32, device="cuda", requires_grad=False)
    w, b = torch.rand(4, device="cuda") + 0.5, torch.randn(4, device="cuda")
    rm, rv = torch.randn(4, device="cuda"), torch.rand(4, device="cuda") + 0.5
    z, dy = torch.randn_like(x), torch.randn_like(x)
    torch.library.opcheck(ops.batch_stats, (x,))
    torch.library.opcheck(ops.forward_train, (x, w, b, z, rm, rv, 4.0, 1e-5, "relu", 0.0))
    torch.library.opcheck(ops.normalize, (x, w, b, z, rm, rv, 1e-5, "silu", 0.0))
    # the training op that updates the running statistics in place, and the ops' autograd node
    torch.library.opcheck(ops.forward_train, (x, w, b, z, None, None, 0.0, 1e-5, "gelu", 0.0, rm.clone(), rv.clone(),
                                              torch.tensor(2, device="cuda"), 0.1))
    xg, wg = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    torch.library.opcheck(ops.forward_train, (xg, wg, b, z, None, None, 0.0, 1e-5, "hardswish", 0.0))
    torch.library.opcheck(ops.normalize, (xg, wg, b, z, rm, rv, 1e-5, "relu6", 0.0))
    _, mean, invstd, bm, bm2, _ = ops.forward_train(x, w, b, z, None, None, 0.0, 1e-5, "relu", 0.0)
    torch.library.opcheck(ops.update_running_stats, (rm.clone(), rv.clone(), torch.tensor(2, device="cuda"), bm, bm2,
                                                     30, None))
    torch.library.opcheck(ops.backward, (dy, x, z, mean, invstd, w, b, 30.0, "relu", 0.0))
    torch.library.opcheck(ops.backward_reduce, (dy, x, z, mean, invstd, w, b, "relu", 0.0))
    s1, s2, _ = ops.backward_reduce(dy, x, z, mean, invstd, w, b, "relu", 0.0)
    torch.library.opcheck(ops.backward_elemt, (dy, x, z, mean, invstd, w, b, s1, s2, 30.0, "relu", 0.0))


def test_compile_cuda():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), fusedbn.FusedBatchNorm2d(4, activation="relu")).cuda()
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(4, 3, 8, 8, device="cuda")
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("memory_format", FORMATS, ids=["nchw", "cl"])
def test_statistics_and_weight_gradient_written_by_the_merges_cuda(memory_format):
    """forward_train writes the normalisation statistics in the kernel that merges the moments, and backward the
    weight gradient in the one that merges its sums: the moments are bitwise batch_stats', the statistics those of
    the formula (with and without a prior), and the weight gradient bitwise sum_dy_xmu·invstd."""
    ops = torch.ops.fusedbn
    shape = (8, 40, 9, 7)
    n = shape[0] * shape[2] * shape[3]
    x = random_input(shape, torch.float32, memory_format, device="cuda", requires_grad=False)
    dy = torch.randn_like(x)
    w, b = torch.rand(40, device="cuda") + 0.5, torch.randn(40, device="cuda")
    prior_mean, prior_var = torch.randn(40, device="cuda"), torch.rand(40, device="cuda") + 0.5
    for prior in (0.0, 300.0):
        _, mean, invstd, batch_mean, batch_m2, _ = ops.forward_train(x, w, b, None, prior_mean, prior_var, prior, 1e-5,
                                                                  "relu", 0.0)
        separate_mean, separate_m2 = ops.batch_stats(x)
        assert torch.equal(batch_mean, separate_mean) and torch.equal(batch_m2, separate_m2)
        # Chan's merge of the batch moments with `prior` pseudo-samples at (prior_mean, prior_var), in float64.
        m, m2, p = batch_mean.double(), batch_m2.double(), prior
        delta = prior_mean.double() - m
        expected_mean = m + delta * p / (n + p)
        expected_var = (m2 + p * prior_var.double() + delta * delta * n * p / (n + p)) / (n + p)
        torch.testing.assert_close(mean, expected_mean.float(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(invstd, (expected_var + 1e-5).rsqrt().float(), rtol=1e-6, atol=0)
    _, mean, invstd, _, _, _ = ops.forward_train(x, w, b, None, None, None, 0.0, 1e-5, "relu", 0.0)
    _, _, dw, db = ops.backward(dy, x, None, mean, invstd, w, b, float(n), "relu", 0.0)
    s1, s2, dw_reduced = ops.backward_reduce(dy, x, None, mean, invstd, w, b, "relu", 0.0)
    assert torch.equal(db, s1) and torch.equal(dw, s2 * invstd) and torch.equal(dw, dw_reduced)


def test_ops_on_an_empty_batch_cuda():
    ops = torch.ops.fusedbn
    x = torch.empty(0, 3, 4, 4, device="cuda")
    w, b = torch.rand(3, device="cuda") + 0.5, torch.randn(3, device="cuda")
    _, mean, invstd, batch_mean, batch_m2, _ = ops.forward_train(x, w, b, None, None, None, 0.0, 1e-5, "relu", 0.0)
    assert torch.equal(batch_mean.cpu(), torch.zeros(3)) and torch.equal(batch_m2.cpu(), torch.zeros(3))
    assert torch.isnan(invstd).all()  # the statistics of no values (0/0)
    mean, invstd = torch.zeros(3, device="cuda"), torch.ones(3, device="cuda")
    dx, _, dw, db = ops.backward(torch.empty_like(x), x, None, mean, invstd, w, b, 1.0, "relu", 0.0)
    assert dx.shape == x.shape and torch.equal(dw.cpu(), torch.zeros(3)) and torch.equal(db.cpu(), torch.zeros(3))


@pytest.mark.parametrize("memory_format", FORMATS, ids=["nchw", "cl"])
def test_cuda_graph_replay_matches_eager(memory_format):
    """A training step (forward, backward, running-statistics update) captured in a CUDA graph and replayed on new
    inputs gives bitwise what the same steps give eagerly. Capture also fails if any kernel is launched on a
    stream other than the current one, or if the step synchronises with the host."""
    shape = (4, 6, 5, 7)
    eager = fusedbn.FusedBatchNorm2d(shape[1], activation="relu").cuda()
    with torch.no_grad():
        eager.weight.uniform_(0.5, 1.5), eager.bias.uniform_(-1, 1)
    graphed = copy.deepcopy(eager)
    batches = [(random_input(shape, torch.float32, memory_format, device="cuda", requires_grad=False),
                torch.randn(shape, device="cuda")) for _ in range(5)]

    def step(m, x, g):
        y = m(x)
        return (y,) + torch.autograd.grad(y, [x, m.weight, m.bias], g)

    static_x = torch.empty_like(batches[0][0]).requires_grad_()
    static_g = torch.empty_like(batches[0][1])

    def load(x, g):
        with torch.no_grad():
            static_x.copy_(x), static_g.copy_(g)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as torch.cuda.graph requires
        for x, g in batches[:2]:
            load(x, g)
            step(graphed, static_x, static_g)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step(graphed, static_x, static_g)

    for x, g in batches[:2]:
        step(eager, x.clone().requires_grad_(), g)
    for x, g in batches[2:]:
        load(x, g)
        graph.replay()
        expected = step(eager, x.clone().requires_grad_(), g)
        for got, want in zip(static_out, expected):
            assert torch.equal(got, want)
    for name, buffer in eager.named_buffers():
        assert torch.equal(getattr(graphed, name), buffer), name
    assert eager.num_batches_tracked.item() == 5


@pytest.mark.parametrize("recompute", ["none", "output", "conv", "auto"])
@pytest.mark.parametrize("memory_format", FORMATS, ids=["nchw", "cl"])
def test_conv_bn_blocks_on_cuda_match_the_cpu(recompute, memory_format):
    """A chain of conv-BN blocks (3×3, depthwise, 1×1 with a residual) trained two steps and evaluated on CUDA and
    on the CPU, float64: outputs, gradients and running statistics agree."""
    torch.manual_seed(0)
    cpu = nn.Sequential(
        fusedbn.FusedConvBatchNorm2d(4, 8, 3, padding=1, activation="relu", recompute=recompute),
        fusedbn.FusedConvBatchNorm2d(8, 8, 3, padding=1, groups=8, activation="hardswish", recompute=recompute),
        fusedbn.FusedConvBatchNorm2d(8, 8, 1, activation="silu", recompute=recompute)).double()
    gpu = copy.deepcopy(cpu).cuda().to(memory_format=memory_format)
    for _ in range(2):
        x = random_input((3, 4, 9, 7))
        outs = []
        for model, device in ((cpu, "cpu"), (gpu, "cuda")):
            xd = x.detach().to(device).contiguous(memory_format=memory_format).requires_grad_()
            out = model(xd)
            out.square().sum().backward()
            outs.append((out.cpu(), xd.grad.cpu()))
        torch.testing.assert_close(outs[1], outs[0], **TOL[torch.float64])
    for (name, a), b in zip(cpu.state_dict().items(), gpu.state_dict().values()):
        torch.testing.assert_close(b.cpu(), a, **TOL[torch.float64], msg=lambda m: f"{name}: {m}")
    for a, b in zip(cpu.parameters(), gpu.parameters()):
        torch.testing.assert_close(b.grad.cpu(), a.grad, **TOL[torch.float64])
    cpu.eval(), gpu.eval()
    x = random_input((3, 4, 9, 7), requires_grad=False)
    torch.testing.assert_close(gpu(x.cuda()).cpu(), cpu(x), **TOL[torch.float64])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_renormalize_reproduces_the_training_output_bitwise_on_cuda(dtype):
    ops = torch.ops.fusedbn
    x = random_input((8, 32, 17, 9), dtype, device="cuda", requires_grad=False)
    w, b = torch.rand(32, device="cuda") + 0.5, torch.randn(32, device="cuda")
    for activation in ("relu", "silu", "gelu"):
        out, mean, invstd, *_ = ops.forward_train(x, w, b, None, None, None, 0.0, 1e-5, activation, 0.01)
        assert torch.equal(ops.renormalize(x, w, b, None, mean, invstd, activation, 0.01), out)
