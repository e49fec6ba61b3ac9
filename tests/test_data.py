"""Datasets, transforms, IDX files and the latent cache."""

import json
import os
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from latent_dmmd.autoencoders import vae_identity
from latent_dmmd.data import ImageFolderDataset, ImageTransform, build_image_dataset, collate_skipping, read_idx
from latent_dmmd.latent_cache import (
    CacheMeta,
    LatentCacheDataset,
    check_cache,
    encode_shard,
    write_cache_meta,
    write_cache_shard,
)

from .conftest import write_image_folder


def test_transform_converts_modes_and_sizes():
    t = ImageTransform(8)
    gray = t(Image.fromarray(np.full((20, 10), 200, np.uint8), mode="L"))
    assert gray.shape == (3, 8, 8) and torch.allclose(gray, torch.full_like(gray, 200 / 127.5 - 1), atol=1e-6)
    rgba = np.zeros((8, 8, 4), np.uint8)  # fully transparent black -> white background
    assert torch.allclose(t(Image.fromarray(rgba, mode="RGBA")), torch.ones(3, 8, 8))
    sixteen = Image.fromarray(np.full((8, 8), 65535, np.uint16))
    assert torch.allclose(t(sixteen), torch.ones(3, 8, 8))
    tiny = t(Image.fromarray(np.zeros((2, 3, 3), np.uint8)))  # 3x2 image is upscaled, then cropped
    assert tiny.shape == (3, 8, 8)
    one = ImageTransform(8, channels=1)(Image.fromarray(np.zeros((8, 8, 3), np.uint8)))
    assert one.shape == (1, 8, 8)


def test_center_crop_and_flip():
    arr = np.zeros((8, 16, 3), np.uint8)
    arr[:, :8] = 255  # left half white
    img = Image.fromarray(arr)
    plain = ImageTransform(8)(img, flip=False)
    flipped = ImageTransform(8)(img, flip=True)
    assert torch.equal(plain.flip(-1), flipped)
    assert plain[:, :, :4].mean() > 0.9 and plain[:, :, 4:].mean() < -0.9  # centre crop straddles the edge


def test_folder_is_recursive_and_skips_unreadable_files(tmp_path):
    write_image_folder(tmp_path, n=6, corrupt=1)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "empty.png").write_bytes(b"")
    good = tmp_path / "part0" / "img000.png"
    (tmp_path / "truncated.png").write_bytes(good.read_bytes()[:60])
    ds = ImageFolderDataset(str(tmp_path), ImageTransform(8))
    assert len(ds) == 9  # 6 good + broken jpg + empty png + truncated png; notes.txt is ignored
    batch = collate_skipping([ds[i] for i in range(len(ds))])
    assert batch["skipped"] == 3 and batch["pixel_values"].shape == (6, 3, 8, 8)


def test_empty_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no images"):
        ImageFolderDataset(str(tmp_path), ImageTransform(8))
    with pytest.raises(FileNotFoundError, match="not found"):
        ImageFolderDataset(str(tmp_path / "missing"), ImageTransform(8))


def test_dataloader_workers_survive_bad_files(tmp_path):
    write_image_folder(tmp_path, n=4, corrupt=2)
    ds = ImageFolderDataset(str(tmp_path), ImageTransform(8))
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2, collate_fn=collate_skipping)
    batches = list(loader)
    assert sum(b["skipped"] for b in batches) == 2
    assert sum(len(b.get("index", [])) for b in batches) == 4


def test_split_by_index_range(tmp_path):
    paths = write_image_folder(tmp_path, n=6)
    ds = build_image_dataset(str(tmp_path), resolution=8, first_index=2, max_train_samples=3)
    assert ds.files == sorted(paths)[2:5]


def write_idx(path, images: np.ndarray):
    with open(path, "wb") as f:
        f.write(struct.pack(">HBB", 0, 8, images.ndim) + struct.pack(">" + "I" * images.ndim, *images.shape))
        f.write(images.tobytes())


