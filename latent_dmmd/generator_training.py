"""Training a one-step generator from a trained DMMD pipeline (method §10): ``scripts/train_generator.py``.

``--mode distill`` regresses ``G(z)`` onto the flow's endpoints from the same noise (computed once, cached in the run
folder); ``--mode field`` regresses ``G(z)`` onto ``stopgrad(x - eta alpha_t grad)`` along the DMMD field at a random
level of the sampling grid (``latent_dmmd.onestep``), the discriminator and its statistics frozen. Both log the
batch's diversity (mean pairwise distance over the data's), so a collapse shows in the log. accelerate runs it
(multi-process included); checkpoints hold the generator, its EMA and the optimiser, and a run resumes with
``--resume_from_checkpoint latest``. The result is the teacher's pipeline folder with a ``generator`` component.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass

import torch

from .training.config import _f, dataclass_parser, load_dataclass_config

logger = logging.getLogger("latent_dmmd.generator")

ENDPOINTS = "endpoints.safetensors"


@dataclass
class GeneratorConfig:
    """Every option of ``scripts/train_generator.py``; a ``None`` architecture field takes the discriminator's."""

    pipeline: str = _f("", "the trained DMMD pipeline folder whose flow (distill) or field (field) trains the generator")
    vae: str | None = _f(None, "autoencoder of a latent pipeline saved without one (folder or Hub id)")
    output_dir: str = _f("outputs/generator", "checkpoints, endpoints cache and the final pipeline folder")
    mode: str = _f("distill", "distill (regression onto flow endpoints) or field (stop-gradient regression along the field)")
    seed: int = _f(0, "seed of the noise draws, levels and data batches")
    # the generator: a UNet2DModel at a fixed timestep, by default the discriminator's backbone
    block_out_channels: list[int] | None = _f(None, "UNet block widths (default: the discriminator's)", nargs="+", type=int)
    layers_per_block: int | None = _f(None, "resnets per UNet block (default: the discriminator's)")
    down_block_types: list[str] | None = _f(None, "UNet down block types (default: the discriminator's)", nargs="+")
    up_block_types: list[str] | None = _f(None, "UNet up block types (default: the discriminator's)", nargs="+")
    attention_head_dim: int | None = _f(None, "attention head size (default: the discriminator's)")
    norm_num_groups: int | None = _f(None, "group-norm groups (default: the discriminator's)")
    # optimisation
    train_batch_size: int = _f(64, "generated samples per step and process")
    max_train_steps: int = _f(2000, "optimiser steps")
    max_train_minutes: float | None = _f(None, "wall-clock budget: stop after the step that passes it (then export)")
    learning_rate: float = _f(2e-4, "AdamW learning rate")
    max_grad_norm: float = _f(1.0, "gradient clipping (0: none)")
    ema_decay: float = _f(0.999, "EMA of the generator's weights (the exported ones)")
    checkpointing_steps: int = _f(500, "save the training state every this many steps (and at the end)")
    checkpoints_total_limit: int | None = _f(2, "keep this many checkpoints")
    resume_from_checkpoint: str | None = _f(None, "a checkpoint folder, or 'latest'")
    log_every: int = _f(50, "log loss and diversity every this many steps")
    # distill
    num_endpoints: int = _f(4096, "distill: flow endpoints computed once and regressed onto")
    flow_batch_size: int = _f(512, "distill: particles flowed together (large: an endpoint nearly a function of its noise)")
    # field
    field_kernel: str = _f("local", "field: linear (the witness the flow follows; collapses) or local (attraction-repulsion)")
    field_step_size: float = _f(1.0, "field: eta of the target x - eta alpha_t grad")
    field_tau: float = _f(0.1, "field, local kernel: temperature in units of the median feature distance")
    train_data: str | None = _f(None, "training data (latent cache or images): the local field's data batches and the "
                                      "diversity reference (required by --mode field)")  # fmt: skip
    data_batch_size: int = _f(256, "field: data samples per step (local kernel) and in the diversity reference")

    def validate(self) -> None:
        if not self.pipeline:
            raise ValueError("--pipeline is required: the trained DMMD pipeline folder")
        if self.mode not in ("distill", "field"):
            raise ValueError(f"--mode must be distill or field, got {self.mode!r}")
        if self.field_kernel not in ("linear", "local"):
            raise ValueError(f"--field_kernel must be linear or local, got {self.field_kernel!r}")
        if self.mode == "field" and not self.train_data:
            raise ValueError("--mode field needs --train_data (data batches for the field and the diversity log)")
        for name in ("train_batch_size", "max_train_steps", "checkpointing_steps", "log_every", "num_endpoints",
                     "flow_batch_size", "data_batch_size"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if not self.learning_rate > 0 or not self.field_step_size > 0 or not self.field_tau > 0:
            raise ValueError("--learning_rate, --field_step_size and --field_tau must be > 0")


def load_generator_config(argv: list[str] | None = None, prog: str | None = None) -> GeneratorConfig:
    parser = dataclass_parser(GeneratorConfig, "Train a one-step generator from a DMMD pipeline (method §10).", prog)
    return load_dataclass_config(GeneratorConfig, parser, argv)


def training_particles(path: str, pipe, count: int | None = None, seed: int = 0) -> torch.Tensor:
    """Clean training samples as the flow sees them: a latent cache's latents, or images (encoded by the pipeline's
    autoencoder in latent space); ``count`` of them drawn at random (all when None)."""
    if os.path.isfile(os.path.join(path, "meta.json")):  # a latent cache (scripts/cache_latents.py)
        from .latent_cache import LatentCacheDataset

        data = LatentCacheDataset(path).tensors["mean"].float()
    else:
        from .data import build_image_dataset
        from .records import output_resolution

        channels = 3 if pipe.vae is not None else pipe.discriminator.config.in_channels
        ds = build_image_dataset(path, resolution=output_resolution(pipe), channels=channels)
        picks = range(len(ds)) if count is None else torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:count]
        data = torch.stack([ds[int(i)]["pixel_values"] for i in picks])
        if pipe.vae is not None:
            from .autoencoders import encode_images

            with torch.no_grad():
                data = torch.cat([encode_images(pipe.vae, x).mean.float() for x in data.split(64)])
        return data
    if count is not None and count < len(data):
        data = data[torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:count]]
    return data


