"""GPU benchmark (CUDA events): fusedbn against nn.BatchNorm2d (+ ReLU) and torch.compile of it, ResNet-50 shapes.

Forward in training mode, backward alone, and a BN+ReLU training step; NCHW and channels_last; float32 and
bfloat16. Achieved bandwidth = bytes that must move ÷ time (forward: 3 passes over the tensor — read x for the
statistics, read x and write y; backward: 5 — read x and dy for the sums, read them again and write dx),
reported as a fraction of a device-to-device copy (2 passes) measured in the same run.

Each timing spans one call between two events, so on small shapes it is the CPU's time to launch the call's
kernels. The step is also timed queued: 10 steps back to back between two events, as a training loop runs, where
the time per step is the larger of the CPU's launch time and the GPU's kernel time, and captured in a CUDA graph
and replayed (10 replays back to back), which takes the CPU out: the GPU's time per step.
"""

import argparse
import os
import statistics
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fusedbn  # noqa: E402

SHAPES = [(64, 64, 112, 112), (64, 256, 56, 56), (64, 512, 28, 28), (64, 1024, 14, 14), (64, 2048, 7, 7)]
# torch.compile takes tens of seconds per shape, dtype and format: it is timed on these shapes only.
COMPILE_SHAPES = [(64, 256, 56, 56)]


def cuda_time(fn, repeats, calls=1):
    """Median seconds per call of fn, from `repeats` CUDA-event timings after 5 warm-ups. Each timing spans `calls`
    calls back to back: with 1, the CPU waits for each call's kernels; with more, it queues calls ahead of the GPU
    as a training loop does."""
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e-3 / calls)
    return statistics.median(times)