def test_idx_reader_and_dataset(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    write_idx(tmp_path / "train-images-idx3-ubyte", imgs)
    assert np.array_equal(read_idx(str(tmp_path / "train-images-idx3-ubyte")), imgs)
    ds = build_image_dataset(str(tmp_path), resolution=32, channels=1)
    assert len(ds) == 5 and ds[0]["pixel_values"].shape == (1, 32, 32)
    (tmp_path / "bad-images-idx3-ubyte").write_bytes((tmp_path / "train-images-idx3-ubyte").read_bytes()[:100])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(str(tmp_path / "bad-images-idx3-ubyte"))


def _meta(vae, **over):
    base = dict(vae=vae_identity(vae, "tiny"), resolution=8, center_crop=True, dataset="d[0:6]", count=6,
                flip_variants=True, latent_shape=[])  # fmt: skip
    return CacheMeta(**(base | over))


def test_latent_cache_round_trip_and_refusal(tmp_path):
    from diffusers import AutoencoderKL

    write_image_folder(tmp_path / "imgs", n=6, corrupt=1)
    ds = ImageFolderDataset(str(tmp_path / "imgs"), ImageTransform(8))
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=2)
    cache = str(tmp_path / "cache")
    # two "processes" each encode their own slice
    for rank in (0, 1):
        tensors, skipped = encode_shard(ds, vae, list(range(rank, len(ds), 2)), 2, flip_variants=True)
        write_cache_shard(cache, tensors, rank, 2)
    write_cache_meta(cache, _meta(vae, count=len(ds), shards=2, kept=6))
    assert not [f for f in os.listdir(cache) if f.startswith(".tmp")]
    cached = LatentCacheDataset(cache, _meta(vae, count=len(ds)))
    assert len(cached) == 6 and cached.index.tolist() == sorted(cached.index.tolist())
    item = cached[0]
    assert item["mean"].shape == (2, 8, 8) and item["std"].gt(0).all() and "mean_flip" in item
    # the cached mean equals a fresh encode of the same image
    from latent_dmmd.autoencoders import encode_images

    fresh = encode_images(vae, ds.load(item["index"])[None]).mean[0]
    assert torch.allclose(item["mean"], fresh, atol=1e-5)

    with pytest.raises(ValueError, match="resolution: cache has 8, run needs 16"):
        check_cache(cache, _meta(vae, count=len(ds), resolution=16))
    other = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=2, scaling_factor=0.3)
    with pytest.raises(ValueError, match="vae.scaling_factor.*vae.weights_sha256"):
        check_cache(cache, _meta(other, count=len(ds)))
    meta = json.loads((tmp_path / "cache" / "meta.json").read_text())
    assert meta["vae"]["scaling_factor"] == vae.config.scaling_factor


def test_hugging_face_dataset_from_a_local_copy(tmp_path):
    datasets = pytest.importorskip("datasets", reason="the optional `datasets` package is not installed")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)) for _ in range(3)]
    ds = datasets.Dataset.from_dict({"img": images}).cast_column("img", datasets.Image())
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "hf"))
    loaded = build_image_dataset(dataset_name=str(tmp_path / "hf"), resolution=8, image_column="img")
    assert len(loaded) == 3 and loaded[1]["pixel_values"].shape == (3, 8, 8)
    expected = ImageTransform(8)(images[1])
    assert torch.allclose(loaded[1]["pixel_values"], expected)
    with pytest.raises(ValueError, match="no column 'image'"):
        build_image_dataset(dataset_name=str(tmp_path / "hf"), resolution=8)


def test_deterministic_autoencoder_cache_stores_no_std(tmp_path):
    from diffusers import AutoencoderTiny

    write_image_folder(tmp_path / "imgs", n=3)
    ds = ImageFolderDataset(str(tmp_path / "imgs"), ImageTransform(8))
    torch.manual_seed(0)
    vae = AutoencoderTiny(encoder_block_out_channels=(8,), decoder_block_out_channels=(8,), num_encoder_blocks=(1,),
                          num_decoder_blocks=(1,), latent_channels=2)  # fmt: skip
    tensors, _ = encode_shard(ds, vae, [0, 1, 2], 2, flip_variants=False)
    assert set(tensors) == {"index", "mean"}
    write_cache_shard(str(tmp_path / "c"), tensors, 0, 1)
    write_cache_meta(str(tmp_path / "c"), _meta(vae, count=3, flip_variants=False))
    cached = LatentCacheDataset(str(tmp_path / "c"))
    assert cached.deterministic and "std" not in cached[0]


def test_cache_files_get_ordinary_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        path = write_cache_shard(str(tmp_path), {"index": torch.arange(2), "mean": torch.zeros(2, 1)}, 0, 1)
    finally:
        os.umask(old)
    assert oct(os.stat(path).st_mode & 0o777) == oct(0o644)  # readable by the group, like any written file


# ---------------------------------------------------------------------------- reliability round 2: the cache and the files


def _cache_run(tmp_path, *extra):
    """A tiny latent-space training run that builds (or checks) its cache; returns the cache folder."""
    from latent_dmmd.training import main

    from .conftest import tiny_vae_folder
    from .test_training import TINY_MODEL

    vae = tmp_path / "vae"
    if not vae.exists():
        tiny_vae_folder(vae, latent_channels=4)
    args = ["--train_data_dir", str(tmp_path / "imgs"), "--output_dir", str(tmp_path / "out"), "--resolution", "8",
            "--pretrained_vae", str(vae), "--train_batch_size", "4", "--group_size", "2", "--max_train_steps", "1",
            "--num_inference_steps", "2", "--flow_steps_per_level", "1", "--report_to", "none",
            "--checkpointing_steps", "1", "--overwrite_output_dir", "--eval_max_samples", "0", *TINY_MODEL, *extra]  # fmt: skip
    main([str(a) for a in args])
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    return tmp_path / "out" / "latent_cache"


