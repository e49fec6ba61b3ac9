"""The end of a run: EMA weights, reference statistics over the training data, and the exported folders."""

from __future__ import annotations

import json
import logging
import os

import torch

from ..atomic import replace_folder
from .config import TrainConfig
from .step import reference_batches

logger = logging.getLogger("latent_dmmd.training")


def ema_copy(accelerator, model, ema):
    """A copy of the discriminator holding the EMA weights (the training model is untouched)."""
    import copy

    unwrapped = accelerator.unwrap_model(model)
    shadow = copy.deepcopy(unwrapped)
    if ema is not None:
        ema.copy_to(shadow.parameters())
    return shadow.eval().requires_grad_(False)


@torch.no_grad()
def distributed_reference_statistics(accelerator, model, dataset, scheduler, config: TrainConfig, collate, vae=None):
    """``m_P``/``m_Pt`` over the training data, each process on its own slice, reduced by sum.

    Noise is keyed by (seed, level, sample index), so the result equals one process doing it all.
    """
    from ..reference import compute_reference_statistics

    n = len(dataset) if config.reference_max_samples is None else min(len(dataset), config.reference_max_samples)
    mine = list(range(accelerator.process_index, n, accelerator.num_processes))
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, mine), batch_size=config.reference_batch_size, collate_fn=collate
    )
    scheduler.set_timesteps(scheduler.config.num_inference_steps)

    def batches():
        for batch in loader:
            yield from reference_batches(batch, config, accelerator.device, vae)

    return compute_reference_statistics(
        model, batches(), scheduler.timesteps, scheduler.alphas_cumprod,
        reduce=lambda x: accelerator.reduce(x, reduction="sum"), progress=accelerator.is_local_main_process,
        total=len(mine) * (2 if config.random_flip else 1),
    )  # fmt: skip


def calibration_data(dataset, config: TrainConfig, collate, device, vae=None) -> torch.Tensor:
    """The first ``--calibration_samples`` clean training samples (latents in latent space), as the flow sees them."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=config.reference_batch_size, collate_fn=collate)
    chunks, count = [], 0
    for batch in loader:
        for x0, _ in reference_batches(batch, config, device, vae):
            chunks.append(x0.float())
            count += x0.shape[0]
        if count >= config.calibration_samples:
            break
    return torch.cat(chunks)[: config.calibration_samples]


def wants_calibration(config: TrainConfig) -> bool:
    """Whether the export calibrates the step sizes: asked for (``--step_size_schedule calibrated``), or no step rule
    given at all (neither a schedule nor a step size: the default); an explicit ``--step_size`` alone is kept."""
    unset = config.step_size_schedule is None and config.step_size is None
    return config.objective == "mmd" and config.calibration_samples > 0 and (unset or config.step_size_schedule == "calibrated")


def export_baseline(accelerator, model, ema, scheduler, config: TrainConfig, run_info: dict) -> str:
    """Write ``<output_dir>/baseline``: the EMA epsilon UNet (``unet/``), the DDPM scheduler with
    the same betas (``scheduler/``) and, in latent space, the VAE (``vae/``)."""
    from ..baselines import baseline_scheduler

    folder = os.path.join(config.output_dir, "baseline")
    if accelerator.is_main_process:
        unet = ema_copy(accelerator, model, ema).to("cpu")
        with replace_folder(folder) as tmp:  # the previous export stays whole until this one is
            unet.save_pretrained(os.path.join(tmp, "unet"))
            baseline_scheduler(scheduler, "ddpm").save_pretrained(os.path.join(tmp, "scheduler"))
            if config.latent:
                from ..autoencoders import load_autoencoder

                load_autoencoder(config.pretrained_vae, config.vae_subfolder, config.vae_revision).save_pretrained(
                    os.path.join(tmp, "vae")
                )
        with open(os.path.join(config.output_dir, "training_summary.json"), "w") as f:
            json.dump(run_info | {"method": "ddpm"}, f, indent=2)
    accelerator.wait_for_everyone()
    return folder


def export_pipeline(accelerator, model, ema, scheduler, dataset, config: TrainConfig, vae_id, train_vae, run_info: dict):
    """Compute reference statistics over the training set with the EMA weights (all
    processes, reduced) and write ``<output_dir>/pipeline`` with ``save_pretrained``."""
    from ..data import collate_skipping
    from ..pipelines import DMMDPipeline

    disc = ema_copy(accelerator, model, ema)
    stats = None  # a KALE critic needs no statistics
    if config.objective == "mmd":
        stats = distributed_reference_statistics(accelerator, disc, dataset, scheduler, config, collate_skipping, train_vae)
    folder = os.path.join(config.output_dir, "pipeline")
    if accelerator.is_main_process:
        vae = None
        if config.latent:
            from ..autoencoders import load_autoencoder

            vae = load_autoencoder(config.pretrained_vae, config.vae_subfolder, config.vae_revision)
        if stats is not None:
            disc.set_reference_statistics(stats, vae=vae)
        pipe = DMMDPipeline(disc.to("cpu"), scheduler, vae=vae)
        if stats is not None and wants_calibration(config):
            from ..calibration import calibrate_pipeline

            data = calibration_data(dataset, config, collate_skipping, accelerator.device, train_vae).cpu()
            calibration = calibrate_pipeline(pipe, data, generator=torch.Generator().manual_seed(config.seed),
                                             step_size=config.step_size or 1.0)  # fmt: skip
            run_info = run_info | {"step_size_calibration": {"samples": int(data.shape[0]), "step_sizes": calibration.step_sizes}}
            logger.info("calibrated step sizes per level on %d training samples: %s", data.shape[0],
                        ", ".join(f"{s:.3g}" for s in calibration.step_sizes))  # fmt: skip
            if config.step_size_selection == "energy":
                from ..calibration import select_step_rule

                selection = select_step_rule(pipe, data, generator=torch.Generator().manual_seed(config.seed + 1),
                                             progress=accelerator.is_local_main_process)  # fmt: skip
                run_info = run_info | {"step_size_selection": selection.as_record()}
                logger.info("step rule chosen on the calibration samples: %s (energy distances: %s)", selection.chosen,
                            ", ".join(f"{k} {v:.4g}" for k, v in selection.distances.items()))  # fmt: skip
        from ..hub import write_model_card

        run_info = run_info | {"reference_count": stats.count if stats is not None else 0, "vae": vae_id}
        with replace_folder(folder) as tmp:  # the previous export stays loadable until this one is complete
            pipe.save_pretrained(tmp)
            write_model_card(tmp, config, run_info)
        with open(os.path.join(config.output_dir, "training_summary.json"), "w") as f:
            json.dump(run_info, f, indent=2)
        logger.info("wrote the pipeline to %s (statistics over %d samples)", folder, run_info["reference_count"])
        if config.push_to_hub:
            from ..upload import push_pipeline_folder

            push_pipeline_folder(folder, config.hub_model_id, private=config.hub_private)
    accelerator.wait_for_everyone()
    return folder
