"""Shared pieces of the benchmark commands: data, client training with checkpoint caching, result files."""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from fedmerge.client.train import TrainConfig, train
from fedmerge.common.engine.methods import METHODS
from fedmerge.common.task.checkpoint import load_checkpoint, save_checkpoint
from fedmerge.common.task.data import (
    canonical_name,
    dataset_info,
    load_dataset,
    make_loader,
    set_seed,
    split_probe_pool,
)
from fedmerge.common.task.evaluate import evaluate
from fedmerge.common.task.models import build_model
from fedmerge.common.task.splits import make_split

SCALES = {
    # CPU: narrow models, few epochs, batch 128. Paper: the paper's widths and 200 epochs, batch 500, for a GPU.
    "cpu": {"width": 0.25, "epochs": 12, "batch_size": 128, "lr": 0.1, "probe_size": 2000},
    "paper": {"width": 1.0, "epochs": 200, "batch_size": 500, "lr": 0.4, "probe_size": 5000},
}
# Peak learning rate per architecture where it differs from the scale's (the REPAIR/CCA Merge recipes train
# VGG without BatchNorm at 0.08: at batch 500 and lr 0.4 VGG11 x1 diverged within 11 epochs on an H100).
ARCH_LR = {("vgg11", "paper"): 0.08, ("vgg16", "paper"): 0.08}
# The data regime of the paper's Table 1 and Fig. 4: every client trains on all non-probe training images, from
# its own seed. The default of two_models and many_models and of the studies reusing their models; the Table 3
# analogues (80/20, Dirichlet, disjoint) are benchmarks.splits'.
SAME_DATA = "same"


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--data-root", default=None)
    p.add_argument("--arch", default="vgg11")
    p.add_argument("--width", type=float, default=None, help="width multiplier (default: by scale)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs per client (default: by scale)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: by scale and arch)")
    p.add_argument("--probe-size", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="results folder (default: results/<scale>/<experiment>)")
    p.add_argument("--device", default=None)
    p.add_argument("--max-train", type=int, default=None, help="cap training images (smoke runs)")
    p.add_argument("--max-test", type=int, default=None, help="cap test images (smoke runs)")
    return p


def resolve(args, name: str) -> dict:
    sc = dict(SCALES[args.scale])
    sc["lr"] = ARCH_LR.get((getattr(args, "arch", None), args.scale), sc["lr"])
    for k in ("width", "epochs", "probe_size", "lr"):
        if getattr(args, k, None) is not None:
            sc[k] = getattr(args, k)
    sc["out"] = Path(args.out or Path("results") / args.scale / name)
    sc["out"].mkdir(parents=True, exist_ok=True)
    return sc


class Setup:
    """Data, probe and split for one experiment, all seeded."""

    def __init__(self, args, sc: dict, split: str, num_clients: int, alpha: float = 0.5):
        set_seed(args.seed)
        self.train = load_dataset(args.dataset, "train", data_root=args.data_root)
        self.test = load_dataset(args.dataset, "test", data_root=args.data_root)
        rng = np.random.default_rng(args.seed)
        if args.max_train:
            self.train = self.train.subset(np.sort(rng.permutation(len(self.train))[: args.max_train]))
        if args.max_test:
            self.test = self.test.subset(np.sort(rng.permutation(len(self.test))[: args.max_test]))
        self.info = dataset_info(args.dataset)
        self.probe_idx, pool = split_probe_pool(len(self.train), sc["probe_size"], args.seed)
        parts = make_split(split, self.train.y[pool], num_clients, seed=args.seed, alpha=alpha)
        self.parts = [pool[p] for p in parts]
        self.probe_loader = make_loader(self.train, self.probe_idx, batch_size=250, train=False)
        self.test_loader = make_loader(self.test, None, batch_size=500, train=False)
        self.split, self.alpha = split, alpha

    def describe(self) -> dict:
        return {"dataset": self.train.name, "source": self.train.source, "train_images": len(self.train),
                "test_images": len(self.test), "probe_size": int(len(self.probe_idx)),
                "client_sizes": [int(len(p)) for p in self.parts], "split": self.split}


