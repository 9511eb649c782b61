"""Refinements after the merge (issue 20): label-free distillation into the ensemble, NP Merge after REPAIR, NP
Merge's granularities, and the checks on what they need."""

import copy

import pytest
import torch
import torch.nn.functional as F
from toy_models import TinyMLP, TinyVGG

from fedmerge import merge_models
from fedmerge.common.engine.distill import augment_views, distill, ensemble_logits
from fedmerge.common.engine.npmerge import np_merge
from fedmerge.common.wire.probe import Batches, as_batches


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 12, generator=g)
    w = torch.randn(12, 4, generator=torch.Generator().manual_seed(99))
    return x, (x @ w).argmax(1)


def _trained(seed, steps=150):
    torch.manual_seed(seed)
    m = TinyMLP()
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    x, y = _data(512, seed)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        opt.step()
    return m.eval()


def _kl_to_ensemble(model, teachers, x):
    with torch.no_grad():
        target = torch.stack([t(x) for t in teachers]).mean(0)
        return float(F.kl_div(F.log_softmax(model(x), 1), F.log_softmax(target, 1), reduction="batchmean",
                              log_target=True))


def test_augment_views_are_shifted_and_flipped_copies():
    x = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    views = augment_views(Batches([(x, None)]), 4, seed=1, shift=2)
    assert views.shape == (20, 3, 8, 8) and torch.equal(views[:5], x)   # view-major, view 0 the probe itself
    padded = F.pad(x, (2, 2, 2, 2))
    for k in range(1, 4):
        for i in range(5):   # every image is one crop of its padded original, possibly flipped
            crops = [padded[i, :, dy:dy + 8, dx:dx + 8] for dy in range(5) for dx in range(5)]
            assert any(torch.equal(views[5 * k + i], c) or torch.equal(views[5 * k + i], c.flip(2)) for c in crops)
    assert torch.equal(augment_views(Batches([(x, None)]), 4, seed=1, shift=2), views)   # seeded
    assert not torch.equal(augment_views(Batches([(x, None)]), 4, seed=2, shift=2), views)
    flat = torch.randn(6, 12)
    assert torch.equal(augment_views(Batches([(flat, None)]), 4), flat)   # not images: one view


def test_ensemble_logits_is_the_weighted_average():
    a, b = _trained(0), _trained(1)
    x = _data(50, 3)[0]
    (z,) = ensemble_logits([a, b], [x], [0.25, 0.75], torch.device("cpu"), batch_size=16)
    with torch.no_grad():
        assert torch.allclose(z, 0.25 * a(x) + 0.75 * b(x), atol=1e-6)


def test_distill_moves_the_merge_towards_the_ensemble_without_labels():
    a, b = _trained(0), _trained(1)
    x = _data(400, 5)[0]
    fit, held = as_batches(x, 50).split(0.25, 0)
    plain = merge_models([a, b], (fit, held), method="avg")
    out, info = distill(plain, [a, b], fit, held, steps=200, lr=1e-2, eval_every=20, seed=0)
    assert info["improved"] and info["held_kl_best"] < info["held_kl_start"]
    x_test = _data(400, 11)[0]
    assert _kl_to_ensemble(out, [a, b], x_test) < _kl_to_ensemble(plain, [a, b], x_test)
    # deterministic, and the labels of a labelled probe are not read
    again, _ = distill(plain, [a, b], fit, held, steps=200, lr=1e-2, eval_every=20, seed=0)
    y_fake = torch.zeros(400, dtype=torch.long)
    fit_l, held_l = as_batches((x, y_fake), 50).split(0.25, 0)
    labelled, _ = distill(plain, [a, b], fit_l, held_l, steps=200, lr=1e-2, eval_every=20, seed=0)
    for k, v in out.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]) and torch.equal(v, labelled.state_dict()[k])
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in merge_models([a, b], (fit, held), method="avg")
               .state_dict().items())   # the input model is not modified


def test_distill_zero_steps_keeps_the_merge():
    a, b = _trained(0), _trained(1)
    fit, held = as_batches(_data(200, 5)[0], 50).split(0.25, 0)
    plain = merge_models([a, b], (fit, held), method="avg")
    out, info = distill(plain, [a, b], fit, held, steps=0)
    assert info["steps"] == 0 and not info["improved"]
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in out.state_dict().items())


