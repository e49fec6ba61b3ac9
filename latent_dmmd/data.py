"""Datasets (image folders, Hugging Face datasets, IDX files), image transforms and the
index-keyed latent cache.

Images come out as float tensors in [-1, 1], shape (C, H, W). A file that cannot be read
is skipped: its item is ``None``, ``collate_skipping`` drops it and counts it in the
batch (``batch["skipped"]``), and training reports the total at the end. Nothing crashes
hours into a run because of one bad JPEG.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import struct
import tempfile
import warnings
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image, ImageFile
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset, default_collate

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# an image is skipped when resizing its shorter side to the resolution would make more than this many
# pixels per output pixel (aspect ratio beyond 64:1: a 1x200000 strip would otherwise need GBs)
MAX_RESIZED_PIXELS_PER_OUTPUT_PIXEL = 64
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file must fail loudly, then be skipped


# ---------------------------------------------------------------------------- transforms


@dataclass
class ImageTransform:
    """Resize the shorter side to ``resolution``, crop to a square, optionally flip, to [-1, 1]."""

    resolution: int
    center_crop: bool = True
    random_flip: bool = False
    channels: int = 3

    def to_mode(self, image: Image.Image) -> Image.Image:
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):
            # 16-bit / 32-bit grayscale: rescale to 8 bits before the RGB conversion
            arr = np.asarray(image, dtype=np.float64)
            top = 65535.0 if arr.max() > 255 else 255.0
            image = Image.fromarray(np.clip(arr / top * 255.0, 0, 255).astype(np.uint8), mode="L")
        if image.mode in ("RGBA", "LA", "P"):
            image = image.convert("RGBA")
            background = Image.new("RGBA", image.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, image)
        return image.convert("RGB" if self.channels == 3 else "L")

    def __call__(self, image: Image.Image, flip: bool | None = None, rng: np.random.Generator | None = None):
        image = self.to_mode(image)
        w, h = image.size
        scale = self.resolution / min(w, h)
        if w * h * scale * scale > MAX_RESIZED_PIXELS_PER_OUTPUT_PIXEL * self.resolution**2:
            raise ValueError(f"{w}x{h} image: its shorter side resized to {self.resolution} would need "
                             f"{w * h * scale * scale / 1e6:.0f}M pixels (aspect ratio too extreme)")  # fmt: skip
        if scale != 1:
            image = image.resize((max(self.resolution, round(w * scale)), max(self.resolution, round(h * scale))),
                                 Image.Resampling.BICUBIC if scale > 1 else Image.Resampling.LANCZOS)  # fmt: skip
        w, h = image.size
        if self.center_crop:
            left, top = (w - self.resolution) // 2, (h - self.resolution) // 2
        else:
            rng = rng or np.random.default_rng()
            left, top = int(rng.integers(0, w - self.resolution + 1)), int(rng.integers(0, h - self.resolution + 1))
        image = image.crop((left, top, left + self.resolution, top + self.resolution))
        arr = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
        tensor = torch.from_numpy(arr.copy()).reshape(self.resolution, self.resolution, -1).permute(2, 0, 1)
        if flip is None:
            flip = self.random_flip and bool((rng or np.random.default_rng()).random() < 0.5)
        return tensor.flip(-1) if flip else tensor


# ---------------------------------------------------------------------------- datasets


def list_images(folder: str | os.PathLike) -> list[str]:
    """All image files under ``folder`` (recursive), sorted, so indices are stable."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"image folder not found: {folder}")
    found = []
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            # regular files only: a FIFO named pipe.png would block the first read forever
            if name.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(path):
                found.append(path)
    return sorted(found)


class ImageFolderDataset(Dataset):
    """Images of a folder (recursive). Items: ``{"index", "pixel_values"}`` or ``None`` if unreadable."""

    def __init__(self, folder: str, transform: ImageTransform, files: list[str] | None = None):
        self.files = files if files is not None else list_images(folder)
        if not self.files:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {folder}")
        self.transform = transform
        self.source = os.path.abspath(folder)

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int, flip: bool | None = None) -> torch.Tensor | None:
        path = self.files[index]
        try:
            with warnings.catch_warnings():
                # Pillow warns above MAX_IMAGE_PIXELS (and raises above twice that): treat both as a bomb
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(path) as image:
                    image.load()
                    return self.transform(image, flip=flip)
        except Exception as err:  # any decoding failure: skip and count, never crash
            logger.warning("skipping unreadable image %s (%s)", path, err)
            return None

    def __getitem__(self, index: int):
        pixels = self.load(index)
        return None if pixels is None else {"index": index, "pixel_values": pixels}


class HFImageDataset(Dataset):
    """A Hugging Face ``datasets`` image dataset: a local ``save_to_disk`` folder or a cached Hub name."""

    def __init__(self, name: str, transform: ImageTransform, split: str = "train", image_column: str = "image"):
        try:
            import datasets
        except ImportError as err:  # pragma: no cover - optional dependency
            raise ImportError("Hugging Face datasets are optional: pip install datasets") from err
        if os.path.isdir(name):
            ds = datasets.load_from_disk(name)
            ds = ds[split] if isinstance(ds, datasets.DatasetDict) else ds
        else:
            ds = datasets.load_dataset(name, split=split)
        if image_column not in ds.column_names:
            raise ValueError(f"dataset {name} has no column {image_column!r}; columns: {ds.column_names}")
        self.ds, self.column, self.transform, self.source = ds, image_column, transform, name

    def __len__(self) -> int:
        return len(self.ds)

    def load(self, index: int, flip: bool | None = None) -> torch.Tensor | None:
        try:
            image = self.ds[index][self.column]
            if not isinstance(image, Image.Image):
                image = Image.fromarray(np.asarray(image))
            return self.transform(image, flip=flip)
        except Exception as err:
            logger.warning("skipping unreadable item %d of %s (%s)", index, self.source, err)
            return None

    def __getitem__(self, index: int):
        pixels = self.load(index)
        return None if pixels is None else {"index": index, "pixel_values": pixels}


