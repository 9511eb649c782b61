"""Compressed statistics (fedmerge.common.wire.compress): dtype round trips and their error bounds, float16
scaling against overflow and underflow, the low-rank forms (exact when k >= d, trace and positive
definiteness kept, canonical pairs kept), bytes, validation of corrupted uploads, CCA merges from compressed
statistics, and one federation with float16 statistics."""
import numpy as np
import pytest
import torch
from toy_models import TinyVGG

from fedmerge.common.engine.graph import derive_spec
from fedmerge.common.engine.merge import merge_from_statistics
from fedmerge.common.engine.stats import (
    CrossMoments,
    Moments,
    Statistics,
    collect_statistics,
)
from fedmerge.common.wire.compress import (
    DTYPES,
    WHITEN_GAMMA,
    block_encoding,
    check_options,
    decode_cross,
    decode_moments,
    encode_cross,
    encode_moments,
    payload_bytes,
)
from fedmerge.common.wire.records import arrays_to_record

torch.manual_seed(0)
X = torch.randn(128, 3, 16, 16)
BOUND = {"float64": 0.0, "float32": 1e-7, "float16": 1e-3, "bfloat16": 1e-2}


def legacy_arrays(blocks, prefix: str = "own") -> dict:
    """The legacy wire form, written out by hand: per group ``n`` and the dense float64 blocks, no header."""
    out = {}
    for g, m in blocks.items():
        out[f"{prefix}.{g}.n"] = np.array([m.n], dtype=np.int64)
        fields = ("mean", "m2") if prefix == "own" else ("mean_a", "mean_b", "c")
        out.update({f"{prefix}.{g}.{f}": getattr(m, f).numpy() for f in fields})
    return out


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(1)
    a, b = TinyVGG(width=16).eval(), TinyVGG(width=16).eval()
    spec = derive_spec(a, X)
    return a, b, spec, collect_statistics([a, b], X, spec=spec)


def rel(x, ref):
    return float((x - ref).abs().max() / ref.abs().max())


def scaled(own, cross, f):
    """Statistics of activations multiplied by ``f``."""
    return ({g: Moments(m.n, m.mean * f, m.m2 * f * f) for g, m in own.items()},
            {g: CrossMoments(m.n, m.mean_a * f, m.mean_b * f, m.c * f * f) for g, m in cross.items()})


def spd(d, seed=0, decay=0.7):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return (q * decay ** torch.arange(d, dtype=torch.float64)) @ q.T


class _Spec:
    def __init__(self, d):
        self.groups = {0: type("G", (), {"dim": d})()}


@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_error_bounds(setup, dtype):
    _, _, spec, st = setup
    own, cross = st.own[1], st.cross[(0, 1)]
    eo, ec = encode_moments(own, dtype), encode_cross(cross, dtype)
    do, dc = decode_moments(eo, spec), decode_cross(ec, spec)
    for g in spec.groups:
        assert do[g].m2.dtype == torch.float64 and dc[g].c.dtype == torch.float64
        assert rel(do[g].m2, own[g].m2) <= BOUND[dtype] and rel(dc[g].c, cross[g].c) <= BOUND[dtype]
        assert rel(do[g].mean, own[g].mean) <= 1e-7 and rel(dc[g].mean_b, cross[g].mean_b) <= 1e-7
        assert torch.equal(do[g].m2, do[g].m2.T) and do[g].n == own[g].n
        # scaled by the unit standard deviations: variances come back to float32 precision in every dtype
        var, var_back = torch.diagonal(own[g].m2), torch.diagonal(do[g].m2)
        assert float(((var_back - var).abs() / var.clamp_min(1e-30)).max()) < 1e-6
    if dtype == "float64":  # the default is the legacy format (no header, dense float64 blocks), bit for bit
        legacy, legacy_cross = legacy_arrays(own), legacy_arrays(cross, "cross")
        assert eo.keys() == legacy.keys() and all(np.array_equal(eo[k], legacy[k]) for k in legacy)
        assert ec.keys() == legacy_cross.keys() and all(np.array_equal(ec[k], legacy_cross[k]) for k in ec)
    else:
        assert block_encoding(eo, "own.1") == {"dtype": dtype, "form": "dense", "rank": 0, "legacy": False}


