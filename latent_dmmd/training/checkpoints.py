"""The run folder: claiming it, atomic checkpoints with pruning, and resuming (with a config check)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil

from ..atomic import fsync_tree, incomplete_files
from .config import TrainConfig

logger = logging.getLogger("latent_dmmd.training")


CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


CHECKPOINT_CONFIG = "training_config.json"  # the run's resolved config, inside every checkpoint
CHECKPOINT_PROGRESS = "progress.json"  # step and optimisation seconds so far, summed over every resumed session
PROGRESS_LOG = "progress.jsonl"  # the same, one line per checkpoint, in the run folder (the learning curve's clock)


def _model_fields() -> tuple[str, ...]:
    """Config fields that shape the weights: the fields ``TrainConfig.model_kwargs`` passes to ``DMMDDiscriminator``
    (so a new model option is covered without a list to maintain), plus the method, the data's shape, the
    autoencoder and the EMA."""
    from ..models import DMMDDiscriminator

    shape = TrainConfig.fields_of(DMMDDiscriminator)
    return tuple(dict.fromkeys(("method", "objective", *shape, "resolution", "channels", "pretrained_vae", "use_ema")))


MODEL_FIELDS = _model_fields()


OPTIMIZER_FIELDS = {"learning_rate": "lr", "adam_weight_decay": "weight_decay", "adam_epsilon": "eps"}


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


def save_checkpoint(accelerator, output_dir: str, step: int, total_limit: int | None, config: TrainConfig | None = None,
                    progress: dict | None = None) -> str:
    """Save the training state to a temporary folder, rename it into place, then prune. ``progress`` (step,
    optimisation seconds) goes into the checkpoint and, once it is in place, onto the run's ``progress.jsonl``.

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
        if progress is not None:
            with open(os.path.join(tmp, CHECKPOINT_PROGRESS), "w") as f:
                json.dump(progress, f)
        fsync_tree(tmp)  # a power cut after the rename must not leave 0-byte files behind it
        if os.path.isdir(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        if progress is not None:
            with open(os.path.join(output_dir, PROGRESS_LOG), "a") as f:
                f.write(json.dumps(progress) + "\n")
        if total_limit is not None:
            for _, old in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old)
        for name in os.listdir(output_dir):
            if name.startswith(".tmp-checkpoint-") and name != os.path.basename(tmp):
                shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


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


def checkpoint_progress(checkpoint: str) -> dict:
    """What a checkpoint recorded of the run's progress (``{}`` for checkpoints written before it was recorded)."""
    path = os.path.join(checkpoint, CHECKPOINT_PROGRESS)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


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
