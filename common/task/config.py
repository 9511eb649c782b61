"""The federated task's one typed config (:class:`FedConfig`, read from a Flower run config), shared by the
ServerApp, the ClientApp and the offline runs; :mod:`fedmerge.common.task.loaders` derives the model, the
partitions, the probe and the test set from it."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Any, Sequence

from fedmerge.common.engine.methods import METHODS
from fedmerge.common.task.data import dataset_info
from fedmerge.common.task.splits import ALIASES, SPLITS

__all__ = ["FedConfig", "METHOD_CHOICES", "FAULT_KINDS", "option", "parse_faults", "parse_method_schedule"]

#: The matching methods, from the one registry (:data:`fedmerge.common.engine.methods.METHODS`).
METHOD_CHOICES = tuple(METHODS)
#: ``method_schedule="auto"``: the configured method in a round whose clients start from their own
#: initialisations (no global weights sent: round 1 without ``common_init``), plain averaging in a round whose
#: clients all start from the global model.
SCHEDULE_AUTO = "auto"
#: Fault kinds the built-in ClientApp can inject (``--inject-fault KIND[@ROUND]:CLIENT``), each one a way a
#: client can fail or attack: training-phase ``nan`` (a NaN weight), ``shape`` (a weight of another shape),
#: ``bytes`` (a payload that holds another shape than the Array declares), ``huge`` (an upload over the cap),
#: ``scale`` (weights x 1e6), ``count`` (num-examples 10^12), ``partition`` (claims another client's
#: partition), ``nonpsd`` (own covariance not positive semidefinite), ``slow`` (answers after the timeout),
#: ``drop-train`` (raises); statistics-phase ``drop-query`` (raises; the reference too), ``nan-query`` (a NaN
#: cross statistic), ``stale-ref`` (cross statistics against another reference).
FAULT_KINDS = ("nan", "shape", "bytes", "huge", "scale", "count", "partition", "nonpsd", "slow", "drop-train",
               "drop-query", "nan-query", "stale-ref")
BN_RESET_CHOICES = ("auto", "true", "false")
NORM_ACTIONS = ("reject", "clip")


def option(default, help: str = "", *, flag: str | None = None, choices: Sequence[str] | None = None,
           metavar: str | None = None, repeat: bool = False):
    """A :class:`FedConfig` field and how the command line shows it (``fedmerge simulate`` / ``demo`` build their
    options from these): ``help``; ``flag`` where the option's name is not the field's dashed name (``--clients``
    for ``num_clients``); ``choices``; ``metavar``; ``repeat``: the option may be given several times and its
    values are joined with commas (``--inject-fault``). The Flower run-config key is always the dashed name."""
    return dataclasses.field(default=default, metadata={"help": help, "flag": flag, "choices": choices,
                                                        "metavar": metavar, "repeat": repeat})


@dataclass
class FedConfig:
    # data
    dataset: str = option("cifar10-mini", "cifar10 | cifar10-mini (embedded) | mnist | fashion_mnist | cifar100")
    data_root: str = option("", "folder with the data sets (or set FEDMERGE_DATA)")
    split: str = option("iid", " | ".join(SPLITS) + " (same: every client trains on all non-probe images, with its "
                        "own seed, init and data order)")
    alpha: float = option(0.5, "Dirichlet concentration")
    num_clients: int = option(2, "number of clients", flag="--clients")
    probe_size: int = option(500, "probe images")
    probe_from_union: bool = option(False, "draw the probe from all training data")
    held_out: float = option(0.2, "fraction of the probe held out to choose gamma")
    max_train: int = option(0, "cap each client's training images (0 = all; smoke runs)")
    max_test: int = option(0, "cap test images (0 = all)")
    # model and training
    arch: str = option("cnn")
    width: float = option(1.0)
    epochs: float = option(1.0)
    lr: float = option(0.05)
    batch_size: int = option(64)
    seed: int = option(0)
    common_init: bool = option(False, "round 1 from one shared initialisation (else each client's own seed)")
    augment: bool = option(True, "random crop (+ flip for RGB) in local training")
    embedding_dim: int = option(0, "class-embedding head size for split=disjoint (0 = number of classes)")
    # merging
    method: str = option("cca", " | ".join(METHOD_CHOICES))
    method_schedule: str = option(
        SCHEDULE_AUTO, "method per round. auto (default): --method while clients start from their own "
        "initialisations (round 1 without --common-init), plain averaging once they all start from the merged "
        "model; M1,M2,...: one per round, the last repeating (e.g. cca,avg); '': --method in every round",
        metavar="auto|M1,M2,...|''")
    reference: str = option("best", "'best' or a client index")
    gamma: str = option("auto", "'auto' or a number (CCA regularisation)")
    gamma_clients: int = option(0, "CCA, --gamma auto: choose gamma by merging the reference with this many - 1 "
                                   "clients, then merge all with it (0 = choose on all clients)")
    bn_reset: str = option("auto", "reset BatchNorm statistics after merging (auto: when the model has BatchNorm)",
                           choices=BN_RESET_CHOICES)
    repair: bool = option(False, "REPAIR the merged model's unit statistics")
    repair_target: str = option("average", "REPAIR to the clients' average statistics or the reference's (the "
                                           "paper's App. D)", choices=("average", "reference"))
    bn_fold: bool = option(False, "fold BatchNorm into its conv/linear before aligning (exact for CCA; no BatchNorm "
                                  "reset)")
    np_merge: bool = option(False, "NP Merge: learn per-parameter merge coefficients on the labelled probe after "
                                   "alignment (after REPAIR with --repair); uses the probe's labels")
    distill: bool = option(False, "last, fit the merged model to the clients' logit ensemble on the unlabelled "
                                  "probe (label-free distillation)")
    stats_on_server: bool = option(False, "the server holds the probe and computes all statistics (one phase)")
    weighted: bool = option(True, "average weighted by the clients' sample counts")
    stats_dtype: str = option("float64", "dtype the clients send their probe statistics in (accumulated in float64 "
                                         "anyway)", choices=("float64", "float32", "float16", "bfloat16"))
    stats_rank: int = option(0, "send statistics blocks in low-rank form of this rank (0 = full blocks)")
    norm_bound: float = option(10.0, "reject (or clip) a client whose weight norm is beyond this factor of the "
                                     "median (0 = off)")
    norm_action: str = option("reject", "what happens to a client outside the norm bound", choices=NORM_ACTIONS)
    # federation
    num_server_rounds: int = option(1, "federated rounds", flag="--rounds")
    min_clients: int = option(2, "fewest clients a round needs (at most --clients)")
    timeout: float = option(600.0, "seconds a round waits for the clients' replies")
    device: str = option("", "cpu | cuda (default: cuda when available)")
    out: str = option("runs/flwr", "output folder")
    faults: str = option("", "make a client fail or attack (the server must reject it): " + " | ".join(FAULT_KINDS)
                         + ", e.g. nan:1 or scale@2:0", flag="--inject-fault", metavar="KIND[@ROUND]:CLIENT",
                         repeat=True)
    resume: bool = option(False, "continue the run in --out from its last finished round (same configuration)")

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        if self.method not in METHOD_CHOICES:
            raise ValueError(f"method must be one of {METHOD_CHOICES}, got {self.method!r}")
        parse_method_schedule(self.method_schedule)
        dataset_info(self.dataset)  # raises for an unknown data set
        if self.split not in SPLITS and self.split not in ALIASES:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")
        if self.num_clients < 1 or self.min_clients < 1:
            raise ValueError("num_clients and min_clients must be >= 1")
        if self.num_server_rounds < 1:
            raise ValueError("num_server_rounds must be >= 1")
        if self.reference != "best":
            try:
                int(self.reference)
            except ValueError:
                raise ValueError(f"reference must be 'best' or a client index, got {self.reference!r}") from None
        if self.gamma != "auto":
            try:
                g = float(self.gamma)
            except ValueError:
                raise ValueError(f"gamma must be 'auto' or a number, got {self.gamma!r}") from None
            if not (math.isfinite(g) and g >= 0):
                raise ValueError(f"gamma must be >= 0, got {self.gamma!r}")
        if self.gamma_clients != 0 and (self.gamma_clients < 2 or self.method != "cca"):
            raise ValueError(f"gamma_clients must be 0 (all clients) or an integer >= 2, with method 'cca'; got "
                             f"{self.gamma_clients!r} with method {self.method!r}")
        if str(self.bn_reset).lower() not in BN_RESET_CHOICES:
            raise ValueError(f"bn_reset must be auto|true|false, got {self.bn_reset!r}")
        if not 0 < self.held_out < 1:
            raise ValueError("held_out must be in (0, 1)")
        if self.epochs <= 0 or self.lr <= 0 or self.batch_size < 1 or self.width <= 0:
            raise ValueError("epochs, lr, batch_size and width must be positive")
        if self.probe_size < 10:
            raise ValueError("probe_size must be >= 10")
        from fedmerge.common.wire.compress import check_options
        check_options(self.stats_dtype, self.stats_rank)
        parse_faults(self.faults)
        if not (self.norm_bound == 0 or (math.isfinite(self.norm_bound) and self.norm_bound > 1)):
            raise ValueError(f"norm_bound must be 0 (off) or a factor > 1, got {self.norm_bound!r}")
        from fedmerge.common.engine.merge import REPAIR_TARGETS
        if self.repair_target not in REPAIR_TARGETS:
            raise ValueError(f"repair_target must be one of {REPAIR_TARGETS}, got {self.repair_target!r}")
        if self.norm_action not in NORM_ACTIONS:
            raise ValueError(f"norm_action must be reject|clip, got {self.norm_action!r}")

    # --- conversions ------------------------------------------------------------------------------------
    @classmethod
    def from_run_config(cls, run_config: dict[str, Any] | None = None, **overrides) -> "FedConfig":
        """Build from a Flower run config (keys with dashes, e.g. ``num-server-rounds``); unknown keys are
        an error so that a typo never silently falls back to a default."""
        values: dict[str, Any] = {}
        names = {f.name: f for f in fields(cls)}
        for k, v in {**(run_config or {}), **overrides}.items():
            key = k.replace("-", "_")
            if key not in names:
                raise ValueError(f"unknown run-config key {k!r}; known: "
                                 f"{', '.join(sorted(n.replace('_', '-') for n in names))}")
            values[key] = _coerce(names[key], v)
        return cls(**values)

    def to_run_config(self) -> dict[str, Any]:
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def gamma_value(self) -> float | str:
        return "auto" if self.gamma == "auto" else float(self.gamma)

    @property
    def reference_value(self) -> int | str:
        return "best" if self.reference == "best" else int(self.reference)

    @property
    def bn_reset_value(self) -> bool | None:
        return {"auto": None, "true": True, "false": False}[str(self.bn_reset).lower()]

    def fault_for(self, client: int) -> list[str]:
        """This client's faults as ``KIND`` or ``KIND@ROUND``."""
        return [f"{kind}@{rnd}" if rnd else kind for kind, rnd, who in parse_faults(self.faults)
                if who is None or who == client]


