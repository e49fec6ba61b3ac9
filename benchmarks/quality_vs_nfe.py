"""Benchmark a: FID/KID against NFE, DMMD (several T x N_s splits) vs DDIM and DDPM on the same
backbone, forward process and data.

    python benchmarks/quality_vs_nfe.py --dmmd outputs/celebahq_taef2_64/pipeline \
        --ddpm outputs/celebahq_taef2_64_ddpm/baseline --reference ../shared/data/celebahq256/images \
        --reference_first_index 3500 --reference_count 500 --num_samples 500 --name quality_celebahq64

DMMD splits at NFE n use T levels x n/T steps for each T in --levels that divides n; the
statistics must exist for those grids (compute them with --recompute_statistics, which uses
--statistics_data). Writes benchmarks/results/<name>.{json,png}.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time

import torch
from common import (
    add_name_arg,
    add_real_features_arg,
    add_reference_args,
    add_sampling_args,
    plt,
    reference_metric,
    save_figure,
    save_sample_grid,
    write,
)


def dmmd_points(pipe, nfes, levels_list, args, metric, stats_data, model="dmmd"):
    from latent_dmmd.diagnostics import noise_memory
    from latent_dmmd.evaluation import generate
    from latent_dmmd.reference import compute_reference_statistics

    rows = []
    grids = sorted({t for n in nfes for t in levels_list if n % t == 0 and n // t >= 1})
    if stats_data is not None:  # statistics for the union of the grids, with the model's weights
        sched = pipe.scheduler
        times = torch.cat([sched.grid(t) for t in grids]).unique().flip(0)
        pipe.discriminator.set_reference_statistics(
            compute_reference_statistics(pipe.discriminator, stats_data.split(256), times, sched.alphas_cumprod,
                                         generator=torch.Generator().manual_seed(0)),
            vae=pipe.vae,
        )
    for n in nfes:
        for t in levels_list:
            if n % t:
                continue
            particles = {}
            images, seconds = generate(pipe, args.num_samples, args.batch_size, args.seed, particles=particles,
                                       num_inference_steps=t, flow_steps_per_level=n // t)  # fmt: skip
            save_sample_grid(images, args.name, f"{model}_nfe{n}_T{t}", args.save_grid)
            metric.reset_fake()
            metric.update(images, real=False)
            m = metric.compute()
            rows.append({"method": "dmmd", "model": model, "nfe": n, "levels": t, "flow_steps": n // t,
                         "forward_equivalents": 3 * n, "step_size": pipe.scheduler.config.step_size,
                         "step_size_schedule": pipe.scheduler.config.step_size_schedule,
                         "noise_memory_r2": noise_memory(particles["initial"], particles["final"])["r2"],
                         "seconds_per_image": seconds / args.num_samples, **m})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    return rows


@functools.cache
def autoencoder(path: str):
    """One load per autoencoder folder in a run (the resolution probe and the sampling share it)."""
    from latent_dmmd.autoencoders import load_autoencoder

    return load_autoencoder(path)


def baseline_vae(folder: str, vae: str | None) -> str | None:
    """The autoencoder of a baseline folder: its ``vae/``, else ``--vae`` (a latent baseline saved without one)."""
    inside = os.path.join(folder, "vae")
    return inside if os.path.isdir(inside) else vae


def baseline_points(folder, nfes, args, metric, stats_data=None):
    from diffusers import DDPMScheduler, UNet2DModel

    from latent_dmmd.baselines import baseline_scheduler, sample_baseline
    from latent_dmmd.evaluation import to_uint8

    unet = UNet2DModel.from_pretrained(os.path.join(folder, "unet")).eval()
    vae_path = baseline_vae(folder, args.vae)
    vae = autoencoder(vae_path) if vae_path else None
    betas = DDPMScheduler.from_pretrained(os.path.join(folder, "scheduler"))  # same betas as the DMMD model
    rows, clip = [], args.clip_sample_range
    if clip is None:  # pixels lie in [-1, 1] (diffusers' default clipping); latents: their training range
        clip = 1.0 if vae is None else (float(stats_data.abs().max()) if stats_data is not None else None)
    for kind in args.baseline_kinds:
        sched = baseline_scheduler(betas, kind, clip_sample_range=clip, timestep_spacing=args.timestep_spacing)
        for n in nfes + (args.ddpm_full if kind == "ddpm" else []):
            start, chunks = time.perf_counter(), []
            for first in range(0, args.num_samples, args.batch_size):
                k = min(args.batch_size, args.num_samples - first)
                gens = [torch.Generator().manual_seed(args.seed + first + i) for i in range(k)]
                chunks.append(to_uint8(((sample_baseline(unet, sched, k, n, gens, vae) + 1) / 2).clamp(0, 1)))
            seconds = time.perf_counter() - start
            images = torch.cat(chunks)
            save_sample_grid(images, args.name, f"{kind}_nfe{n}", args.save_grid)
            metric.reset_fake()
            metric.update(images, real=False)
            rows.append({"method": kind, "nfe": n, "forward_equivalents": n, "clip_sample_range": clip,
                         "timestep_spacing": args.timestep_spacing,
                         "seconds_per_image": seconds / args.num_samples, **metric.compute()})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dmmd", action="append", default=[],
                   help="DMMD pipeline folder, or NAME=FOLDER (repeatable: every model is scored at every point)")
    p.add_argument("--ddpm", default=None, help="baseline folder written by --method ddpm (unet/, scheduler/, vae/)")
    p.add_argument("--vae", default=None,
                   help="autoencoder of latent models saved without one (TAEF2 or diffusers folder, or Hub id)")
    add_reference_args(p, "reference images")
    p.add_argument("--nfe", type=int, nargs="*", default=[10, 20, 50, 100], help="NFE values (none: only --ddpm_full points)")
    p.add_argument("--levels", type=int, nargs="+", default=[5, 10], help="DMMD T values to split each NFE into")
    add_sampling_args(p)
    p.add_argument("--kid_subset_size", type=int, default=100, help="KID subset size")
    p.add_argument("--statistics_data", default=None,
                   help="latent cache or image folder to recompute statistics for every grid (default: stored ones)")  # fmt: skip
    p.add_argument("--clip_sample_range", type=float, default=None,
                   help="baselines clip predicted x0 to [-r, r] (default: 1 in pixel space, the training latents' max |z|)")
    p.add_argument("--reuse_dmmd", default=None, help="results JSON (or printed JSON lines) whose DMMD rows are reused, not recomputed")
    p.add_argument("--timestep_spacing", default="trailing", choices=["leading", "trailing", "linspace"],
                   help="baselines' diffusers timestep spacing (trailing starts every run at t = 999)")
    p.add_argument("--baseline_kinds", nargs="+", default=["ddim", "ddpm"], choices=["ddim", "ddpm"],
                   help="which baseline samplers to score")
    p.add_argument("--ddpm_full", type=int, nargs="*", default=[],
                   help="extra DDPM-only NFE points (e.g. 1000: the full ancestral chain, the sanity check)")
    p.add_argument("--save_grid", type=int, default=0,
                   help="save each row's first N images (seeds seed..seed+N-1) as results/<name>_<row>.png")
    add_real_features_arg(p)
    add_name_arg(p, "quality_vs_nfe")
    args = p.parse_args()

    from latent_dmmd import DMMDPipeline
    from latent_dmmd.evaluation import output_resolution
    from latent_dmmd.latent_cache import LatentCacheDataset

    models = [item.split("=", 1) if "=" in item else ("dmmd", item) for item in args.dmmd]
    if not models and not args.ddpm:
        p.error("give --dmmd and/or --ddpm")
    pipes = {}
    for name, folder in models:
        pipe = DMMDPipeline.from_pretrained(folder)
        if pipe.vae is None and args.vae:  # a latent model shipped without its autoencoder: attach it
            pipe = DMMDPipeline(discriminator=pipe.discriminator, scheduler=pipe.scheduler, vae=autoencoder(args.vae))
        pipe.set_progress_bar_config(disable=True)
        pipes[name] = pipe
    pipe = next(iter(pipes.values()), None)
    stats_data = None
    if args.statistics_data:
        stats_data = LatentCacheDataset(args.statistics_data).tensors["mean"]
    if pipe is not None:
        resolution = output_resolution(pipe)
    else:  # baselines only: the resolution of what the baseline decodes to
        from diffusers import UNet2DModel

        from latent_dmmd.autoencoders import decode_latents

        c = UNet2DModel.load_config(os.path.join(args.ddpm, "unet"))
        vae_dir = baseline_vae(args.ddpm, args.vae)
        resolution = c["sample_size"]
        if vae_dir:
            with torch.no_grad():
                z = torch.zeros(1, c["in_channels"], c["sample_size"], c["sample_size"])
                resolution = int(decode_latents(autoencoder(vae_dir), z).shape[-1])
    metric = reference_metric(args, resolution, args.kid_subset_size)
    if args.reuse_dmmd:  # DMMD rows of an earlier run with the same protocol (e.g. to redo the baselines)
        with open(args.reuse_dmmd) as f:  # a results JSON, or the JSON lines a run printed
            text = f.read()
        try:
            found = json.loads(text)["rows"]
        except json.JSONDecodeError:
            found = [json.loads(line) for line in text.splitlines() if line.startswith('{"')]
        rows = [r for r in found if r["method"] == "dmmd"]
    else:
        rows = []
        for name, model_pipe in pipes.items():
            rows += dmmd_points(model_pipe, args.nfe, args.levels, args, metric, stats_data, model=name)
    if args.ddpm:
        rows += baseline_points(args.ddpm, args.nfe, args, metric, stats_data)
    path = write(args.name, {"benchmark": "FID/KID vs NFE", "args": vars(args), "rows": rows})
    pyplot = plt()
    fig, (ax, ax_r) = pyplot.subplots(1, 2, figsize=(11, 4))
    for label in sorted({(r["method"], r.get("model"), r.get("levels")) for r in rows}, key=str):
        sel = [r for r in rows if (r["method"], r.get("model"), r.get("levels")) == label]
        name = f"{label[1] or 'DMMD'} T={label[2]}" if label[0] == "dmmd" else label[0].upper()
        ax.plot([r["nfe"] for r in sel], [r["fid"] for r in sel], "o-", label=name)
        if "recall" in sel[0]:
            ax_r.plot([r["nfe"] for r in sel], [r["recall"] for r in sel], "o-", label=name)
    ax.set(xscale="log", xlabel="NFE", ylabel=f"FID ({args.num_samples} samples)")
    ax_r.set(xscale="log", xlabel="NFE", ylabel="recall (k-NN, k = 3)")
    ax.legend(fontsize=7)
    save_figure(fig, path)


if __name__ == "__main__":
    main()
