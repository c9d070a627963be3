"""CPU step time of one DP-SGD step: fastdp (bk, hooks) vs non-private, microbatching and Opacus.

    OMP_NUM_THREADS=2 python -m bench.bench_engine_cpu [--repeats 10]

Opacus is optional (``pip install opacus``); without it its rows are left out. Each
method gets a fresh model; times are medians after warm-up, in one process.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn
import torch.nn.functional as F

from fastdp import GradSampleModule
from fastdp.engine.clipping import FlatClipping


def mlp():
    return nn.Sequential(nn.Linear(3072, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)), (256, 3072)


def cnn():
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.GroupNorm(8, 32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.GroupNorm(8, 64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 8 * 8, 10),
    )
    return model, (128, 3, 32, 32)


MODELS = {"mlp-3072-1024-1024-10 (B=256)": mlp, "cnn-2conv-groupnorm 32x32 (B=128)": cnn}


def non_private(model, x, y):
    def step():
        F.cross_entropy(model(x), y).backward()
        model.zero_grad()
    return step


def fastdp_mode(mode):
    def make(model, x, y):
        gsm = GradSampleModule(model, mode=mode, clipping=FlatClipping(1.0))
        def step():
            F.cross_entropy(gsm(x), y).backward()
            gsm.zero_grad()
        return step
    return make


def microbatching(model, x, y):
    def step():
        for i in range(x.shape[0]):
            F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
            norm = torch.sqrt(sum(p.grad.square().sum() for p in model.parameters()))
            for p in model.parameters():
                p.grad.mul_(min(1.0, 1.0 / (float(norm) + 1e-6)))
        model.zero_grad()
    return step


def opacus_hooks(model, x, y):
    from opacus.grad_sample import GradSampleModule as OpacusGSM

    gsm = OpacusGSM(model, loss_reduction="mean")
    params = [p for p in gsm.parameters() if p.requires_grad]

    def step():
        F.cross_entropy(gsm(x), y).backward()
        norms = torch.stack([p.grad_sample.flatten(1).norm(dim=1) for p in params]).norm(dim=0)
        factors = (1.0 / (norms + 1e-6)).clamp(max=1.0)
        for p in params:
            p.summed_grad = torch.einsum("i,i...", factors, p.grad_sample)
        gsm.zero_grad()
    return step


METHODS = {"non-private": non_private, "fastdp bk": fastdp_mode("bk"), "fastdp hooks": fastdp_mode("hooks"),
           "opacus hooks": opacus_hooks, "microbatching": microbatching}


def median_time(step, repeats: int) -> float:
    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--skip-microbatching", action="store_true")
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print("| model | method | step (ms) | × non-private |")
    print("|---|---|---|---|")
    for model_name, make_model in MODELS.items():
        baseline = None
        for method, make_step in METHODS.items():
            if method == "microbatching" and args.skip_microbatching:
                continue
            torch.manual_seed(0)
            model, shape = make_model()
            x, y = torch.randn(shape), torch.randint(0, 10, (shape[0],))
            try:
                step = make_step(model, x, y)
            except ImportError:
                continue
            seconds = median_time(step, 2 if method == "microbatching" else args.repeats)
            baseline = baseline or seconds
            print(f"| {model_name} | {method} | {seconds * 1e3:.1f} | {seconds / baseline:.2f} |", flush=True)


if __name__ == "__main__":
    main()
