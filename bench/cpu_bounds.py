"""Lower bounds for the CPU targets of bench_cpu.py: the memory floor plus the fixed cost of an eager module call.

Besides its kernels, any eager nn.Module implementation pays a fixed cost per call: nn.Module.__call__ and its
forward in Python, an op dispatch, and in a training step the autograd node and torch.autograd.grad's engine run.
This script measures that cost where bench_cpu.py measures (its runners, all interleaved in a shuffled order each
round) as the time of a minimal module on a tiny (2, C, 1, 1) tensor: one op, y = x·w + b (torch.addcmul, w and b
of shape (C, 1, 1)), and one autograd node. No batch norm can do less.

For each benchmark case it then bounds the time of any implementation from below by

    bound = floor × (clone − tiny clone) + minimal module on the tiny tensor

with the smallest floors possible, in clones (one read and one write of the tensor): 1.0 for the training forward
(x read once, for the statistics and the normalisation together: all of x in cache), 1.0 for eval, 2.5 for the
BN+ReLU step (the forward's 1.0, then the backward's reads of x and dy and write of dx, once each). It prints the
bound as a ratio to clone, and nn's time over the bound (the most speed-up over nn any implementation can have) and
writes the table into bench/RESULTS.md (between its markers) unless --no-write.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import bench_cpu  # shapes, formats, runners, measure(), malloc settings (bench/ is the script's sys.path[0])

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FLOOR_CLONES = {"fwd_train": 1.0, "eval": 1.0, "step": 2.5}
TARGETS = {"fwd_train": 2.0, "eval": 1.2}  # at most this many clones; the step: geometric mean over nn ≥ 2.5


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=100, help="rounds per case (default 100)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="include torch.compile's runners, as bench_cpu does")
    p.add_argument("--no-write", action="store_true", help="print only; do not update bench/RESULTS.md")
    return p.parse_args()


def minimal_runners(torch, shape, memory_format):
    """{(\"minimal\", task): callable} for a one-op module y = x·w + b on `shape`."""
    c = shape[1]

    class Minimal(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(c, 1, 1))
            self.bias = torch.nn.Parameter(torch.zeros(c, 1, 1))

        def forward(self, x):
            return torch.addcmul(self.bias, x, self.weight)

    m = Minimal()
    x = torch.randn(shape).contiguous(memory_format=memory_format)
    xg = x.clone().requires_grad_()
    g = torch.randn(shape).contiguous(memory_format=memory_format)
    params = list(m.parameters())

    def forward():
        with torch.no_grad():
            m(x)

    return {("minimal", "fwd_train"): forward, ("minimal", "eval"): forward,
            ("minimal", "step"): lambda: torch.autograd.grad(m(xg), [xg] + params, g),
            ("minimal", "clone"): lambda: x.clone()}


def main():
    args = parse_args()
    if any(os.environ.get(k) != v for k, v in bench_cpu.MALLOC_ENV.items()):
        os.execve(sys.executable, [sys.executable] + sys.argv, {**os.environ, **bench_cpu.MALLOC_ENV})
    sys.path.insert(0, ROOT)
    import torch
    from torch import nn

    import fusedbn
    from results_md import write_section

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    torch._dynamo.config.cache_size_limit = 64
    lines = ["| shape | format | task | clone ms | fixed ms | bound/clone | target | fusedbn/clone | fusedbn/bound "
             "| nn/bound | nn/fusedbn |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    step_bounds, step_fusedbn = [], []
    started = time.time()
    for shape in bench_cpu.SHAPES:
        for fmt_name, fmt in bench_cpu.FORMATS.items():
            torch._dynamo.reset()
            memory_format = getattr(torch, fmt)
            runners = bench_cpu.make_runners(torch, nn, fusedbn, torch.float32, shape, memory_format, args.compile)
            runners.update(minimal_runners(torch, (2, shape[1], 1, 1), memory_format))
            t = bench_cpu.measure(runners, args.repeats)
            for task, floor in FLOOR_CLONES.items():
                clone, fixed = t["clone", task], t["minimal", task]
                bound = floor * (clone - t["minimal", "clone"]) + fixed
                target = f"≤ {TARGETS[task]}" if task in TARGETS else "–"
                fb, ref = t["fusedbn", task], t["nn", task]
                if task == "step":
                    step_bounds.append(ref / bound)
                    step_fusedbn.append(ref / fb)
                lines.append(f"| {shape} | {fmt_name} | {task} | {clone * 1e3:.3f} | {fixed * 1e3:.3f} | "
                             f"{bound / clone:.2f} | {target} | {fb / clone:.2f} | {fb / bound:.2f} | "
                             f"{ref / bound:.2f} | {ref / fb:.2f} |")
            print(f"{shape} {fmt_name} done ({time.time() - started:.0f} s)", file=sys.stderr, flush=True)

    def geomean(v):
        return math.exp(sum(map(math.log, v)) / len(v))

    text = "\n".join([
        f"Command: `python bench/cpu_bounds.py {' '.join(sys.argv[1:])}` ({time.strftime('%Y-%m-%d')}), float32, "
        f"{args.threads} threads, median of {args.repeats} interleaved runs ({time.time() - started:.0f} s). "
        f"Step speed-up over nn, geometric mean: at most {geomean(step_bounds):.2f}x (bound); fusedbn "
        f"{geomean(step_fusedbn):.2f}x in this run.", ""] + lines)
    print(text)
    if not args.no_write:
        write_section("cpu_bounds", text)
        print("wrote bench/RESULTS.md")


if __name__ == "__main__":
    main()