def client_seed(args, i: int) -> int:
    """Client ``i``'s own seed: its initialisation, data order and augmentation (as the ClientApp derives
    ``seed * 1000 + partition id``)."""
    return args.seed * 1000 + i


def checkpoint_tag(args, sc: dict, split: str, clients: int | None = None, extra: str = "") -> str:
    """Name stem of an experiment's client checkpoints: architecture, width, epochs, (number of clients),
    split, ``extra`` and seed. Studies that reuse another experiment's models rebuild its tag with this."""
    n = f"_n{clients}" if clients is not None else ""
    return f"{args.arch}_w{sc['width']}_e{sc['epochs']}{n}_{split.replace('/', '-')}{extra}_s{args.seed}"


def training_record(args, sc: dict, num_clients: int) -> dict:
    """How the clients were trained, for every result JSON: seeds, learning rate, epochs, batch size, width."""
    return {"seed": args.seed, "client_seeds": [client_seed(args, i) for i in range(num_clients)], "lr": sc["lr"],
            "epochs": sc["epochs"], "batch_size": sc["batch_size"], "width": sc["width"],
            "probe_size": sc["probe_size"], "max_train": args.max_train, "max_test": args.max_test}


def add_split_arg(p: argparse.ArgumentParser, source: str = "") -> None:
    """``--split`` of the experiments in the paper's same-data regime (default :data:`SAME_DATA`)."""
    reuse = f"; must be {source}'s split to reuse its checkpoints" if source else ""
    p.add_argument("--split", default=SAME_DATA,
                   help=f"client data split (default {SAME_DATA}: every client trains on all non-probe images, the "
                        f"paper's Table 1 / Fig. 4 regime; 80/20, iid, dirichlet, disjoint{reuse})")


def train_clients(args, sc: dict, setup: Setup, num_clients: int, tag: str, head=None,
                  ckpt_dir=None) -> list[torch.nn.Module]:
    """Train (or load cached) client models, each from its own seed (different inits, as in the paper).

    Checkpoints live in ``ckpt_dir`` (default ``<out>/checkpoints``) as ``<tag>_client<i>``."""
    models = []
    ckpt_dir = Path(ckpt_dir) if ckpt_dir is not None else sc["out"] / "checkpoints"
    for i in range(num_clients):
        path = ckpt_dir / f"{tag}_client{i}"
        cfg_model = {"arch": args.arch, "num_classes": setup.info["num_classes"], "width": sc["width"],
                     "in_channels": setup.info["in_channels"], "image_size": setup.info["image_size"]}
        if Path(str(path) + ".json").exists():
            model, cfg = load_checkpoint(path)
            models.append(model)
            continue
        seed = client_seed(args, i)
        set_seed(seed)
        model = build_model(**cfg_model, head=head)
        loader = make_loader(setup.train, setup.parts[i], batch_size=sc["batch_size"], train=True, seed=seed)
        t = time.perf_counter()
        train(model, loader, TrainConfig(epochs=sc["epochs"], lr=sc["lr"], batch_size=sc["batch_size"],
                                         device=args.device, seed=seed, progress=True,
                                         desc=f"{tag} client {i}: train"))
        model.cpu().eval()
        save_checkpoint(model, path, {**cfg_model, "epochs": sc["epochs"], "lr": sc["lr"], "seed": seed,
                                      "seconds": time.perf_counter() - t, "client": i, "tag": tag})
        models.append(model)
    return models


# --- replicates: independent pairs / client sets, reported as mean ± std (issue 16) ----------------------------

def add_replicates_arg(p: argparse.ArgumentParser, flag: str, what: str) -> None:
    """``flag`` (``--pairs`` / ``--sets``): the number of independent replicates of an experiment, in
    ``args.replicates`` (default 1)."""
    p.add_argument(flag, dest="replicates", type=int, default=1, metavar="N",
                   help=f"N independent {what} (default 1): replicate r is the experiment at seed --seed + r (its "
                        "own client seeds, training subset, probe and split; checkpoints cached per seed); every "
                        "table row is the mean ± sample std over the N")


