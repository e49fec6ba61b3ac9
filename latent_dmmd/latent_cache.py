"""The index-keyed latent cache: a dataset encoded once by an autoencoder into safetensors shards
(one per process that wrote it) and a ``meta.json`` naming what it was made from, so that a run
with another VAE, resolution, crop or changed images refuses it instead of training on stale latents.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset

from .atomic import write_file_atomically

logger = logging.getLogger(__name__)

CACHE_META = "meta.json"


@dataclass
class CacheMeta:
    """What a latent cache was made from; a run whose meta differs must not use it."""

    vae: dict
    resolution: int
    center_crop: bool
    dataset: str
    count: int
    flip_variants: bool
    latent_shape: list
    # hash over the source files' names, sizes and contents (caches before it: "")
    source_digest: str = ""
    # what source_digest hashes: "content" (bytes), or "mtime" (sizes and modification times, the caches of
    # version 0.1, refused: a copy of the same images, a fresh checkout of shared data, changed their key)
    source_key: str = "mtime"
    shards: int = 1  # processes that wrote the cache: latents-r-of-<shards> for r < shards
    kept: int = -1  # latents in the cache (count minus unreadable images); -1: not recorded

    def mismatches(self, other: CacheMeta) -> list[str]:
        """Names of the fields (VAE fields as ``vae.<name>``) that differ from ``other``."""
        bad = []
        for key, value in asdict(self).items():
            theirs = getattr(other, key)
            if key == "vae":
                bad += [f"vae.{k}" for k in sorted(set(value) | set(theirs)) if value.get(k) != theirs.get(k)]
            elif value != theirs and key not in ("latent_shape", "shards", "kept"):
                bad.append(key)
        return bad


def source_digest(dataset) -> str:
    """SHA-256 over what a dataset reads: each image file's path (relative), size and content, the IDX
    file's, or a Hugging Face dataset's fingerprint. A replaced, added or removed image changes it; copying
    the same files elsewhere or touching them does not (hashing reads the files: about 0.3 s per 100 MB)."""
    import hashlib

    digest = hashlib.sha256()
    files = getattr(dataset, "files", None)
    if files is None and os.path.isfile(getattr(dataset, "source", "") or ""):
        files = [dataset.source]
    if files is not None:
        root = os.path.commonpath([os.path.abspath(f) for f in files]) if len(files) > 1 else ""
        for path in files:
            content = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    content.update(block)
            digest.update(f"{os.path.relpath(path, root) if root else os.path.basename(path)}|{os.path.getsize(path)}|"
                          f"{content.hexdigest()}\n".encode())  # fmt: skip
    else:
        digest.update(str(getattr(getattr(dataset, "ds", None), "_fingerprint", dataset.source)).encode())
    return digest.hexdigest()


def shard_name(rank: int, world: int) -> str:
    return f"latents-{rank:05d}-of-{world:05d}.safetensors"


@torch.no_grad()
def encode_shard(dataset, vae, indices: list[int], batch_size: int, flip_variants: bool, progress: bool = False):
    """Encode ``indices`` of an image dataset: returns tensors for one cache shard and a skip count."""
    from tqdm.auto import tqdm

    from .autoencoders import encode_images

    kept, means, stds, skipped = [], [], [], 0
    variants = (False, True) if flip_variants else (False,)
    for start in tqdm(range(0, len(indices), batch_size), desc="encoding latents", disable=not progress):
        chunk = indices[start : start + batch_size]
        for flip in variants:
            images = [dataset.load(i, flip=flip) for i in chunk]
            ok = [(i, im) for i, im in zip(chunk, images) if im is not None]
            if not flip:
                skipped += len(chunk) - len(ok)
                kept += [i for i, _ in ok]
            if ok:
                post = encode_images(vae, torch.stack([im for _, im in ok]).to(next(vae.parameters()).device))
                means.append((flip, post.mean.cpu()))
                stds.append((flip, post.std.cpu()))
    out = {"index": torch.tensor(kept, dtype=torch.long)}
    for flip in variants:
        suffix = "_flip" if flip else ""
        m = [t for f, t in means if f == flip]
        s = [t for f, t in stds if f == flip]
        out["mean" + suffix] = torch.cat(m) if m else torch.empty(0)
        std = torch.cat(s) if s else torch.empty(0)
        if bool(std.any()):  # deterministic autoencoders (TAEF2, AutoencoderTiny) store no std
            out["std" + suffix] = std
    return out, skipped


def write_cache_shard(cache_dir: str, tensors: dict, rank: int, world: int) -> str:
    os.makedirs(cache_dir, exist_ok=True)
    path = os.path.join(cache_dir, shard_name(rank, world))
    write_file_atomically(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, tmp))
    return path


def write_cache_meta(cache_dir: str, meta: CacheMeta) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(asdict(meta), f, indent=2)

    write_file_atomically(os.path.join(cache_dir, CACHE_META), write)


def read_cache_meta(cache_dir: str) -> CacheMeta | None:
    path = os.path.join(cache_dir, CACHE_META)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return CacheMeta(**json.load(f))


def check_cache(cache_dir: str, expected: CacheMeta) -> None:
    """Refuse a cache made from another VAE, scaling, resolution, crop or dataset, or from images
    that changed since (``source_digest``: a replaced, added or removed file)."""
    meta = read_cache_meta(cache_dir)
    if meta is None:
        raise ValueError(f"{cache_dir} is not a complete latent cache (no {CACHE_META})")
    bad = meta.mismatches(expected)
    if bad:
        detail = ", ".join(f"{k}: cache has {_short(_lookup(meta, k))!r}, run needs {_short(_lookup(expected, k))!r}"
                           for k in bad)  # fmt: skip
        why = " (the images changed since the cache was built)" if "source_digest" in bad else ""
        if "source_key" in bad:  # an older cache's digest cannot be compared: say so rather than "changed"
            bad = [k for k in bad if k != "source_digest"]
            why = (" (the cache keyed its images on their modification times, which change whenever the data is "
                   "copied; this version keys them on their content)")
        raise ValueError(f"latent cache {cache_dir} does not match this run ({detail}){why}; rebuild it with "
                         f"--rebuild_cache, or use another --latent_cache_dir")  # fmt: skip


def _short(value):
    return value[:12] if isinstance(value, str) and len(value) == 64 else value


def remove_shards(cache_dir: str) -> None:
    """Delete a cache's shards and meta (before a rebuild, so no stale shard survives it)."""
    if not os.path.isdir(cache_dir):
        return
    for name in os.listdir(cache_dir):
        if name == CACHE_META or (name.startswith("latents-") and name.endswith(".safetensors")):
            os.remove(os.path.join(cache_dir, name))


