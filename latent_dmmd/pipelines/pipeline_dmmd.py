"""DMMDPipeline: unconditional generation by the noise-adaptive MMD gradient flow.

Pixel space when ``vae`` is None; latent space otherwise (particles are latents that the
VAE decodes at the end). The particle loop itself is ``latent_dmmd.flow.sample_flow``.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor
from huggingface_hub import snapshot_download

from ..autoencoders import decode_latents
from ..flow import data_reference, sample_flow
from ..models import DMMDDiscriminator
from ..safety import check_pipeline_folder, drop_local_paths, write_checksums
from ..schedulers import DMMDScheduler
from .checks import check_call_inputs, check_flow_options
from .folders import HUB_ALLOW_PATTERNS, looks_like_local_path, write_loader_shim


class DMMDPipeline(DiffusionPipeline):
    """Sample images with DMMD (method §5): particles follow the witness gradient of a
    noise-conditional discriminator, level by level, from noise to data.

    Args:
        discriminator: the trained ``DMMDDiscriminator`` with its reference statistics.
        scheduler: the ``DMMDScheduler`` holding the forward process and sampler options.
        vae: optional diffusers autoencoder; when given, particles are its latents.
        score_model: optional epsilon-prediction ``UNet2DModel`` trained on the same forward
            process and particle space (the DDPM baseline): the data score of the DiffFlow
            sampler's ``noise_mode="score"`` (method §7).
        generator: optional ``DMMDGenerator`` trained from this model (method §10): when present, a call
            samples in one network evaluation (``use_generator=False`` runs the particle flow instead).
    """

    model_cpu_offload_seq = "generator->discriminator->score_model->vae"
    _optional_components = ["vae", "score_model", "generator"]
    _callback_tensor_inputs = ["latents"]

    def __init__(self, discriminator: DMMDDiscriminator, scheduler: DMMDScheduler, vae=None, score_model=None,
                 generator=None):  # fmt: skip
        super().__init__()
        self.register_modules(discriminator=discriminator, scheduler=scheduler, vae=vae, score_model=score_model,
                              generator=generator)  # fmt: skip
        self.image_processor = VaeImageProcessor(do_normalize=True)

    # ------------------------------------------------------------------ loading
    @classmethod
    def download(cls, pretrained_model_name, **kwargs) -> str:
        """Fetch a Hub repository as a snapshot (safetensors, configs and card only).

        diffusers' stock ``download`` rejects components from third-party libraries, so
        this override is what makes ``DMMDPipeline.from_pretrained("user/repo")`` work.
        """
        return snapshot_download(
            pretrained_model_name,
            revision=kwargs.get("revision"),
            cache_dir=kwargs.get("cache_dir"),
            token=kwargs.get("token"),
            local_files_only=bool(kwargs.get("local_files_only")),
            force_download=bool(kwargs.get("force_download")),
            allow_patterns=HUB_ALLOW_PATTERNS,
        )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, allow_pickle: bool = False, **kwargs):
        """Load a pipeline folder or Hub repo (snapshot of configs and safetensors).

        Before anything is built the folder is checked (``latent_dmmd.safety``): pickle-only
        weights are refused unless ``allow_pickle=True``, damaged safetensors and shape
        mismatches raise a ``ValueError`` naming the file.
        """
        folder = str(pretrained_model_name_or_path)
        if not os.path.isdir(folder):
            if looks_like_local_path(folder):
                raise FileNotFoundError(f"no such folder: {folder} (and it is not a Hub id of the form user/name)")
            folder = cls.download(folder, **kwargs)
            kwargs = {k: v for k, v in kwargs.items() if k not in ("revision", "cache_dir", "token", "force_download")}
        check_pipeline_folder(folder, allow_pickle=allow_pickle)
        kwargs.setdefault("use_safetensors", not allow_pickle)
        return super().from_pretrained(folder, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs):
        """``DiffusionPipeline.save_pretrained`` with safetensors only, plus checksums and the loader shim;
        the configs lose ``_name_or_path`` (where a loaded pipeline came from on this machine)."""
        if kwargs.pop("safe_serialization", True) is False:
            raise ValueError("DMMDPipeline saves safetensors only; safe_serialization=False is not supported")
        super().save_pretrained(save_directory, safe_serialization=True, **kwargs)
        drop_local_paths(str(save_directory))
        write_checksums(str(save_directory))
        write_loader_shim(save_directory)

    def push_to_hub(
        self,
        repo_id: str,
        private: bool = False,
        revision: str | None = None,
        token: str | None = None,
        commit_message: str = "Upload DMMD pipeline",
        **kwargs,
    ) -> list[str]:
        """Save to a temporary folder and upload the pipeline files only (see ``latent_dmmd.hub``)."""
        import tempfile

        from ..upload import push_pipeline_folder

        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp)
            return push_pipeline_folder(tmp, repo_id, private=private, revision=revision, token=token,
                                        commit_message=commit_message, api=kwargs.get("api"))  # fmt: skip

    def enable_xformers_memory_efficient_attention(self, attention_op: Callable | None = None):
        if not torch.cuda.is_available():
            raise ValueError(
                "xformers attention needs a CUDA GPU; on this machine the default PyTorch attention is used"
            )
        super().enable_xformers_memory_efficient_attention(attention_op)

    # ------------------------------------------------------------------ helpers
    @property
    def num_timesteps(self) -> int:
        """Flow steps of the last call (T·N_s, plus final flow steps): the callback's step runs over range(num_timesteps)."""
        return getattr(self, "_num_timesteps", 0)

    @property
    def interrupt(self) -> bool:
        """Set ``pipe._interrupt = True`` (e.g. in a callback) to stop the flow; the particles are decoded as they are."""
        return getattr(self, "_interrupt", False)

    @property
    def particle_shape(self) -> tuple[int, int, int]:
        c = self.discriminator.config
        return (c.in_channels, c.sample_size, c.sample_size)

    # ------------------------------------------------------------------ sampling
    def _score_function(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """``grad log p_t(z) = -eps_hat(z, t) / sigma_t`` from the epsilon-prediction score model."""
        model = self.score_model
        if model is None:
            raise ValueError(
                "noise_mode='score' needs a score model: DMMDPipeline(..., score_model=unet) with the epsilon-"
                "prediction UNet of a DDPM trained on the same forward process (latent-dmmd train --method ddpm)"
            )
        c = model.config
        if (c.in_channels, c.sample_size, c.sample_size) != tuple(self.particle_shape):
            raise ValueError(
                f"score_model takes {c.in_channels}x{c.sample_size}x{c.sample_size} "
                f"inputs but the particles are {tuple(self.particle_shape)}"
            )

        def score(z, t):
            sigma = float(1 - self.scheduler.alphas_cumprod[int(t)]) ** 0.5
            eps = model(z.to(model.dtype), torch.full((z.shape[0],), int(t), device=z.device)).sample
            return -eps.float() / sigma

        return score

    @torch.no_grad()
    def __call__(
        self,
        num_images: int = 8,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int | None = None,
        timesteps: list[int] | None = None,
        flow_steps_per_level: int | None = None,
        step_size: float | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        reference_data: torch.Tensor | None = None,
        noise_scale: float | None = None,
        noise_schedule: str | None = None,
        noise_mode: str | None = None,
        score_weight: float | None = None,
        noise_injection: float | None = None,
        final_denoise: str | None = None,
        use_generator: bool | None = None,
    ) -> ImagePipelineOutput | tuple:
        """Generate ``num_images`` images.

        Args:
            num_images: number of particles flowed together (they interact under the default
                ``particle_mean="ensemble"``, so results depend on this number).
            generator: a ``torch.Generator`` or one per image, for the initial noise.
            num_inference_steps: ``T`` noise levels (default: the scheduler config); must be
                a grid the reference statistics were computed for.
            timesteps: a custom strictly decreasing grid instead (e.g. an adaptive grid from
                ``latent_dmmd.diagnostics``); its statistics must be stored as well.
            flow_steps_per_level: ``N_s`` (default: the scheduler config).
            step_size: ``eta`` (default: the scheduler config).
            latents: initial particles ``(num_images, C, H, W)`` instead of fresh noise.
            output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"`` (the raw particles).
            return_dict: return an ``ImagePipelineOutput`` rather than a tuple.
            callback_on_step_end: ``fn(pipe, step, timestep, {"latents": z}) -> dict`` (or a diffusers
                ``PipelineCallback``), called after every flow step, not once per level: ``step`` runs over
                ``range(pipe.num_timesteps)`` (T·N_s steps) and ``timestep`` repeats for the N_s steps of a
                level. A returned ``"latents"`` replaces the particles; setting ``pipe._interrupt = True``
                stops the flow and decodes the particles as they are.
            reference_data: clean data in particle space, needed when the scheduler's
                ``reference`` is ``"data"`` (the exact, uncached reference means).
            noise_scale, noise_schedule, noise_mode, score_weight: the DiffFlow sampler of
                method §7 (defaults: the scheduler config; ``noise_scale=0`` is plain DMMD).
                ``noise_mode="score"`` needs the pipeline's ``score_model``. The noise is drawn
                from ``generator`` after the initial particles.
            noise_injection: ``beta`` of noise injection (method §5; default: the scheduler config):
                the witness gradient is evaluated at ``z + beta_k sigma_t u``, the particles ``z`` move.
            final_denoise: ``"none"``, ``"tweedie"`` (one denoising step with ``score_model`` at the last
                level) or ``"flow"`` (the scheduler's ``final_denoise_steps`` more flow steps there);
                default: the scheduler config.
            use_generator: sample with the pipeline's one-step ``generator`` (default: when it has one) instead
                of the particle flow: one network evaluation per image, samples independent of their batch;
                the flow's options above are then unused.
        """
        from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        check_call_inputs(self, num_images, generator, latents, output_type, callback_on_step_end_tensor_inputs)
        device = self._execution_device
        one_step = getattr(self, "generator", None)
        if use_generator and one_step is None:
            raise ValueError("use_generator=True but this pipeline has no one-step generator (scripts/train_generator.py "
                             "trains one from it)")  # fmt: skip
        if one_step is not None and use_generator is not False:
            if latents is None:
                latents = randn_tensor((num_images, *self.particle_shape), generator=generator, device=device)
            self._num_timesteps = 1
            z = one_step(latents.to(device, one_step.dtype)).float()
            return self._finish(z, output_type, return_dict)
        disc, sched = self.discriminator, self.scheduler
        flow_steps = sched.config.flow_steps_per_level if flow_steps_per_level is None else flow_steps_per_level
        check_flow_options(flow_steps, step_size=step_size, noise_scale=noise_scale, noise_injection=noise_injection,
                           score_weight=score_weight)  # fmt: skip
        sched.set_timesteps(num_inference_steps, device=device, timesteps=timesteps)
        timesteps = sched.timesteps
        final_denoise = final_denoise or sched.config.final_denoise
        self._num_timesteps = len(timesteps) * int(flow_steps) + (
            sched.config.final_denoise_steps if final_denoise == "flow" else 0
        )
        self._interrupt = False
        if final_denoise not in ("none", "tweedie", "flow"):
            raise ValueError(f"final_denoise={final_denoise!r} is not supported; choose 'none', 'tweedie' or 'flow'")
        tweedie = self._score_function() if final_denoise == "tweedie" else None  # refuses a missing score model
        diffflow = {"noise_scale": noise_scale, "noise_schedule": noise_schedule, "noise_mode": noise_mode,
                    "score_weight": score_weight}  # fmt: skip
        settings = sched.diffflow(**diffflow)
        score_fn = self._score_function() if sched.uses_score(**diffflow) else None

        dtype = disc.dtype
        disc.check_finite_weights()
        kale = disc.config.objective == "kale"
        stats = reference = None
        if kale:  # the critic alone gives the velocity: no statistics

            def phi(x, t):
                return disc.critic(x.to(dtype), t).float()[:, None]

        else:

            def phi(x, t):
                return disc(x.to(dtype), t).float()

            needs_stats = sched.config.particle_mean == "forward_marginal" or sched.config.reference == "cached"
            stats = disc.reference_statistics(timesteps, sched.alphas_cumprod) if needs_stats else None
            if sched.config.reference == "data":
                if reference_data is None:
                    raise ValueError("the scheduler uses reference='data': pass reference_data (clean data particles)")
                reference = data_reference(phi, reference_data.to(device, torch.float32))
            else:
                reference = stats.mean_data.float()

        if latents is None:
            latents = randn_tensor((num_images, *self.particle_shape), generator=generator, device=device)
        z = latents.to(device, torch.float32) * sched.init_noise_sigma

        def update(grad, k, z):
            score = score_fn(z, timesteps[k]) if score_fn is not None else None
            return sched.step(grad, timesteps[k], z, step_size=step_size, generator=generator, score=score,
                              flow_steps=flow_steps, **diffflow).prev_sample  # fmt: skip

        def perturb(z, k):
            scale = sched.injection_scale(k, noise_injection)
            if scale == 0:
                return None  # the plain flow, no random numbers drawn
            return z + scale * randn_tensor(z.shape, generator=generator, device=z.device, dtype=z.dtype)

        def callback(step, k, t, z):
            if callback_on_step_end is None:
                return None
            tensors = {"latents": z}
            out = callback_on_step_end(
                self, step, t, {name: tensors[name] for name in callback_on_step_end_tensor_inputs}
            )
            return (out or {}).get("latents")

        z = sample_flow(
            phi,
            z,
            timesteps,
            reference,
            flow_steps=flow_steps,
            update=update,
            particle_mean=sched.config.particle_mean,
            marginal_means=stats.mean_noised.float() if stats is not None else None,
            callback=callback,
            progress=lambda total: self.progress_bar(total=total),
            witness=settings["score_weight"] < 1,
            kale_lambda=disc.config.kale_lambda if kale else None,
            perturb=perturb,
            final_steps=sched.config.final_denoise_steps if final_denoise == "flow" else 0,
            interrupt=lambda: self.interrupt,
        )
        if tweedie is not None:  # Tweedie: E[x0 | z_t] = (z + sigma_t^2 grad log p_t(z)) / alpha_t
            t_last = int(timesteps[-1])
            alpha, sigma = (float(v) for v in sched.alpha_sigma(t_last))
            z = (z + sigma**2 * tweedie(z, t_last)) / alpha

        return self._finish(z, output_type, return_dict)

    def _finish(self, z: torch.Tensor, output_type: str, return_dict: bool):
        """Particles to the requested output: raw (``latent``), or decoded and post-processed images."""
        if output_type == "latent":
            images = z
        else:
            images = decode_latents(self.vae, z) if self.vae is not None else z
            images = self.image_processor.postprocess(images.detach(), output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
