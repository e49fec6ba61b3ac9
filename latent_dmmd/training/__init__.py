"""Training DMMD discriminators with accelerate, in pixel or VAE-latent space (method §3-4).

``scripts/train_latent.py`` and ``latent-dmmd train`` only call :func:`main`. Each concern has its
own module:

- ``config``: ``TrainConfig`` (one field per flag), the parser, YAML with overrides, validation;
- ``step``: the keyed micro-batch and the loss of one step;
- ``checkpoints``: the run folder, atomic checkpoints, resume;
- ``latents``: the image dataset and the latent cache;
- ``monitor``: held-out MMD² per level and validation grids;
- ``export``: reference statistics and the exported pipeline / baseline folders;
- ``loop``: ``main``, the run from the flags to the exported folder.
"""

from .checkpoints import (
    CHECKPOINT_CONFIG,
    CHECKPOINT_RE,
    MODEL_FIELDS,
    apply_optimizer_settings,
    check_resume_config,
    claim_output_dir,
    list_checkpoints,
    resolve_resume,
    save_checkpoint,
)
from .config import TrainConfig, build_parser, load_config, resolved_yaml
from .export import distributed_reference_statistics, export_baseline, export_pipeline
from .latents import cache_main, image_dataset, prepare_latents
from .loop import build_models, check_distributed_type, main
from .monitor import heldout_samples, level_mmd, log_level_mmd, validate
from .step import dmmd_step_loss, reference_batches, training_batch

__all__ = [
    "CHECKPOINT_CONFIG",
    "CHECKPOINT_RE",
    "MODEL_FIELDS",
    "TrainConfig",
    "apply_optimizer_settings",
    "build_models",
    "build_parser",
    "cache_main",
    "check_distributed_type",
    "check_resume_config",
    "claim_output_dir",
    "distributed_reference_statistics",
    "dmmd_step_loss",
    "export_baseline",
    "export_pipeline",
    "heldout_samples",
    "image_dataset",
    "level_mmd",
    "list_checkpoints",
    "load_config",
    "log_level_mmd",
    "main",
    "prepare_latents",
    "reference_batches",
    "resolve_resume",
    "resolved_yaml",
    "save_checkpoint",
    "training_batch",
    "validate",
]
