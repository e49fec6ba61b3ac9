"""Training DMMD discriminators with accelerate, in pixel or VAE-latent space (method §3-4).

``scripts/train_latent.py`` only calls ``main()``; the pieces live here so they can be
tested and reused: the config (one source of truth for every flag), the keyed training
step, atomic checkpoints, the cross-process reference statistics and the final export.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import torch
import yaml

from .atomic import RunLock, fsync_tree, incomplete_files, replace_folder
from .mmd import dmmd_loss
from .seeding import keyed_generator, keyed_rand, keyed_randn

logger = logging.getLogger("latent_dmmd.training")

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
CHECKPOINT_CONFIG = "training_config.json"  # the run's resolved config, inside every checkpoint
# settings that decide the shapes of the trained weights: a resume with other values cannot load them
MODEL_FIELDS = ("method", "objective", "block_out_channels", "layers_per_block", "down_block_types", "up_block_types",
                "attention_head_dim", "norm_num_groups", "out_channels", "pool_size", "projection_dim", "resolution",
                "channels", "pretrained_vae", "use_ema")  # fmt: skip
OPTIMIZER_FIELDS = {"learning_rate": "lr", "adam_weight_decay": "weight_decay", "adam_epsilon": "eps"}


def _f(default, help, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """Every training option; YAML keys and CLI flags use these names (diffusers' where they exist).

    ``None`` for a model or scheduler option means the default of ``DMMDDiscriminator`` /
    ``DMMDScheduler``: the defaults are defined there once, never restated here.
    """

    # run
    output_dir: str = _f("outputs/dmmd", "folder for checkpoints, logs, validation grids and the final pipeline")
    seed: int = _f(0, "seed of every random draw (keyed by step and sample, so runs are process-count independent)")
    dry_run: bool = _f(False, "print the resolved config and exit")
    # data
    train_data_dir: str | None = _f(None, "image folder (recursive png/jpg) or IDX file/folder")
    dataset_name: str | None = _f(None, "Hugging Face dataset: a save_to_disk folder or a cached Hub name")
    dataset_split: str = _f("train", "split of --dataset_name")
    image_column: str = _f("image", "image column of --dataset_name")
    resolution: int = _f(32, "image resolution (square) fed to the VAE or, in pixel space, to the discriminator")
    center_crop: bool = _f(True, "center crop (else random crop) after resizing the shorter side")
    random_flip: bool = _f(False, "random horizontal flips (latent space: needs --flip_variants in the cache)")
    channels: int = _f(3, "image channels in pixel space (1 for grayscale data such as Fashion-MNIST)")
    first_index: int = _f(0, "first image of the data to use (for a fixed train/held-out split)")
    max_train_samples: int | None = _f(None, "use at most this many images, starting at --first_index")
    dataloader_num_workers: int = _f(0, "dataloader worker processes")
    # autoencoder
    pretrained_vae: str | None = _f(None, "diffusers autoencoder (Hub id or folder) or a TAEF2 folder; none: pixel space")
    vae_subfolder: str | None = _f(None, "subfolder of --pretrained_vae holding the autoencoder")
    vae_revision: str | None = _f(None, "revision of --pretrained_vae")
    cache_latents: bool = _f(True, "encode the data once into a latent cache (else encode every batch, VAE in memory)")
    latent_cache_dir: str | None = _f(None, "latent cache folder (default: <output_dir>/latent_cache)")
    rebuild_cache: bool = _f(False, "encode the latent cache again even if one exists (after the images changed)")
    flip_variants: bool = _f(False, "also cache latents of horizontally flipped images")
    encode_batch_size: int = _f(16, "images per VAE encode call when caching latents")
    # discriminator (None: DMMDDiscriminator's default)
    block_out_channels: list[int] | None = _f(None, "UNet block widths", nargs="+", type=int)
    layers_per_block: int | None = _f(None, "resnet layers per UNet block")
    down_block_types: list[str] | None = _f(None, "UNet down block types", nargs="+")
    up_block_types: list[str] | None = _f(None, "UNet up block types", nargs="+")
    attention_head_dim: int | None = _f(None, "attention head dimension")
    norm_num_groups: int | None = _f(None, "GroupNorm groups")
    pool_size: int | None = _f(None, "average-pool the UNet output to pool_size^2 cells per channel")
    projection_dim: int | None = _f(None, "learned linear projection of the features to this size")
    gradient_checkpointing: bool = _f(False, "trade compute for memory in the UNet")
    # scheduler (None: DMMDScheduler's default)
    beta_schedule: str | None = _f(None, "forward process: linear, scaled_linear or squaredcos_cap_v2")
    num_inference_steps: int | None = _f(None, "T: noise levels of the sampling grid (statistics are stored for it)")
    flow_steps_per_level: int | None = _f(None, "N_s: flow steps per level when sampling")
    step_size: float | None = _f(None, "flow step size eta")
    step_size_schedule: str | None = _f(None, "constant, sigma2 or rms")
    t_min: int | None = _f(None, "lowest level of the sampling grid")
    timestep_spacing: str | None = _f(None, "sampling grid spacing: linear or log_snr")
    particle_mean: str | None = _f(None, "ensemble or forward_marginal")
    train_timestep_sampling: str | None = _f(None, "uniform, log_snr or grid")
    # method
    method: str = _f("dmmd", "dmmd, or ddpm: the epsilon-prediction baseline on the same UNet backbone and forward process")
    objective: str = _f("mmd", "discriminator objective: mmd (DMMD features) or kale (scalar KALE critic, "
                               "projection_dim 1; sampling follows (1+lambda) grad h)")
    critic_clip: float | None = _f(None, "KALE: upper bound c of the critic, c - softplus(c - raw) (default 5)")
    kale_lambda: float | None = _f(None, "KALE: regularisation lambda of the bound (default 0.1)")
    # loss
    group_size: int = _f(16, "samples per noise-level group (each group's MMD uses this many pairs)")
    lambda_l2: float = _f(1e-3, "weight of the l2 regulariser")
    lambda_gp: float = _f(1.0, "weight of the gradient penalty")
    gp_every: int = _f(1, "lazy penalty: the gradient penalty on one step in k (those with step % k == 0), its "
                          "weight times k; the other steps skip its double backward")
    gp_fraction: float = _f(1.0, "the gradient penalty on this fraction of each group's interpolates (keyed draws)")
    l2_mode: str = _f("feature", "l2 reading: feature (mean squared feature norm) or witness")
    gp_target: float = _f(1.0, "target norm of the witness gradient in the penalty")
    pairing: str = _f("paired", "how a group's clean samples meet noisy ones (method 2): paired (each with its own noisy "
                                "copy, diagonal left out of the cross term), permuted (noisy copies of the next group's "
                                "samples; pairs kept for the penalty), independent (the old biased estimator, ablations only)")
    level_weighting: str = _f("none", "weight of each group's MMD term by noise level (method 3): none, normalized "
                                      "(divided by its level bucket's running MMD^2) or sigma (sigma_t^-power)")
    level_weight_power: float = _f(1.0, "power of 1/sigma_t for --level_weighting sigma")
    level_buckets: int = _f(10, "level buckets (equal slices of [0, 1000)) for --level_weighting normalized and the logs")
    level_weight_decay: float = _f(0.99, "EMA decay of the per-bucket running MMD^2 (--level_weighting normalized)")
    level_weight_floor: float = _f(1e-4, "smallest running MMD^2 a weight divides by (--level_weighting normalized)")
    # optimisation
    train_batch_size: int = _f(64, "samples per process per micro-batch (a multiple of --group_size)")
    max_train_steps: int = _f(1000, "optimizer steps")
    max_train_minutes: float | None = _f(None, "wall-clock budget: stop after the step that passes this many minutes "
                                               "of training (checkpoint and final pipeline written as usual)")
    gradient_accumulation_steps: int = _f(1, "micro-batches per optimizer step")
    learning_rate: float = _f(1e-4, "AdamW learning rate")
    lr_scheduler: str = _f("constant", "diffusers LR schedule: constant, constant_with_warmup, cosine, linear, ...")
    lr_warmup_steps: int = _f(0, "LR warmup steps")
    adam_beta1: float = _f(0.9, "AdamW beta1")
    adam_beta2: float = _f(0.999, "AdamW beta2")
    adam_weight_decay: float = _f(0.0, "AdamW weight decay")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon")
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0: off)")
    mixed_precision: str = _f("no", "no or bf16 (CPU and GPU); fp16 needs CUDA")
    use_ema: bool = _f(True, "keep an EMA of the weights (used for sampling and statistics)")
    ema_decay: float = _f(0.999, "EMA decay (the largest decay, with --ema_warmup)")
    ema_warmup: bool = _f(True, "EMA warm-up of diffusers' training scripts: decay 1 - (1 + step / ema_inv_gamma)"
                                "^-ema_power, capped at --ema_decay (off: EMAModel's own ramp (1 + step) / (10 + step))")
    ema_inv_gamma: float = _f(1.0, "inverse gamma of the EMA warm-up")
    ema_power: float = _f(2 / 3, "power of the EMA warm-up")
    max_bad_steps: int = _f(10, "stop after this many consecutive steps with NaN/inf loss or gradients")
    # checkpoints and logs
    checkpointing_steps: int = _f(500, "save training state every N steps")
    checkpoints_total_limit: int | None = _f(None, "keep at most N checkpoints (older ones pruned after a save)")
    resume_from_checkpoint: str | None = _f(None, "a checkpoint folder, or 'latest'")
    overwrite_output_dir: bool = _f(False, "start a fresh run in an output_dir that holds another run's checkpoints or "
                                    "pipeline (its checkpoints are removed); without it such a start is refused")
    report_to: str = _f("tensorboard", "tensorboard, wandb, all or none")
    logging_dir: str = _f("logs", "log folder inside output_dir")
    log_every: int = _f(10, "log metrics every N steps")
    validation_steps: int | None = _f(None, "write a sample grid every N steps (none: only at the end)")
    num_validation_images: int = _f(16, "images in a validation grid")
    # held-out level diagnostics
    eval_data_dir: str | None = _f(None, "held-out images (folder or IDX file) for the per-level MMD^2 log "
                                         "(none: the last --eval_max_samples training samples, labelled as such)")
    eval_first_index: int = _f(0, "first held-out image of --eval_data_dir")
    eval_max_samples: int = _f(256, "held-out samples behind the per-level MMD^2 log")
    eval_mmd_steps: int | None = _f(None, "log held-out MMD^2 per sampling level every N steps (default: --checkpointing_steps)")
    # reference statistics
    reference_max_samples: int | None = _f(None, "data samples behind m_P and m_Pt (default: the whole training set)")
    reference_batch_size: int = _f(64, "batch size for the reference statistics")
    # sharing
    push_to_hub: bool = _f(False, "upload the final pipeline folder to the Hub")
    hub_model_id: str | None = _f(None, "Hub repo id for --push_to_hub")
    hub_private: bool = _f(False, "create the Hub repo as private")

    # ------------------------------------------------------------------ derived
    @property
    def latent(self) -> bool:
        return self.pretrained_vae is not None

    @property
    def cache_dir(self) -> str:
        return self.latent_cache_dir or os.path.join(self.output_dir, "latent_cache")

    def _set(self, cls) -> dict:
        """The options of ``cls.__init__`` this config sets (None means: keep the class default)."""
        import inspect

        names = inspect.signature(cls.__init__).parameters
        return {k: getattr(self, k) for k in names if hasattr(self, k) and getattr(self, k) is not None}

    def model_kwargs(self) -> dict:
        from .models import DMMDDiscriminator

        return self._set(DMMDDiscriminator)

    def scheduler_kwargs(self) -> dict:
        from .schedulers import DMMDScheduler

        return self._set(DMMDScheduler)

    def validate(self) -> None:
        """Refuse inconsistent settings before any work is done."""
        if self.mixed_precision == "fp16" and not torch.cuda.is_available():
            raise ValueError("--mixed_precision fp16 needs a CUDA GPU; on this machine use bf16 or no")
        if self.method not in ("dmmd", "ddpm"):
            raise ValueError(f"--method must be dmmd or ddpm, got {self.method!r}")
        if self.objective not in ("mmd", "kale"):
            raise ValueError(f"--objective must be mmd or kale, got {self.objective!r}")
        if self.objective == "kale":
            if self.projection_dim is None:
                self.projection_dim = 1  # the KALE critic is scalar
            if self.projection_dim != 1:
                raise ValueError(f"--objective kale needs --projection_dim 1 (a scalar critic), got {self.projection_dim}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"--mixed_precision must be no, bf16 or fp16, got {self.mixed_precision!r}")
        if self.group_size < 2 or self.train_batch_size % self.group_size:
            raise ValueError(
                f"--train_batch_size {self.train_batch_size} must be a multiple of --group_size {self.group_size} (>= 2)"
            )
        if not (self.train_data_dir or self.dataset_name):
            raise ValueError("give --train_data_dir or --dataset_name")
        if self.random_flip and self.latent and self.cache_latents and not self.flip_variants:
            raise ValueError("--random_flip in latent space needs --flip_variants (flipped latents are cached)")
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("--push_to_hub needs --hub_model_id")
        if self.pairing not in ("paired", "permuted", "independent"):
            raise ValueError(f"--pairing must be paired, permuted or independent, got {self.pairing!r}")
        if self.pairing == "permuted" and self.train_batch_size // self.group_size < 2:
            raise ValueError("--pairing permuted pairs each group with the next one's samples: it needs "
                             "--train_batch_size >= 2 x --group_size")  # fmt: skip
        from .balance import MODES

        if self.level_weighting not in MODES:
            raise ValueError(f"--level_weighting must be one of {', '.join(MODES)}, got {self.level_weighting!r}")
        if not 0 < self.gp_fraction <= 1:
            raise ValueError(f"--gp_fraction must be in (0, 1], got {self.gp_fraction}")
        if self.objective == "kale" and self.gp_fraction < 1:
            raise ValueError("--gp_fraction is for the MMD objective; the KALE critic's penalty runs on every interpolate")
        for name in ("max_train_steps", "gradient_accumulation_steps", "checkpointing_steps", "log_every", "gp_every",
                     "resolution", "train_batch_size"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1")
        for name in ("learning_rate", "lambda_gp", "lambda_l2"):
            if not math.isfinite(getattr(self, name)) or getattr(self, name) < 0:
                raise ValueError(f"--{name} must be a finite number >= 0, got {getattr(self, name)}")


# ---------------------------------------------------------------------------- config parsing


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _field_type(f: dataclasses.Field):
    text = str(f.type)
    if "bool" in text:
        return _parse_bool
    if text.startswith("int"):
        return int
    if text.startswith("float"):
        return float
    return str


def build_parser(prog: str | None = None, parents: Sequence[argparse.ArgumentParser] = ()) -> argparse.ArgumentParser:
    """The training flags (one per ``TrainConfig`` field; ``--a_b`` and ``--a-b`` both work)."""
    from .argparsing import FlagParser

    parser = FlagParser(
        prog=prog,
        parents=list(parents),
        description="Train a DMMD discriminator (pixel or latent space). Flags override the YAML --config.",
    )
    parser.add_argument("--config", help="YAML file whose keys are the flag names below")
    for f in fields(TrainConfig):
        meta = dict(f.metadata)
        kwargs = {"help": meta.pop("help"), "default": argparse.SUPPRESS}
        if "nargs" in meta:
            kwargs.update(nargs=meta["nargs"], type=meta.get("type", str))
        elif f.type in ("bool",) or str(f.type) == "bool":
            kwargs.update(nargs="?", const=True, type=_parse_bool)
        else:
            kwargs["type"] = _field_type(f)
        if "default" not in kwargs["help"]:  # a help that says what the default means keeps its own words
            kwargs["help"] += f" (default: {f.default})"
        kwargs["help"] = kwargs["help"].replace("%", "%%")
        parser.add_argument(f"--{f.name}", **kwargs)
    return parser


def load_config(argv: list[str] | None = None, prog: str | None = None) -> TrainConfig:
    """YAML config, then CLI overrides; unknown YAML keys are an error naming the key."""
    args = vars(build_parser(prog).parse_args(argv))
    values: dict = {}
    config_path = args.pop("config", None)
    if config_path:
        with open(config_path) as f:
            try:
                values = yaml.safe_load(f) or {}
            except yaml.YAMLError as err:
                raise ValueError(f"{config_path} is not valid YAML: {str(err).splitlines()[0]}") from err
        if not isinstance(values, dict):
            raise ValueError(f"{config_path} must be a mapping of flag names to values")
        known = {f.name for f in fields(TrainConfig)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown key(s) in {config_path}: {', '.join(unknown)}")
        types = {f.name: _field_type(f) for f in fields(TrainConfig)}
        for key, value in values.items():  # YAML 1.1 reads 1e-4 (no dot) as a string
            if isinstance(value, str) and types[key] in (int, float, _parse_bool):
                try:
                    values[key] = types[key](value)
                except (ValueError, argparse.ArgumentTypeError) as err:
                    raise ValueError(f"{config_path}: {key}: expected a number, got {value!r}") from err
    values.update(args)
    config = TrainConfig(**values)
    config.validate()
    return config


def resolved_yaml(config: TrainConfig) -> str:
    return yaml.safe_dump(dataclasses.asdict(config), sort_keys=False)


# ---------------------------------------------------------------------------- the training step


def training_batch(
    batch: dict, config: TrainConfig, step: int, micro: int, device, vae=None, flip_all: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean samples ``x0`` and dataset indices of one micro-batch: pixels, latents drawn from the
    cached posterior, or (``vae`` given, ``--cache_latents false``) latents encoded right now.

    Random flips are keyed like every other draw: pixels are flipped here, cached latents
    pick their cached flipped variant. ``flip_all`` True/False flips every sample / none
    (the reference statistics average both variants: the training distribution).
    """
    index = batch["index"]
    flip = None
    if flip_all is not None:
        flip = torch.ones((len(index), 1, 1, 1), dtype=torch.bool) if flip_all else None
    elif config.random_flip and step >= 0:
        flip = (keyed_rand([(config.seed, "flip", step, micro, int(i)) for i in index]) < 0.5).view(-1, 1, 1, 1)
    if "pixel_values" in batch:
        pixels = batch["pixel_values"]
        if flip is not None:
            pixels = torch.where(flip, pixels.flip(-1), pixels)
        if vae is None:
            return pixels.to(device), index
        from .autoencoders import encode_images

        post = encode_images(vae, pixels.to(device))
        mean, std = post.mean, (post.std if bool(post.std.any()) else None)
    else:
        mean, std = batch["mean"], batch.get("std")
        if flip is not None:
            mean = torch.where(flip, batch["mean_flip"], mean)
            std = None if std is None else torch.where(flip, batch["std_flip"], std)
    if std is not None:
        eps = keyed_randn([(config.seed, "latent", step, micro, int(i)) for i in index], mean.shape[1:], device=mean.device)
        mean = mean + std.to(mean.device) * eps
    return mean.to(device), index


def dmmd_step_loss(
    model, scheduler, x0: torch.Tensor, index: torch.Tensor, config: TrainConfig, step: int, micro: int,
    penalty_model=None, level_weighting=None, reduce=None,
):  # fmt: skip
    """The DMMD loss of one micro-batch with randomness keyed by (seed, step, sample index).

    Samples are grouped in consecutive runs of ``group_size``; a trailing partial group (only
    possible after skipped images) is dropped. Returns ``None`` when no full group is left.
    ``level_weighting`` (a ``LevelWeighting``) weights each group's MMD term; ``reduce`` sums its
    running statistics over processes.
    """
    size = config.group_size
    groups = x0.shape[0] // size
    if groups == 0:
        return None
    x0, index = x0[: groups * size], index[: groups * size]
    keys = [int(i) for i in index]
    s, m = config.seed, micro
    t_group = torch.cat(
        [scheduler.sample_training_timesteps(1, keyed_generator(s, "t", step, m, keys[g * size])) for g in range(groups)]
    )
    t = t_group.repeat_interleave(size).to(x0.device)
    eps = keyed_randn([(s, "eps", step, m, k) for k in keys], x0.shape[1:], device=x0.device, dtype=x0.dtype)
    u = keyed_rand([(s, "u", step, m, k) for k in keys], device=x0.device, dtype=x0.dtype)
    xt = scheduler.add_noise(x0, eps, t)
    # lazy penalty (StyleGAN2's lazy R1): every gp_every-th step, weighted by gp_every; which steps
    # follows from the step index, so a resumed run penalises the same steps
    lambda_gp = config.lambda_gp * config.gp_every if step % config.gp_every == 0 else 0.0
    if config.objective == "kale":
        from .kale import clip_critic, kale_loss

        unwrapped = penalty_model or model
        return kale_loss(
            lambda x, tt: clip_critic(model(x, tt)[:, 0], unwrapped.config.critic_clip), x0, xt, t,
            kale_lambda=unwrapped.config.kale_lambda, lambda_gp=lambda_gp, gp_target=config.gp_target,
            interpolation=u, critic_penalty=lambda x, tt: unwrapped.critic(x, tt),
        )  # fmt: skip
    # permuted: group g meets noisy copies (at its own level) of group g+1's samples, independent of its own
    xt_unpaired = scheduler.add_noise(x0.roll(-size, 0), eps, t) if config.pairing == "permuted" else None
    weights = None
    if level_weighting is not None and level_weighting.mode != "none":
        weights = lambda mmd2: level_weighting(t_group, mmd2, reduce)  # noqa: E731
    penalty_index = None
    if lambda_gp and config.gp_fraction < 1:  # the same number of interpolates from every group, keyed
        keep = max(1, round(config.gp_fraction * size))
        ranks = keyed_rand([(s, "gp", step, m, k) for k in keys]).view(groups, size).argsort(1)[:, :keep]
        penalty_index = (ranks.sort(1).values + size * torch.arange(groups)[:, None]).flatten()
    return dmmd_loss(
        model, x0, xt, t, groups, lambda_l2=config.lambda_l2, lambda_gp=lambda_gp,
        l2_mode=config.l2_mode, gp_target=config.gp_target, interpolation=u, phi_penalty=penalty_model,
        pairing=config.pairing, xt_unpaired=xt_unpaired, group_weights=weights, penalty_index=penalty_index,
    )  # fmt: skip


# ---------------------------------------------------------------------------- checkpoints


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints (``checkpoint-N`` folders; temporary ones are ignored), oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = CHECKPOINT_RE.match(name)
        if match and os.path.isdir(os.path.join(output_dir, name)):
            found.append((int(match.group(1)), os.path.join(output_dir, name)))
    return sorted(found)


def save_checkpoint(accelerator, output_dir: str, step: int, total_limit: int | None, config: TrainConfig | None = None) -> str:
    """Save the training state to a temporary folder, rename it into place, then prune.

    A crash at any point leaves either the previous checkpoints intact plus a stray temporary
    folder (ignored and cleaned on the next save) or the new complete checkpoint.
    """
    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = os.path.join(output_dir, f".tmp-checkpoint-{step}")
    if accelerator.is_main_process and os.path.isdir(tmp):
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if config is not None:
            with open(os.path.join(tmp, CHECKPOINT_CONFIG), "w") as f:
                json.dump(dataclasses.asdict(config), f, indent=2)
        fsync_tree(tmp)  # a power cut after the rename must not leave 0-byte files behind it
        if os.path.isdir(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        if total_limit is not None:
            for _, old in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old)
        for name in os.listdir(output_dir):
            if name.startswith(".tmp-checkpoint-") and name != os.path.basename(tmp):
                shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def resolve_resume(config: TrainConfig) -> tuple[int, str | None]:
    """``(step, folder)`` to resume from; ``latest`` picks the newest complete checkpoint."""
    if not config.resume_from_checkpoint:
        return 0, None
    if config.resume_from_checkpoint == "latest":
        found = list_checkpoints(config.output_dir)
        if not found:
            logger.info("no checkpoint in %s: starting from scratch", config.output_dir)
            return 0, None
        for step, path in reversed(found):
            bad = incomplete_files(path)
            if not bad:
                return step, path
            logger.warning("%s is incomplete (%s): falling back to the previous checkpoint", path, bad[0])
        raise ValueError(f"no complete checkpoint in {config.output_dir}: every checkpoint-N has an empty or truncated file")
    path = config.resume_from_checkpoint
    match = CHECKPOINT_RE.match(os.path.basename(os.path.normpath(path)))
    if not match or not os.path.isdir(path):
        raise ValueError(f"--resume_from_checkpoint {path}: not a checkpoint-N folder")
    return int(match.group(1)), path


# ---------------------------------------------------------------------------- statistics


def reference_batches(batch: dict, config: TrainConfig, device, vae=None):
    """``(x0, keys)`` for the reference statistics from one data batch: the samples as they are and,
    with ``--random_flip``, flipped as well, so the means are over the training distribution (each
    sample and its mirror image, equally likely) rather than over unflipped data only."""
    if not len(batch.get("index", [])):
        return
    variants = (False, True) if config.random_flip else (False,)
    for flipped in variants:
        x0, index = training_batch(batch, config, -1, 0, device, vae, flip_all=flipped)
        yield x0, [(config.seed, "reference", int(i)) + (("flip",) if flipped else ()) for i in index]


@torch.no_grad()
def distributed_reference_statistics(accelerator, model, dataset, scheduler, config: TrainConfig, collate, vae=None):
    """``m_P``/``m_Pt`` over the training data, each process on its own slice, reduced by sum.

    Noise is keyed by (seed, level, sample index), so the result equals one process doing it all.
    """
    from .reference import compute_reference_statistics

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


# ---------------------------------------------------------------------------- main


def _image_dataset(config: TrainConfig):
    from .data import build_image_dataset

    return build_image_dataset(
        train_data_dir=config.train_data_dir, dataset_name=config.dataset_name, resolution=config.resolution,
        center_crop=config.center_crop, random_flip=False,  # flips are keyed in training_batch
        channels=3 if config.latent else config.channels, split=config.dataset_split,
        image_column=config.image_column, max_train_samples=config.max_train_samples, first_index=config.first_index,
    )  # fmt: skip


def prepare_latents(accelerator, config: TrainConfig):
    """Make sure the latent cache for this run exists (encoding split across processes) and
    return ``(LatentCacheDataset, vae_identity)``. The VAE is freed before training."""
    from .autoencoders import check_latent_scale, load_autoencoder, vae_identity
    from .data import (
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

    images = _image_dataset(config)
    vae = load_autoencoder(config.pretrained_vae, config.vae_subfolder, config.vae_revision).to(accelerator.device)
    identity = vae_identity(vae, config.pretrained_vae)
    source = getattr(images, "source", config.train_data_dir or config.dataset_name)
    expected = CacheMeta(
        vae=identity, resolution=config.resolution, center_crop=config.center_crop,
        dataset=f"{source}[{config.first_index}:{config.first_index + len(images)}]", count=len(images),
        flip_variants=config.flip_variants, latent_shape=[], source_digest=source_digest(images),
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


def build_models(config: TrainConfig, sample_size: int, in_channels: int):
    from .models import DMMDDiscriminator
    from .schedulers import DMMDScheduler

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
            with open(os.path.join(config.output_dir, "config.yaml"), "w") as f:
                f.write(resolved_yaml(config))
        return _train(config, accelerator, report_to)
    finally:
        lock.release()


def claim_output_dir(config: TrainConfig) -> None:
    """Refuse to start a fresh run over another run's checkpoints or exported folders (it would prune
    them, replace its pipeline, and a later ``--resume_from_checkpoint latest`` would mix the two runs)."""
    os.makedirs(config.output_dir, exist_ok=True)
    if config.resume_from_checkpoint:
        return
    found = [os.path.basename(p) for _, p in list_checkpoints(config.output_dir)]
    found += [name for name in ("pipeline", "baseline") if os.path.isdir(os.path.join(config.output_dir, name))]
    if not found:
        return
    if not config.overwrite_output_dir:
        raise ValueError(
            f"{config.output_dir} holds another run ({', '.join(found[:4])}): resume it with --resume_from_checkpoint "
            f"latest, choose another --output_dir, or pass --overwrite_output_dir to start over"
        )
    for _, path in list_checkpoints(config.output_dir):
        shutil.rmtree(path)
    logger.warning("--overwrite_output_dir: removed the checkpoints of the previous run in %s", config.output_dir)


def check_resume_config(checkpoint: str, config: TrainConfig) -> dict:
    """Compare a checkpoint's recorded config with this run's: a changed model shape is refused naming
    the fields; changed optimizer settings are returned ``{field: (old, new)}`` so they can be applied."""
    path = os.path.join(checkpoint, CHECKPOINT_CONFIG)
    if not os.path.isfile(path):  # checkpoints written before the config was recorded
        return {}
    with open(path) as f:
        saved = json.load(f)
    now = dataclasses.asdict(config)
    model = [k for k in MODEL_FIELDS if k in saved and saved[k] != now[k]]
    if model:
        detail = ", ".join(f"--{k} {saved[k]!r} -> {now[k]!r}" for k in model)
        raise ValueError(f"cannot resume from {checkpoint}: the model changed ({detail}); its weights would not fit. "
                         f"Resume with the checkpoint's settings or start a new run in another --output_dir")  # fmt: skip
    return {k: (saved[k], now[k]) for k in (*OPTIMIZER_FIELDS, "adam_beta1", "adam_beta2") if k in saved and saved[k] != now[k]}


def apply_optimizer_settings(optimizer, lr_scheduler, changed: dict) -> None:
    """Put changed optimizer settings into the restored optimizer (and the LR schedule's base rate),
    where ``load_state`` had brought back the checkpoint's values."""
    groups = optimizer.param_groups
    for key, (old, new) in changed.items():
        if key == "learning_rate":
            inner = getattr(lr_scheduler, "scheduler", lr_scheduler)
            inner.base_lrs = [new for _ in inner.base_lrs]
            for g in groups:  # keep the schedule's current factor (warm-up, decay)
                g["lr"] = g["lr"] * new / old if old else new
        elif key in ("adam_beta1", "adam_beta2"):
            for g in groups:
                betas = list(g["betas"])
                betas[0 if key == "adam_beta1" else 1] = new
                g["betas"] = tuple(betas)
        else:
            for g in groups:
                g[OPTIMIZER_FIELDS[key]] = new
        logger.warning("resume: --%s changed from %s to %s; applied to the restored optimizer", key, old, new)


def _train(config: TrainConfig, accelerator, report_to: str | None) -> str:
    """The training loop of ``main`` once the output folder is claimed."""
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm

    from .data import collate_skipping

    start = time.time()

    # ---- data: cached latents (VAE freed afterwards) or pixels
    vae_id = train_vae = None
    if config.latent and config.cache_latents:
        dataset, vae_id = prepare_latents(accelerator, config)
        sample_shape = tuple(dataset.tensors["mean"].shape[1:])
    else:
        dataset = _image_dataset(config)
        probe = next((item for item in (dataset[i] for i in range(len(dataset))) if item is not None), None)
        if probe is None:
            raise ValueError(f"no readable image in {config.train_data_dir or config.dataset_name}: every file was skipped")
        sample_shape = tuple(probe["pixel_values"].shape)
        if config.latent:  # no cache: the VAE stays in memory and encodes every batch
            from .autoencoders import encode_images, load_autoencoder, vae_identity

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
        from .balance import LevelWeighting

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
                    from .baselines import ddpm_step_loss

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


def _ema_model(accelerator, model, ema):
    """A copy of the discriminator holding the EMA weights (the training model is untouched)."""
    import copy

    unwrapped = accelerator.unwrap_model(model)
    shadow = copy.deepcopy(unwrapped)
    if ema is not None:
        ema.copy_to(shadow.parameters())
    return shadow.eval().requires_grad_(False)


@torch.no_grad()
def validate(accelerator, model, ema, scheduler, dataset, config: TrainConfig, step: int, train_vae=None):
    """Sample a grid with the EMA weights and statistics from a small data subset."""
    from .pipelines import DMMDPipeline

    if not accelerator.is_main_process:
        return
    disc = _ema_model(accelerator, model, ema)
    scheduler.set_timesteps(scheduler.config.num_inference_steps)
    vae = train_vae
    if config.latent and vae is None:
        from .autoencoders import load_autoencoder

        vae = load_autoencoder(config.pretrained_vae, config.vae_subfolder, config.vae_revision).to(accelerator.device)
    if config.objective == "mmd":
        disc.set_reference_statistics(_validation_statistics(disc, dataset, scheduler, config, accelerator, train_vae), vae=vae)
    pipe = DMMDPipeline(disc, scheduler, vae=vae)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(num_images=config.num_validation_images, generator=torch.Generator().manual_seed(config.seed),
                  output_type="pt").images  # fmt: skip
    from .evaluation import save_grid, to_uint8

    grid = save_grid(to_uint8(images.cpu()), os.path.join(config.output_dir, "validation", f"step-{step:06d}.png"),
                     nrow=int(math.ceil(math.sqrt(len(images)))))  # fmt: skip
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("validation", grid, step, dataformats="HWC")


def _validation_statistics(disc, dataset, scheduler, config, accelerator, train_vae):
    """Reference statistics from the first 256 training samples (validation grids only)."""
    from .data import collate_skipping
    from .reference import compute_reference_statistics

    subset = torch.utils.data.Subset(dataset, range(min(len(dataset), 256)))
    loader = torch.utils.data.DataLoader(subset, batch_size=config.reference_batch_size, collate_fn=collate_skipping)
    batches = (item for b in loader for item in reference_batches(b, config, accelerator.device, train_vae))
    return compute_reference_statistics(disc, batches, scheduler.timesteps, scheduler.alphas_cumprod)


def heldout_samples(config: TrainConfig, dataset, accelerator, train_vae=None) -> dict:
    """Clean held-out particles for the per-level MMD² log: ``--eval_data_dir`` (encoded with the
    run's VAE in latent space) or, without it, the last ``--eval_max_samples`` training samples."""
    from .data import build_image_dataset, collate_skipping

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
        from .autoencoders import load_autoencoder

        vae = load_autoencoder(config.pretrained_vae, config.vae_subfolder, config.vae_revision).to(accelerator.device)
    chunks = []
    with torch.no_grad():
        for batch in loader:
            if "pixel_values" not in batch:
                continue
            pixels = batch["pixel_values"].to(accelerator.device)
            if config.latent:
                from .autoencoders import encode_images

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
    from .mmd import mmd2_unbiased_paired

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
    disc = _ema_model(accelerator, model, ema)
    rows = level_mmd(disc, heldout["x0"], scheduler.grid(scheduler.config.num_inference_steps), scheduler, config.seed)
    accelerator.log({f"heldout_mmd2/t{r['t']:03d}": r["mmd2"] for r in rows}, step=step)
    with open(os.path.join(config.output_dir, "level_mmd.jsonl"), "a") as f:
        f.write(json.dumps({"step": step, "source": heldout["source"], "heldout": heldout["heldout"], "levels": rows}) + "\n")


def export_baseline(accelerator, model, ema, scheduler, config: TrainConfig, run_info: dict) -> str:
    """Write ``<output_dir>/baseline``: the EMA epsilon UNet (``unet/``), the DDPM scheduler with
    the same betas (``scheduler/``) and, in latent space, the VAE (``vae/``)."""
    from .baselines import baseline_scheduler

    folder = os.path.join(config.output_dir, "baseline")
    if accelerator.is_main_process:
        unet = _ema_model(accelerator, model, ema).to("cpu")
        with replace_folder(folder) as tmp:  # the previous export stays whole until this one is
            unet.save_pretrained(os.path.join(tmp, "unet"))
            baseline_scheduler(scheduler, "ddpm").save_pretrained(os.path.join(tmp, "scheduler"))
            if config.latent:
                from .autoencoders import load_autoencoder

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
    from .data import collate_skipping
    from .pipelines import DMMDPipeline

    disc = _ema_model(accelerator, model, ema)
    stats = None  # a KALE critic needs no statistics
    if config.objective == "mmd":
        stats = distributed_reference_statistics(accelerator, disc, dataset, scheduler, config, collate_skipping, train_vae)
    folder = os.path.join(config.output_dir, "pipeline")
    if accelerator.is_main_process:
        vae = None
        if config.latent:
            from .autoencoders import load_autoencoder

            vae = load_autoencoder(config.pretrained_vae, config.vae_subfolder, config.vae_revision)
        if stats is not None:
            disc.set_reference_statistics(stats, vae=vae)
        pipe = DMMDPipeline(disc.to("cpu"), scheduler, vae=vae)
        from .hub import write_model_card

        run_info = run_info | {"reference_count": stats.count if stats is not None else 0, "vae": vae_id}
        with replace_folder(folder) as tmp:  # the previous export stays loadable until this one is complete
            pipe.save_pretrained(tmp)
            write_model_card(tmp, config, run_info)
        with open(os.path.join(config.output_dir, "training_summary.json"), "w") as f:
            json.dump(run_info, f, indent=2)
        logger.info("wrote the pipeline to %s (statistics over %d samples)", folder, run_info["reference_count"])
        if config.push_to_hub:
            from .hub import push_pipeline_folder

            push_pipeline_folder(folder, config.hub_model_id, private=config.hub_private)
    accelerator.wait_for_everyone()
    return folder


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


if __name__ == "__main__":  # python -m latent_dmmd.training (what `latent-dmmd train` launches)
    from .launch import run_worker

    run_worker(main)
