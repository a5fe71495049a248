"""Fixed cost of a layer call: fusedbn's module against nn.BatchNorm2d (+ nn.ReLU) on small tensors, hot.

For (2, 64, 4, 4) and (8, 512, 7, 7), float32, 2 threads: training forward, eval forward (torch.no_grad) and a
BN+ReLU training step (forward, then torch.autograd.grad to input, weight and bias). Each round times 100 calls of
fusedbn, then 100 of nn, alternately; the ratio fusedbn / nn of each round is taken in the same process, so that
the process's speed cancels out (bench/HISTORY.md, "method (session 9)"). Prints the median over rounds and the
median times; writes them into bench/RESULTS.md unless --no-write.
"""

import argparse
import os
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import fusedbn  # noqa: E402

SHAPES = [(2, 64, 4, 4), (8, 512, 7, 7)]
TASKS = ["train", "eval", "step"]


def runners(shape, impl):
    c = shape[1]
    x, g = torch.randn(shape, requires_grad=True), torch.randn(shape)
    make = (lambda **kw: fusedbn.FusedBatchNorm2d(c, **kw)) if impl == "fusedbn" else (lambda **kw: nn.BatchNorm2d(c))
    train, evaluating = make(), make().eval()
    step = make(activation="relu") if impl == "fusedbn" else nn.Sequential(nn.BatchNorm2d(c), nn.ReLU())
    params = [x] + list(step.parameters())

    def run_eval():
        with torch.no_grad():
            evaluating(x)

    return {"train": lambda: train(x), "eval": run_eval,
            "step": lambda: torch.autograd.grad(step(x), params, g)}


def timed(fn, calls):
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=41)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(2)
    rows = []
    for shape in SHAPES:
        fused, ref = runners(shape, "fusedbn"), runners(shape, "nn")
        for task in TASKS:
            for fn in (fused[task], ref[task]):
                timed(fn, 50)  # warm-up
            times = [(timed(fused[task], 100), timed(ref[task], 100)) for _ in range(args.rounds)]
            ratio = statistics.median(a / b for a, b in times)
            rows.append((shape, task, statistics.median(a for a, _ in times), statistics.median(b for _, b in times),
                         ratio))
    table = ["| shape | task | fusedbn µs | nn µs | fusedbn / nn (median of rounds) |", "|---|---|---|---|---|"]
    table += [f"| {s} | {t} | {a:.1f} | {b:.1f} | {r:.2f} |" for s, t, a, b, r in rows]
    text = (f"Command: `python bench/call_cost.py` ({time.strftime('%Y-%m-%d')}), torch {torch.__version__}, float32, "
            f"2 threads, hot, {args.rounds} rounds of 100 calls each, alternating.\n\n" + "\n".join(table))
    print(text)
    if not args.no_write:
        from results_md import write_section

        write_section("call_cost", text)


if __name__ == "__main__":
    main()
