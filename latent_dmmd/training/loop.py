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
    checkpoint_progress,
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


@dataclasses.dataclass
class Run:
    """Everything a training run holds between its named steps: what ``prepare`` builds and the counters the
    loop advances."""

    config: TrainConfig
    accelerator: object
    model: torch.nn.Module
    scheduler: object
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    loader: object
    dataset: object
    ema: object = None
    balance: object = None
    heldout: torch.Tensor | None = None
    train_vae: object = None
    vae_id: object = None
    reduce_sum: object = None
    global_step: int = 0
    bad_in_a_row: int = 0
    bad_total: int = 0
    skipped_images: int = 0
    start: float = dataclasses.field(default_factory=time.time)
    loop_start: float = 0.0
    optimize_seconds: float = 0.0  # in optimiser steps (data, loss, backward, update, EMA), summed over resumes

    def progress(self) -> dict:
        """The learning curve's clock: optimisation seconds exclude checkpoints, held-out MMD and validation grids,
        so that two methods trained side by side compare at equal seconds of training."""
        return {"step": self.global_step, "optimize_seconds": round(self.optimize_seconds, 2)}

    @property
    def dmmd(self) -> bool:
        return self.config.method == "dmmd"

    def summary(self) -> dict:
        """What ``training_summary.json`` records of the run."""
        now = time.time()
        return {"train_seconds": round(now - self.start, 1), "skipped_images": self.skipped_images,
                "train_loop_seconds": round(now - self.loop_start, 1), "train_steps": self.global_step,
                "optimize_seconds": round(self.optimize_seconds, 1), "bad_steps": self.bad_total, "num_processes": self.accelerator.num_processes}  # fmt: skip


def prepare_data(config: TrainConfig, accelerator):
    """``(dataset, sample_shape, train_vae, vae_id)``: cached latents (the VAE freed afterwards) or pixels, or
    latents encoded every batch when the cache is off (the VAE then stays in memory)."""
    if config.latent and config.cache_latents:
        dataset, vae_id = prepare_latents(accelerator, config)
        return dataset, tuple(dataset.tensors["mean"].shape[1:]), None, vae_id
    dataset = image_dataset(config)
    probe = next((item for item in (dataset[i] for i in range(len(dataset))) if item is not None), None)
    if probe is None:
        raise ValueError(f"no readable image in {config.train_data_dir or config.dataset_name}: every file was skipped")
    if not config.latent:
        return dataset, tuple(probe["pixel_values"].shape), None, None
    from ..autoencoders import encode_images, load_autoencoder, vae_identity

    train_vae = load_autoencoder(config.pretrained_vae, config.vae_subfolder, config.vae_revision)
    train_vae.to(accelerator.device)
    sample_shape = tuple(encode_images(train_vae, probe["pixel_values"][None].to(accelerator.device)).mean.shape[1:])
    return dataset, sample_shape, train_vae, vae_identity(train_vae, config.pretrained_vae)


def prepare(config: TrainConfig, accelerator, report_to: str | None) -> Run:
    """Data, model, optimiser, LR schedule, EMA and level balance, handed to accelerate; then the resume."""
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    from ..data import collate_skipping

    start = time.time()
    dataset, sample_shape, train_vae, vae_id = prepare_data(config, accelerator)
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
    run = Run(config, accelerator, model, scheduler, optimizer, lr_scheduler, loader, dataset, ema=ema,
              train_vae=train_vae, vae_id=vae_id, start=start)  # fmt: skip
    if run.dmmd and config.objective == "mmd":
        from ..balance import LevelWeighting

        run.balance = LevelWeighting(config.level_weighting, scheduler.alphas_cumprod, num_buckets=config.level_buckets,
                                     decay=config.level_weight_decay, power=config.level_weight_power,
                                     floor=config.level_weight_floor)  # fmt: skip
        accelerator.register_for_checkpointing(run.balance)  # its running means are training state
        if config.eval_max_samples > 0:
            run.heldout = heldout_samples(config, dataset, accelerator, train_vae)
    if accelerator.num_processes > 1:
        run.reduce_sum = lambda x: accelerator.reduce(x.to(accelerator.device), "sum").cpu()
    resume(run)
    if accelerator.is_main_process and report_to:
        accelerator.init_trackers("latent_dmmd", config={k: str(v) for k, v in dataclasses.asdict(config).items()})
    return run


def resume(run: Run) -> None:
    """Restore the newest complete checkpoint (``--resume_from_checkpoint``), applying changed optimiser flags."""
    run.global_step, path = resolve_resume(run.config)
    if path:
        changed = check_resume_config(path, run.config)
        run.accelerator.load_state(path)
        apply_optimizer_settings(run.optimizer, run.lr_scheduler, changed)
        run.optimize_seconds = float(checkpoint_progress(path).get("optimize_seconds", 0.0))
        logger.info("resumed from %s (step %d)", path, run.global_step)