def parse_method_schedule(spec, methods: Sequence[str] = METHOD_CHOICES) -> tuple[str, ...] | str | None:
    """A per-round method schedule: ``None`` or ``""`` -> ``None`` (the configured method in every round);
    ``"auto"`` -> ``"auto"``; ``"cca,avg"`` or ``["cca", "avg"]`` -> ``("cca", "avg")``: round r uses entry
    ``min(r, len) - 1``, so the last entry repeats. A name outside ``methods`` or an empty entry is an error."""
    if spec is None:
        return None
    if isinstance(spec, str):
        text = spec.strip()
        if not text:
            return None
        if text.lower() == SCHEDULE_AUTO:
            return SCHEDULE_AUTO
        items = [t.strip() for t in text.split(",")]
    else:
        items = [str(t).strip() if isinstance(t, str) else t for t in spec]
    if not items:
        return None
    for t in items:
        if not isinstance(t, str) or not t:
            raise ValueError(f"method schedule {spec!r}: every entry must be a method name, got {t!r}")
        if t == SCHEDULE_AUTO:
            raise ValueError(f"method schedule {spec!r}: 'auto' is a whole schedule, not one round's method")
        if t not in methods:
            raise ValueError(f"method schedule {spec!r}: unknown method {t!r}; choose from {', '.join(methods)}")
    return tuple(items)


