"""``main``: the training run from the flags to the exported folder, top to bottom as it happens."""

from __future__ import annotations

import dataclasses
import logging
import os
import time

import torch

from ..atomic import RunLock
from .checkpoints import (
    apply_optimizer_settings,
    check_resume_config,
    claim_output_dir,
    resolve_resume,
    save_checkpoint,
)
from .config import TrainConfig, load_config, resolved_yaml
from .export import export_baseline, export_pipeline
from .latents import image_dataset, prepare_latents
from .monitor import heldout_samples, log_level_mmd, validate
from .step import dmmd_step_loss, training_batch

logger = logging.getLogger("latent_dmmd.training")


def build_models(config: TrainConfig, sample_size: int, in_channels: int):
    from ..models import DMMDDiscriminator
    from ..schedulers import DMMDScheduler

    model = DMMDDiscriminator(sample_size=sample_size, in_channels=in_channels, **config.model_kwargs())
    scheduler = DMMDScheduler(**config.scheduler_kwargs())
    return model, scheduler


def check_distributed_type(kind: str, config: TrainConfig) -> None:
    """Refuse sharded training for the DMMD objective: the gradient penalty runs its own forward
    (and double backward) through the unwrapped module, which under FSDP or DeepSpeed ZeRO holds
    only a shard of each parameter. DDP (what ``accelerate launch --multi_gpu`` and
    ``--num_machines`` use) is the supported way to scale out; discriminators here fit one device."""
    if kind in ("FSDP", "DEEPSPEED") and config.method == "dmmd" and config.lambda_gp > 0:
        raise ValueError(
            f"{kind} is not supported for DMMD training with a gradient penalty (its double backward goes through "
            "the unwrapped, sharded module); use DDP (accelerate config: multi-GPU / multi-node without FSDP or "
            "DeepSpeed), or --method ddpm"
        )


