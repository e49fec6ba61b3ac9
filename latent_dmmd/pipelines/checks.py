"""The checks of a ``DMMDPipeline`` call, before any work: every bad argument is a ``ValueError`` that names it and
says what to pass instead."""

from __future__ import annotations

import math
import numbers

import torch

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def check_call_inputs(pipe, num_images, generator, latents, output_type, callback_tensor_inputs) -> None:
    """The call's images, generators, initial latents, output type and callback against the pipeline's parts
    (its particle shape, its autoencoder and the one the discriminator was trained with)."""
    if torch.is_inference_mode_enabled():
        raise ValueError(
            "DMMDPipeline cannot run under torch.inference_mode(): the flow needs the input gradient of the "
            "discriminator; call it outside inference_mode (no_grad is fine)"
        )
    if not _is_int(num_images) or num_images < 1:
        raise ValueError(f"num_images must be a positive integer, got {num_images!r}")
    if isinstance(generator, list) and len(generator) != num_images:
        raise ValueError(f"got a list of {len(generator)} generators for num_images={num_images}; give one per image")
    gens = generator if isinstance(generator, list) else [generator]
    wrong = [type(g).__name__ for g in gens if g is not None and not isinstance(g, torch.Generator)]
    if wrong or (isinstance(generator, list) and None in generator):
        raise ValueError(f"generator must be a torch.Generator or a list of them, got {wrong[0] if wrong else 'None'} "
                         f"in it; seed one with torch.Generator().manual_seed(seed)")  # fmt: skip
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
    if latents is not None:
        expected = (num_images, *pipe.particle_shape)
        if not torch.is_tensor(latents) or not latents.is_floating_point():
            raise ValueError(f"latents must be a floating-point tensor of shape {expected}")
        if tuple(latents.shape) != expected:
            raise ValueError(
                f"latents have shape {tuple(latents.shape)} but the discriminator expects {expected} "
                f"(num_images, channels, height, width)"
            )
    bad = [k for k in callback_tensor_inputs if k not in pipe._callback_tensor_inputs]
    if bad:
        raise ValueError(f"callback_on_step_end_tensor_inputs {bad} not in {pipe._callback_tensor_inputs}")
    stored_vae = pipe.discriminator.config.reference_vae
    if pipe.vae is None and stored_vae is not None and output_type != "latent":
        raise ValueError(
            f"this model flows in the latent space of a {stored_vae['class']} autoencoder, which its folder does "
            f"not contain: load it and pass it, DMMDPipeline.from_pretrained(folder, vae=...) (the model card "
            f"says how), or ask for output_type='latent'"
        )
    one_step = getattr(pipe, "generator", None)
    if one_step is not None and tuple(one_step.particle_shape) != tuple(pipe.particle_shape):
        raise ValueError(f"the one-step generator makes {tuple(one_step.particle_shape)} particles but the discriminator "
                         f"takes {tuple(pipe.particle_shape)}: they were not trained together")  # fmt: skip
    if pipe.vae is not None:
        pipe.discriminator.check_vae(pipe.vae)
        latent_channels = pipe.vae.config.latent_channels
        if latent_channels != pipe.particle_shape[0]:
            raise ValueError(
                f"the VAE has {latent_channels} latent channels but the discriminator expects "
                f"{pipe.particle_shape[0]}: they were not trained together"
            )


def check_flow_options(flow_steps, step_size=None, noise_scale=None, noise_injection=None, score_weight=None) -> None:
    """The flow's numbers: N_s a positive integer; eta, the DiffFlow noise, the injection and the score weight
    finite and non-negative (eta > 0, the score weight at most 1)."""
    if not _is_int(flow_steps) or flow_steps < 1:
        raise ValueError(f"flow_steps_per_level must be an integer >= 1, got {flow_steps!r}")
    for name, value in (("step_size", step_size), ("noise_scale", noise_scale), ("noise_injection", noise_injection),
                        ("score_weight", score_weight)):  # fmt: skip
        if value is not None and not (_is_real(value) and math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if step_size is not None and step_size <= 0:
        raise ValueError(f"step_size must be > 0, got {step_size!r}: a zero step leaves the particles where they start")
    if score_weight is not None and score_weight > 1:
        raise ValueError(f"score_weight must lie in [0, 1], got {score_weight!r}")


def _is_int(value) -> bool:
    """A Python or NumPy integer (not a bool)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    """A Python or NumPy real number (not a bool)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
