"""Two models (paper Table 1): base models, ensemble, and every merging method.

    python -m benchmarks.two_models --scale cpu                  # VGG11 x0.25 on CIFAR-10, CPU
    python -m benchmarks.two_models --scale paper                # VGG11 x1, 200 epochs: for a GPU
    python -m benchmarks.two_models --scale cpu --split 80/20    # the two-party 80/20 split (Table 3-style)

By default both models train on the same full training set (every non-probe image, ``--split same``), each
from its own seed, init and data order: the regime of the paper's Table 1. At CPU scale that is about twice
the training of the 80/20 pair (each model sees all 48,000 non-probe images instead of ~24,000). Each merge is
timed (statistics on the probe, transforms, total); with and without the method's post-processing (REPAIR
for nets without BatchNorm, BatchNorm reset for nets with it). Choices made on the held-out probe slice (CCA's
gamma, ZipIt!'s alpha and beta) are recorded per merge.
"""
from __future__ import annotations

import time

import torch

from fedmerge.client.train import ensemble_evaluate
from fedmerge.common.merge import has_batchnorm, merge_models
from fedmerge.common.probe import as_batches

from .common import (Setup, add_split_arg, base_parser, checkpoint_tag, client_seed, command_line, data_note,
                     environment, forward_pass, md_table, pct, resolve, sync, train_clients, training_record,
                     write_results)
from .plots import bar_chart

METHODS = ["avg", "permute", "weight_matching", "ot", "zipit", "cca"]


def forward_time(models, batches, device=None) -> float:
    dev = torch.device(device) if device is not None else next(models[0].parameters()).device
    for m in models:
        m.to(dev).eval()
    sync(dev)
    t = time.perf_counter()
    for m in models:
        forward_pass(m, batches, dev)
    sync(dev)
    return time.perf_counter() - t


def main(argv=None):
    p = base_parser(__doc__)
    p.add_argument("--methods", default=",".join(METHODS))
    add_split_arg(p)
    args = p.parse_args(argv)
    sc = resolve(args, "two_models")
    setup = Setup(args, sc, args.split, 2)
    print(f"data: {setup.describe()}")
    t0 = time.perf_counter()
    models = train_clients(args, sc, setup, 2, checkpoint_tag(args, sc, args.split))
    probe = as_batches(setup.probe_loader)
    bases = [pct(m, setup.test_loader, args.device) for m in models]
    ens = 100.0 * ensemble_evaluate(models, setup.test_loader, device=args.device)["accuracy"]
    fwd = forward_time(models, probe)
    bn = has_batchnorm(models[0])
    post_name = "BN reset" if bn else "REPAIR"
    rows, raw = [], []
    for method in args.methods.split(","):
        for post in (False, True):
            kw = {"bn_reset": post, "repair": False} if bn else {"bn_reset": False, "repair": post}
            t = time.perf_counter()
            merged, info = merge_models(models, probe, method=method, reference=0, gamma="auto", return_info=True,
                                        device=args.device, **kw)
            total = time.perf_counter() - t
            acc = pct(merged, setup.test_loader, args.device)
            tm = info.timings
            rec = {"method": method, "post": post_name if post else "none", "accuracy": acc, "gamma": info.gamma,
                   "params": info.params, "statistics_s": tm.get("statistics", 0.0),
                   "transforms_s": tm.get("transforms", 0.0), "total_s": total}
            raw.append(rec)
            rows.append([method, rec["post"], acc, ", ".join(f"{k} {v:g}" for k, v in info.params.items()),
                         rec["statistics_s"], rec["transforms_s"], total])
            print(f"[{time.perf_counter() - t0:.0f} s]", rows[-1], flush=True)
    header = (f"# Two models, {args.split} split — {args.arch} x{sc['width']} on {setup.train.name}\n\n"
              f"Data: {data_note(setup.train)}; {len(setup.train)} train / {len(setup.test)} test images; clients of "
              f"{', '.join(str(len(q)) for q in setup.parts)} images; probe {sc['probe_size']} images held out "
              f"from client data (20% of it held out again to choose CCA's gamma and ZipIt!'s alpha, beta); "
              f"{sc['epochs']} epochs per model, lr {sc['lr']:g}, batch {sc['batch_size']}; seed {args.seed} "
              f"(client seeds {client_seed(args, 0)}, {client_seed(args, 1)}); device "
              f"{environment()['device']}.\n\n"
              f"Base A {bases[0]:.2f}%, base B {bases[1]:.2f}%, ensemble {ens:.2f}%. One plain forward pass of "
              f"both models over the probe: {fwd:.2f} s.\n\n")
    table = md_table(["method", "post-processing", "test acc %", "chosen on held-out probe", "statistics s",
                      "transforms s", "total s"], rows)
    write_results(sc["out"], "two_models", {"config": {**vars(args), **{k: str(v) for k, v in sc.items()}},
                                            "training": training_record(args, sc, 2),
                                            "data": setup.describe(), "bases": bases, "ensemble": ens,
                                            "forward_pass_s": fwd, "results": raw, "environment": environment(),
                                            "command": command_line("two_models", argv)},
                  header + table)
    methods = list(dict.fromkeys(r["method"] for r in raw))
    bar_chart(sc["out"] / "two_models.png", methods,
              {p: [next((r["accuracy"] for r in raw if r["method"] == m and r["post"] == p), None) for m in methods]
               for p in ("none", post_name)},
              title=f"Two models, {args.split} split: {args.arch} x{sc['width']}, {sc['epochs']} epochs, "
                    f"probe {sc['probe_size']}", xlabel="method (post-processing: colour)",
              hlines={"base A": bases[0], "base B": bases[1], "ensemble": ens})


if __name__ == "__main__":
    main()
