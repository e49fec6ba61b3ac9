"""DMMDDiscriminator: the noise-conditional feature network ``phi(x, t)`` on a diffusers UNet.

The reference statistics of method §4 are persistent buffers of the model, so one
``save_pretrained`` carries everything a sampler needs. Their shapes are in the config
(``num_reference_levels``), which lets ``from_pretrained`` rebuild them before loading.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models import UNet2DModel
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ..mmd import median_pairwise_distance, rff_frequencies, rff_map
from ..reference import ReferenceStatistics, weights_fingerprint


def vae_contract(vae) -> dict | None:
    """What the statistics assume of the autoencoder: its class, factors and latent channels."""
    if vae is None:
        return None
    c = vae.config
    return {
        "class": type(vae).__name__,
        "scaling_factor": float(getattr(c, "scaling_factor", None) or 1.0),
        "shift_factor": float(getattr(c, "shift_factor", None) or 0.0),
        "latent_channels": int(c.latent_channels),
    }

__all__ = ["DMMDDiscriminator", "ModelMixin"]

_ALPHA_ATOL = 1e-6
RFF_BUCKETS = 20  # bandwidth buckets of the Gaussian kernel: t in [50 b, 50 (b + 1))


class DMMDDiscriminator(ModelMixin, ConfigMixin):
    """Noise-conditional discriminator ``phi(x, t) -> (B, D)`` (method §1, §3).

    The backbone is a ``UNet2DModel``; the features are its output flattened
    (``D = out_channels · H · W``), optionally average-pooled to ``pool_size²`` cells per
    channel and/or linearly projected to ``projection_dim``.

    Args:
        sample_size: spatial size of the inputs (pixels, or latent cells in latent space).
        in_channels: channels of the particles (3 for RGB, the VAE's latent channels).
        out_channels: channels of the UNet output (defaults to ``in_channels``).
        block_out_channels, layers_per_block, down_block_types, up_block_types,
        attention_head_dim, norm_num_groups, dropout: passed to ``UNet2DModel``.
        pool_size: average-pool the UNet output to ``pool_size × pool_size`` (None: no pooling).
        projection_dim: learned linear map of the features to this size (None: none).
        num_reference_levels: number of levels of the stored reference statistics
            (set by ``set_reference_statistics``; 0 means none stored yet).
        reference_fingerprint: SHA-256 of the weights the statistics were computed with (bf16-rounded,
            so a bf16 cast still matches).
        reference_fingerprint_fp16: the same weights' fingerprint after a float16 cast (fp16 then bf16
            rounding differs from bf16 rounding for a few percent of the weights).
        reference_count: number of data samples behind the statistics.
        reference_vae: class, scaling/shift factors and latent channels of the autoencoder whose
            latents the statistics describe (None in pixel space).
        objective: ``"mmd"`` (features for the linear-kernel MMD, the default) or ``"kale"``
            (a scalar critic trained with the KALE bound; needs ``projection_dim=1``).
        critic_clip: ``c``, the KALE critic's upper bound: ``h = c - softplus(c - raw)``.
        kale_lambda: ``λ`` of the KALE objective (also scales the particle velocity ``1 + λ``).
        kernel: ``"linear"`` (the MMD of the features themselves, the default) or ``"rff_gaussian"``
            (method §5): a Gaussian kernel on the features through ``rff_features`` random Fourier
            features drawn from ``rff_seed``; ``forward`` then returns ``psi(phi)``, whose means are the
            cached statistics, so training, statistics and sampling stay linear in ``psi``. Its
            bandwidth per noise level is the median distance between clean-data features, tracked
            during training in ``RFF_BUCKETS`` buckets of t (the buffer ``rff_bandwidth``, saved with
            the weights and part of their fingerprint, hence of the statistics' key).
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        sample_size: int = 32,
        in_channels: int = 3,
        out_channels: int | None = None,
        block_out_channels: tuple[int, ...] = (32, 64, 64),
        layers_per_block: int = 1,
        down_block_types: tuple[str, ...] = ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types: tuple[str, ...] = ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim: int | None = 8,
        norm_num_groups: int = 16,
        dropout: float = 0.0,
        pool_size: int | None = None,
        projection_dim: int | None = None,
        num_reference_levels: int = 0,
        reference_fingerprint: str | None = None,
        reference_fingerprint_fp16: str | None = None,
        reference_count: int = 0,
        reference_vae: dict | None = None,
        objective: str = "mmd",
        critic_clip: float = 5.0,
        kale_lambda: float = 0.1,
        kernel: str = "linear",
        rff_features: int = 1024,
        rff_seed: int = 0,
    ):
        super().__init__()
        for name, value in (("sample_size", sample_size), ("in_channels", in_channels), ("layers_per_block", layers_per_block),
                            ("norm_num_groups", norm_num_groups), ("rff_features", rff_features)):  # fmt: skip
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if kernel not in ("linear", "rff_gaussian"):
            raise ValueError(f"kernel={kernel!r} is not supported; choose 'linear' or 'rff_gaussian'")
        if kernel != "linear" and objective != "mmd":
            raise ValueError("kernel='rff_gaussian' is for the MMD objective; the KALE critic is a scalar")
        if rff_features < 1:
            raise ValueError(f"rff_features must be a positive number of random features, got {rff_features}")
        if objective not in ("mmd", "kale"):
            raise ValueError(f"objective={objective!r} is not supported; choose 'mmd' or 'kale'")
        if objective == "kale" and projection_dim != 1:
            raise ValueError(f"the KALE critic is scalar: it needs projection_dim=1, got {projection_dim}")
        if critic_clip <= 0 or kale_lambda < 0:
            raise ValueError(f"need critic_clip > 0 and kale_lambda >= 0, got {critic_clip}, {kale_lambda}")
        out_channels = out_channels or in_channels
        self.unet = UNet2DModel(
            sample_size=sample_size,
            in_channels=in_channels,
            out_channels=out_channels,
            block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block,
            down_block_types=tuple(down_block_types),
            up_block_types=tuple(up_block_types),
            attention_head_dim=attention_head_dim,
            norm_num_groups=norm_num_groups,
            dropout=dropout,
        )
        self.pool = nn.AdaptiveAvgPool2d(pool_size) if pool_size else nn.Identity()
        cells = pool_size**2 if pool_size else sample_size**2
        raw_dim = out_channels * cells
        self.projection = nn.Linear(raw_dim, projection_dim, bias=False) if projection_dim else nn.Identity()
        self.raw_feature_dim = projection_dim or raw_dim
        self.feature_dim = rff_features if kernel == "rff_gaussian" else self.raw_feature_dim
        if kernel == "rff_gaussian":
            # the frequencies follow from the seed: not stored, rebuilt on load
            weight, bias = rff_frequencies(rff_features, self.raw_feature_dim, rff_seed)
            self.register_buffer("rff_weight", weight.float(), persistent=False)
            self.register_buffer("rff_bias", bias.float(), persistent=False)
            # 0 = not measured yet; set by training (update_bandwidth) or calibrate_bandwidth
            self.register_buffer("rff_bandwidth", torch.zeros(RFF_BUCKETS))
        self._make_reference_buffers(num_reference_levels)

    # ------------------------------------------------------------------ features
    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | int, raw: bool = False) -> torch.Tensor:
        """Features of shape (B, D); ``timestep`` scalar or (B,). With ``kernel="rff_gaussian"`` these are
        ``psi(phi(sample, t))`` at the level's stored bandwidth, unless ``raw`` (then ``phi`` itself)."""
        c = self.config
        if sample.dim() != 4 or sample.shape[1] != c.in_channels:
            raise ValueError(
                f"expected samples of shape (B, {c.in_channels}, H, W) for this discriminator, got {tuple(sample.shape)}"
            )
        if sample.shape[-1] != c.sample_size or sample.shape[-2] != c.sample_size:
            raise ValueError(
                f"this discriminator was built for {c.sample_size}x{c.sample_size} inputs, "
                f"got {sample.shape[-2]}x{sample.shape[-1]}"
            )
        timestep = torch.as_tensor(timestep, device=sample.device)
        if timestep.dim() == 0:
            timestep = timestep.expand(sample.shape[0])
        out = self.unet(sample, timestep).sample
        features = self.projection(self.pool(out).flatten(1))
        if raw or self.config.kernel == "linear":
            return features
        return self.kernel_features(features, self.bandwidth_at(timestep))

    # ------------------------------------------------------------------ Gaussian kernel through RFF (§5)
    @staticmethod
    def bandwidth_bucket(timestep: torch.Tensor) -> torch.Tensor:
        """Bucket of ``rff_bandwidth`` each timestep reads: ``RFF_BUCKETS`` equal bins of [0, 1000)."""
        return (torch.as_tensor(timestep).long() * RFF_BUCKETS // 1000).clamp(0, RFF_BUCKETS - 1)

    def bandwidth_at(self, timestep: torch.Tensor) -> torch.Tensor:
        """The stored bandwidth for each timestep (B,). A bucket never measured (short runs) reads its
        nearest measured bucket; a model with none measured is refused."""
        bw = self.rff_bandwidth
        measured = (bw > 0).nonzero().flatten()
        if not len(measured):
            raise ValueError(
                "the Gaussian-kernel (rff_gaussian) discriminator has no bandwidth yet: train it, or call "
                "discriminator.calibrate_bandwidth(clean_samples) first"
            )
        buckets = self.bandwidth_bucket(timestep).to(bw.device)
        nearest = measured[(buckets[:, None] - measured[None, :]).abs().argmin(1)]
        return bw[torch.where(bw[buckets] > 0, buckets, nearest)]

    def kernel_features(self, features: torch.Tensor, bandwidth: torch.Tensor) -> torch.Tensor:
        """``psi(f) = sqrt(2/R) cos(W f / l + b)`` of raw features (B, D), ``bandwidth`` (B,), in float32
        (cosines of bf16 arguments would be noise): ``<psi(f), psi(f')>`` estimates ``exp(-|f-f'|²/(2 l²))``."""
        return rff_map(features.float() / bandwidth.to(features.device).float().view(-1, 1), self.rff_weight, self.rff_bias)

    @torch.no_grad()
    def update_bandwidth(self, features: torch.Tensor, levels: torch.Tensor, decay: float = 0.95, reduce=None) -> None:
        """Fold the median pairwise distance of each group's raw features ``features`` (G, m, D), at the
        groups' ``levels`` (G,), into the running bandwidth of their buckets (the first reading of a bucket
        is taken as it is). ``reduce`` sums over processes, so every process keeps the same values.

        Training passes a group's clean and noisy features pooled: the median heuristic over both samples.
        The clean features alone give a kernel as narrow as the data's own spread, and the noisy particles
        the sampler starts from then sit many bandwidths away, where the witness and its gradient vanish."""
        median = median_pairwise_distance(features.float())
        buckets = self.bandwidth_bucket(levels).to(median.device)
        sums = torch.zeros(RFF_BUCKETS, device=median.device).index_add_(0, buckets, median)
        counts = torch.zeros(RFF_BUCKETS, device=median.device).index_add_(0, buckets, torch.ones_like(median))
        if reduce is not None:
            sums, counts = reduce(sums), reduce(counts)
        seen = (counts > 0) & torch.isfinite(sums)  # a non-finite step (skipped by the loop) leaves it as it was
        reading = sums[seen] / counts[seen]
        old = self.rff_bandwidth[seen.to(self.rff_bandwidth.device)]
        new = torch.where(old > 0, decay * old + (1 - decay) * reading.to(old), reading.to(old))
        self.rff_bandwidth[seen.to(self.rff_bandwidth.device)] = new

    @torch.no_grad()
    def calibrate_bandwidth(self, clean: torch.Tensor, batch_size: int = 256, alphas_cumprod: torch.Tensor | None = None,
                            generator: torch.Generator | None = None) -> None:  # fmt: skip
        """Set every bucket's bandwidth to the median feature distance at the bucket's middle level, over
        ``clean`` (N, C, H, W; up to ``batch_size`` used) and, given the scheduler's ``alphas_cumprod``,
        their forward-noised copies pooled with them (as training measures it): a model that was not trained
        with this kernel (tests, conversions) can then compute statistics and sample."""
        x = clean[:batch_size].to(self.rff_bandwidth.device)
        for b in range(RFF_BUCKETS):
            level = (2 * b + 1) * 1000 // (2 * RFF_BUCKETS)
            t = torch.full((x.shape[0],), level, device=x.device)
            raw = self(x.to(self.dtype), t, raw=True).float()
            if alphas_cumprod is not None:
                a = alphas_cumprod[level].to(x.device, x.dtype)
                noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
                raw = torch.cat([raw, self((a.sqrt() * x + (1 - a).sqrt() * noise).to(self.dtype), t, raw=True).float()])
            self.rff_bandwidth[b] = median_pairwise_distance(raw[None])[0]

    def set_attention_slice(self, slice_size: int | str | None) -> None:
        """Attention in slices of ``slice_size`` heads (``"auto"``: half of them, ``"max"``: one at a
        time, ``None``: PyTorch's fused attention again); what ``pipe.enable_attention_slicing()`` calls."""
        from diffusers.models.attention_processor import Attention, AttnProcessor2_0, SlicedAttnProcessor

        class SlicedAttention(SlicedAttnProcessor):
            """diffusers' sliced attention, taking the ``temb`` UNet2DModel passes (unused: no spatial norm)."""

            def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
                return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask)

        layers = [m for m in self.modules() if isinstance(m, Attention)]
        for layer in layers:
            heads = layer.sliceable_head_dim
            if slice_size == "auto":
                size = max(1, heads // 2)
            elif slice_size == "max":
                size = 1
            elif slice_size is None or isinstance(slice_size, int):
                size = slice_size
            else:
                raise ValueError(f"slice_size must be 'auto', 'max', an int or None, got {slice_size!r}")
            if size is not None and not 1 <= size <= heads:
                raise ValueError(f"slice_size {size} must be between 1 and the {heads} heads of {type(layer).__name__}")
            layer.set_processor(AttnProcessor2_0() if size is None else SlicedAttention(size))

    def critic(self, sample: torch.Tensor, timestep: torch.Tensor | int) -> torch.Tensor:
        """The clipped KALE critic ``h(sample, timestep)`` of shape (B,) (``objective="kale"``)."""
        from ..kale import clip_critic

        if self.config.objective != "kale":
            raise ValueError("critic() is the KALE critic: this discriminator was built with objective='mmd'")
        return clip_critic(self(sample, timestep)[:, 0], self.config.critic_clip)

    # ------------------------------------------------------------------ reference statistics
    def _make_reference_buffers(self, levels: int, device: torch.device | None = None) -> None:
        d = self.feature_dim
        # empty placeholders stay out of the state dict (empty tensors look "shared" to savers)
        keep = levels > 0
        self.register_buffer("reference_timesteps", torch.zeros(levels, dtype=torch.long, device=device), keep)
        self.register_buffer("reference_alphas_cumprod", torch.zeros(levels, device=device), keep)
        self.register_buffer("reference_mean_data", torch.zeros(levels, d, device=device), keep)
        self.register_buffer("reference_mean_noised", torch.zeros(levels, d, device=device), keep)

    def weights_fingerprint(self, via: torch.dtype | None = None) -> str:
        """``weights_fingerprint`` of this model, cached until a parameter or a non-statistics buffer (the
        Gaussian kernel's bandwidth) changes (version counters)."""
        tensors = list(self.parameters()) + [b for n, b in self.named_buffers() if not n.split(".")[-1].startswith("reference_")]
        state = (via, tuple((id(p), p._version, p.dtype, p.device) for p in tensors))
        cache = self.__dict__.setdefault("_fingerprint_cache", {})
        if cache.get(via, (None,))[0] != state:
            cache[via] = (state, weights_fingerprint(self, via=via))
        return cache[via][1]

    def check_finite_weights(self) -> None:
        """``ValueError`` naming the first parameter holding NaN or inf (sampling with it gives black images)."""
        for name, p in self.named_parameters():
            if not torch.isfinite(p).all():
                raise ValueError(f"the discriminator weight {name} holds NaN or inf values: the model file is damaged")

    def statistics_are_current(self) -> bool:
        """Whether the stored statistics were computed with these weights, in any of fp32, bf16 or fp16."""
        stored = {self.config.reference_fingerprint, self.config.reference_fingerprint_fp16} - {None}
        return self.weights_fingerprint() in stored

    @property
    def has_reference_statistics(self) -> bool:
        return self.config.num_reference_levels > 0

    def set_reference_statistics(self, stats: ReferenceStatistics, vae=None) -> None:
        """Store ``m_P`` and ``m_Pt`` with the model, keyed by the current weights (and the VAE)."""
        if stats.mean_data.shape[-1] != self.feature_dim:
            raise ValueError(
                f"statistics have feature dimension {stats.mean_data.shape[-1]}, the model has {self.feature_dim}"
            )
        self._make_reference_buffers(len(stats.timesteps), device=self.unet.conv_in.weight.device)
        self.reference_timesteps.copy_(stats.timesteps)
        self.reference_alphas_cumprod.copy_(stats.alphas_cumprod)
        self.reference_mean_data.copy_(stats.mean_data)
        self.reference_mean_noised.copy_(stats.mean_noised)
        self.register_to_config(
            num_reference_levels=len(stats.timesteps),
            reference_fingerprint=self.weights_fingerprint(),
            reference_fingerprint_fp16=self.weights_fingerprint(via=torch.float16),
            reference_count=int(stats.count),
            reference_vae=vae_contract(vae),
        )

    def check_vae(self, vae) -> None:
        """Refuse an autoencoder other than the one the statistics were computed with."""
        stored, given = self.config.reference_vae, vae_contract(vae)
        if stored is None or given is None:
            return
        bad = [k for k in stored if stored[k] != given.get(k)]
        if bad:
            detail = ", ".join(f"{k}: statistics {stored[k]!r}, pipeline VAE {given.get(k)!r}" for k in bad)
            raise ValueError(f"mismatched reference statistics: they were computed with another autoencoder ({detail})")

    def reference_statistics(self, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> ReferenceStatistics:
        """Stored statistics for the levels ``timesteps``, after checking they are valid for them.

        Raises ``ValueError`` naming the problem when no statistics are stored, when the
        weights changed after they were computed, when a level is missing, or when the
        scheduler's forward process differs from the one they were computed with.
        """
        if not self.has_reference_statistics:
            raise ValueError(
                "this discriminator has no reference statistics; compute them with "
                "latent_dmmd.reference.compute_reference_statistics and store them with "
                "discriminator.set_reference_statistics(...), or sample with reference='data'"
            )
        if not self.statistics_are_current():
            raise ValueError(
                "stale reference statistics: the discriminator weights changed after the statistics were "
                "computed; recompute them for the current weights"
            )
        stored = self.reference_timesteps.tolist()
        index = {t: k for k, t in enumerate(stored)}
        missing = [int(t) for t in timesteps if int(t) not in index]
        if missing:
            raise ValueError(
                f"no reference statistics for timesteps {missing}: the stored grid is {stored}; choose "
                f"num_inference_steps and the scheduler grid they were computed for, or recompute them"
            )
        rows = torch.tensor([index[int(t)] for t in timesteps], device=self.reference_mean_data.device)
        expected = alphas_cumprod[torch.as_tensor(timesteps, dtype=torch.long).cpu()].to(rows.device)
        stored_acp = self.reference_alphas_cumprod[rows]
        # compared at the buffers' precision, so a .to(bfloat16) of the model is not a mismatch
        if not torch.allclose(stored_acp.float(), expected.to(stored_acp.dtype).float(), atol=_ALPHA_ATOL, rtol=0):
            raise ValueError(
                "mismatched reference statistics: they were computed with another forward process "
                "(alphas_cumprod differ at the sampling levels); use the scheduler config saved with the model"
            )
        bad = [int(t) for t, m, mt in zip(timesteps, self.reference_mean_data[rows], self.reference_mean_noised[rows])
               if not (torch.isfinite(m).all() and torch.isfinite(mt).all())]  # fmt: skip
        if bad:
            raise ValueError(f"non-finite reference statistics (NaN or inf) at timesteps {bad}: recompute them")
        return ReferenceStatistics(
            timesteps=torch.as_tensor(timesteps).cpu(),
            alphas_cumprod=stored_acp.cpu(),
            mean_data=self.reference_mean_data[rows],
            mean_noised=self.reference_mean_noised[rows],
            count=self.config.reference_count,
        )