def replicate_args(args) -> list[argparse.Namespace]:
    """One copy of ``args`` per replicate, replicate r with seed ``args.seed + r`` (everything seeded by the
    seed follows: client seeds, training subset, probe, split, checkpoint tag)."""
    n = getattr(args, "replicates", 1)
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"the number of replicates must be an integer >= 1, got {n!r}")
    return [argparse.Namespace(**{**vars(args), "seed": args.seed + r}) for r in range(n)]


def mean_std(values) -> dict:
    """``{"mean", "std", "n", "values"}`` of ``values``: the mean and the sample standard deviation (ddof 1;
    ``None`` for a single value, where it is undefined)."""
    v = [float(x) for x in values]
    if not v:
        raise ValueError("mean_std needs at least one value")
    return {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else None, "n": len(v),
            "values": v}


def fmt_mean_std(s: dict) -> str:
    """``"62.31 ± 1.05"`` (one value: ``"62.31"``)."""
    return f"{s['mean']:.2f}" if s["std"] is None else f"{s['mean']:.2f} ± {s['std']:.2f}"


def summarise(runs: list[list[dict]], keys: tuple[str, ...], value: str = "accuracy") -> list[dict]:
    """Aggregate per-replicate records: one row per distinct ``keys`` tuple (in first-seen order), with those
    keys and ``value`` as :func:`mean_std` over the replicates. Every replicate must hold each key once."""
    order: dict[tuple, list[float]] = {}
    for r, recs in enumerate(runs):
        seen = set()
        for rec in recs:
            k = tuple(rec[f] for f in keys)
            if k in seen:
                raise ValueError(f"replicate {r} holds {dict(zip(keys, k))} twice")
            seen.add(k)
            order.setdefault(k, []).append(rec[value])
    rows = []
    for k, vals in order.items():
        if len(vals) != len(runs):
            raise ValueError(f"{dict(zip(keys, k))} is in {len(vals)} of {len(runs)} replicates")
        rows.append({**dict(zip(keys, k)), value: mean_std(vals)})
    return rows


def replicates_record(reps: list) -> dict:
    """The replicates of a result JSON: their number and seeds."""
    return {"n": len(reps), "seeds": [a.seed for a in reps]}


def environment() -> dict:
    return {"torch": torch.__version__, "device": "cuda" if torch.cuda.is_available() else "cpu",
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "threads": torch.get_num_threads(), "python": platform.python_version(), "cpus": os.cpu_count()}


def write_results(out: Path, name: str, payload: dict, table_md: str) -> None:
    (out / f"{name}.json").write_text(json.dumps(payload, indent=2, default=float))
    (out / f"{name}.md").write_text(table_md)
    print(table_md)


