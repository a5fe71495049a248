"""Overhead of synchronised statistics: SyncFusedBatchNorm2d against FusedBatchNorm2d, training step
(forward + backward), 2 processes with gloo on loopback, 1 thread each. Writes into bench/RESULTS.md."""

import os
import socket
import statistics
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import fusedbn  # noqa: E402
from results_md import write_section  # noqa: E402

SHAPES = [(16, 64, 28, 28), (8, 256, 14, 14), (4, 512, 7, 7), (1, 64, 56, 56)]


def step_time(module, x, g, repeats=30):
    for _ in range(3):
        torch.autograd.grad(module(x), [x], g)
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        torch.autograd.grad(module(x), [x], g)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def worker(rank, world, port, queue):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    for shape in SHAPES:
        x = torch.randn(shape, requires_grad=True)
        g = torch.randn(shape)
        plain = step_time(fusedbn.FusedBatchNorm2d(shape[1]), x, g)
        synced = step_time(fusedbn.SyncFusedBatchNorm2d(shape[1]), x, g)
        if rank == 0:
            queue.put((shape, plain, synced))
    dist.destroy_process_group()


def main():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.spawn(worker, args=(2, port, queue), nprocs=2, join=True)
    rows = []
    while not queue.empty():
        shape, plain, synced = queue.get()
        rows.append(f"| {shape} per rank | {plain * 1e3:.3f} | {synced * 1e3:.3f} | {(synced - plain) * 1e3:+.3f} | "
                    f"{synced / plain:.2f} |")
    text = "\n".join([
        f"Command: `python bench/bench_sync.py` ({time.strftime('%Y-%m-%d')}); 2 processes, gloo over loopback, "
        "1 thread each, float32, median of 30 training steps (forward + backward to the input).", "",
        "| shape | FusedBatchNorm2d ms | SyncFusedBatchNorm2d ms | overhead ms | ratio |", "|---|---|---|---|---|",
        *rows])
    print(text)
    write_section("sync", text)


if __name__ == "__main__":
    main()