def micro_step(run: Run, batch: dict, micro: int):
    """One micro-batch: the loss, its backward and (when gradients sync) the optimiser step. Returns
    ``(loss output, whether the update was applied)``; a NaN/inf loss or gradient on any process skips it on all."""
    config, accelerator, model = run.config, run.accelerator, run.model
    with accelerator.accumulate(model):
        x0, index = training_batch(batch, config, run.global_step, micro, accelerator.device, run.train_vae)
        if config.method == "ddpm":
            from ..baselines import ddpm_step_loss

            out = ddpm_step_loss(model, run.scheduler, x0, index, config.seed, run.global_step, micro)
        else:
            out = dmmd_step_loss(model, run.scheduler, x0, index, config, run.global_step, micro,
                                 penalty_model=accelerator.unwrap_model(model), level_weighting=run.balance,
                                 reduce=run.reduce_sum)  # fmt: skip
        # every process must agree to skip, or DDP would wait for a backward that never comes
        finite = torch.tensor([0.0 if out is None or not torch.isfinite(out.loss) else 1.0], device=accelerator.device)
        grads_ok = False
        if accelerator.reduce(finite, "sum").item() == accelerator.num_processes:
            accelerator.backward(out.loss)
            if accelerator.sync_gradients and config.max_grad_norm > 0:
                accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            grads_ok = all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
        if grads_ok:
            run.optimizer.step()
            run.lr_scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
    return out, grads_ok


def count_bad_step(run: Run) -> None:
    """A skipped update: warn, and stop the run after ``--max_bad_steps`` in a row (the last checkpoint stays)."""
    run.bad_in_a_row += 1
    run.bad_total += 1
    logger.warning("step %d: NaN/inf loss or gradients, update skipped (%d in a row)", run.global_step, run.bad_in_a_row)
    if run.bad_in_a_row >= run.config.max_bad_steps:
        raise RuntimeError(
            f"{run.bad_in_a_row} consecutive steps with NaN/inf loss or gradients; stopping. The last good "
            f"checkpoint in {run.config.output_dir} is untouched: lower --learning_rate or resume from it"
        )


def log_step(run: Run, out, bar) -> None:
    """Loss, learning rate and the objective's own scalars, every ``--log_every`` steps."""
    config = run.config
    if run.global_step % config.log_every:
        return
    logs = {"loss": out.loss.item(), "lr": run.lr_scheduler.get_last_lr()[0]}
    if run.dmmd and config.objective == "kale":
        logs.update(kale=out.kale.item(), critic_clean=out.critic_clean.item(),
                    critic_noisy=out.critic_noisy.item(), gradient_penalty=out.gradient_penalty.item())  # fmt: skip
    elif run.dmmd:
        logs.update(mmd2=out.mmd2.item(), l2=out.l2.item(), gradient_penalty=out.gradient_penalty.item(),
                    feature_norm=out.feature_norm.item(), **run.balance.summary())  # fmt: skip
    bar.set_postfix(loss=f"{logs['loss']:.4g}")
    run.accelerator.log(logs, step=run.global_step)


def out_of_time(run: Run) -> bool:
    """Whether ``--max_train_minutes`` has passed on any process (all must stop at the same step)."""
    if run.config.max_train_minutes is None:
        return False
    late = torch.tensor([float(time.time() - run.loop_start > 60 * run.config.max_train_minutes)], device=run.accelerator.device)
    return run.accelerator.reduce(late, "sum").item() > 0


def checkpoint_and_evaluate(run: Run, last: bool) -> None:
    """The training state every ``--checkpointing_steps`` (and at the end), the held-out MMD² per level every
    ``--eval_mmd_steps``, a validation grid every ``--validation_steps``."""
    config, step = run.config, run.global_step
    if step % config.checkpointing_steps == 0 or last:
        save_checkpoint(run.accelerator, config.output_dir, step, config.checkpoints_total_limit, config, run.progress())
    if run.heldout is not None and (step % (config.eval_mmd_steps or config.checkpointing_steps) == 0 or last):
        log_level_mmd(run.accelerator, run.model, run.ema, run.scheduler, run.heldout, config, step)
    if config.validation_steps and step % config.validation_steps == 0 and run.dmmd:
        validate(run.accelerator, run.model, run.ema, run.scheduler, run.dataset, config, step, run.train_vae)


