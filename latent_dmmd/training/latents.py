"""Training data: the image dataset of a config and the latent cache (encoded once, split across processes)."""

from __future__ import annotations

import json
import logging
import os
import time

import torch

from .config import TrainConfig, load_config

logger = logging.getLogger("latent_dmmd.training")


def image_dataset(config: TrainConfig):
    from ..data import build_image_dataset

    return build_image_dataset(
        train_data_dir=config.train_data_dir, dataset_name=config.dataset_name, resolution=config.resolution,
        center_crop=config.center_crop, random_flip=False,  # flips are keyed in training_batch
        channels=3 if config.latent else config.channels, split=config.dataset_split,
        image_column=config.image_column, max_train_samples=config.max_train_samples, first_index=config.first_index,
    )  # fmt: skip


def prepare_latents(accelerator, config: TrainConfig):
    """Make sure the latent cache for this run exists (encoding split across processes) and
    return ``(LatentCacheDataset, vae_identity)``. The VAE is freed before training."""
    from ..autoencoders import check_latent_scale, load_autoencoder, vae_identity
    from ..latent_cache import (
        CacheMeta,
        LatentCacheDataset,
        check_cache,
        encode_shard,
        read_cache_meta,
        remove_shards,
        source_digest,
        write_cache_meta,
        write_cache_shard,
    )

    images = image_dataset(config)
    vae = load_autoencoder(config.pretrained_vae, config.vae_subfolder, config.vae_revision).to(accelerator.device)
    identity = vae_identity(vae, config.pretrained_vae)
    source = getattr(images, "source", config.train_data_dir or config.dataset_name)
    expected = CacheMeta(
        vae=identity, resolution=config.resolution, center_crop=config.center_crop,
        dataset=f"{source}[{config.first_index}:{config.first_index + len(images)}]", count=len(images),
        flip_variants=config.flip_variants, latent_shape=[], source_digest=source_digest(images),
        source_key="content",
    )  # fmt: skip
    cache = config.cache_dir
    if read_cache_meta(cache) is not None and not config.rebuild_cache:
        check_cache(cache, expected)
        logger.info("using the latent cache in %s", cache)
    else:
        start = time.time()
        rank, world = accelerator.process_index, accelerator.num_processes
        if accelerator.is_main_process:
            remove_shards(cache)  # no shard of an earlier build may survive this one
        accelerator.wait_for_everyone()
        mine = list(range(rank, len(images), world))
        tensors, skipped = encode_shard(
            images, vae, mine, config.encode_batch_size, config.flip_variants, progress=accelerator.is_local_main_process
        )
        write_cache_shard(cache, tensors, rank, world)
        skipped = int(accelerator.reduce(torch.tensor([skipped], device=accelerator.device), "sum").item())
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            expected.latent_shape = list(tensors["mean"].shape[1:])
            expected.count = len(images)
            expected.shards, expected.kept = world, len(images) - skipped
            write_cache_meta(cache, expected)
            seconds = time.time() - start
            logger.info("encoded %d images in %.1f s (%.2f img/s over %d processes); skipped %d unreadable",
                        len(images) - skipped, seconds, (len(images) - skipped) / max(seconds, 1e-9), world, skipped)  # fmt: skip
        accelerator.wait_for_everyone()
    del vae
    dataset = LatentCacheDataset(cache)
    if accelerator.is_main_process:
        check_latent_scale(dataset.tensors["mean"][:512])
    return dataset, identity


def cache_main(argv: list[str] | None = None, prog: str | None = None) -> str:
    """Build (or check) the latent cache of a config and report its size and throughput."""
    from accelerate import Accelerator

    config = load_config(argv, prog)
    if not config.latent:
        raise ValueError("caching latents needs --pretrained_vae")
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    logging.basicConfig(level=logging.INFO if accelerator.is_local_main_process else logging.WARNING)
    start = time.time()
    dataset, _ = prepare_latents(accelerator, config)
    if accelerator.is_main_process:
        size = sum(os.path.getsize(os.path.join(config.cache_dir, f)) for f in os.listdir(config.cache_dir))
        print(json.dumps({"cache_dir": config.cache_dir, "latents": len(dataset), "bytes": size,
                          "latent_shape": list(dataset.tensors["mean"].shape[1:]),
                          "seconds": round(time.time() - start, 1)}))  # fmt: skip
    return config.cache_dir
