"""Reference statistics of method §4: ``m_P(t_k)`` and ``m_Pt(t_k)`` over a dataset.

The statistics are stored with the model and keyed by the network weights and the
forward process at each level, so a sampler can refuse stale or mismatched ones.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .mmd import FeatureFn
from .seeding import keyed_randn


@dataclass
class ReferenceStatistics:
    """Per-level feature means over clean and forward-noised data (T, D each)."""

    timesteps: torch.Tensor  # (T,) long, the levels the means belong to
    alphas_cumprod: torch.Tensor  # (T,) the forward process at those levels
    mean_data: torch.Tensor  # (T, D) m_P(t_k)
    mean_noised: torch.Tensor  # (T, D) m_Pt(t_k)
    count: int  # number of data samples behind each mean


def weights_fingerprint(
    module: torch.nn.Module, exclude_prefix: str = "reference_", via: torch.dtype | None = None
) -> str:
    """SHA-256 of a module's parameters, rounded to bfloat16 so ``.to(bf16)`` is not "stale".

    ``via=torch.float16`` rounds through float16 first: the fingerprint that the same weights
    have after ``.to(float16)`` (fp16 then bf16 is not always bf16 directly: double rounding).
    Buffers whose name starts with ``exclude_prefix`` (the statistics themselves) are left out.
    """
    digest = hashlib.sha256()
    tensors = list(module.named_parameters()) + [
        (n, b) for n, b in module.named_buffers() if not n.split(".")[-1].startswith(exclude_prefix)
    ]
    for name, tensor in sorted(tensors, key=lambda item: item[0]):
        digest.update(name.encode())
        values = tensor.detach().to("cpu")
        if via is not None and values.is_floating_point():
            values = values.to(via)
        values = values.to(torch.bfloat16).contiguous().view(torch.int16)
        digest.update(values.numpy().tobytes())
    return digest.hexdigest()


@torch.no_grad()
def compute_reference_statistics(
    phi: FeatureFn,
    batches: Iterable[torch.Tensor],
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    reduce=None,
    progress: bool = False,
    total: int | None = None,
) -> ReferenceStatistics:
    """Compute ``m_P(t_k)`` and ``m_Pt(t_k)`` for every level ``t_k`` of ``timesteps``.

    ``batches`` yields clean samples (B, …), or ``(samples, keys)`` pairs; each sample is
    noised with its own ``eps`` at every level, drawn from ``generator`` or, when keys are
    given, from a generator seeded by ``(*key, level)`` (so the split of the data does not matter). Sums are accumulated in float64. ``reduce(sum_tensor) -> sum_tensor`` is
    applied to the sums and the count before dividing, which is how several processes
    agree (``accelerator.reduce(x, "sum")``): the result equals one process seeing all data.
    ``progress`` shows a bar over samples (``total`` of them, when known).
    """
    timesteps = torch.as_tensor(timesteps, dtype=torch.long).cpu()
    acp = alphas_cumprod[timesteps].float()
    alpha, sigma = acp.sqrt(), (1 - acp).sqrt()
    sum_data = sum_noised = None
    count = 0
    bar = tqdm(total=total, desc="reference statistics", unit="sample", disable=not progress)
    for item in batches:
        x0, keys = item if isinstance(item, (tuple, list)) else (item, None)
        n = x0.shape[0]
        bar.update(n)
        for k, t in enumerate(timesteps):
            t_batch = torch.full((n,), int(t), device=x0.device, dtype=torch.long)
            if keys is None:
                eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
            else:
                eps = keyed_randn([(*key, int(t)) for key in keys], x0.shape[1:], device=x0.device, dtype=x0.dtype)
            xt = alpha[k].to(x0) * x0 + sigma[k].to(x0) * eps
            f_data = phi(x0, t_batch).double().sum(0)
            f_noised = phi(xt, t_batch).double().sum(0)
            if sum_data is None:
                sum_data = torch.zeros(len(timesteps), f_data.numel(), dtype=torch.float64, device=f_data.device)
                sum_noised = torch.zeros_like(sum_data)
            sum_data[k] += f_data
            sum_noised[k] += f_noised
        count += n
    bar.close()
    if sum_data is None:
        raise ValueError("no data: cannot compute reference statistics from an empty dataset")
    count_t = torch.tensor([float(count)], dtype=torch.float64, device=sum_data.device)
    if reduce is not None:
        sum_data, sum_noised, count_t = reduce(sum_data), reduce(sum_noised), reduce(count_t)
    return ReferenceStatistics(
        timesteps=timesteps,
        alphas_cumprod=acp,
        mean_data=(sum_data / count_t).float().cpu(),
        mean_noised=(sum_noised / count_t).float().cpu(),
        count=int(count_t.item()),
    )