def test_legacy_float64_upload_still_decodes(setup):
    _, _, spec, st = setup
    do = decode_moments(legacy_arrays(st.own[0]), spec)
    dc = decode_cross(legacy_arrays(st.cross[(0, 1)], "cross"), spec)
    for g in spec.groups:
        assert torch.equal(do[g].m2, st.own[0][g].m2) and torch.equal(dc[g].c, st.cross[(0, 1)][g].c)


@pytest.mark.parametrize("factor", [1e8, 1e-8, 1e20])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_neither_overflows_nor_flushes(setup, factor, dtype):
    _, _, spec, st = setup
    own, cross = scaled(st.own[1], st.cross[(0, 1)], factor)
    assert not np.isfinite(np.float16(float(own[1].m2.abs().max()))) or factor < 1  # a plain cast would fail
    eo, ec = encode_moments(own, dtype), encode_cross(cross, dtype)
    do, dc = decode_moments(eo, spec), decode_cross(ec, spec)
    for g in spec.groups:
        assert rel(do[g].m2, own[g].m2) <= BOUND[dtype] and rel(dc[g].c, cross[g].c) <= BOUND[dtype]
        assert rel(do[g].mean, own[g].mean) <= 1e-7
        live = torch.diagonal(own[g].m2) > 0
        assert bool((torch.diagonal(do[g].m2)[live] > 0).all())  # no variance flushed to zero
    assert eo["own.1.m2.scale"].dtype == np.float32  # standard deviations: ~1e20 still fits
    # cross row maxima ~1e40 are beyond float32: those scales fall back to float64
    assert ec["cross.1.c.scale"].dtype == (np.float64 if factor == 1e20 else np.float32)


def test_units_of_very_different_scales_keep_their_relative_precision():
    d = 6
    s = spd(d, decay=1.0)
    unit = torch.tensor([1e-6, 1e-3, 1.0, 1e3, 1e6, 1.0], dtype=torch.float64)
    m2 = s * torch.outer(unit, unit)  # row/column max-abs would flush the small units in float16
    own = {0: Moments(100, torch.zeros(d, dtype=torch.float64), m2)}
    back = decode_moments(encode_moments(own, "float16"), _Spec(d))[0].m2
    rel_unit = (back - m2).abs() / torch.outer(unit, unit)
    assert float(rel_unit.max()) < 1e-3
    c = s * torch.outer(unit, unit.flip(0))
    cross = {0: CrossMoments(100, torch.zeros(d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64), c)}
    cb = decode_cross(encode_cross(cross, "float16"), _Spec(d))[0].c
    assert float(((cb - c).abs() / torch.outer(unit, unit.flip(0))).max()) < 1e-3


@pytest.mark.parametrize("dtype", DTYPES)
def test_rank_at_least_d_sends_the_full_block(setup, dtype):
    _, _, spec, st = setup
    own, cross = st.own[1], st.cross[(0, 1)]
    dmax = max(g.dim for g in spec.groups.values())
    for k in (dmax, dmax + 5):
        eo, ec = encode_moments(own, dtype, rank=k), encode_cross(cross, dtype, rank=k)
        assert all(np.array_equal(eo[key], v) for key, v in encode_moments(own, dtype).items())
        assert all(np.array_equal(ec[key], v) for key, v in encode_cross(cross, dtype).items())
    if dtype == "float64":
        do = decode_moments(encode_moments(own, dtype, rank=dmax), spec)
        assert all(torch.equal(do[g].m2, own[g].m2) for g in spec.groups)


