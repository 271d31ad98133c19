"""Why the vectorized engine trains convolutional models without a grouped-conv path one client
at a time on the CPU: seconds of one local SGD step of K clients through ``torch.func.vmap``
(the generic path) against a plain loop over the clients, same model, batches and thread count.

    .venv/bin/python benchmarks/bench_conv_vmap.py [--model authors_cnn] [--clients 60]
        [--batch 12] [--threads 1]

The defaults are the authors' federation (configs/paper1_authors.toml): most clients hold 9-15
images of a task, so a step is a small batch per client. Prints both times and the ratio.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad_and_value, vmap

from mmfl.tasks.models import build_model


def best_of(fn, repeat: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="authors_cnn")
    ap.add_argument("--clients", type=int, default=60)
    ap.add_argument("--batch", type=int, default=12)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = build_model(args.model, {}, (1, 28, 28), 10, init_seed=0)
    k, b = args.clients, args.batch
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(k, b, 1, 28, 28, generator=gen)
    y = torch.randint(0, 10, (k, b), generator=gen)
    stacked = {n: p.detach().unsqueeze(0).repeat(k, *[1] * p.dim())
               for n, p in model.named_parameters()}

    def loss(p, xb, yb):
        return F.nll_loss(functional_call(model, p, (xb,)), yb)

    step = vmap(grad_and_value(loss))
    params = list(model.parameters())

    def loop():
        for i in range(k):
            torch.autograd.grad(F.nll_loss(model(x[i]), y[i]), params)

    t_vmap = best_of(lambda: step(stacked, x, y), args.repeat)
    t_loop = best_of(loop, args.repeat)
    print(f"{args.model}, {k} clients x batch {b}, {args.threads} thread(s): "
          f"vmap {t_vmap * 1e3:.0f} ms, loop {t_loop * 1e3:.0f} ms per step; "
          f"vmap / loop = {t_vmap / t_loop:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
