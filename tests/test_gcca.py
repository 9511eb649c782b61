"""Reference-free multi-view CCA merge (``method="gcca"``): exactness on equivalent copies, invertible
transforms, the two-model case against CCA Merge, independence of the model order, degenerate statistics,
argument checks, and the method through ``merge_models`` and the Flower strategy."""
import copy

import pytest
import torch
import torch.nn as nn
from test_merge_engine import equivalent_copy
from toy_models import TinyMLP, TinyResNet, TinyVGG, randomize_bn

from fedmerge import collect_statistics, merge_models
from fedmerge.common.engine.gcca import match_gcca
from fedmerge.common.engine.graph import derive_spec
from fedmerge.common.engine.matching import MatchInputs, match_cca
from fedmerge.common.engine.merge import GAMMA_GRID, METHODS
from fedmerge.common.engine.stats import Statistics

torch.manual_seed(0)
X = torch.randn(64, 3, 16, 16)

ARCHS = {
    "vgg": lambda seed=0: (torch.manual_seed(seed), TinyVGG().eval())[1],
    "resnet": lambda seed=0: (torch.manual_seed(seed), randomize_bn(TinyResNet(), seed))[1],
}


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


def out(model, x=X):
    with torch.no_grad():
        return model.eval()(x)


def stats_of(models, x=X):
    spec = derive_spec(models[0], x)
    return collect_statistics(models, x, pairs="all", spec=spec), spec


@pytest.fixture(scope="module")
def different_models():
    return {arch: [make(seed) for seed in (1, 2, 3)] for arch, make in ARCHS.items()}


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("basis", ["mean", "reference"])
@pytest.mark.parametrize("variant", ["maxvar", "sumcor"])
def test_permuted_copies_merge_exactly(arch, basis, variant):
    a = ARCHS[arch]()
    models = [a, equivalent_copy(a, X, "perm", 2), equivalent_copy(a, X, "perm", 3)]
    merged = merge_models(models, X, method="gcca", gamma=0.1, bn_reset=False, basis=basis, variant=variant)
    assert rel_err(out(merged), out(a)) <= 1e-4
    if basis == "mean" and variant == "maxvar":  # averaging without alignment is not exact: the test means something
        assert rel_err(out(merge_models(models, X, method="avg", bn_reset=False)), out(a)) > 1e-3


@pytest.mark.parametrize("basis", ["mean", "reference"])
@pytest.mark.parametrize("reg,gamma", [("corr", 0.5), ("trace", 1e-9)])
def test_rescaled_and_permuted_copies_merge_exactly(basis, reg, gamma):
    # positive rescaling: exact for every gamma with the scale-free "corr" ridge, as gamma -> 0 with "trace"
    a = ARCHS["resnet"]()
    models = [a, equivalent_copy(a, X, "scale", 2), equivalent_copy(a, X, "perm", 3)]
    merged = merge_models(models, X, method="gcca", gamma=gamma, bn_reset=False, basis=basis, regularization=reg)
    assert rel_err(out(merged), out(a)) <= 1e-4


@pytest.mark.parametrize("basis", ["mean", "reference"])
@pytest.mark.parametrize("variant", ["maxvar", "sumcor"])
def test_transforms_are_exact_inverses(different_models, basis, variant):
    models = different_models["resnet"]
    stats, spec = stats_of(models)
    al = match_gcca(MatchInputs(stats), spec, reference=1, gamma=0.1, variant=variant, basis=basis)
    assert set(al) == set(spec.groups)
    for g, row in al.items():
        eye = torch.eye(spec.groups[g].dim, dtype=torch.float64)
        assert len(row) == 3
        for i, (t, t_inv) in enumerate(row):
            assert t.dtype == t_inv.dtype == torch.float64
            assert torch.allclose(t @ t_inv, eye, atol=1e-9) and torch.allclose(t_inv @ t, eye, atol=1e-9)
            if basis == "reference" and i == 1:
                assert torch.equal(t, eye) and torch.equal(t_inv, eye)