def test_merge_models_distill_on_a_cnn_records_its_cost():
    torch.manual_seed(0)
    models = [TinyVGG().eval() for _ in range(2)]
    x = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    merged, info = merge_models(models, x, method="cca", gamma=0.1, return_info=True,
                                distill={"steps": 10, "eval_every": 5, "views": 2, "batch_size": 16})
    assert 1 <= info.distill["steps"] <= 10 and info.distill["views"] == 2
    assert info.timings["distill"] > 0 and info.distill["held_kl_best"] <= info.distill["held_kl_start"]
    assert type(merged) is TinyVGG


def test_np_merge_after_repair_starts_at_the_repaired_merge():
    """With zero steps NP Merge after REPAIR returns the REPAIR merge itself: REPAIR's per-unit maps are applied
    around the (initial) plain combination, exactly."""
    a, b = _trained(0), _trained(1)
    probe = _data(300, 5)
    fit, held = as_batches(probe, 50).split(0.2, 0)
    repaired = merge_models([a, b], (fit, held), method="cca", gamma=0.1, repair=True)
    both, info = merge_models([a, b], (fit, held), method="cca", gamma=0.1, repair=True, return_info=True,
                              np_merge={"steps": 0})
    assert info.np_merge["after_repair"] is True
    for k, v in repaired.state_dict().items():   # float32 products of the same factors: a few ulps
        assert torch.allclose(both.state_dict()[k], v, rtol=1e-5, atol=1e-6), k
    learned, info = merge_models([a, b], (fit, held), method="cca", gamma=0.1, repair=True, return_info=True,
                                 np_merge={"steps": 60, "eval_every": 10})
    assert info.np_merge["held_loss_best"] <= info.np_merge["held_loss_start"]


@pytest.mark.parametrize("granularity,count", [("element", None), ("unit", 16), ("tensor", 1)])
def test_np_merge_granularity(granularity, count):
    a, b = _trained(0), _trained(1)
    fit, held = as_batches(_data(300, 5), 50).split(0.2, 0)
    sa, sb = a.state_dict(), b.state_dict()
    m, info = np_merge(a, [sa, sb], [0.5, 0.5], fit, held, steps=30, eval_every=10, granularity=granularity)
    assert info["granularity"] == granularity and info["held_loss_best"] <= info["held_loss_start"]
    # fc1.weight (16 x 12): per unit, every row is one convex combination of the two models' rows
    w, wa, wb = m.state_dict()["fc1.weight"], sa["fc1.weight"], sb["fc1.weight"]
    ok = (wa - wb).abs() > 1e-2   # where the two models differ enough to read the coefficient
    alpha = torch.where(ok, (w - wb) / torch.where(ok, wa - wb, torch.ones_like(wa)), torch.full_like(wa, -1.0))
    if count is not None:
        per_row = [torch.unique(torch.round(r[r >= 0], decimals=3)).numel() for r in alpha]
        assert max(per_row) == 1
        assert torch.unique(torch.round(alpha[alpha >= 0], decimals=3)).numel() <= count
    assert alpha[alpha >= 0].min() >= -1e-4 and alpha.max() <= 1 + 1e-4   # convex combinations


def test_refine_options_are_checked():
    a, b = _trained(0), _trained(1)
    x, y = _data(200, 3)
    with pytest.raises(ValueError, match="granularity"):
        merge_models([a, b], (x, y), method="cca", gamma=0.1, np_merge={"granularity": "row"})
    with pytest.raises(ValueError, match="label"):
        merge_models([a, b], x, method="cca", gamma=0.1, np_merge=True)
    with pytest.raises(ValueError, match="distill must be"):
        merge_models([a, b], x, method="cca", gamma=0.1, distill="yes")
    with pytest.raises(ValueError, match="'lr' must be a number > 0"):
        merge_models([a, b], x, method="cca", gamma=0.1, distill={"lr": 0})
    with pytest.raises(ValueError, match="unknown distill option 'stepz'"):
        merge_models([a, b], x, method="cca", gamma=0.1, distill={"stepz": 3})
    with pytest.raises(ValueError, match="unknown np_merge option 'device'"):   # reserved names are not options
        merge_models([a, b], (x, y), method="cca", gamma=0.1, np_merge={"device": "cpu"})
    with pytest.raises(ValueError, match="'steps' must be an integer"):
        merge_models([a, b], (x, y), method="cca", gamma=0.1, np_merge={"steps": 2.5})
    fit, held = as_batches(x, 50).split(0.2, 0)
    with pytest.raises(ValueError, match="weights"):
        distill(a, [a, b], fit, held, weights=[1.0])
    m = copy.deepcopy(a)
    with pytest.raises(ValueError, match="affine map"):
        np_merge(m, [a.state_dict(), b.state_dict()], [0.5, 0.5], *as_batches((x, y), 50).split(0.2, 0),
                 affine={"nope": (torch.ones(3), torch.zeros(3))})