def _lookup(meta: CacheMeta, key: str):
    if key.startswith("vae."):
        return meta.vae.get(key[4:])
    return getattr(meta, key)


class LatentCacheDataset(Dataset):
    """Cached posteriors keyed by dataset index. Items hold ``mean`` and ``std`` (and their flipped
    variants), so each training step draws a fresh latent and a fresh flip choice. Deterministic
    autoencoders have no ``std``: their latent is the mean."""

    def __init__(self, cache_dir: str, expected: CacheMeta | None = None):
        if expected is not None:
            check_cache(cache_dir, expected)
        self.meta = read_cache_meta(cache_dir)
        if self.meta is None:
            raise ValueError(f"{cache_dir} is not a complete latent cache (no {CACHE_META})")
        shards = sorted(f for f in os.listdir(cache_dir) if f.startswith("latents-") and f.endswith(".safetensors"))
        if not shards:
            raise ValueError(f"latent cache {cache_dir} has no shards")
        expected_shards = [shard_name(r, self.meta.shards) for r in range(self.meta.shards)]
        missing = sorted(set(expected_shards) - set(shards))
        extra = sorted(set(shards) - set(expected_shards))
        if missing or extra:
            raise ValueError(f"latent cache {cache_dir} was written by {self.meta.shards} process(es) but "
                             + (f"misses {missing[0]}" if missing else f"also holds {extra[0]} (from another build)")
                             + "; rebuild it with --rebuild_cache")  # fmt: skip
        parts = []
        for name in shards:
            try:
                parts.append(load_file(os.path.join(cache_dir, name)))
            except Exception as err:
                raise ValueError(f"latent cache shard {os.path.join(cache_dir, name)} is unreadable (truncated or "
                                 f"corrupted: {err}); rebuild the cache with --rebuild_cache") from err  # fmt: skip
        index = torch.cat([p["index"] for p in parts])
        if len(index) != len(set(index.tolist())) or (self.meta.kept >= 0 and len(index) != self.meta.kept):
            raise ValueError(f"latent cache {cache_dir} holds {len(index)} latents where its meta says "
                             f"{self.meta.kept} distinct ones; rebuild it with --rebuild_cache")  # fmt: skip
        order = index.argsort()
        self.index = index[order]
        self.tensors = {k: torch.cat([p[k] for p in parts])[order] for k in parts[0] if k != "index"}
        if len(self.index) == 0:
            raise ValueError(f"latent cache {cache_dir} holds no latents")
        self.deterministic = not any(k.startswith("std") for k in self.tensors)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        item = {"index": int(self.index[i])}
        item.update({k: v[i] for k, v in self.tensors.items()})
        return item