@pytest.mark.parametrize("variant", ["maxvar", "sumcor"])
@pytest.mark.parametrize("reference", [0, 1])
def test_two_models_reference_basis_is_cca(different_models, variant, reference):
    # two views: MAXVAR's (and SUMCOR's) shared directions are CCA's canonical pairs, and with the reference's
    # units as basis the transform is CCA Merge's R_A^1/2 U V^T R_B^-1/2, to rounding
    models = different_models["vgg"][:2]
    stats, spec = stats_of(models)
    g_al = match_gcca(MatchInputs(stats), spec, reference=reference, gamma=0.1, variant=variant, basis="reference")
    c_al = match_cca(MatchInputs(stats), spec, reference=reference, gamma=0.1)
    for g in spec.groups:
        for (t, t_inv), (tc, tc_inv) in zip(g_al[g], c_al[g]):
            assert rel_err(t, tc) < 1e-8 and rel_err(t_inv, tc_inv) < 1e-8


def test_two_models_mean_basis_is_neither_reference(different_models):
    models = different_models["vgg"][:2]
    outs = [out(merge_models(models, X, method="cca", reference=r, gamma=0.1, bn_reset=False)) for r in (0, 1)]
    mean = out(merge_models(models, X, method="gcca", gamma=0.1, bn_reset=False, basis="mean"))
    assert all(rel_err(mean, o) > 1e-3 for o in outs)


@pytest.mark.parametrize("variant", ["maxvar", "sumcor"])
def test_mean_basis_does_not_depend_on_model_order_or_reference(different_models, variant):
    models = different_models["vgg"]
    base = out(merge_models(models, X, method="gcca", gamma=0.1, bn_reset=False, variant=variant, basis="mean"))
    for order, ref in (([2, 0, 1], 0), ([1, 2, 0], 2), ([0, 1, 2], 1)):
        other = merge_models([models[i] for i in order], X, method="gcca", reference=ref, gamma=0.1,
                             bn_reset=False, variant=variant, basis="mean")
        assert rel_err(out(other), base) < 1e-6, (order, ref)
    # the reference basis does depend on the reference
    by_ref = [out(merge_models(models, X, method="gcca", reference=r, gamma=0.1, bn_reset=False, basis="reference"))
              for r in (0, 1)]
    assert rel_err(by_ref[0], by_ref[1]) > 1e-3


def _with_dead_units(model: nn.Module) -> nn.Module:
    m = copy.deepcopy(model)
    with torch.no_grad():
        for conv in (m.features[0], m.features[3]):  # units that output ReLU(0) = 0 on every input
            conv.weight[:3] = 0
            conv.bias[:3] = 0
    return m.eval()


@pytest.mark.parametrize("gamma", [0.0, 0.1])
@pytest.mark.parametrize("basis", ["mean", "reference"])
def test_dead_units_stay_finite_and_copies_stay_exact(gamma, basis):
    a = _with_dead_units(ARCHS["vgg"]())
    models = [a, equivalent_copy(a, X, "perm", 2), _with_dead_units(ARCHS["vgg"](5))]
    stats, spec = stats_of(models)
    for variant in ("maxvar", "sumcor"):
        al = match_gcca(MatchInputs(stats), spec, gamma=gamma, variant=variant, basis=basis)
        for row in al.values():
            for t, t_inv in row:
                assert torch.isfinite(t).all() and torch.isfinite(t_inv).all()
                assert torch.allclose(t @ t_inv, torch.eye(t.shape[0], dtype=t.dtype), atol=1e-7)
    merged = merge_models(models, X, method="gcca", gamma=gamma, bn_reset=False, basis=basis)
    assert torch.isfinite(out(merged)).all()
    copies = merge_models(models[:2], X, method="gcca", gamma=gamma, bn_reset=False, basis=basis)
    assert rel_err(out(copies), out(a)) <= 1e-4


def test_rank_deficient_statistics_stay_finite():
    # 6 probe samples for 16 hidden units: every covariance is rank-deficient
    x = torch.randn(6, 12)
    models = [(torch.manual_seed(s), TinyMLP().eval())[1] for s in range(4)]
    stats, spec = stats_of(models, x)
    for variant in ("maxvar", "sumcor"):
        for basis in ("mean", "reference"):
            for gamma in (0.0, 1e-3):
                al = match_gcca(MatchInputs(stats), spec, gamma=gamma, variant=variant, basis=basis)
                for row in al.values():
                    for t, t_inv in row:
                        assert torch.isfinite(t).all() and torch.isfinite(t_inv).all()
                        assert torch.allclose(t @ t_inv, torch.eye(t.shape[0], dtype=t.dtype), atol=1e-6)
    merged = merge_models(models, x, method="gcca", gamma=0.0)
    assert torch.isfinite(out(merged, torch.randn(20, 12))).all()


