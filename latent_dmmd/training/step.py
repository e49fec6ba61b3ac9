"""One training step: the keyed micro-batch (flips, latent draws) and the DMMD loss of its groups."""

from __future__ import annotations

import torch

from ..mmd import dmmd_loss
from ..seeding import keyed_generator, keyed_rand, keyed_randn
from .config import TrainConfig


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
        from ..autoencoders import encode_images

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
        from ..kale import clip_critic, kale_loss

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
        weights = lambda mmd2: level_weighting(t_group, mmd2, reduce)
    penalty_index = None
    if lambda_gp and config.gp_fraction < 1:  # the same number of interpolates from every group, keyed
        keep = max(1, round(config.gp_fraction * size))
        ranks = keyed_rand([(s, "gp", step, m, k) for k in keys]).view(groups, size).argsort(1)[:, :keep]
        penalty_index = (ranks.sort(1).values + size * torch.arange(groups)[:, None]).flatten()
    phi, phi_penalty, kernel = model, penalty_model, {}
    unwrapped = penalty_model or model
    if unwrapped.config.kernel == "rff_gaussian":  # raw features in, psi at the running bandwidth out
        phi = lambda x, tt: model(x, tt, raw=True)
        phi_penalty = None if penalty_model is None else (lambda x, tt: penalty_model(x, tt, raw=True))
        kernel = {
            "kernel": lambda f, tt: unwrapped.kernel_features(f, unwrapped.bandwidth_at(tt)),
            # the median heuristic over both samples of a group, clean and noisy pooled (see update_bandwidth)
            "on_raw_features": lambda clean, noisy, levels: unwrapped.update_bandwidth(torch.cat([clean, noisy], 1),
                                                                                       levels, reduce=reduce),
        }
    return dmmd_loss(
        phi, x0, xt, t, groups, lambda_l2=config.lambda_l2, lambda_gp=lambda_gp,
        l2_mode=config.l2_mode, gp_target=config.gp_target, interpolation=u, phi_penalty=phi_penalty,
        pairing=config.pairing, xt_unpaired=xt_unpaired, group_weights=weights, penalty_index=penalty_index,
        **kernel,
    )  # fmt: skip


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