def md_table(headers: list[str], rows: list[list]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.2f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def sync(dev: torch.device) -> None:
    """Wait for the device's queued work (timing on CUDA); nothing to wait for on the CPU."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


@torch.no_grad()
def forward_pass(model, batches, dev) -> None:
    """One plain forward pass of ``model`` (already on ``dev``) over ``batches``."""
    for x, _ in batches:
        model(x.to(dev))


def pct(model, loader, device=None) -> float:
    return 100.0 * evaluate(model, loader, device=device)["accuracy"]


# --- shared by many_models, splits and sensitivity -------------------------------------------------------------

def apply_arch_defaults(args, defaults: dict) -> None:
    """Fill ``args`` attributes the user left unset (``None``) from ``defaults[(arch, scale)]`` (a dict)."""
    for k, v in defaults.get((args.arch, args.scale), {}).items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)


def data_note(ds) -> str:
    """One line: which data set, from where, and how exact it is (for result headers)."""
    src = str(ds.source)
    if ds.name == "cifar10" and src.startswith("npz:"):
        return ("CIFAR-10 rebuilt from the JPEG copy (q75, 4:2:0): labels exact, pixels near-exact "
                "(lossy decodes of the originals)")
    if ds.name == "cifar10-mini":
        return ("cifar10-mini, the embedded 8,000/2,000-image CIFAR-10 subset (JPEG q75): labels exact, pixels "
                "near-exact")
    if src.startswith("torchvision:"):
        return f"{ds.name} from the original torchvision files: exact"
    if src.startswith("npz:") and ds.name in ("mnist", "fashion_mnist"):
        return f"{ds.name} from the offline npz: bit-exact"
    return f"{ds.name} ({src})"


def test_logits(models, loader, device=None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every model's test logits (once), for per-model and any ensemble accuracies."""
    from fedmerge.common.task.evaluate import predict_logits

    outs = [predict_logits(m, loader, device) for m in models]
    return [o[0] for o in outs], outs[0][1]


def acc_pct(logits: torch.Tensor, y: torch.Tensor) -> float:
    """Accuracy in percent of ``logits`` (a model, or the mean logits of an ensemble) against ``y``."""
    return 100.0 * float((logits.argmax(1) == y).float().mean())


def command_line(module: str, argv) -> str:
    return f"python -m benchmarks.{module}" + ("".join(" " + a for a in argv) if argv else "")


# Methods whose merge the cache below reproduces through merge_from_statistics (checked against merge_models
# in tests/test_benchmarks.py): every registered method but gcca; any other method name goes to merge_models.
CACHEABLE_METHODS = tuple(m for m in METHODS if m != "gcca")


def first_models(stats, n: int):
    """Statistics of the first ``n`` models (their own blocks and the cross blocks among them), reference 0.
    Per-model and per-pair blocks do not depend on the other models, so this is what collecting statistics
    of ``models[:n]`` alone would give."""
    import dataclasses

    return dataclasses.replace(stats, own=stats.own[:n], cross={k: v for k, v in stats.cross.items() if max(k) < n},
                               reference=0)


class MergeCache:
    """``merge_models(models[:n], probe, method, reference=0, ...)`` for many ``n`` and methods, with the probe
    statistics collected once.

    The probe is split into a fitting and a held-out part exactly as :func:`merge_models` splits it (only when
    something is chosen on it: gamma with ``gamma="auto"``, ZipIt!'s alpha and beta); the statistics of all N
    models on the part a merge uses are collected the first time they are needed (reference pairs (0, i), or
    all pairs for ZipIt!), and those of the first n models are a prefix of them (per-model and per-pair blocks
    do not depend on the other models). So the result is the one ``merge_models`` gives, without recollecting
    statistics for every (n, method, post-processing).
    Methods outside :data:`CACHEABLE_METHODS`, or a probe without labels, go through ``merge_models``.
    """

    def __init__(self, models, probe, device=None, held_out: float = 0.2, seed: int = 0):
        from fedmerge.common.wire.probe import as_batches

        self.models = list(models)
        self.probe = as_batches(probe)
        self.device, self.held_out, self.seed = device, held_out, seed
        self._split = None
        self._spec = None
        self._stats: dict = {}
        self._states = [{k: v.detach().cpu() for k, v in m.state_dict().items()} for m in self.models]
        self.statistics_s = 0.0  # time spent collecting statistics (not counted in merge seconds)

    def _parts(self, select: bool):
        if not select:
            return self.probe, None
        if self._split is None:
            self._split = self.probe.split(self.held_out, self.seed)
        return self._split

    @property
    def spec(self):
        if self._spec is None:
            from fedmerge.common.engine.graph import derive_spec

            self._spec = derive_spec(self.models[0], self.probe.example())
        return self._spec

    def _statistics(self, pairs: str, select: bool, n: int):
        from fedmerge.common.engine.stats import collect_statistics

        fit, _ = self._parts(select)
        st = self._stats.get((pairs, select))
        if st is None and pairs == "reference":
            st = self._stats.get(("all", select))  # all pairs include the reference pairs
        if st is None:
            t = time.perf_counter()
            st = collect_statistics(self.models, fit, reference=0, pairs=pairs, spec=self.spec,
                                    device=self.device)
            self.statistics_s += time.perf_counter() - t
            self._stats[(pairs, select)] = st
        return first_models(st, n)

    def merge(self, n: int, method: str, *, gamma="auto", bn_reset: bool = False, repair: bool = False,
              gamma_grid=None, distill: bool | dict = False):
        """(merged model, MergeInfo, seconds without statistics collection) for the first ``n`` models."""
        from fedmerge.common.engine.merge import (
            GAMMA_GRID,
            METHODS,
            merge_from_statistics,
            merge_models,
            selection_candidates,
        )

        grid = GAMMA_GRID if gamma_grid is None else gamma_grid
        models = self.models[:n]
        t = time.perf_counter()
        if method not in CACHEABLE_METHODS or method not in METHODS or not self.probe.has_labels:
            merged, info = merge_models(models, self.probe, method=method, reference=0, gamma=gamma,
                                        bn_reset=bn_reset, repair=repair, device=self.device, distill=distill,
                                        held_out=self.held_out, seed=self.seed, gamma_grid=grid, return_info=True)
            return merged, info, time.perf_counter() - t
        m = METHODS[method]
        # as merge_models decides it
        select = bool(selection_candidates(method, gamma, gamma_grid=grid)) or bool(distill)
        fit, held = self._parts(select)
        s0 = self.statistics_s
        stats = None
        if m.needs in ("stats", "stats_all"):
            stats = self._statistics("all" if m.needs == "stats_all" else "reference", select, n)
        g = "auto" if select else (None if isinstance(gamma, str) else gamma)
        merged, info = merge_from_statistics(
            models[0], self._states[:n], self.spec, stats, method=method, reference=0, gamma=g,
            weights=[1.0 / n] * n, bn_reset=bn_reset, repair=repair, reset_batches=fit, eval_batches=held,
            eval_target=None, gamma_grid=grid, device=self.device, repair_models=models, distill=distill)
        return merged, info, time.perf_counter() - t - (self.statistics_s - s0)


def add_checkpoints_arg(p: argparse.ArgumentParser, source: str) -> None:
    """``--checkpoints``: where a study finds (or trains) the client models of the experiment ``source``."""
    p.add_argument("--checkpoints", default=None,
                   help=f"folder of the {source} checkpoints (default: results/<scale>/{source}/checkpoints; "
                        "<out>/checkpoints with --max-train/--max-test or a data set other than cifar10)")


def shared_checkpoints(args, sc: dict, source: str) -> Path:
    """The checkpoint folder of ``source``'s models that a study reuses; smoke runs (capped data, other data
    sets) keep their own under ``<out>/checkpoints`` so that they never touch the real cache."""
    if args.checkpoints:
        return Path(args.checkpoints)
    if args.max_train or args.max_test or canonical_name(args.dataset) != "cifar10":
        return sc["out"] / "checkpoints"
    return Path("results") / args.scale / source / "checkpoints"


class ReusedClients(NamedTuple):
    setup: Setup
    models: list
    checkpoints: Path
    tag: str
    cached: bool   # every client's checkpoint was there before this run


def reuse_clients(args, sc: dict, source: str, num_clients: int = 2) -> ReusedClients:
    """The client models of the experiment ``source`` that a study reuses: its data set-up and checkpoint tag
    (``two_models``: 2 clients, no count in the tag; ``many_models``: ``num_clients``, counted), loaded from
    :func:`shared_checkpoints` or trained into it as ``source`` would."""
    setup = Setup(args, sc, args.split, num_clients)  # as the source experiment, so the checkpoints match
    print(f"data: {setup.describe()}", flush=True)
    ckpt = shared_checkpoints(args, sc, source)
    tag = checkpoint_tag(args, sc, args.split, None if source == "two_models" else num_clients)
    cached = all(Path(f"{ckpt / tag}_client{i}.json").exists() for i in range(num_clients))
    return ReusedClients(setup, train_clients(args, sc, setup, num_clients, tag, ckpt_dir=ckpt), ckpt, tag, cached)


def comma_list(text: str, cast=str) -> list:
    """``"a, b,,c"`` -> ``["a", "b", "c"]``: the non-empty items of a comma-separated option, each through
    ``cast`` (``int``, ``float``, ...)."""
    return [cast(v.strip()) for v in str(text).split(",") if v.strip()]


def method_list(text: str, p: argparse.ArgumentParser | None = None) -> list[str]:
    """``"avg, cca"`` -> ``["avg", "cca"]``: names of the merge registry (``fedmerge.common.engine.merge.METHODS``);
    an unknown one is a usage error of ``p`` (else a ValueError)."""
    from fedmerge.common.engine.merge import METHODS

    methods = comma_list(text)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        msg = f"unknown method(s) {unknown}; available: {', '.join(sorted(METHODS))}"
        if p is not None:
            p.error(msg)
        raise ValueError(msg)
    return methods