def build_generator(config: GeneratorConfig, discriminator):
    from .models import DMMDGenerator

    d = discriminator.unet.config
    pick = lambda mine, theirs: theirs if mine is None else mine
    return DMMDGenerator(
        sample_size=discriminator.config.sample_size, in_channels=discriminator.config.in_channels,
        block_out_channels=tuple(pick(config.block_out_channels, d.block_out_channels)),
        layers_per_block=pick(config.layers_per_block, d.layers_per_block),
        down_block_types=tuple(pick(config.down_block_types, d.down_block_types)),
        up_block_types=tuple(pick(config.up_block_types, d.up_block_types)),
        attention_head_dim=pick(config.attention_head_dim, d.attention_head_dim),
        norm_num_groups=pick(config.norm_num_groups, d.norm_num_groups), mode=config.mode,
    )  # fmt: skip


def cached_endpoints(config: GeneratorConfig, pipe, accelerator) -> tuple[torch.Tensor, torch.Tensor]:
    """The flow's endpoints from their noise, computed once by the main process into the run folder."""
    from safetensors.torch import load_file, save_file

    path = os.path.join(config.output_dir, ENDPOINTS)
    if accelerator.is_main_process and not os.path.isfile(path):
        from .onestep import flow_endpoints

        noise, ends = flow_endpoints(pipe, config.num_endpoints, config.flow_batch_size, seed=config.seed, progress=True)
        save_file({"noise": noise.contiguous(), "endpoints": ends.contiguous()}, path + ".tmp")
        os.replace(path + ".tmp", path)
    accelerator.wait_for_everyone()
    saved = load_file(path)
    if saved["noise"].shape[0] != config.num_endpoints:
        raise ValueError(f"{path} holds {saved['noise'].shape[0]} endpoints, not --num_endpoints {config.num_endpoints}: "
                         f"delete it or pass the number it was made with")  # fmt: skip
    return saved["noise"], saved["endpoints"]


def load_teacher(config: GeneratorConfig):
    from . import DMMDPipeline

    pipe = DMMDPipeline.from_pretrained(config.pipeline)
    if pipe.vae is None and config.vae:
        from .autoencoders import load_autoencoder

        pipe = DMMDPipeline(pipe.discriminator, pipe.scheduler, vae=load_autoencoder(config.vae), score_model=pipe.score_model)
    pipe.set_progress_bar_config(disable=True)
    pipe.discriminator.requires_grad_(False).eval()
    return pipe


