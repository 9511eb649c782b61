"""Property: no mutation of one client's upload -- bytes, shapes, dtypes, npy headers, metrics, echoes, records --
crashes the server or stops the honest clients' merge. 500 seeded cases (hypothesis, derandomised)."""
import logging

import adversary as adv
import numpy as np
import pytest
import torch
from adversary import ATTACKER, QUERY_CROSS
from flwr.app import Array, ArrayRecord, ConfigRecord
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fedmerge.server.checks import weight_norm
from fedmerge.server.inline import InlineGrid


@pytest.fixture(scope="module")
def kit():
    # tiny matrices: one thread is faster, and two processes' threads do not fight over a loaded machine's cores
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield adv.record_honest()
    torch.set_num_threads(threads)


RECORDS = {"train": ["arrays", "own-stats"], QUERY_CROSS: ["cross-stats"]}
METRICS = ["num-examples", "partition-id", "probe-accuracy", "seconds-train", "seconds-cross-stats", "test-accuracy"]
NUMBERS = st.one_of(st.integers(-2 ** 63, 2 ** 63 - 1), st.floats(allow_nan=True, allow_infinity=True),
                    st.lists(st.floats(allow_nan=True), max_size=3), st.lists(st.integers(-5, 5), max_size=3),
                    st.sampled_from([0, 1, 2, 3, 256, 10 ** 12, 1.5, -1]))
DTYPES = ["float16", "float64", "int8", "int64", "uint16", "bool", "object", "<U4", "complex64", "V3", "garbage", ">f4"]

op = st.one_of(
    st.tuples(st.just("splice"), st.integers(0, 10 ** 6), st.integers(0, 400), st.binary(min_size=1, max_size=32)),
    st.tuples(st.just("truncate"), st.integers(0, 10 ** 6), st.integers(0, 200)),
    st.tuples(st.just("shape"), st.integers(0, 10 ** 6), st.lists(st.integers(0, 2 ** 40), max_size=4)),
    st.tuples(st.just("dtype"), st.integers(0, 10 ** 6), st.sampled_from(DTYPES)),
    st.tuples(st.just("header"), st.integers(0, 10 ** 6), st.text(max_size=80)),
    st.tuples(st.just("stype"), st.integers(0, 10 ** 6), st.text(max_size=12)),
    st.tuples(st.just("value"), st.integers(0, 10 ** 6), st.integers(0, 10 ** 6),
              st.floats(allow_nan=True, allow_infinity=True)),
    st.tuples(st.just("recast"), st.integers(0, 10 ** 6), st.sampled_from(["float16", "float64", "int32", "float32"])),
    st.tuples(st.just("drop-array"), st.integers(0, 10 ** 6)),
    st.tuples(st.just("drop-record"), st.integers(0, 3)),
    st.tuples(st.just("metric"), st.sampled_from(METRICS), NUMBERS),
    st.tuples(st.just("drop-metric"), st.sampled_from(METRICS)),
    st.tuples(st.just("echo"), st.sampled_from(["probe-digest", "reference-digest"]),
              st.one_of(st.text(max_size=70), st.integers(), st.floats())),
)


def _apply(rd, phase: str, ops) -> None:
    for o in ops:
        kind = o[0]
        if kind in ("metric", "drop-metric"):
            mr = rd.metric_records.get("metrics")
            if mr is None:
                continue
            if kind == "drop-metric":
                mr.pop(o[1], None)
            else:
                try:
                    mr[o[1]] = o[2]
                except (TypeError, ValueError):  # a value Flower itself refuses never reaches the server
                    pass
            continue
        if kind == "echo":
            try:
                rd.config_records["fedmerge"] = ConfigRecord({o[1]: o[2]})
            except (TypeError, ValueError):
                pass
            continue
        if kind == "drop-record":
            names = list(rd.array_records.keys()) + list(rd.config_records.keys()) + list(rd.metric_records.keys())
            if names:
                rd.pop(names[o[1] % len(names)], None)
            continue
        names = [r for r in RECORDS[phase] if r in rd.array_records]
        if not names:
            continue
        rec = rd.array_records[names[o[1] % len(names)]]
        keys = list(rec.keys())
        if not keys:
            continue
        key = keys[o[1] % len(keys)]
        a = rec[key]
        if kind == "splice":
            data = bytearray(a.data)
            at = o[2] % (len(data) + 1)
            rec[key] = adv.raw(a.dtype, a.shape, bytes(data[:at] + o[3] + data[at + len(o[3]):]), a.stype)
        elif kind == "truncate":
            rec[key] = adv.raw(a.dtype, a.shape, a.data[:o[2] % (len(a.data) + 1)], a.stype)
        elif kind == "shape":
            rec[key] = adv.raw(a.dtype, tuple(o[2]), a.data, a.stype)
        elif kind == "dtype":
            rec[key] = adv.raw(o[2], a.shape, a.data, a.stype)
        elif kind == "header":
            rec[key] = adv.raw(a.dtype, a.shape, adv.npy_with_header(o[2], a.data[128:]), a.stype)
        elif kind == "stype":
            rec[key] = adv.raw(a.dtype, a.shape, a.data, o[2])
        elif kind == "value":
            v = a.numpy().copy()
            if v.size and v.dtype.kind in "fiu":
                try:
                    with np.errstate(all="ignore"):
                        v.reshape(-1)[o[2] % v.size] = o[3]
                except (OverflowError, ValueError):
                    continue
                rec[key] = Array(v)
        elif kind == "recast":
            v = a.numpy()
            with np.errstate(all="ignore"):
                rec[key] = Array(v.astype(o[2]))
        elif kind == "drop-array":
            rec.pop(key)


@settings(max_examples=500, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large])
@given(phase=st.sampled_from(["train", QUERY_CROSS]), ops=st.lists(op, min_size=1, max_size=3))
def test_no_mutated_upload_crashes_the_server(kit, phase, ops):
    logging.getLogger("flwr").setLevel(logging.ERROR)
    strategy = adv.make_strategy(kit.cfg, reference=0, max_examples=adv.partition_sizes(kit))
    grid = InlineGrid(adv.replay_app(kit, {(phase, ATTACKER): lambda rd: _apply(rd, phase, ops)}), 3)
    strategy.attach(grid)   # start() attaches its grid; the hooks are driven by hand here
    arrays, _ = strategy.aggregate_train(1, grid.send_and_receive(strategy.configure_train(
        1, ArrayRecord(), ConfigRecord(), grid)))   # never raises
    rec = strategy.history[-1]
    event("rejected" if rec.clients_rejected else "accepted")
    # the honest clients are always merged; the attacker is merged only if every check passed
    assert rec.ok, rec.error
    assert rec.clients_merged[:2] == [0, 1] and set(rec.clients_merged) <= {0, 1, 2}
    assert {r["partition"] for r in rec.clients_rejected} <= {ATTACKER}
    state = arrays.to_torch_state_dict()
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert weight_norm(state) <= 10 * rec.merge_info["norm_anchor"]
