"""Evidence that the small-batch fallback helps: train a small CNN on scikit-learn's bundled digits (8×8, no
download) whose last batch norm sees (N, C, 1, 1) — one value per channel at batch size 1.

Variants: nn.BatchNorm2d at batch size 32 (the reference), and at batch size 1: TensorFlow's semantics (the
seed's all-zero output), fusedbn small_batch="running" and "blend". nn.BatchNorm2d cannot train at batch size 1
(it raises). Reports test accuracy (eval mode) and the agreement of train-mode and eval-mode predictions on
the test set (predictions of a model left in training mode, one image at a time, as in the seed). Fixed seeds,
CPU, a few epochs. Writes its table into bench/RESULTS.md (between markers).
"""

import copy
import os
import sys
import time
import warnings

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import fusedbn  # noqa: E402
from results_md import write_section  # noqa: E402
from fusedbn.demo import TFBatchNorm2d  # noqa: E402


def data():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    return x_train, x_test, y_train, y_test


def make_net(norm):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), norm(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), norm(32), nn.ReLU(),   # 4×4
        nn.Conv2d(32, 64, 4), norm(64), nn.ReLU(),                         # (N, 64, 1, 1)
        nn.Flatten(), nn.Linear(64, 10))


def train(net, x, y, batch, epochs):
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(1)
    net.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch):
            idx = order[i:i + batch]
            opt.zero_grad()
            nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()


@torch.no_grad()
def evaluate(net, x, y):
    """(eval accuracy, train-mode accuracy, agreement) — the last two "raises" where train mode at batch 1 does."""
    net.eval()
    eval_pred = net(x).argmax(1)
    accuracy = f"{(eval_pred == y).float().mean().item():.3f}"
    train_mode = copy.deepcopy(net).train()  # a model left in training mode, one image at a time
    try:
        train_pred = torch.cat([train_mode(x[i:i + 1]).argmax(1) for i in range(len(x))])
    except ValueError:
        return accuracy, "raises", "–"
    return accuracy, f"{(train_pred == y).float().mean().item():.3f}", \
        f"{(train_pred == eval_pred).float().mean().item():.3f}"


def main(epochs=3):
    torch.set_num_threads(2)
    x_train, x_test, y_train, y_test = data()
    variants = [
        ("nn.BatchNorm2d, batch 32 (reference)", nn.BatchNorm2d, 32),
        ("nn.BatchNorm2d, batch 1", nn.BatchNorm2d, 1),
        ("TensorFlow semantics, batch 1", TFBatchNorm2d, 1),
        ("fusedbn running, batch 1", lambda c: fusedbn.FusedBatchNorm2d(c, small_batch="running"), 1),
        ("fusedbn blend, batch 1", lambda c: fusedbn.FusedBatchNorm2d(c, small_batch="blend"), 1),
    ]
    rows = []
    for name, norm, batch in variants:
        net = make_net(norm)
        start = time.time()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                train(net, x_train, y_train, batch, epochs)
                acc, train_acc, agree = evaluate(net, x_test, y_test)
            row = f"| {name} | {acc} | {train_acc} | {agree} | {time.time() - start:.0f} s |"
        except ValueError as e:
            row = f"| {name} | raises: {str(e)[:60]}… | – | – | – |"
        print(row, flush=True)
        rows.append(row)
    text = "\n".join([
        f"Command: `python bench/small_batch_digits.py` ({time.strftime('%Y-%m-%d')}, {epochs} epochs, Adam 1e-3, "
        f"{len(x_train)} training / {len(x_test)} test images, CPU, fixed seeds). The last BN sees (N, 64, 1, 1).",
        "", "| variant | test accuracy (eval mode) | test accuracy (train mode, batch 1) | train/eval agreement | time |",
        "|---|---|---|---|---|", *rows])
    print(text)
    write_section("small_batch_digits", text)


if __name__ == "__main__":
    main()