@pytest.mark.parametrize("dtype", DTYPES)
def test_low_rank_covariance_keeps_trace_top_spectrum_and_is_positive_definite(dtype):
    d, k = 24, 5
    m2 = spd(d, seed=3)
    own = {0: Moments(500, torch.linspace(-1, 1, d, dtype=torch.float64), m2)}
    arrays = encode_moments(own, dtype, rank=k)
    assert block_encoding(arrays, "own.0")["form"] == "low-rank"
    assert arrays["own.0.m2.vecs"].shape == (d, k)
    back = decode_moments(arrays, _Spec(d))[0].m2
    ev, ev_back = torch.linalg.eigvalsh(m2).flip(0), torch.linalg.eigvalsh(back).flip(0)
    tol = 1e-12 if dtype == "float64" else 1e-6  # eigenvalues and sigma^2 travel in float32
    assert abs(float(torch.trace(back) / torch.trace(m2)) - 1) < tol
    assert torch.allclose(ev_back[:k], ev[:k], rtol=tol * 10)
    sigma2 = float(ev[k:].mean())
    assert torch.allclose(ev_back[k:], torch.full((d - k,), sigma2, dtype=torch.float64), rtol=1e-5)
    assert float(ev_back.min()) > 0
    # a rank-deficient block: sigma^2 = 0, positive semi-definite, trace still kept
    low = m2.clone()
    v = torch.linalg.eigh(m2)[1][:, -3:]
    low = (v * torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)) @ v.T
    back = decode_moments(encode_moments({0: Moments(50, own[0].mean, low)}, dtype, rank=k), _Spec(d))[0].m2
    assert float(torch.linalg.eigvalsh(back).min()) > -1e-9 and abs(float(torch.trace(back)) - 6.0) < 1e-5


def test_low_rank_cross_svd_exact_for_rank_k_and_whitened_keeps_top_canonical_pairs():
    d, k = 20, 4
    g = torch.Generator().manual_seed(5)
    c = torch.randn(d, k, generator=g, dtype=torch.float64) @ torch.randn(k, d, generator=g, dtype=torch.float64)
    z = torch.zeros(d, dtype=torch.float64)
    back = decode_cross(encode_cross({0: CrossMoments(100, z, z, c)}, "float64", rank=k), _Spec(d))[0].c
    assert rel(back, c) < 1e-12
    # whitened: the server's whitened cross-covariance keeps exactly the k largest canonical correlations
    x = torch.randn(4000, 2 * d, generator=g, dtype=torch.float64) @ torch.randn(2 * d, 2 * d, generator=g,
                                                                                 dtype=torch.float64)
    m = Moments.of(x)
    s_aa, s_bb, s_ab = m.m2[:d, :d], m.m2[d:, d:], m.m2[:d, d:]
    own_a, own_b = {0: Moments(m.n, m.mean[:d], s_aa)}, {0: Moments(m.n, m.mean[d:], s_bb)}
    arrays = encode_cross({0: CrossMoments(m.n, m.mean[:d], m.mean[d:], s_ab)}, "float64", rank=k,
                          whiten=(own_a, own_b))
    c_k = decode_cross(arrays, _Spec(d))[0].c

    def mh(s):
        s = s + WHITEN_GAMMA * torch.trace(s) / d * torch.eye(d, dtype=torch.float64)
        w, v = torch.linalg.eigh(s)
        return (v / w.sqrt()) @ v.T

    full = torch.linalg.svdvals(mh(s_aa) @ s_ab @ mh(s_bb))
    kept = torch.linalg.svdvals(mh(s_aa) @ c_k @ mh(s_bb))
    assert torch.allclose(kept[:k], full[:k], rtol=1e-8) and float(kept[k:].max()) < 1e-8 * float(full[0])


