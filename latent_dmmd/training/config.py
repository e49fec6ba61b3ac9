"""The training options: ``TrainConfig`` (one field per flag), its parser, YAML with overrides, validation."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import yaml


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
    step_size: float | None = _f(None, "flow step size eta (with --step_size_schedule calibrated: the multiplier of the "
                                       "calibrated steps; unset, with no schedule: calibrated at export)")
    step_size_schedule: str | None = _f(None, "constant, sigma2, rms, level or calibrated (unset together with "
                                              "--step_size: calibrated at export on --calibration_samples samples)")
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
    kernel: str | None = _f(None, "MMD kernel on the features: linear (default) or rff_gaussian (a Gaussian kernel "
                                  "through random Fourier features, bandwidth per level from the median distance)")
    rff_features: int | None = _f(None, "rff_gaussian: number of random Fourier features R (default 1024)")
    rff_seed: int | None = _f(None, "rff_gaussian: seed of the random frequencies (default 0)")
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
    calibration_samples: int = _f(512, "training samples whose flow calibrates a step size per level at export (method 5, "
                                       "'calibrated'; used with --step_size_schedule calibrated, or when neither it nor "
                                       "--step_size is given; 0: off)")
    step_size_selection: str = _f("energy", "after the calibration, keep the calibrated steps or a constant eta (a "
                                            "factor-3 ladder from 1), whichever flow lands closest to the calibration "
                                            "samples in energy distance (energy), or keep the calibrated steps (none)")
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

    @classmethod
    def fields_of(cls, component) -> tuple[str, ...]:
        """The config fields that are arguments of ``component.__init__`` (the model's or the scheduler's)."""
        import inspect

        return tuple(n for n in inspect.signature(component.__init__).parameters if n in cls.__dataclass_fields__)

    def _set(self, cls) -> dict:
        """The options of ``cls.__init__`` this config sets (None means: keep the class default)."""
        return {k: getattr(self, k) for k in self.fields_of(cls) if getattr(self, k) is not None}

    def model_kwargs(self) -> dict:
        from ..models import DMMDDiscriminator

        return self._set(DMMDDiscriminator)

    def scheduler_kwargs(self) -> dict:
        from ..schedulers import DMMDScheduler

        kwargs = self._set(DMMDScheduler)
        if kwargs.get("step_size_schedule") == "calibrated":  # calibrated at export; training samples with eta as given
            kwargs.pop("step_size_schedule")
        return kwargs

    def validate(self) -> None:
        """Refuse inconsistent settings before any work is done."""
        import torch

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
        from ..balance import MODES

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
        if self.calibration_samples < 0:
            raise ValueError(f"--calibration_samples must be >= 0, got {self.calibration_samples}")
        if self.step_size_selection not in ("energy", "none"):
            raise ValueError(f"--step_size_selection must be energy or none, got {self.step_size_selection!r}")
        self.validate_components()

    def validate_components(self) -> None:
        """Build the scheduler and check the discriminator's settings now, so a bad value (``t_min: 5000``,
        ``step_size: -0.1``) is refused before a latent cache is encoded or a step is trained."""
        from ..schedulers import DMMDScheduler

        try:
            DMMDScheduler(**self.scheduler_kwargs())
        except (TypeError, ValueError) as err:
            raise ValueError(f"scheduler settings: {err}") from None
        for name in ("layers_per_block", "attention_head_dim", "norm_num_groups", "pool_size", "projection_dim"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"--{name} must be an integer >= 1, got {value!r}")
        if self.block_out_channels is not None:
            if not self.block_out_channels or any(isinstance(c, bool) or not isinstance(c, int) or c < 1
                                                  for c in self.block_out_channels):  # fmt: skip
                raise ValueError(f"--block_out_channels must be integers >= 1, got {self.block_out_channels!r}")
            groups = self.norm_num_groups or 16  # DMMDDiscriminator's default
            if any(c % groups for c in self.block_out_channels):
                raise ValueError(f"--block_out_channels {self.block_out_channels} must be multiples of "
                                 f"--norm_num_groups {groups}")  # fmt: skip


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


def _yaml_value(path: str, key: str, value, f: dataclasses.Field):
    """A YAML value checked against its field's type: integers stay integers (``2.5`` steps is an error, not 3),
    numbers are numbers (YAML 1.1 reads ``1e-4`` as a string: converted), lists are lists."""
    text = str(f.type)
    if value is None:
        if "None" in text:
            return None
        raise ValueError(f"{path}: {key}: a value is required (it has no 'unset' meaning)")
    if text.startswith("list"):
        if not isinstance(value, list):
            raise ValueError(f"{path}: {key}: expected a list (e.g. [{value}]), got {value!r}")
        kind = int if "list[int]" in text else str
        return [_yaml_scalar(path, f"{key}[{i}]", v, kind) for i, v in enumerate(value)]
    return _yaml_scalar(path, key, value, _field_type(f))


def _yaml_scalar(path: str, key: str, value, kind):
    if kind is _parse_bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return _parse_bool(value)
            except argparse.ArgumentTypeError:
                pass
        raise ValueError(f"{path}: {key}: expected true or false, got {value!r}")
    if kind in (int, float):
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                value = float(value) if kind is float or any(c in value for c in ".eE") else int(value)
            except ValueError:
                raise ValueError(f"{path}: {key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{path}: {key}: expected a number, got {value!r}")
        if kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(f"{path}: {key}: expected an integer, got {value!r}")
            return int(value)
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f"{path}: {key}: expected text, got {value!r}")
    return value


def build_parser(prog: str | None = None, parents: Sequence[argparse.ArgumentParser] = ()) -> argparse.ArgumentParser:
    """The training flags (one per ``TrainConfig`` field; ``--a_b`` and ``--a-b`` both work)."""
    return dataclass_parser(TrainConfig, "Train a DMMD discriminator (pixel or latent space). Flags override the YAML "
                            "--config.", prog, parents)  # fmt: skip


def dataclass_parser(cls, description: str, prog: str | None = None, parents: Sequence[argparse.ArgumentParser] = ()):
    """A parser with ``--config`` (YAML) and one flag per field of the config dataclass ``cls`` (its help from the
    field's metadata)."""
    from ..argparsing import FlagParser

    parser = FlagParser(prog=prog, parents=list(parents), description=description)
    parser.add_argument("--config", help="YAML file whose keys are the flag names below")
    for f in fields(cls):
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
    return load_dataclass_config(TrainConfig, build_parser(prog), argv)


def load_dataclass_config(cls, parser: argparse.ArgumentParser, argv: list[str] | None = None):
    """``cls`` from a YAML ``--config`` with the flags of ``parser`` over it, typed and validated (``validate()``)."""
    args = vars(parser.parse_args(argv))
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
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            hints = [f"{k} (spell it {k.replace('-', '_')})" if k.replace("-", "_") in known else k for k in unknown]
            raise ValueError(f"unknown key(s) in {config_path}: {', '.join(hints)}")
        by_name = {f.name: f for f in fields(cls)}
        values = {key: _yaml_value(config_path, key, value, by_name[key]) for key, value in values.items()}
    values.update(args)
    config = cls(**values)
    config.validate()
    return config


def resolved_yaml(config: TrainConfig) -> str:
    return yaml.safe_dump(dataclasses.asdict(config), sort_keys=False)