@pytest.mark.parametrize("change", ["replaced", "added", "removed"])
def test_a_cache_of_images_that_changed_is_refused_naming_the_field(tmp_path, change):
    import shutil

    paths = write_image_folder(tmp_path / "imgs", n=8, size=12)
    _cache_run(tmp_path)
    if change == "replaced":  # same names, other pictures
        write_image_folder(tmp_path / "other", n=8, size=12, seed=5)
        for p in paths:
            shutil.copy(p.replace(str(tmp_path / "imgs"), str(tmp_path / "other")), p)
    elif change == "added":
        write_image_folder(tmp_path / "imgs" / "more", n=1, size=12, seed=7)
    else:
        os.remove(paths[0])
    with pytest.raises(ValueError, match="source_digest.*the images changed.*--rebuild_cache"):
        _cache_run(tmp_path)
    cache = _cache_run(tmp_path, "--rebuild_cache")
    assert LatentCacheDataset(str(cache)).meta.kept == (7 if change == "removed" else 9 if change == "added" else 8)


def test_a_cache_survives_its_images_being_touched_but_not_an_older_mtime_key(tmp_path):
    """Shared data copied afresh onto a machine gets new modification times and the same bytes: the cache
    keys on the bytes, so it stays valid; a cache keyed on modification times (version 0.1) is refused with
    the reason, not as "the images changed"."""
    paths = write_image_folder(tmp_path / "imgs", n=8, size=12)
    cache = _cache_run(tmp_path)
    before = (cache / "latents-00000-of-00001.safetensors").read_bytes()
    for p in paths:
        os.utime(p, (1_000_000_000, 1_000_000_000))
    _cache_run(tmp_path)  # accepted (a mismatch would raise)
    assert (cache / "latents-00000-of-00001.safetensors").read_bytes() == before  # reused, not rebuilt

    meta = json.loads((cache / "meta.json").read_text())
    assert meta["source_key"] == "content"
    del meta["source_key"]  # as version 0.1 wrote it
    (cache / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="source_key.*modification times.*content.*--rebuild_cache") as err:
        _cache_run(tmp_path)
    assert "images changed" not in str(err.value)


def test_missing_extra_and_truncated_shards_are_errors_naming_the_file(tmp_path):
    write_image_folder(tmp_path / "imgs", n=8, size=12)
    cache = _cache_run(tmp_path)
    shard = cache / "latents-00000-of-00001.safetensors"
    data = shard.read_bytes()
    (cache / "latents-00001-of-00002.safetensors").write_bytes(data)  # left by a 2-process build
    with pytest.raises(ValueError, match="also holds latents-00001-of-00002.*--rebuild_cache"):
        LatentCacheDataset(str(cache))
    os.remove(cache / "latents-00001-of-00002.safetensors")
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="latents-00000-of-00001.safetensors is unreadable"):
        LatentCacheDataset(str(cache))
    os.remove(shard)
    with pytest.raises(ValueError, match="has no shards|misses latents-00000"):
        LatentCacheDataset(str(cache))
    # a rebuild leaves exactly the shards of the new build
    cache = _cache_run(tmp_path, "--rebuild_cache")
    assert sorted(f for f in os.listdir(cache) if f.endswith(".safetensors")) == ["latents-00000-of-00001.safetensors"]


def test_only_regular_files_are_read_and_bombs_are_skipped(tmp_path):
    import warnings

    from PIL import Image

    write_image_folder(tmp_path / "imgs", n=2, size=12)
    os.mkfifo(tmp_path / "imgs" / "pipe.png")  # opening it for reading would block forever
    Image.new("L", (200000, 1), 255).save(tmp_path / "imgs" / "strip.png")  # 1x200000: GBs if resized first
    Image.new("L", (3000, 3000), 0).save(tmp_path / "imgs" / "bomb.png")
    ds = ImageFolderDataset(str(tmp_path / "imgs"), ImageTransform(64))
    assert not any(f.endswith("pipe.png") for f in ds.files)
    limit = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = 3000 * 3000 - 1  # the bomb is just above Pillow's warning threshold
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            loaded = {os.path.basename(f): ds.load(i) for i, f in enumerate(ds.files)}
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    assert loaded["bomb.png"] is None and loaded["strip.png"] is None
    assert sum(v is not None for v in loaded.values()) == 2