class FieldSampler:
    """Draws what one field step needs: the level, its ``alpha_t``/``sigma_t`` and ``m_P(t)``, the noise of the
    generated and data batches, and a data batch; keyed by (seed, step, process), so a resumed run repeats them."""

    def __init__(self, pipe, data: torch.Tensor, config: GeneratorConfig, process_index: int):
        sched = pipe.scheduler
        sched.set_timesteps(sched.config.num_inference_steps)
        self.timesteps = [int(t) for t in sched.timesteps]
        stats = pipe.discriminator.reference_statistics(sched.timesteps, sched.alphas_cumprod)
        self.means = stats.mean_data.float()
        self.sched, self.data, self.config, self.rank = sched, data, config, process_index

    def draw(self, step: int, shape: tuple[int, ...]):
        g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + step * 1009 + self.rank)
        k = int(torch.randint(len(self.timesteps), (1,), generator=g))
        t = self.timesteps[k]
        alpha, sigma = (float(v) for v in self.sched.alpha_sigma(t))
        picks = torch.randint(len(self.data), (min(self.config.data_batch_size, len(self.data)),), generator=g)
        data = self.data[picks]
        return {"t": t, "alpha": alpha, "sigma": sigma, "mean_data": self.means[k], "noise": torch.randn(shape, generator=g),
                "data": data, "data_noise": torch.randn(data.shape, generator=g)}  # fmt: skip