def train_loop(run: Run) -> None:
    """Optimiser steps until ``--max_train_steps`` or the wall-clock budget, epoch by epoch; a resumed run skips
    the batches its epoch had already seen, so it continues the uninterrupted run exactly."""
    from tqdm.auto import tqdm

    config, accelerator = run.config, run.accelerator
    steps_per_epoch = max(1, len(run.loader) // config.gradient_accumulation_steps)
    bar = tqdm(total=config.max_train_steps, initial=run.global_step, desc="training",
               disable=not accelerator.is_local_main_process)  # fmt: skip
    run.loop_start, micro, stop = time.time(), 0, False
    mark = time.perf_counter()
    while run.global_step < config.max_train_steps and not stop:
        epoch = run.global_step // steps_per_epoch
        run.loader.set_epoch(epoch)
        done = run.global_step - epoch * steps_per_epoch
        batches = accelerator.skip_first_batches(run.loader, done * config.gradient_accumulation_steps) if done else run.loader
        for batch in batches:
            run.skipped_images += int(batch.get("skipped", 0))
            out, grads_ok = micro_step(run, batch, micro)
            micro += 1
            if not accelerator.sync_gradients:
                continue
            micro = 0
            if not grads_ok:
                count_bad_step(run)
                continue
            run.bad_in_a_row = 0
            if run.ema is not None:
                run.ema.step(run.model.parameters())
            run.global_step += 1
            run.optimize_seconds += time.perf_counter() - mark
            bar.update(1)
            log_step(run, out, bar)
            stop = out_of_time(run)
            checkpoint_and_evaluate(run, last=run.global_step == config.max_train_steps or stop)
            if run.global_step >= config.max_train_steps or stop:
                break
            mark = time.perf_counter()
    if stop:
        logger.info("wall-clock budget of %.1f min reached at step %d", config.max_train_minutes, run.global_step)
    bar.close()
    run.skipped_images = int(accelerator.reduce(torch.tensor([run.skipped_images], device=accelerator.device), "sum").item())
    if run.skipped_images:
        logger.warning("skipped %d unreadable images during training", run.skipped_images)


def export(run: Run) -> str:
    """The final folder: the DDPM baseline, or the DMMD pipeline with its statistics, calibration and card."""
    if run.config.method == "ddpm":
        info = {k: v for k, v in run.summary().items() if k != "skipped_images"}
        path = export_baseline(run.accelerator, run.model, run.ema, run.scheduler, run.config, info)
    else:
        path = export_pipeline(run.accelerator, run.model, run.ema, run.scheduler, run.dataset, run.config, run.vae_id,
                               run.train_vae, run.summary())  # fmt: skip
    run.accelerator.end_training()
    return path


def _train(config: TrainConfig, accelerator, report_to: str | None) -> str:
    """The run once the output folder is claimed: prepare, the loop of steps, export."""
    from ..launch import hold_until_exit

    run = prepare(config, accelerator, report_to)
    hold_until_exit(run)  # a distributed run's DDP model must not be freed before the process exits
    train_loop(run)
    return export(run)


def export_checkpoint(checkpoint: str, output_dir: str, overrides: list[str] | None = None) -> str:
    """The exported folder of any ``checkpoint-N`` (a learning curve's point): the checkpoint is linked into
    ``output_dir`` and resumed there with the configuration it recorded and ``--max_train_steps N``, so no step
    runs and the usual export follows (EMA weights, reference statistics over the training data, calibrated
    steps and card for DMMD; ``baseline/`` for DDPM). ``overrides`` are extra flags (e.g. ``--step_size_schedule
    calibrated``); the run the checkpoint came from is never touched, and may still be training."""
    import shutil
    import tempfile

    from .checkpoints import CHECKPOINT_CONFIG, CHECKPOINT_RE

    checkpoint = os.path.normpath(checkpoint)
    match = CHECKPOINT_RE.match(os.path.basename(checkpoint))
    recorded = os.path.join(checkpoint, CHECKPOINT_CONFIG)
    if not match or not os.path.isfile(recorded):
        raise ValueError(f"{checkpoint} is not a checkpoint-N folder with its {CHECKPOINT_CONFIG}")
    if os.path.abspath(output_dir) == os.path.abspath(os.path.dirname(checkpoint)):
        raise ValueError("export a checkpoint into another folder than its run's (the run's own pipeline/ would be replaced)")
    step = int(match.group(1))
    os.makedirs(output_dir, exist_ok=True)
    target = os.path.join(output_dir, os.path.basename(checkpoint))
    if not os.path.isdir(target):  # hard links where the filesystem allows: no copy of the weights
        tmp = tempfile.mkdtemp(prefix=".tmp-link-", dir=output_dir)
        try:
            shutil.copytree(checkpoint, os.path.join(tmp, "c"), copy_function=_link_or_copy)
            os.replace(os.path.join(tmp, "c"), target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    flags = ["--config", recorded, "--output_dir", output_dir, "--resume_from_checkpoint", target,
             "--max_train_steps", str(step), "--report_to", "none", "--push_to_hub", "false", *(overrides or [])]  # fmt: skip
    return main(flags)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        import shutil

        shutil.copy2(src, dst)
