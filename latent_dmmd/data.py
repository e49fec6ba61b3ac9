"""Datasets (image folders, Hugging Face datasets, IDX files) and image transforms (the latent cache
of encoded datasets is ``latent_dmmd.latent_cache``).

Images come out as float tensors in [-1, 1], shape (C, H, W). A file that cannot be read
is skipped: its item is ``None``, ``collate_skipping`` drops it and counts it in the
batch (``batch["skipped"]``), and training reports the total at the end. Nothing crashes
hours into a run because of one bad JPEG.
"""

from __future__ import annotations

import gzip
import logging
import os
import struct
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageFile
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