def read_idx(path: str) -> np.ndarray:
    """Read an IDX file (optionally gzipped), e.g. Fashion-MNIST's ``*-images-idx3-ubyte``."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        zero, dtype_code, ndim = struct.unpack(">HBB", f.read(4))
        if zero != 0 or dtype_code != 0x08:
            raise ValueError(f"{path} is not an unsigned-byte IDX file")
        shape = struct.unpack(">" + "I" * ndim, f.read(4 * ndim))
        data = np.frombuffer(f.read(), dtype=np.uint8)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: expected {int(np.prod(shape))} bytes of data, got {data.size}")
    return data.reshape(shape)


class IDXImageDataset(Dataset):
    """Grayscale images from an IDX file (Fashion-MNIST: ``apt-get install dataset-fashion-mnist``)."""

    def __init__(self, path: str, transform: ImageTransform):
        if os.path.isdir(path):
            candidates = [f for f in os.listdir(path) if "images" in f and "idx3" in f]
            split = "train" if any(f.startswith("train") for f in candidates) else ""
            chosen = sorted(f for f in candidates if f.startswith(split))
            if not chosen:
                raise FileNotFoundError(f"no *-images-idx3-ubyte file in {path}")
            path = os.path.join(path, chosen[0])
        self.images = read_idx(path)
        self.transform, self.source = transform, os.path.abspath(path)

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int, flip: bool | None = None) -> torch.Tensor:
        return self.transform(Image.fromarray(self.images[index], mode="L"), flip=flip)

    def __getitem__(self, index: int):
        return {"index": index, "pixel_values": self.load(index)}


def build_image_dataset(
    train_data_dir: str | None = None,
    dataset_name: str | None = None,
    resolution: int = 32,
    center_crop: bool = True,
    random_flip: bool = False,
    channels: int = 3,
    split: str = "train",
    image_column: str = "image",
    max_train_samples: int | None = None,
    first_index: int = 0,
) -> Dataset:
    """The dataset a config names: an image folder, an IDX file/folder, or a HF dataset.

    ``first_index`` / ``max_train_samples`` select a contiguous slice of a folder (e.g. the
    CelebA-HQ split 00000–03499) so that held-out images are never trained on.
    """
    transform = ImageTransform(resolution, center_crop, random_flip, channels)
    if dataset_name:
        ds = HFImageDataset(dataset_name, transform, split, image_column)
    elif train_data_dir is None:
        raise ValueError("give train_data_dir (an image folder or IDX file) or dataset_name")
    elif (os.path.isfile(train_data_dir) and "idx" in os.path.basename(train_data_dir)) or (
        os.path.isdir(train_data_dir) and any("idx3" in f for f in os.listdir(train_data_dir))
    ):
        ds = IDXImageDataset(train_data_dir, transform)
    else:
        files = list_images(train_data_dir)
        stop = None if max_train_samples is None else first_index + max_train_samples
        ds = ImageFolderDataset(train_data_dir, transform, files=files[first_index:stop])
        return ds
    if first_index or max_train_samples:
        stop = len(ds) if max_train_samples is None else min(len(ds), first_index + max_train_samples)
        ds = torch.utils.data.Subset(ds, range(first_index, stop))
        ds.source = ds.dataset.source  # type: ignore[attr-defined]
    return ds


def collate_skipping(items: list) -> dict:
    """Collate, dropping unreadable items (``None``) and counting them in ``batch["skipped"]``."""
    kept = [item for item in items if item is not None]
    batch = default_collate(kept) if kept else {}
    batch["skipped"] = len(items) - len(kept)
    return batch


# ---------------------------------------------------------------------------- latent cache


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
    # hash over the source files' names, sizes and modification times (caches before it: "")
    source_digest: str = ""
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
    """SHA-256 over what a dataset reads: each image file's path (relative), size and mtime, the IDX
    file's, or a Hugging Face dataset's fingerprint. A replaced, added or removed image changes it."""
    import hashlib

    digest = hashlib.sha256()
    files = getattr(dataset, "files", None)
    if files is None and os.path.isfile(getattr(dataset, "source", "") or ""):
        files = [dataset.source]
    if files is not None:
        root = os.path.commonpath([os.path.abspath(f) for f in files]) if len(files) > 1 else ""
        for path in files:
            st = os.stat(path)
            digest.update(f"{os.path.relpath(path, root) if root else os.path.basename(path)}|{st.st_size}|"
                          f"{st.st_mtime_ns}\n".encode())  # fmt: skip
    else:
        digest.update(str(getattr(getattr(dataset, "ds", None), "_fingerprint", dataset.source)).encode())
    return digest.hexdigest()


def _default_mode() -> int:
    """The permissions a plain ``open(..., "w")`` would give (mkstemp files are 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _atomic_save(tensors: dict, path: str) -> None:
    """Write safetensors to a temporary file in the same folder, then rename into place."""
    folder = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".safetensors")
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
        os.chmod(tmp, _default_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _atomic_write_json(obj, path: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2)
    os.chmod(tmp, _default_mode())
    os.replace(tmp, path)


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
    _atomic_save(tensors, path)
    return path


def write_cache_meta(cache_dir: str, meta: CacheMeta) -> None:
    _atomic_write_json(asdict(meta), os.path.join(cache_dir, CACHE_META))


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
            except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
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
