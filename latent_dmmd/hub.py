"""Model cards and sharing helpers."""

from __future__ import annotations

import dataclasses
import os

from huggingface_hub import ModelCard, ModelCardData

CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

A DMMD (diffusion MMD gradient flow) model in {{ space }} space, trained with the
`latent_dmmd` library (`pip install latent_dmmd`).

```python
import torch
from latent_dmmd import DMMDPipeline

pipe = DMMDPipeline.from_pretrained("{{ repo_id }}")
images = pipe(num_images=8, generator=torch.Generator().manual_seed(0)).images
```

Plain diffusers: `DiffusionPipeline.from_pretrained("{{ repo_id }}", custom_pipeline="{{ repo_id }}", trust_remote_code=True)`
(the one-line `pipeline.py` shim imports the installed `latent_dmmd`).

## Training

| | |
| --- | --- |
| data | {{ data }} |
| resolution | {{ resolution }} |
| autoencoder | {{ vae }} |
| steps × batch | {{ steps }} × {{ batch }} ({{ processes }} process(es)) |
| wall-clock | {{ seconds }} s |
| reference statistics | over {{ reference_count }} training samples |

## Sampler

The scheduler config saved with this model is the sampler behind any number reported here:
{{ levels }} noise levels × {{ flow_steps }} flow steps, step size {{ step_size }},
`particle_mean={{ particle_mean }}`.

## Reproducibility and limitations

With `particle_mean="ensemble"` the particles interact: an image depends on the other images
generated with it, so a per-image seed fixes only its initial noise. DMMD needs the
discriminator's input gradient at every flow step (about three forward passes per step), so it
cannot run under `torch.inference_mode()`.
"""


def write_model_card(folder: str, config, info: dict) -> str:
    """Render the first model card of a trained pipeline folder (README.md)."""
    from .schedulers import DMMDScheduler

    sched = DMMDScheduler.from_pretrained(os.path.join(folder, "scheduler"))
    cfg = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    space = "latent" if cfg.get("pretrained_vae") else "pixel"
    data = ModelCardData(
        library_name="latent_dmmd",
        pipeline_tag="unconditional-image-generation",
        tags=["dmmd", "mmd-gradient-flow", f"{space}-space", "diffusers"],
        license="apache-2.0",
    )
    card = ModelCard.from_template(
        data,
        template_str=CARD_TEMPLATE,
        title=f"DMMD {space}-space model",
        space=space,
        repo_id=cfg.get("hub_model_id") or "path/to/this/folder",
        data=cfg.get("train_data_dir") or cfg.get("dataset_name"),
        resolution=cfg.get("resolution"),
        vae=cfg.get("pretrained_vae") or "none (pixel space)",
        steps=cfg.get("max_train_steps"),
        batch=cfg.get("train_batch_size"),
        processes=info.get("num_processes", 1),
        seconds=info.get("train_seconds"),
        reference_count=info.get("reference_count"),
        levels=sched.config.num_inference_steps,
        flow_steps=sched.config.flow_steps_per_level,
        step_size=sched.config.step_size,
        particle_mean=sched.config.particle_mean,
    )
    path = os.path.join(folder, "README.md")
    card.save(path)
    return path
