"""Keyed randomness: every random draw of training is a function of (seed, step, sample index).

Drawing per sample from a generator seeded by its key makes a run independent of how the
batch is split: one process with batch 2B and two processes with batch B draw exactly the
same noise, noise levels and interpolation weights, so they reach the same parameters.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

import torch


def key_seed(*parts: int | str) -> int:
    """A 63-bit seed from any tuple of ints/strings (stable across processes and runs)."""
    text = "/".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") & ((1 << 63) - 1)


def keyed_generator(*parts: int | str) -> torch.Generator:
    return torch.Generator().manual_seed(key_seed(*parts))


def keyed_randn(keys: Iterable[Sequence[int | str]], shape: Sequence[int], device=None, dtype=torch.float32):
    """One standard-normal tensor of ``shape`` per key, stacked: (len(keys), *shape)."""
    out = torch.stack([torch.randn(tuple(shape), generator=keyed_generator(*k), dtype=dtype) for k in keys])
    return out.to(device)


def keyed_rand(keys: Iterable[Sequence[int | str]], device=None, dtype=torch.float32) -> torch.Tensor:
    """One uniform [0, 1) number per key: (len(keys),)."""
    out = torch.stack([torch.rand((), generator=keyed_generator(*k), dtype=dtype) for k in keys])
    return out.to(device)


def keyed_randint(keys: Iterable[Sequence[int | str]], high: int, device=None) -> torch.Tensor:
    """One integer in [0, high) per key: (len(keys),)."""
    out = torch.stack([torch.randint(0, high, (), generator=keyed_generator(*k)) for k in keys])
    return out.to(device)