def test_distill_through_the_flower_strategy(tmp_path, monkeypatch):
    """The strategy's ``distill`` option (``--distill``) distils the round's merge into the clients' ensemble on the
    server's probe; its time is in the round's timings. (The run caps distillation at 30 steps to stay short.)"""
    from fedmerge.client.app import task_client_app
    from fedmerge.common.task.config import FedConfig
    from fedmerge.common.task.loaders import probe_batches
    from fedmerge.server import app
    from fedmerge.server.inline import InlineGrid

    cfg = FedConfig(dataset="cifar10-mini", arch="cnn", width=0.25, epochs=1, max_train=256, probe_size=120,
                    max_test=200, num_clients=2, gamma="0.1", reference="0", distill=True, repair=True,
                    out=str(tmp_path))
    assert app.CCAMerge.from_config(cfg, probe=probe_batches(cfg)).distill == {}   # on, with its defaults
    plain = app.CCAMerge.from_config.__func__
    short = {"steps": 30, "eval_every": 10}
    monkeypatch.setattr(app.CCAMerge, "from_config",
                        classmethod(lambda cls, c, **kw: plain(cls, c, **{**kw, "distill": short})))
    result = app.run_federation(InlineGrid(task_client_app(cfg.to_run_config()), 2), cfg)
    assert result["rounds_completed"] == 1 and result["accuracy"]["merged"] is not None
    assert result["rounds"][0]["timings"]["merge_distill"] > 0


def test_strategy_checks_refine_options():
    from fedmerge.server.strategy import CCAMerge

    with pytest.raises(ValueError, match="distill must be"):
        CCAMerge(TinyMLP(), _data(100, 0), gamma=0.1, distill="on")
    with pytest.raises(ValueError, match="NP Merge / distillation"):
        CCAMerge(TinyMLP(), None, gamma=0.1, example_input=torch.zeros(2, 12), distill=True)


def test_an_empty_options_dict_runs_the_step_with_its_defaults():
    a, b = _trained(0), _trained(1)
    x, y = _data(200, 3)
    _, info = merge_models([a, b], (x, y), method="cca", gamma=0.1, return_info=True, np_merge={},
                           distill={})
    assert info.np_merge["granularity"] == "unit" and info.distill["steps"] >= 1
    assert "np_merge" in info.timings and "distill" in info.timings


def test_np_merge_result_is_kept_only_when_better_on_the_held_out_slice():
    """The refinement compares NP Merge's result with the merge it would replace on the held-out slice (what
    matters for nets with BatchNorm, where NP Merge's own early stopping sees averaged statistics)."""
    a, b = _trained(0), _trained(1)
    x, y = _data(300, 3)
    _, info = merge_models([a, b], (x, y), method="cca", gamma=0.1, return_info=True,
                           np_merge={"steps": 40, "eval_every": 10})
    rec = info.np_merge
    assert rec["kept"] == (rec["held_loss_np_merge"] < rec["held_loss_merge"])
    assert rec["held_loss_np_merge"] <= rec["held_loss_merge"] + 1e-6   # BN-free: it starts at that merge
    torch.manual_seed(0)
    models = [TinyVGG(bn=True).eval() for _ in range(2)]
    xi = torch.randn(80, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    yi = torch.randint(0, 5, (80,), generator=torch.Generator().manual_seed(2))
    merged, info = merge_models(models, (xi, yi), method="cca", gamma=0.1, return_info=True,
                                np_merge={"steps": 10, "eval_every": 5})
    rec = info.np_merge
    assert rec["kept"] == (rec["held_loss_np_merge"] < rec["held_loss_merge"])


def test_strategy_rejects_bad_refine_options_when_built():
    from fedmerge.server.strategy import CCAMerge

    x, y = _data(100, 0)
    with pytest.raises(ValueError, match="labelled probe"):
        CCAMerge(TinyMLP(), x, gamma=0.1, np_merge=True)
    with pytest.raises(ValueError, match="unknown np_merge option 'stepz'"):
        CCAMerge(TinyMLP(), (x, y), gamma=0.1, np_merge={"stepz": 1})
    with pytest.raises(ValueError, match="'lr' must be a number > 0"):
        CCAMerge(TinyMLP(), (x, y), gamma=0.1, distill={"lr": -1})
    s = CCAMerge(TinyMLP(), (x, y), gamma=0.1, np_merge=True, distill={"steps": 5})
    assert s.np_merge == {} and s.distill == {"steps": 5}
