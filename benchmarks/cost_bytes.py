"""Bytes per client per round (:mod:`benchmarks.cost` (f)): the model's state dict vs the statistics arrays the
client app uploads, the d^2 + d per group formula as a check, and the whole round's upload for N clients."""
from __future__ import annotations

__all__ = ["upload_bytes", "client_arrays", "round_bytes"]


def upload_bytes(model, own, cross, spec) -> dict:
    from flwr.app import ArrayRecord

    from fedmerge.common.wire.records import arrays_to_record

    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    model_bytes = sum(v.numel() * v.element_size() for v in state.values())
    own_arrays, cross_arrays, encoder = client_arrays(own, cross)
    own_b = sum(a.nbytes for a in own_arrays.values())
    cross_b = sum(a.nbytes for a in cross_arrays.values())
    dims = [g.dim for g in spec.groups.values()]
    formula_own = sum(8 * (d * d + d + 1) for d in dims)
    formula_cross = sum(8 * (d * d + 2 * d + 1) for d in dims)
    return {"model": model_bytes, "own": own_b, "cross": cross_b, "formula_own": formula_own,
            "formula_cross": formula_cross,
            "record_model": ArrayRecord(state).count_bytes(),
            "record_own": arrays_to_record(own_arrays).count_bytes(),
            "record_cross": arrays_to_record(cross_arrays).count_bytes(),
            "parameters": sum(p.numel() for p in model.parameters()), "group_dims": dims, "encoder": encoder}


def client_arrays(own, cross) -> tuple[dict, dict, str]:
    """The arrays the client app uploads with its default options (the wire codec: full float64 blocks)."""
    from fedmerge.common.wire.compress import encode_cross, encode_moments

    return (encode_moments(own, "float64", 0), encode_cross(cross, "float64", 0),
            "compress.encode_moments / encode_cross (float64, full rank)")


def round_bytes(b: dict, n: int) -> dict:
    """Upload of one round with n clients: all send weights + own statistics, all but the reference send
    cross statistics; the server also sends the reference's weights to the n - 1 others (download)."""
    cca_up = n * (b["model"] + b["own"]) + (n - 1) * b["cross"]
    return {"n": n, "cca_upload": cca_up, "fedavg_upload": n * b["model"], "ratio": cca_up / (n * b["model"]),
            "cca_extra_download": (n - 1) * b["model"]}
