"""Probe inputs: the only data the merging server ever sees.

``as_batches`` turns whatever the user passes (a tensor of inputs, a ``(inputs, labels)`` pair, a
DataLoader yielding tensors or ``(x, y, ...)`` tuples, or a list of batches) into a small materialised
list of CPU batches, so that it can be iterated several times and split into a fitting part and a
held-out part (for ``gamma="auto"`` and ``reference="best"``) deterministically.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch


@dataclass
class Batches:
    batches: list[tuple[torch.Tensor, torch.Tensor | None]]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)

    @property
    def num_samples(self) -> int:
        return sum(x.shape[0] for x, _ in self.batches)

    @property
    def has_labels(self) -> bool:
        return all(y is not None for _, y in self.batches)

    def example(self) -> torch.Tensor:
        return self.batches[0][0]

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = torch.cat([b[0] for b in self.batches])
        y = torch.cat([b[1] for b in self.batches]) if self.has_labels else None
        return x, y

    def split(self, held_out: float = 0.2, seed: int = 0, batch_size: int | None = None) -> tuple["Batches", "Batches"]:
        """Deterministic (fit, held-out) split of the samples."""
        x, y = self.tensors()
        n = x.shape[0]
        n_held = int(round(n * held_out))
        if n_held < 1 or n - n_held < 2:
            raise ValueError(f"probe of {n} samples is too small to hold out {held_out:.0%} of it")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        bs = batch_size or self.batches[0][0].shape[0]
        return (_chunk(x[perm[n_held:]], None if y is None else y[perm[n_held:]], bs),
                _chunk(x[perm[:n_held]], None if y is None else y[perm[:n_held]], bs))


def _chunk(x, y, bs) -> Batches:
    return Batches([(x[i:i + bs], None if y is None else y[i:i + bs]) for i in range(0, x.shape[0], bs)])


def as_batches(probe, batch_size: int = 256) -> Batches:
    if isinstance(probe, Batches):
        return probe
    if isinstance(probe, torch.Tensor):
        out = _chunk(probe, None, batch_size)
    elif isinstance(probe, tuple) and len(probe) == 2 and all(isinstance(t, torch.Tensor) for t in probe):
        x, y = probe
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"probe inputs ({x.shape[0]}) and labels ({y.shape[0]}) differ in length")
        out = _chunk(x, y, batch_size)
    else:
        try:
            it = iter(probe)
        except TypeError:
            raise TypeError(f"probe must be a tensor, an (inputs, labels) pair, a DataLoader or a list of "
                            f"batches, got {type(probe).__name__}") from None
        batches = []
        for item in it:
            if isinstance(item, torch.Tensor):
                batches.append((item.detach().cpu(), None))
            elif isinstance(item, (tuple, list)) and item and isinstance(item[0], torch.Tensor):
                y = item[1] if len(item) > 1 and isinstance(item[1], torch.Tensor) else None
                batches.append((item[0].detach().cpu(), None if y is None else y.detach().cpu()))
            else:
                raise TypeError(f"probe batches must be tensors or (x, y) tuples, got {type(item).__name__}")
        out = Batches(batches)
    if not out.batches or out.num_samples == 0:
        raise ValueError("probe is empty")
    if out.num_samples < 2:
        raise ValueError("probe needs at least 2 samples")
    return out


def probe_digest(batches: Batches) -> str:
    """SHA-256 of the probe's inputs (float bytes, in order): the fingerprint the server sends with the train
    config and clients echo with their statistics, so that statistics computed on another probe are refused."""
    from fedmerge.common.wire.records import weights_digest

    return weights_digest({"inputs": torch.cat([x for x, _ in batches.batches])})
