"""Watching a run: held-out MMD² per level (tensorboard and ``level_mmd.jsonl``) and validation grids."""

from __future__ import annotations

import json
import math
import os

import torch

from ..seeding import keyed_randn
from .config import TrainConfig
from .export import ema_copy
from .step import reference_batches, training_batch


def heldout_samples(config: TrainConfig, dataset, accelerator, train_vae=None) -> dict:
    """Clean held-out particles for the per-level MMD² log: ``--eval_data_dir`` (encoded with the
    run's VAE in latent space) or, without it, the last ``--eval_max_samples`` training samples."""
    from ..data import build_image_dataset, collate_skipping

    count = config.eval_max_samples
    if config.eval_data_dir is None:
        subset = torch.utils.data.Subset(dataset, range(max(0, len(dataset) - count), len(dataset)))
        loader = torch.utils.data.DataLoader(subset, batch_size=64, collate_fn=collate_skipping)
        x0 = torch.cat([training_batch(b, config, -1, 0, "cpu", train_vae, flip_all=False)[0] for b in loader])
        return {"x0": x0, "source": f"last {len(x0)} training samples (not held out)", "heldout": False}
    images = build_image_dataset(
        train_data_dir=config.eval_data_dir, resolution=config.resolution, center_crop=config.center_crop,
        channels=3 if config.latent else config.channels, first_index=config.eval_first_index, max_train_samples=count,
    )  # fmt: skip
    loader = torch.utils.data.DataLoader(images, batch_size=config.encode_batch_size, collate_fn=collate_skipping)
    vae = train_vae
    if config.latent and vae is None:
        from ..autoencoders import load_autoencoder

        vae = load_autoencoder(config.pretrained_vae, config.vae_subfolder, config.vae_revision).to(accelerator.device)
    chunks = []
    with torch.no_grad():
        for batch in loader:
            if "pixel_values" not in batch:
                continue
            pixels = batch["pixel_values"].to(accelerator.device)
            if config.latent:
                from ..autoencoders import encode_images

                pixels = encode_images(vae, pixels).mean
            chunks.append(pixels.float().cpu())
    if not chunks:
        raise ValueError(f"--eval_data_dir {config.eval_data_dir}: no readable images")
    x0 = torch.cat(chunks)
    return {"x0": x0, "source": f"{config.eval_data_dir}[{config.eval_first_index}:+{len(x0)}]", "heldout": True}


@torch.no_grad()
def level_mmd(phi: torch.nn.Module, x0: torch.Tensor, timesteps, scheduler, seed: int = 0, batch_size: int = 64) -> list[dict]:
    """Unbiased paired MMD²_t of the features ``phi`` (a discriminator) between clean ``x0`` and their
    forward-noised copies at every level of
    ``timesteps`` (noise keyed by sample and level), with the mean feature norm of each side."""
    from ..mmd import mmd2_unbiased_paired

    rows, device = [], next(phi.parameters()).device
    for t in [int(t) for t in timesteps]:
        a, b = [], []
        for first, chunk in zip(range(0, len(x0), batch_size), x0.split(batch_size)):
            chunk = chunk.to(device)
            tt = torch.full((len(chunk),), t, dtype=torch.long, device=device)
            eps = keyed_randn([(seed, "eval", first + i, t) for i in range(len(chunk))], chunk.shape[1:], device=device)
            a.append(phi(chunk, tt).double().cpu())
            b.append(phi(scheduler.add_noise(chunk, eps, tt), tt).double().cpu())
        a, b = torch.cat(a), torch.cat(b)
        rows.append({"t": t, "mmd2": float(mmd2_unbiased_paired(a, b)), "feature_norm_clean": float(a.norm(dim=1).mean()),
                     "feature_norm_noisy": float(b.norm(dim=1).mean())})  # fmt: skip
    return rows


def log_level_mmd(accelerator, model, ema, scheduler, heldout: dict, config: TrainConfig, step: int) -> None:
    """Held-out MMD²_t per sampling level with the EMA weights: tensorboard and ``level_mmd.jsonl``."""
    if not accelerator.is_main_process:
        return
    disc = ema_copy(accelerator, model, ema)
    rows = level_mmd(disc, heldout["x0"], scheduler.grid(scheduler.config.num_inference_steps), scheduler, config.seed)
    accelerator.log({f"heldout_mmd2/t{r['t']:03d}": r["mmd2"] for r in rows}, step=step)
    with open(os.path.join(config.output_dir, "level_mmd.jsonl"), "a") as f:
        f.write(json.dumps({"step": step, "source": heldout["source"], "heldout": heldout["heldout"], "levels": rows}) + "\n")


@torch.no_grad()
def validate(accelerator, model, ema, scheduler, dataset, config: TrainConfig, step: int, train_vae=None):
    """Sample a grid with the EMA weights and statistics from a small data subset."""
    from ..pipelines import DMMDPipeline

    if not accelerator.is_main_process:
        return
    disc = ema_copy(accelerator, model, ema)
    scheduler.set_timesteps(scheduler.config.num_inference_steps)
    vae = train_vae
    if config.latent and vae is None:
        from ..autoencoders import load_autoencoder

        vae = load_autoencoder(config.pretrained_vae, config.vae_subfolder, config.vae_revision).to(accelerator.device)
    if config.objective == "mmd":
        disc.set_reference_statistics(_validation_statistics(disc, dataset, scheduler, config, accelerator, train_vae), vae=vae)
    pipe = DMMDPipeline(disc, scheduler, vae=vae)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(num_images=config.num_validation_images, generator=torch.Generator().manual_seed(config.seed),
                  output_type="pt").images  # fmt: skip
    from ..records import save_grid, to_uint8

    grid = save_grid(to_uint8(images.cpu()), os.path.join(config.output_dir, "validation", f"step-{step:06d}.png"),
                     nrow=int(math.ceil(math.sqrt(len(images)))))  # fmt: skip
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("validation", grid, step, dataformats="HWC")


def _validation_statistics(disc, dataset, scheduler, config, accelerator, train_vae):
    """Reference statistics from the first 256 training samples (validation grids only)."""
    from ..data import collate_skipping
    from ..reference import compute_reference_statistics

    subset = torch.utils.data.Subset(dataset, range(min(len(dataset), 256)))
    loader = torch.utils.data.DataLoader(subset, batch_size=config.reference_batch_size, collate_fn=collate_skipping)
    batches = (item for b in loader for item in reference_batches(b, config, accelerator.device, train_vae))
    return compute_reference_statistics(disc, batches, scheduler.timesteps, scheduler.alphas_cumprod)