def graphed(fn):
    """fn captured in a CUDA graph (after a warm-up on a side stream, as torch.cuda.graph requires): its replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def profile_kernels(path):
    """Per-kernel CUDA time of a fusedbn and an nn BN+ReLU training step (forward + backward), 10 steps each, on a
    large shape; on a small one, where the CPU bounds the step, the CPU time of each op as well."""
    with open(path, "w") as f:
        profile_shape(f, (64, 256, 56, 56), cpu=False)
        profile_shape(f, (64, 2048, 7, 7), cpu=True)


def profile_shape(f, shape, cpu):
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if cpu else [])
    sort_by = "self_cpu_time_total" if cpu else "device_time_total"
    for dtype in (torch.float32, torch.bfloat16):
        for fmt_name, fmt in (("NCHW", torch.contiguous_format), ("channels_last", torch.channels_last)):
            x = torch.randn(shape, device="cuda").to(dtype).contiguous(memory_format=fmt).requires_grad_()
            g = torch.randn(shape, device="cuda").to(dtype).contiguous(memory_format=fmt)
            for name, m in (("fusedbn", fusedbn.FusedBatchNorm2d(shape[1], activation="relu")),
                            ("nn", nn.Sequential(nn.BatchNorm2d(shape[1]), nn.ReLU()))):
                m = m.cuda()
                for _ in range(3):
                    m(x).backward(g)
                torch.cuda.synchronize()
                with profile(activities=activities) as prof:
                    for _ in range(10):
                        m(x).backward(g)
                    torch.cuda.synchronize()
                f.write(f"## {name} {str(dtype)[6:]} {shape} {fmt_name} (10 steps)\n")
                f.write(prof.key_averages().table(sort_by=sort_by, row_limit=16) + "\n")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--out", default=None)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--profile", default=None, help="write per-kernel CUDA times of two shapes to this file")
    args = p.parse_args()
    dev = torch.device("cuda")
    if args.profile:
        profile_kernels(args.profile)
    # One compiled module per case: without this, dynamo falls back to eager after 8 recompilations.
    torch._dynamo.config.cache_size_limit = 64
    lines = [f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}. Median of {args.repeats} runs "
             "(CUDA events). bw = bytes that must move / time, as a fraction of a device copy.", "",
             "| dtype | shape | format | copy GB/s | fwd fusedbn ms (bw) | fwd nn ms | bwd fusedbn ms (bw) | "
             "bwd nn ms | step fusedbn ms | step nn ms | step compile ms | step nn/fusedbn | "
             "queued step fusedbn ms | queued step nn ms | queued nn/fusedbn | "
             "graphed step fusedbn ms | graphed step nn ms | graphed nn/fusedbn |",
             "|" + "---|" * 18]
    for dtype in (torch.float32, torch.bfloat16):
        for shape in SHAPES:
            for fmt_name, fmt in (("NCHW", torch.contiguous_format), ("channels_last", torch.channels_last)):
                c = shape[1]
                x = torch.randn(shape, device=dev).to(dtype).contiguous(memory_format=fmt)
                g = torch.randn(shape, device=dev).to(dtype).contiguous(memory_format=fmt)
                nbytes = x.numel() * x.element_size()
                copy_t = cuda_time(lambda: x.clone(), args.repeats)
                copy_bw = 2 * nbytes / copy_t
                fb = fusedbn.FusedBatchNorm2d(c).to(dev)
                ref = nn.BatchNorm2d(c).to(dev)
                fbr = fusedbn.FusedBatchNorm2d(c, activation="relu").to(dev)
                refr = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU()).to(dev)
                with torch.no_grad():
                    t_fwd = cuda_time(lambda: fb(x), args.repeats)
                    t_fwd_nn = cuda_time(lambda: ref(x), args.repeats)
                xg = x.clone().requires_grad_()
                y_f, y_n = fb(xg), ref(xg)
                t_bwd = cuda_time(lambda: torch.autograd.grad(y_f, [xg], g, retain_graph=True), args.repeats)
                t_bwd_nn = cuda_time(lambda: torch.autograd.grad(y_n, [xg], g, retain_graph=True), args.repeats)
                # The retained graphs keep xg's gradient accumulator, made on the default stream, alive: a CUDA
                # graph capture on another stream cannot then accumulate into it.
                del y_f, y_n
                step = lambda m: torch.autograd.grad(m(xg), [xg] + list(m.parameters()), g)  # noqa: E731
                t_step = cuda_time(lambda: step(fbr), args.repeats)
                t_step_nn = cuda_time(lambda: step(refr), args.repeats)
                t_queued = cuda_time(lambda: step(fbr), args.repeats // 3, calls=10)
                t_queued_nn = cuda_time(lambda: step(refr), args.repeats // 3, calls=10)
                t_graph = cuda_time(graphed(lambda: step(fbr)), args.repeats // 3, calls=10)
                t_graph_nn = cuda_time(graphed(lambda: step(refr)), args.repeats // 3, calls=10)
                t_step_c = float("nan")
                if not args.no_compile and shape in COMPILE_SHAPES:
                    compiled = torch.compile(nn.Sequential(nn.BatchNorm2d(c), nn.ReLU()).to(dev))
                    t_step_c = cuda_time(lambda: step(compiled), args.repeats)
                bw_f = 3 * nbytes / t_fwd / copy_bw
                bw_b = 5 * nbytes / t_bwd / copy_bw
                lines.append(
                    f"| {str(dtype)[6:]} | {shape} | {fmt_name} | {copy_bw / 1e9:.0f} | "
                    f"{t_fwd * 1e3:.3f} ({bw_f:.0%}) | "
                    f"{t_fwd_nn * 1e3:.3f} | {t_bwd * 1e3:.3f} ({bw_b:.0%}) | {t_bwd_nn * 1e3:.3f} | "
                    f"{t_step * 1e3:.3f} | {t_step_nn * 1e3:.3f} | {t_step_c * 1e3:.3f} | {t_step_nn / t_step:.2f} | "
                    f"{t_queued * 1e3:.3f} | {t_queued_nn * 1e3:.3f} | {t_queued_nn / t_queued:.2f} | "
                    f"{t_graph * 1e3:.3f} | {t_graph_nn * 1e3:.3f} | {t_graph_nn / t_graph:.2f} |")
                print(lines[-1], flush=True)
                del x, g, xg
                torch.cuda.empty_cache()
    text = "\n".join(lines)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