def main(argv: list[str] | None = None) -> str:
    """Train the generator and write ``<output_dir>/pipeline`` (the teacher's components plus ``generator``)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm

    from .onestep import diversity, field_target
    from .training.checkpoints import checkpoint_progress, resolve_resume, save_checkpoint

    config = load_generator_config(argv)
    accelerator = Accelerator(project_config=ProjectConfiguration(project_dir=config.output_dir))
    logging.basicConfig(level=logging.INFO if accelerator.is_local_main_process else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip
    set_seed(config.seed)
    os.makedirs(config.output_dir, exist_ok=True)
    pipe = load_teacher(config)
    disc = pipe.discriminator.to(accelerator.device)
    generator = build_generator(config, disc)
    optimizer = torch.optim.AdamW(generator.parameters(), lr=config.learning_rate)
    ema = EMAModel(generator.parameters(), decay=config.ema_decay)
    if config.mode == "distill":
        noise, ends = cached_endpoints(config, pipe, accelerator)
        reference = ends[: config.data_batch_size]
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(noise, ends), batch_size=config.train_batch_size,
                                             shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(config.seed))  # fmt: skip
        generator, optimizer, loader = accelerator.prepare(generator, optimizer, loader)
    else:
        data = training_particles(config.train_data, pipe)
        reference = data[: config.data_batch_size]
        field = FieldSampler(pipe, data, config, accelerator.process_index)
        generator, optimizer = accelerator.prepare(generator, optimizer)
        loader = None
    from .launch import hold_until_exit

    hold_until_exit(accelerator, generator)  # a distributed run's DDP model must not be freed before the process exits
    ema.to(accelerator.device)
    accelerator.register_for_checkpointing(ema)
    step, path = resolve_resume(config)
    seconds = 0.0
    if path:
        accelerator.load_state(path)
        seconds = float(checkpoint_progress(path).get("optimize_seconds", 0.0))
        logger.info("resumed from %s (step %d)", path, step)

    def batches():
        epoch = 0
        while True:
            loader.set_epoch(epoch)
            yield from loader
            epoch += 1

    stream = batches() if loader is not None else None
    if stream is not None:
        for _ in range(step):  # the batches the resumed steps had seen
            next(stream)
    shape = (config.train_batch_size, *pipe.particle_shape)
    phi = lambda x, t: disc(x, t).float()
    bar = tqdm(total=config.max_train_steps, initial=step, desc=f"generator ({config.mode})",
               disable=not accelerator.is_local_main_process)  # fmt: skip
    loop_start, log = time.time(), []
    while step < config.max_train_steps:
        mark = time.perf_counter()
        if stream is not None:
            z, target = next(stream)
            out = generator(z)
        else:
            g = torch.Generator().manual_seed(config.seed + 7919 * step + accelerator.process_index)
            z = torch.randn(shape, generator=g).to(accelerator.device)
            out = generator(z)
            draw = field.draw(step, tuple(out.shape))
            target = field_target(phi, out, draw["t"], draw["alpha"], draw["sigma"], config.field_step_size,
                                  draw["noise"].to(out.device), mean_data=draw["mean_data"].to(out.device),
                                  kernel=config.field_kernel, data=draw["data"].to(out.device),
                                  data_noise=draw["data_noise"].to(out.device), tau=config.field_tau)  # fmt: skip
        loss = torch.nn.functional.mse_loss(out.float(), target.float())
        accelerator.backward(loss)
        if config.max_grad_norm > 0:
            accelerator.clip_grad_norm_(generator.parameters(), config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(generator.parameters())
        step += 1
        seconds += time.perf_counter() - mark
        bar.update(1)
        if step % config.log_every == 0 or step == config.max_train_steps:
            spread = diversity(out, reference)
            log.append({"step": step, "loss": loss.item(), "diversity": spread})
            bar.set_postfix(loss=f"{loss.item():.4g}", diversity=f"{spread:.2f}")
            if accelerator.is_main_process:
                with open(os.path.join(config.output_dir, "generator_log.jsonl"), "a") as f:
                    f.write(json.dumps(log[-1]) + "\n")
        late = config.max_train_minutes is not None and time.time() - loop_start > 60 * config.max_train_minutes
        if step % config.checkpointing_steps == 0 or step == config.max_train_steps or late:
            save_checkpoint(accelerator, config.output_dir, step, config.checkpoints_total_limit, config,
                            {"step": step, "optimize_seconds": round(seconds, 2)})  # fmt: skip
        if late:
            break
    bar.close()
    return export(accelerator, pipe, generator, ema, config, {"steps": step, "optimize_seconds": round(seconds, 1),
                                                             "last_log": log[-1] if log else None})  # fmt: skip


def export(accelerator, pipe, generator, ema, config: GeneratorConfig, info: dict) -> str:
    """``<output_dir>/pipeline``: the teacher pipeline with the EMA generator as its ``generator`` component, and a
    card section saying how it was trained."""
    import copy

    from . import DMMDPipeline
    from .atomic import replace_folder
    from .hub import write_model_card

    folder = os.path.join(config.output_dir, "pipeline")
    if accelerator.is_main_process:
        shadow = copy.deepcopy(accelerator.unwrap_model(generator)).to("cpu")
        ema.copy_to(shadow.parameters())
        shadow.eval().requires_grad_(False)
        out = DMMDPipeline(pipe.discriminator.to("cpu"), pipe.scheduler, vae=pipe.vae, score_model=pipe.score_model,
                           generator=shadow)  # fmt: skip
        teacher_card = os.path.join(config.pipeline, "README.md")
        with replace_folder(folder) as tmp:
            out.save_pretrained(tmp)
            if os.path.isfile(teacher_card):  # the teacher's card, with the generator's section
                shutil.copyfile(teacher_card, os.path.join(tmp, "README.md"))
            write_model_card(tmp, one_step=one_step_card(config, info))
        with open(os.path.join(config.output_dir, "generator_summary.json"), "w") as f:
            json.dump(info | {"config": dataclasses.asdict(config)}, f, indent=2)
        logger.info("wrote %s (one-step generator, %s, %d steps)", folder, config.mode, info["steps"])
    accelerator.wait_for_everyone()
    return folder


def one_step_card(config: GeneratorConfig, info: dict) -> str:
    how = (f"regression onto {config.num_endpoints} endpoints of this model's particle flow (batches of "
           f"{config.flow_batch_size} particles)" if config.mode == "distill" else
           f"the stop-gradient regression along the DMMD field (kernel {config.field_kernel}, eta {config.field_step_size}, "
           f"tau {config.field_tau})")  # fmt: skip
    last = info.get("last_log") or {}
    return (f"`generator/` is a `DMMDGenerator` (x = z + UNet(z) at a fixed timestep) trained by {how} for "
            f"{info['steps']} steps ({info['optimize_seconds']} s of optimisation); its last logged diversity (mean "
            f"pairwise distance over the data's) was {last.get('diversity', float('nan')):.2f}.")  # fmt: skip