def test_singular_consensus_falls_back_to_the_reference_basis(different_models, monkeypatch):
    import fedmerge.common.engine.gcca as gcca

    stats, spec = stats_of(different_models["vgg"])
    monkeypatch.setattr(gcca, "_MAX_COND", 0.0)
    with pytest.warns(UserWarning, match="numerically singular"):
        al = match_gcca(MatchInputs(stats), spec, reference=2, gamma=0.1, basis="mean")
    expected = match_gcca(MatchInputs(stats), spec, reference=2, gamma=0.1, basis="reference")
    for g in spec.groups:
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(al[g], expected[g]))


def test_bad_arguments_are_named(different_models):
    models = different_models["vgg"]
    stats, spec = stats_of(models)
    with pytest.raises(ValueError, match="variant.*'maxvr'"):
        match_gcca(MatchInputs(stats), spec, variant="maxvr")
    with pytest.raises(ValueError, match="basis.*'median'"):
        match_gcca(MatchInputs(stats), spec, basis="median")
    with pytest.raises(ValueError, match="regularization.*'ridge'"):
        match_gcca(MatchInputs(stats), spec, regularization="ridge")
    with pytest.raises(ValueError, match="gamma"):
        match_gcca(MatchInputs(stats), spec, gamma=-1.0)
    with pytest.raises(ValueError, match="reference"):
        match_gcca(MatchInputs(stats), spec, reference=3)
    with pytest.raises(ValueError, match="variant.*'bogus'"):
        merge_models(models, X, method="gcca", gamma=0.1, variant="bogus")
    ref_only = collect_statistics(models, X, reference=0, pairs="reference", spec=spec)
    with pytest.raises(ValueError, match="pairs='all'"):
        match_gcca(MatchInputs(ref_only), spec)
    assert isinstance(ref_only, Statistics)


def test_registered_with_auto_gamma(different_models):
    m = METHODS["gcca"]
    assert m.needs == "stats_all" and m.tunable_gamma
    a = ARCHS["resnet"]()
    models = [a, equivalent_copy(a, X, "perm", 2), equivalent_copy(a, X, "perm", 3)]
    merged, info = merge_models(models, X, method="gcca", gamma="auto", bn_reset=False, return_info=True)
    assert info.gamma in GAMMA_GRID and set(info.gamma_scores) == set(GAMMA_GRID)
    assert info.timings["statistics"] > 0 and info.timings["transforms"] > 0
    assert rel_err(out(merged), out(a)) <= 1e-4
    # different models, gamma chosen on the held-out slice of a labelled probe, BatchNorm reset
    y = torch.randint(0, 5, (len(X),))
    merged, info = merge_models(different_models["resnet"], (X, y), method="gcca", gamma="auto", return_info=True)
    assert info.gamma in GAMMA_GRID and info.bn_reset and torch.isfinite(out(merged)).all()


def test_through_the_strategy(tmp_path):
    from fedmerge.client.app import task_client_app
    from fedmerge.common.task.config import FedConfig
    from fedmerge.server.app import run_federation
    from fedmerge.server.inline import InlineGrid

    cfg = FedConfig(dataset="cifar10-mini", arch="cnn", width=0.25, epochs=1, max_train=128, probe_size=100,
                    max_test=100, batch_size=64, num_clients=3, min_clients=2, out=str(tmp_path), method="gcca",
                    reference="0", gamma="auto")
    grid = InlineGrid(task_client_app(cfg.to_run_config()), 3)
    result = run_federation(grid, cfg)
    types = [m.metadata.message_type for m in grid.sent]
    assert types == ["train"] * 3  # statistics of all pairs are computed on the server: one phase
    assert result["clients_merged"] == [0, 1, 2] and result["accuracy"]["merged"] is not None
    assert result["rounds"][0]["gamma"] in GAMMA_GRID