def parse_faults(spec: str) -> list[tuple[str, int | None, int | None]]:
    """``"KIND[@ROUND][:CLIENT],..."`` -> [(kind, round or None, client or None = every client)]; an unknown
    kind, round or client is an error."""
    out = []
    for item in filter(None, (s.strip() for s in str(spec).split(","))):
        head, _, who = item.partition(":")
        kind, _, rnd = head.partition("@")
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r} in {item!r}; known: {', '.join(FAULT_KINDS)}")
        try:
            r = int(rnd) if rnd else None
            c = None if who in ("", "*") else int(who)
        except ValueError:
            raise ValueError(f"fault {item!r}: expected KIND[@ROUND][:CLIENT] with integer round and client") from None
        if (r is not None and r < 1) or (c is not None and c < 0):
            raise ValueError(f"fault {item!r}: round must be >= 1 and client >= 0")
        out.append((kind, r, c))
    return out


def _coerce(f: dataclasses.Field, v: Any) -> Any:
    t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    try:
        if t == "bool":
            if isinstance(v, str):
                if v.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return v.lower() in ("true", "1", "yes")
            return bool(v)
        if t == "int":
            if isinstance(v, float) and not v.is_integer():
                raise ValueError
            return int(v)
        if t == "float":
            return float(v)
        return str(v)
    except (TypeError, ValueError):
        raise ValueError(f"run-config key {f.name.replace('_', '-')!r}: cannot read {v!r} as {t}") from None
