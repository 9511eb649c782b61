"""BatchNorm nets: BatchNorm folded into its producer before aligning (``bn_fold=True``) vs transformed like units.

    python -m benchmarks.bn_fold --seeds 3                  # ~5 min on 2 cores

A small CNN with BatchNorm (conv 16 - BN - ReLU - pool - conv 32 - BN - ReLU - pool - linear) on Fashion-MNIST,
3 clients, each from its own seed, on an IID split or a label-skewed one (6 classes each: 0-5, 4-9, {0, 1, 6-9});
``--steps`` SGD steps of batch 64 per client. The clients are merged onto client 0 with CCA and with Permute,
each as before (BatchNorm vectors transformed like units, then a BatchNorm reset on the probe) and with
``bn_fold=True``, without and with REPAIR; γ chosen on the held-out 20% of the labelled 500-image probe (never the
test set). Every cell: mean ± sample std over ``--seeds`` seeds (seed s: its own split draw, inits, batches).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from fedmerge.common.engine.merge import merge_models
from fedmerge.common.task.data import load_dataset, to_tensor

from .common import (
    comma_list,
    command_line,
    environment,
    fmt_mean_std,
    md_table,
    mean_std,
    write_results,
)

SPLITS = ("iid", "skew")


class SmallBNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c2, self.b2 = nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.fc = nn.Linear(32 * 7 * 7, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.b1(self.c1(x))), 2)
        return self.fc(torch.flatten(F.max_pool2d(F.relu(self.b2(self.c2(x))), 2), 1))


def _acc(model, x, y) -> float:
    with torch.no_grad():
        return 100.0 * (model.eval()(x).argmax(1) == y).float().mean().item()


def run(split: str, seed: int, data, steps: int) -> dict:
    x, y, xt, yt = data
    probe, pool = (x[:500], y[:500]), torch.arange(500, len(y))
    g = torch.Generator().manual_seed(seed)
    yp = y[pool]
    masks = {"iid": [(r := torch.rand(len(pool), generator=g)) < 1 / 3, (r >= 1 / 3) & (r < 2 / 3), r >= 2 / 3],
             "skew": [yp < 6, yp >= 4, (yp < 2) | (yp >= 6)]}[split]
    models = []
    for i, m in enumerate(masks):
        torch.manual_seed(1000 * seed + i)
        model, idx = SmallBNNet(), pool[m]
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        model.train()
        for _ in range(steps):
            b = idx[torch.randint(len(idx), (64,))]
            opt.zero_grad()
            F.cross_entropy(model(x[b]), y[b]).backward()
            opt.step()
        models.append(model.eval())
    rec = {"split": split, "seed": seed, "clients": [_acc(m, xt, yt) for m in models]}
    with torch.no_grad():
        rec["ensemble"] = 100.0 * (torch.stack([m(xt) for m in models]).mean(0).argmax(1) == yt).float().mean().item()
    rec["merges"] = {}
    for method in ("cca", "permute"):
        for fold in (False, True):
            for repair in (False, True):
                t = time.perf_counter()
                merged, info = merge_models(models, probe, method=method, reference=0, bn_fold=fold, repair=repair,
                                            seed=seed, return_info=True)
                key = f"{method}, {'BN folded' if fold else 'BN as units + BN reset'}{' + REPAIR' if repair else ''}"
                rec["merges"][key] = {"accuracy": _acc(merged, xt, yt), "gamma": info.gamma,
                                      "seconds": time.perf_counter() - t}
    print({k: round(v["accuracy"], 2) for k, v in rec["merges"].items()}, flush=True)
    return rec


def main(argv=None):
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--splits", default=",".join(SPLITS))
    p.add_argument("--max-train", type=int, default=20000)
    p.add_argument("--max-test", type=int, default=2000)
    p.add_argument("--data-root", default=None)
    p.add_argument("--out", default="results/cpu/bn_fold")
    args = p.parse_args(argv)
    splits = comma_list(args.splits)
    bad = [s for s in splits if s not in SPLITS]
    if bad or args.seeds < 1:
        p.error(f"--splits must be a comma list of {', '.join(SPLITS)} (got {bad}) and --seeds >= 1")
    torch.set_num_threads(1)
    tr, te = (load_dataset("fashion_mnist", part, data_root=args.data_root) for part in ("train", "test"))
    data = (to_tensor(tr.x[:args.max_train], tr.name), torch.from_numpy(tr.y[:args.max_train]),
            to_tensor(te.x[:args.max_test], te.name), torch.from_numpy(te.y[:args.max_test]))
    t0 = time.time()
    runs = [run(s, seed, data, args.steps) for s in splits for seed in range(args.seeds)]
    rows = []
    for s in splits:
        mine = [r for r in runs if r["split"] == s]
        rows.append([s, "mean client", fmt_mean_std(mean_std([sum(r["clients"]) / 3 for r in mine]))])
        rows.append([s, "ensemble", fmt_mean_std(mean_std([r["ensemble"] for r in mine]))])
        for key in mine[0]["merges"]:
            rows.append([s, key, fmt_mean_std(mean_std([r["merges"][key]["accuracy"] for r in mine]))])
    md = (f"# BatchNorm folded before aligning vs transformed like units — small BN CNN, Fashion-MNIST, 3 clients, "
          f"{args.steps} steps, n = {args.seeds} seeds\n\n"
          f"`{command_line('bn_fold', sys.argv[1:] if argv is None else argv)}`"
          "\n\n" + md_table(["split", "model / merge", "test acc %"], rows) + "\n")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_results(out, "bn_fold", {"runs": runs, "args": vars(args), "seconds": time.time() - t0,
                                   "environment": environment()}, md)


if __name__ == "__main__":
    main()
