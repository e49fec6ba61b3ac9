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

Names load on first use (PEP 562).
"""

_WHERE = {
    "CHECKPOINT_CONFIG": "checkpoints",
    "CHECKPOINT_RE": "checkpoints",
    "MODEL_FIELDS": "checkpoints",
    "TrainConfig": "config",
    "apply_optimizer_settings": "checkpoints",
    "build_models": "loop",
    "build_parser": "config",
    "cache_main": "latents",
    "check_distributed_type": "loop",
    "check_resume_config": "checkpoints",
    "claim_output_dir": "checkpoints",
    "distributed_reference_statistics": "export",
    "dmmd_step_loss": "step",
    "export_baseline": "export",
    "export_checkpoint": "loop",
    "export_pipeline": "export",
    "heldout_samples": "monitor",
    "image_dataset": "latents",
    "level_mmd": "monitor",
    "list_checkpoints": "checkpoints",
    "load_config": "config",
    "log_level_mmd": "monitor",
    "main": "loop",
    "prepare_latents": "latents",
    "reference_batches": "step",
    "resolve_resume": "checkpoints",
    "resolved_yaml": "config",
    "save_checkpoint": "checkpoints",
    "training_batch": "step",
    "validate": "monitor",
}


def __getattr__(name: str):
    """Load a name's module on first use: ``latent-dmmd train --help`` then needs no torch."""
    import importlib

    if name in _WHERE:
        value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    "export_checkpoint",
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