def test_bytes_shrink_as_expected(setup):
    _, _, spec, st = setup
    own, cross = st.own[1], st.cross[(0, 1)]
    dims = [g.dim for g in spec.groups.values()]
    base_own, base_cross = payload_bytes(legacy_arrays(own)), payload_bytes(legacy_arrays(cross, "cross"))
    for dtype, size in (("float32", 4), ("float16", 2), ("bfloat16", 2)):
        po, pc = payload_bytes(encode_moments(own, dtype)), payload_bytes(encode_cross(cross, dtype))
        scale = 0 if dtype == "float32" else 1
        # own: upper triangle only; vectors in float32; headers of 4 int64
        assert po == sum(size * d * (d + 1) // 2 + 4 * d * (1 + scale) + 8 * 5 for d in dims)
        assert pc == sum(size * d * d + 4 * 2 * d * (1 + scale) + 8 * 5 for d in dims)
        assert po < base_own * size / 8 and pc < base_cross * (size / 8) * 1.4  # scales: 2d floats per block
    k = 4
    po = payload_bytes(encode_moments(own, "float16", rank=k))
    pc = payload_bytes(encode_cross(cross, "float16", rank=k))
    assert po == sum(2 * d * k + 4 * (d + k + 1) + 8 * 5 for d in dims)
    assert pc == sum(2 * 2 * d * k + 4 * (2 * d + k) + 8 * 5 for d in dims)
    # what the server counts (Flower records: + ~130 bytes of header per array, a lot for these tiny blocks)
    rec64 = arrays_to_record(legacy_arrays(cross, "cross")).count_bytes()
    e16 = encode_cross(cross, "float16")
    rec16 = arrays_to_record(e16).count_bytes()
    assert rec16 - payload_bytes(e16) < 200 * len(e16) and rec16 < 0.45 * rec64


def _corrupt_cases(eo, ec):
    cases = []

    def case(arrays, key, value, match):
        bad = dict(arrays)
        if value is None:
            del bad[key]
        else:
            bad[key] = value
        cases.append((bad, match))

    tri = eo["own.2.m2.tri"]
    nan = tri.copy()
    nan[3] = np.nan
    case(eo, "own.2.m2.tri", nan, r"'own\.2'.*non-finite")
    case(eo, "own.2.m2.tri", tri[:-1], r"'own\.2'.*shape")
    case(eo, "own.2.m2.tri", tri.astype(np.float32), r"'own\.2'.*dtype float32, expected float16")
    case(eo, "own.2.enc", np.array([1, 9, 0, 0]), r"'own\.2'.*unknown dtype code 9")
    case(eo, "own.2.enc", np.array([1, 2, 7, 0]), r"'own\.2'.*unknown encoding form 7")
    case(eo, "own.2.enc", np.array([2, 2, 0, 0]), r"'own\.2'.*unknown encoding version 2")
    case(eo, "own.2.enc", np.array([1.0, 2.0, 0.0, 0.0]), r"'own\.2'.*encoding header")
    case(eo, "own.2.m2.scale", -eo["own.2.m2.scale"], r"'own\.2'.*non-positive scales")
    case(eo, "own.2.m2.tri", None, r"'own\.2'.*missing array 'own\.2\.m2\.tri'")
    case(eo, "own.2.n", np.array([1], dtype=np.int64), r"'own\.2'.*sample count 1")
    case(ec, "cross.3.c", np.full_like(ec["cross.3.c"], np.inf), r"'cross\.3'.*non-finite")
    return cases


def test_corrupted_uploads_raise_value_errors_naming_the_block(setup):
    _, _, spec, st = setup
    eo, ec = encode_moments(st.own[1], "float16"), encode_cross(st.cross[(0, 1)], "float16")
    for bad, match in _corrupt_cases(eo, ec):
        with pytest.raises(ValueError, match=match):
            (decode_moments if any(k.startswith("own") for k in bad) else decode_cross)(bad, spec)
    # bfloat16 travels as uint16 bits: a NaN pattern is caught after decoding
    eb = encode_cross(st.cross[(0, 1)], "bfloat16")
    bad = dict(eb)
    bad["cross.1.c"] = eb["cross.1.c"].copy()
    bad["cross.1.c"][0, 0] = 0x7FC0
    with pytest.raises(ValueError, match=r"'cross\.1'.*non-finite"):
        decode_cross(bad, spec)
    # low rank: a bad rank, a negative eigenvalue, zeroed vectors
    el = encode_moments(st.own[1], "float32", rank=4)
    for key, value, match in [("own.2.enc", np.array([1, 1, 1, 40]), "rank 40 outside"),
                              ("own.2.enc", np.array([1, 1, 1, 0]), "rank 0 outside"),
                              ("own.2.m2.vals", -np.ones(4, np.float32), "negative eigenvalue"),
                              ("own.2.m2.vecs", np.zeros_like(el["own.2.m2.vecs"]), "not unit vectors")]:
        with pytest.raises(ValueError, match=r"'own\.2'.*" + match):
            decode_moments({**el, key: value}, spec)


def test_options_are_validated():
    for dtype, rank in (("float8", 0), ("float16", -1), ("float16", 1.5), ("float16", True)):
        with pytest.raises(ValueError, match="stats"):
            check_options(dtype, rank)
    with pytest.raises(ValueError, match="stats dtype"):
        encode_moments({}, "int8")
    from fedmerge.common.task.config import FedConfig

    with pytest.raises(ValueError, match="stats dtype"):
        FedConfig(stats_dtype="half")
    with pytest.raises(ValueError, match="stats rank"):
        FedConfig(stats_rank=-2)
    cfg = FedConfig.from_run_config({"stats-dtype": "bfloat16", "stats-rank": "8"})
    assert cfg.stats_dtype == "bfloat16" and cfg.stats_rank == 8
    import argparse

    from fedmerge.cli import add_config_args, config_from_args

    p = argparse.ArgumentParser()
    add_config_args(p)
    cfg = config_from_args(p.parse_args(["--stats-dtype", "float16", "--stats-rank", "4"]))
    assert cfg.stats_dtype == "float16" and cfg.stats_rank == 4


def _merged(a, spec, states, stats):
    merged, _ = merge_from_statistics(a, states, spec, stats, method="cca", reference=0, gamma=0.1,
                                      bn_reset=False, device="cpu")
    return merged.state_dict()


@pytest.fixture(scope="module")
def similar_pair():
    """A model and a permuted, perturbed copy: related models, as trained clients are (two random inits on
    random data have near-zero canonical correlations, where any CCA transform is ill-conditioned)."""
    import copy

    from fedmerge.common.engine.align import align_state

    torch.manual_seed(1)
    a = TinyVGG(width=16).eval()
    spec = derive_spec(a, X)
    g = torch.Generator().manual_seed(2)
    t = {gid: torch.eye(grp.dim, dtype=torch.float64)[torch.randperm(grp.dim, generator=g)]
         for gid, grp in spec.groups.items()}
    sd = align_state(a.state_dict(), spec, t, {k: v.T for k, v in t.items()})
    b = copy.deepcopy(a)
    b.load_state_dict({k: v + 0.3 * v.std() * torch.randn(v.shape, generator=g) for k, v in sd.items()})
    return a, b, spec, collect_statistics([a, b], X, spec=spec)


@pytest.mark.parametrize("dtype,rank,tol", [("float32", 0, 1e-6), ("float16", 0, 5e-3), ("bfloat16", 0, 3e-2),
                                            ("float16", 64, 5e-3)])
def test_cca_merge_from_compressed_statistics_is_close(similar_pair, dtype, rank, tol):
    a, b, spec, st = similar_pair
    states = [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in (a, b)]
    ref = _merged(a, spec, states, st)
    own = [decode_moments(encode_moments(o, dtype, rank), spec) for o in st.own]
    cross = {(0, 1): decode_cross(encode_cross(st.cross[(0, 1)], dtype, rank), spec)}
    got = _merged(a, spec, states, Statistics(own=own, cross=cross, reference=0))
    diff = max(float((got[k] - ref[k]).norm() / ref[k].norm().clamp_min(1e-12)) for k in ref
               if ref[k].is_floating_point())
    assert diff < tol, diff
    out_ref, out = _forward(a, ref, X[:32]), _forward(a, got, X[:32])
    assert rel(out, out_ref) < 10 * tol


def _forward(template, sd, x):
    import copy

    m = copy.deepcopy(template)
    m.load_state_dict(sd)
    with torch.no_grad():
        return m.eval()(x).double()


def test_low_rank_bfloat16_federation_rejects_a_corrupted_cross_upload(tmp_path):
    """Clients send rank-4 whitened cross blocks as bfloat16 bits; client 2's carries a NaN pattern."""
    from fedmerge.client.app import task_client_app
    from fedmerge.common.task.config import FedConfig
    from fedmerge.server.app import run_federation
    from fedmerge.server.inline import InlineGrid

    cfg = FedConfig(dataset="cifar10-mini", arch="cnn", width=0.25, epochs=1, max_train=96, probe_size=100,
                    max_test=100, batch_size=48, num_clients=3, min_clients=2, gamma="0.1", reference="0",
                    stats_dtype="bfloat16", stats_rank=4, faults="nan-query:2", out=str(tmp_path))
    result = run_federation(InlineGrid(task_client_app(cfg.to_run_config()), 3), cfg)
    rej = result["clients_rejected"]
    assert len(rej) == 1 and rej[0]["partition"] == 2 and rej[0]["phase"] == "cross-statistics"
    assert "non-finite" in rej[0]["reason"] and "cross." in rej[0]["reason"]
    assert result["clients_merged"] == [0, 1] and np.isfinite(result["accuracy"]["merged"])


def test_federation_with_float16_statistics(tmp_path):
    from fedmerge.client.app import task_client_app
    from fedmerge.common.task.config import FedConfig
    from fedmerge.common.task.loaders import build_global_model, probe_batches
    from fedmerge.server.app import run_federation
    from fedmerge.server.inline import InlineGrid

    cfg = FedConfig(dataset="cifar10-mini", arch="cnn", width=0.25, epochs=1, max_train=128, probe_size=120,
                    max_test=100, batch_size=64, num_clients=2, min_clients=2, gamma="0.1", reference="0",
                    stats_dtype="float16", out=str(tmp_path))
    grid = InlineGrid(task_client_app(cfg.to_run_config()), 2)
    result = run_federation(grid, cfg)
    assert result["rounds_completed"] == 1 and result["clients_rejected"] == []
    assert result["clients_merged"] == [0, 1] and np.isfinite(result["accuracy"]["merged"])
    rnd = result["rounds"][0]
    # both clients upload weights + own statistics + cross statistics (the reference's against itself: it
    # shows the server it still holds the model it uploaded), all float16, so both upload the same bytes
    assert set(rnd["bytes_statistics"]) == {"0", "1"} and set(rnd["bytes_weights"]) == {"0", "1"}
    assert rnd["bytes_statistics"]["1"] == rnd["bytes_statistics"]["0"]
    for p in ("0", "1"):
        assert rnd["bytes_weights"][p] + rnd["bytes_statistics"][p] <= rnd["bytes_uploaded"][p]
    # float16 own statistics: well under half of what the float64 (legacy) record of the same blocks takes

    spec = derive_spec(build_global_model(cfg), probe_batches(cfg)[0].example())
    fake = {g: Moments(10, torch.zeros(grp.dim, dtype=torch.float64), torch.eye(grp.dim, dtype=torch.float64))
            for g, grp in spec.groups.items()}
    # float16 own (one triangle) + cross blocks: well under half of the same blocks' float64 (legacy) records
    fake_cross = {g: CrossMoments(10, m.mean, m.mean, m.m2) for g, m in fake.items()}
    legacy = (arrays_to_record(legacy_arrays(fake)).count_bytes()
              + arrays_to_record(legacy_arrays(fake_cross, "cross")).count_bytes())
    assert rnd["bytes_statistics"]["0"] < 0.5 * legacy
