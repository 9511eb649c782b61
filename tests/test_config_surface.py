"""One config surface: the command line's options and the Flower run config are generated from / checked against
:class:`FedConfig`'s fields."""
import argparse
from dataclasses import fields
from pathlib import Path

import pytest
import tomllib

from fedmerge.cli import (
    DEMO_DEFAULTS,
    SIMULATE_DEFAULTS,
    add_config_args,
    config_from_args,
    config_to_args,
)
from fedmerge.common.task.config import FedConfig

ROOT = Path(__file__).resolve().parent.parent

#: a valid value other than the default for every field (a new field must be added here)
NON_DEFAULTS = dict(
    dataset="mnist", data_root="/data", split="dirichlet", alpha=0.3, num_clients=4, probe_size=200,
    probe_from_union=True, held_out=0.3, max_train=100, max_test=50, arch="mlp", width=0.5, epochs=2.5, lr=0.1,
    batch_size=32, seed=7, common_init=True, augment=False, embedding_dim=8, method="permute",
    method_schedule="cca,avg", reference="1", gamma="0.1", gamma_clients=0, bn_reset="false", repair=True,
    repair_target="reference", bn_fold=True, np_merge=True, distill=True, stats_on_server=True, weighted=False,
    stats_dtype="float16", stats_rank=4, norm_bound=5.0, norm_action="clip", num_server_rounds=3, min_clients=3,
    timeout=60.0, device="cpu", out="runs/x", faults="nan:1,scale@2:0", resume=True)


def _parser(defaults=None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_config_args(p, defaults)
    return p


def test_every_field_has_an_option_and_round_trips():
    assert set(NON_DEFAULTS) == {f.name for f in fields(FedConfig)}
    p = _parser()
    dests = {a.dest for a in p._actions}
    assert {f.name for f in fields(FedConfig)} <= dests
    cfg = FedConfig(**NON_DEFAULTS)
    assert config_from_args(p.parse_args(config_to_args(cfg))) == cfg
    assert config_from_args(p.parse_args(config_to_args(FedConfig()))) == FedConfig()


def test_defaults_and_the_historic_option_names():
    # no options: FedConfig's defaults, but for each command's own
    assert config_from_args(_parser().parse_args([])) == FedConfig()
    assert config_from_args(_parser(SIMULATE_DEFAULTS).parse_args([])) == FedConfig(out="runs/simulate")
    demo = config_from_args(_parser(DEMO_DEFAULTS).parse_args([]))
    assert demo == FedConfig(**{k: v for k, v in DEMO_DEFAULTS.items() if k != "backend"})
    a = _parser().parse_args(["--clients", "1", "--rounds", "2", "--inject-fault", "nan:0", "--inject-fault",
                              "scale@2:0", "--repair", "--bn-fold", "--np-merge", "--probe-from-union",
                              "--stats-on-server", "--common-init", "--resume", "--gamma", "0.5", "--bn-reset",
                              "true", "--backend", "inline", "--verbose", "--method-schedule", ""])
    cfg = config_from_args(a)
    assert (cfg.num_clients, cfg.min_clients, cfg.num_server_rounds) == (1, 1, 2)   # min_clients <= clients
    assert cfg.faults == "nan:0,scale@2:0" and cfg.repair and cfg.bn_fold and cfg.np_merge and cfg.resume
    assert cfg.probe_from_union and cfg.stats_on_server and cfg.common_init and cfg.method_schedule == ""
    assert (cfg.gamma, cfg.bn_reset, a.backend, a.verbose) == ("0.5", "true", "inline", True)
    with pytest.raises(SystemExit):
        _parser().parse_args(["--norm-action", "ignore"])


def test_pyproject_run_config_is_the_fedconfig_fields_with_their_defaults():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert set(declared) == {f.name.replace("_", "-") for f in fields(FedConfig)}
    assert declared == FedConfig().to_run_config()   # no documented overrides: every value is the default
    assert FedConfig.from_run_config(declared) == FedConfig()


def test_run_config_round_trips():
    cfg = FedConfig(**NON_DEFAULTS)
    assert FedConfig.from_run_config(cfg.to_run_config()) == cfg
    as_text = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in cfg.to_run_config().items()}
    assert FedConfig.from_run_config(as_text) == cfg
    with pytest.raises(ValueError, match="unknown run-config key"):
        FedConfig.from_run_config({"num-client": 2})
