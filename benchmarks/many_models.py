"""Many models (paper Fig. 4): accuracy of the merge of the first n of N client models, n = 2..N, per method.

    python -m benchmarks.many_models --scale cpu --data-root ../shared/data   # VGG11 x0.25, 5 IID clients

CPU scale: the N clients split the non-probe training data IID (so each has 1/N of it) and each trains from
its own seed; merges of n = 2..N of them, all-to-one onto client 0, with and without REPAIR/BN reset.
"""
from __future__ import annotations

import time

from fedmerge.client.train import ensemble_evaluate
from fedmerge.common.merge import has_batchnorm, merge_models
from fedmerge.common.probe import as_batches

from .common import Setup, base_parser, md_table, pct, resolve, train_clients, write_results


def main(argv=None):
    p = base_parser(__doc__)
    p.add_argument("--clients", type=int, default=5)
    p.add_argument("--split", default="iid")
    p.add_argument("--methods", default="avg,permute,cca")
    args = p.parse_args(argv)
    sc = resolve(args, "many_models")
    setup = Setup(args, sc, args.split, args.clients)
    print(f"data: {setup.describe()}", flush=True)
    models = train_clients(args, sc, setup, args.clients,
                           f"{args.arch}_w{sc['width']}_e{sc['epochs']}_n{args.clients}_{args.split}_s{args.seed}")
    probe = as_batches(setup.probe_loader)
    bases = [pct(m, setup.test_loader, args.device) for m in models]
    bn = has_batchnorm(models[0])
    post = "BN reset" if bn else "REPAIR"
    rows, raw = [], []
    for n in range(2, args.clients + 1):
        ens = 100.0 * ensemble_evaluate(models[:n], setup.test_loader, device=args.device)["accuracy"]
        row = [n, sum(bases[:n]) / n, ens]
        for method in args.methods.split(","):
            for use_post in (False, True):
                kw = {"bn_reset": use_post} if bn else {"bn_reset": False, "repair": use_post}
                t = time.perf_counter()
                merged, info = merge_models(models[:n], probe, method=method, reference=0, gamma="auto",
                                            return_info=True, device=args.device, **kw)
                acc = pct(merged, setup.test_loader, args.device)
                raw.append({"n": n, "method": method, "post": post if use_post else "none", "accuracy": acc,
                            "gamma": info.gamma, "seconds": time.perf_counter() - t})
                row.append(acc)
                print(raw[-1], flush=True)
        rows.append(row)
    headers = ["models", "mean base %", "ensemble %"] + [f"{m}{' + ' + post if u else ''} %"
                                                         for m in args.methods.split(",") for u in (False, True)]
    header = (f"# Many models — {args.arch} x{sc['width']} on {setup.train.name}, {args.split} split over "
              f"{args.clients} clients, {sc['epochs']} epochs, probe {sc['probe_size']}, gamma auto, "
              f"reference client 0; seed {args.seed}\n\nBase accuracies: "
              + ", ".join(f"{b:.2f}" for b in bases) + "\n\n")
    write_results(sc["out"], "many_models", {"bases": bases, "results": raw, "data": setup.describe(),
                                             "config": {k: str(v) for k, v in sc.items()}},
                  header + md_table(headers, rows))


if __name__ == "__main__":
    main()