def main(argv: list[str] | None = None) -> str | None:
    """Train, checkpoint, and export a pipeline folder; returns its path (None for --dry_run)."""
    config = load_config(argv)
    if config.dry_run:
        print(resolved_yaml(config))
        return None

    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed

    report_to = None if config.report_to == "none" else config.report_to
    if report_to in ("tensorboard", "all"):
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            logger.warning("tensorboard is not installed (pip install tensorboard): logging to the console only")
            report_to = None
    accelerator = Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=config.mixed_precision,
        log_with=report_to,
        project_config=ProjectConfiguration(
            project_dir=config.output_dir, logging_dir=os.path.join(config.output_dir, config.logging_dir)
        ),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    logging.basicConfig(level=logging.INFO if accelerator.is_local_main_process else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip
    check_distributed_type(accelerator.distributed_type.value, config)
    set_seed(config.seed)
    lock = RunLock(config.output_dir)
    try:
        if accelerator.is_main_process:
            lock.acquire()  # a second run into this folder is refused while this one lives
            claim_output_dir(config)
            _, resume_path = resolve_resume(config)
            if resume_path:  # a refused resume must not rewrite the run's record (issue 28)
                check_resume_config(resume_path, config)
            with open(os.path.join(config.output_dir, "config.yaml"), "w") as f:
                f.write(resolved_yaml(config))
        return _train(config, accelerator, report_to)
    finally:
        lock.release()


def _train(config: TrainConfig, accelerator, report_to: str | None) -> str:
    """The training loop of ``main`` once the output folder is claimed."""
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm

    from ..data import collate_skipping

    start = time.time()

    # ---- data: cached latents (VAE freed afterwards) or pixels
    vae_id = train_vae = None
    if config.latent and config.cache_latents:
        dataset, vae_id = prepare_latents(accelerator, config)
        sample_shape = tuple(dataset.tensors["mean"].shape[1:])
    else:
        dataset = image_dataset(config)
        probe = next((item for item in (dataset[i] for i in range(len(dataset))) if item is not None), None)
        if probe is None:
            raise ValueError(f"no readable image in {config.train_data_dir or config.dataset_name}: every file was skipped")
        sample_shape = tuple(probe["pixel_values"].shape)
        if config.latent:  # no cache: the VAE stays in memory and encodes every batch
            from ..autoencoders import encode_images, load_autoencoder, vae_identity

            train_vae = load_autoencoder(config.pretrained_vae, config.vae_subfolder, config.vae_revision)
            train_vae.to(accelerator.device)
            vae_id = vae_identity(train_vae, config.pretrained_vae)
            sample_shape = tuple(encode_images(train_vae, probe["pixel_values"][None].to(accelerator.device)).mean.shape[1:])
    model, scheduler = build_models(config, sample_shape[-1], sample_shape[0])
    if config.method == "ddpm":
        model = model.unet  # the same backbone, trained as an epsilon-prediction network
    if config.gradient_checkpointing:
        model.enable_gradient_checkpointing()

    loader = torch.utils.data.DataLoader(
        dataset, batch_size=config.train_batch_size, shuffle=True, drop_last=True,
        num_workers=config.dataloader_num_workers, collate_fn=collate_skipping,
        generator=torch.Generator().manual_seed(config.seed),
    )  # fmt: skip
    if len(loader) == 0:
        raise ValueError(f"{len(dataset)} training samples are fewer than one batch of {config.train_batch_size}")
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.adam_weight_decay, eps=config.adam_epsilon,
    )  # fmt: skip
    lr_scheduler = get_scheduler(
        config.lr_scheduler, optimizer=optimizer,
        num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=config.max_train_steps * accelerator.num_processes,
    )  # fmt: skip
    ema = None
    if config.use_ema:
        ema = EMAModel(model.parameters(), decay=config.ema_decay, use_ema_warmup=config.ema_warmup,
                       inv_gamma=config.ema_inv_gamma, power=config.ema_power)  # fmt: skip
    model, optimizer, loader, lr_scheduler = accelerator.prepare(model, optimizer, loader, lr_scheduler)
    if ema is not None:
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)
    balance = None
    if config.method == "dmmd" and config.objective == "mmd":
        from ..balance import LevelWeighting

        balance = LevelWeighting(config.level_weighting, scheduler.alphas_cumprod, num_buckets=config.level_buckets,
                                 decay=config.level_weight_decay, power=config.level_weight_power,
                                 floor=config.level_weight_floor)  # fmt: skip
        accelerator.register_for_checkpointing(balance)  # its running means are training state
    heldout = None
    if config.method == "dmmd" and config.objective == "mmd" and config.eval_max_samples > 0:
        heldout = heldout_samples(config, dataset, accelerator, train_vae)
    eval_every = config.eval_mmd_steps or config.checkpointing_steps
    reduce_sum = (lambda x: accelerator.reduce(x.to(accelerator.device), "sum").cpu()) if accelerator.num_processes > 1 else None

    global_step, resume_path = resolve_resume(config)
    if resume_path:
        changed = check_resume_config(resume_path, config)
        accelerator.load_state(resume_path)
        apply_optimizer_settings(optimizer, lr_scheduler, changed)
        logger.info("resumed from %s (step %d)", resume_path, global_step)
    if accelerator.is_main_process and report_to:
        accelerator.init_trackers("latent_dmmd", config={k: str(v) for k, v in dataclasses.asdict(config).items()})

    steps_per_epoch = max(1, len(loader) // config.gradient_accumulation_steps)
    bar = tqdm(total=config.max_train_steps, initial=global_step, desc="training", disable=not accelerator.is_local_main_process)
    skipped_images = bad_in_a_row = bad_total = 0
    micro = 0
    loop_start = time.time()
    out_of_time = False
    while global_step < config.max_train_steps:
        epoch = global_step // steps_per_epoch
        loader.set_epoch(epoch)
        done_in_epoch = global_step - epoch * steps_per_epoch
        batches = accelerator.skip_first_batches(loader, done_in_epoch * config.gradient_accumulation_steps) if done_in_epoch else loader
        for batch in batches:
            skipped_images += int(batch.get("skipped", 0))
            with accelerator.accumulate(model):
                x0, index = training_batch(batch, config, global_step, micro, accelerator.device, train_vae)
                if config.method == "ddpm":
                    from ..baselines import ddpm_step_loss

                    out = ddpm_step_loss(model, scheduler, x0, index, config.seed, global_step, micro)
                else:
                    out = dmmd_step_loss(model, scheduler, x0, index, config, global_step, micro,
                                         penalty_model=accelerator.unwrap_model(model), level_weighting=balance,
                                         reduce=reduce_sum)  # fmt: skip
                # every process must agree to skip, or DDP would wait for a backward that never comes
                finite = torch.tensor([0.0 if out is None or not torch.isfinite(out.loss) else 1.0], device=accelerator.device)
                if accelerator.reduce(finite, "sum").item() == accelerator.num_processes:
                    accelerator.backward(out.loss)
                    if accelerator.sync_gradients and config.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                    grads_ok = all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
                else:
                    grads_ok = False
                if grads_ok:
                    optimizer.step()
                    lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            micro += 1
            if not accelerator.sync_gradients:
                continue
            micro = 0
            if not grads_ok:
                bad_in_a_row += 1
                bad_total += 1
                logger.warning("step %d: NaN/inf loss or gradients, update skipped (%d in a row)", global_step, bad_in_a_row)
                if bad_in_a_row >= config.max_bad_steps:
                    raise RuntimeError(
                        f"{bad_in_a_row} consecutive steps with NaN/inf loss or gradients; stopping. The last good "
                        f"checkpoint in {config.output_dir} is untouched: lower --learning_rate or resume from it"
                    )
                continue
            bad_in_a_row = 0
            if ema is not None:
                ema.step(model.parameters())
            global_step += 1
            bar.update(1)
            if global_step % config.log_every == 0:
                logs = {"loss": out.loss.item(), "lr": lr_scheduler.get_last_lr()[0]}
                if config.method == "dmmd" and config.objective == "kale":
                    logs.update(kale=out.kale.item(), critic_clean=out.critic_clean.item(),
                                critic_noisy=out.critic_noisy.item(), gradient_penalty=out.gradient_penalty.item())  # fmt: skip
                elif config.method == "dmmd":
                    logs.update(mmd2=out.mmd2.item(), l2=out.l2.item(), gradient_penalty=out.gradient_penalty.item(),
                                feature_norm=out.feature_norm.item(), **balance.summary())  # fmt: skip
                bar.set_postfix(loss=f"{logs['loss']:.4g}")
                accelerator.log(logs, step=global_step)
            if config.max_train_minutes is not None:  # every process must stop at the same step
                late = torch.tensor([float(time.time() - loop_start > 60 * config.max_train_minutes)], device=accelerator.device)
                out_of_time = accelerator.reduce(late, "sum").item() > 0
            if global_step % config.checkpointing_steps == 0 or global_step == config.max_train_steps or out_of_time:
                save_checkpoint(accelerator, config.output_dir, global_step, config.checkpoints_total_limit, config)
            if heldout is not None and (global_step % eval_every == 0 or global_step == config.max_train_steps or out_of_time):
                log_level_mmd(accelerator, model, ema, scheduler, heldout, config, global_step)
            if config.validation_steps and global_step % config.validation_steps == 0 and config.method == "dmmd":
                validate(accelerator, model, ema, scheduler, dataset, config, global_step, train_vae)
            if global_step >= config.max_train_steps or out_of_time:
                break
        if out_of_time:
            logger.info("wall-clock budget of %.1f min reached at step %d", config.max_train_minutes, global_step)
            break
    bar.close()
    skipped_images = int(accelerator.reduce(torch.tensor([skipped_images], device=accelerator.device), "sum").item())
    if skipped_images:
        logger.warning("skipped %d unreadable images during training", skipped_images)

    if config.method == "ddpm":
        path = export_baseline(accelerator, model, ema, scheduler, config, {"train_seconds": round(time.time() - start, 1),
                               "train_loop_seconds": round(time.time() - loop_start, 1), "train_steps": global_step,
                               "bad_steps": bad_total, "num_processes": accelerator.num_processes})  # fmt: skip
        accelerator.end_training()
        return path
    path = export_pipeline(accelerator, model, ema, scheduler, dataset, config, vae_id, train_vae,
                           {"train_seconds": round(time.time() - start, 1), "skipped_images": skipped_images,
                            "train_loop_seconds": round(time.time() - loop_start, 1), "train_steps": global_step,
                            "bad_steps": bad_total, "num_processes": accelerator.num_processes})  # fmt: skip
    accelerator.end_training()
    return path
