"""CPU benchmark: fusedbn against nn.BatchNorm2d (+ nn.ReLU) eager, torch.compile of the latter, and x.clone().

For each shape × memory format × dtype: forward in training mode, forward in eval mode, and a BN+ReLU training
step (forward + backward to input, weight and bias). All implementations run interleaved in one process, in a
new random order each round, median of --repeats runs after warm-up. Writes the table into bench/RESULTS.md
(between markers) and a plot to bench/cpu.png.

glibc returns large freed blocks to the OS, so a run's output may land on fresh pages and pay ~2 µs per 4 KiB
page fault in this VM (≈12 ms for 25 MB), at random for every implementation, clone included. The benchmark
re-executes itself with MALLOC_MMAP_MAX_=0 and MALLOC_TRIM_THRESHOLD_ set high (as a long training process
reaches anyway) so that it measures the kernels; --keep-malloc turns that off.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}

SHAPES = [(32, 64, 56, 56), (32, 256, 14, 14), (8, 512, 7, 7), (1, 64, 112, 112)]
FORMATS = {"NCHW": "contiguous_format", "channels_last": "channels_last"}
IMPLS = ["fusedbn", "nn", "compile", "clone"]
TASKS = ["fwd_train", "eval", "step"]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # 100 rounds: each runner's predecessors (which change its time by up to 2x, see measure) even out. With 25, eval
    # ratios of the same build moved between 0.78 and 1.02 from run to run; with 100, two runs agreed within 0.1.
    p.add_argument("--repeats", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile (saves minutes of compiling)")
    p.add_argument("--keep-malloc", action="store_true", help="do not set the glibc malloc variables")
    p.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md and cpu.png alone")
    return p.parse_args()


def machine_description(torch) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")


def build_cases(torch, nn, fusedbn, args):
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    for dtype in dtypes:
        for shape in SHAPES:
            for fmt_name, fmt in FORMATS.items():
                yield dtype, shape, fmt_name, getattr(torch, fmt)


def make_runners(torch, nn, fusedbn, dtype, shape, memory_format, use_compile):
    """{(impl, task): callable}. Parameters and statistics are float32, as under mixed precision."""
    c = shape[1]
    x = (torch.randn(shape) * 2 + 1).to(dtype).contiguous(memory_format=memory_format)
    g = torch.randn(shape).to(dtype).contiguous(memory_format=memory_format)
    xg = x.clone().requires_grad_()
    modules = {
        "fusedbn": (fusedbn.FusedBatchNorm2d(c), fusedbn.FusedBatchNorm2d(c, activation="relu")),
        "nn": (nn.BatchNorm2d(c), nn.Sequential(nn.BatchNorm2d(c), nn.ReLU())),
    }
    if use_compile:
        modules["compile"] = (torch.compile(nn.BatchNorm2d(c), dynamic=False),
                              torch.compile(nn.Sequential(nn.BatchNorm2d(c), nn.ReLU()), dynamic=False))
    eval_modules = {k: (fusedbn.FusedBatchNorm2d(c) if k == "fusedbn" else nn.BatchNorm2d(c)).eval()
                    for k in modules}
    if use_compile:
        eval_modules["compile"] = torch.compile(eval_modules["compile"], dynamic=False)

    def fwd(m):
        def run():
            with torch.no_grad():
                m(x)
        return run

    def step(m):
        params = [p for p in m.parameters()]
        return lambda: torch.autograd.grad(m(xg), [xg] + params, g)

    runners = {}
    for impl, (bn, bn_relu) in modules.items():
        runners[impl, "fwd_train"] = fwd(bn)
        runners[impl, "eval"] = fwd(eval_modules[impl])
        runners[impl, "step"] = step(bn_relu)
    for task in TASKS:
        runners["clone", task] = lambda: x.clone()
    return runners


def measure(runners, repeats):
    """Median time of each runner, all interleaved in a new random order each round (seeded). What runs just
    before a call changes its time: after a compiled step, the next op took about twice as long here, nn's and
    fusedbn's alike. A fixed or rotating order gives each runner the same predecessor in most rounds (in rotation
    fusedbn's forward always followed the compiled step and the clones, nn's followed fusedbn's), which biased
    the ratios; a shuffled order gives every runner the same mix of predecessors."""
    for fn in runners.values():  # warm-up (and compile)
        for _ in range(3):
            fn()
    samples = {k: [] for k in runners}
    keys = list(runners)
    order = random.Random(0)
    for _ in range(repeats):
        order.shuffle(keys)
        for k in keys:
            start = time.perf_counter()
            runners[k]()
            samples[k].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in samples.items()}


def progress(iterable, total):
    try:
        from tqdm import tqdm
        return tqdm(iterable, total=total, desc="bench_cpu", unit="case")
    except ImportError:
        def simple():
            for i, item in enumerate(iterable, 1):
                print(f"[{i}/{total}] {item[0]} {item[1]} {item[2]}", file=sys.stderr, flush=True)
                yield item
        return simple()


def table(rows, use_compile):
    head = ("| dtype | shape | format | task | fusedbn ms | nn ms | compile ms | clone ms | fusedbn/clone "
            "| nn/fusedbn | compile/fusedbn |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        t = r["times"]
        comp = f"{t['compile'] * 1e3:.3f}" if use_compile else "–"
        comp_ratio = f"{t['compile'] / t['fusedbn']:.2f}" if use_compile else "–"
        lines.append(f"| {r['dtype']} | {r['shape']} | {r['format']} | {r['task']} | {t['fusedbn'] * 1e3:.3f} | "
                     f"{t['nn'] * 1e3:.3f} | {comp} | {t['clone'] * 1e3:.3f} | {t['fusedbn'] / t['clone']:.2f} | "
                     f"{t['nn'] / t['fusedbn']:.2f} | {comp_ratio} |")
    return "\n".join(lines)


def summary(rows):
    out = []
    for dtype in sorted({r["dtype"] for r in rows}):
        sel = [r for r in rows if r["dtype"] == dtype]
        step = [r["times"]["nn"] / r["times"]["fusedbn"] for r in sel if r["task"] == "step"]
        gm = math.exp(sum(map(math.log, step)) / len(step))
        worst = min(r["times"]["nn"] / r["times"]["fusedbn"] for r in sel)
        fwd = max(r["times"]["fusedbn"] / r["times"]["clone"] for r in sel if r["task"] == "fwd_train")
        ev = max(r["times"]["fusedbn"] / r["times"]["clone"] for r in sel if r["task"] == "eval")
        out.append(f"- {dtype}: BN+ReLU step speed-up over nn, geometric mean {gm:.2f}x; slowest case against nn "
                   f"{worst:.2f}x; forward-train at most {fwd:.2f}x clone; eval at most {ev:.2f}x clone")
    return "\n".join(out)


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = sorted({r["dtype"] for r in rows})
    fig, axes = plt.subplots(len(dtypes), len(TASKS), figsize=(5 * len(TASKS), 3.6 * len(dtypes)), squeeze=False)
    for i, dtype in enumerate(dtypes):
        for j, task in enumerate(TASKS):
            sel = [r for r in rows if r["dtype"] == dtype and r["task"] == task]
            labels = [f"{r['shape']}\n{r['format']}" for r in sel]
            ax = axes[i][j]
            ax.bar(range(len(sel)), [r["times"]["nn"] / r["times"]["fusedbn"] for r in sel], color="tab:blue")
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_xticks(range(len(sel)), labels, rotation=60, fontsize=6)
            ax.set_title(f"{task}, {dtype}", fontsize=9)
            ax.set_ylabel("speed-up over nn (×)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    args = parse_args()
    if not args.keep_malloc and any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
        os.execve(sys.executable, [sys.executable] + sys.argv, {**os.environ, **MALLOC_ENV})
    sys.path.insert(0, ROOT)
    import torch
    from torch import nn

    import fusedbn
    from results_md import write_section

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    torch._dynamo.config.cache_size_limit = 64  # grad mode on/off and train/eval are separate graphs
    cases = list(build_cases(torch, nn, fusedbn, args))
    rows = []
    started = time.time()
    for dtype, shape, fmt_name, fmt in progress(((d, s, f, m) for d, s, f, m in cases), len(cases)):
        torch._dynamo.reset()  # each case compiles afresh: nn's forward is one code object for every shape
        runners = make_runners(torch, nn, fusedbn, dtype, shape, fmt, not args.no_compile)
        times = measure(runners, args.repeats)
        for task in TASKS:
            rows.append(dict(dtype=str(dtype).replace("torch.", ""), shape=shape, format=fmt_name, task=task,
                             times={impl: times[impl, task] for impl in IMPLS if (impl, task) in times}))
    use_compile = not args.no_compile
    text = "\n".join([
        f"Machine: {machine_description(torch)}. Command: `python bench/bench_cpu.py {' '.join(sys.argv[1:])}`"
        f" ({time.strftime('%Y-%m-%d')}; {time.time() - started:.0f} s). Median of {args.repeats} interleaved runs; "
        f"malloc variables {'unchanged' if args.keep_malloc else 'set (see bench_cpu.py)'}. "
        "step = BN+ReLU forward + backward (to input, weight, bias).",
        "", summary(rows), "", table(rows, use_compile)])
    print(text)
    if not args.no_write:
        write_section("bench_cpu", text)
        plot(rows, os.path.join(ROOT, "bench", "cpu.png"))
        print("wrote bench/RESULTS.md and bench/cpu.png")


if __name__ == "__main__":
    main()
