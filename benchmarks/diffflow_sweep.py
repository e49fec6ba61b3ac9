"""Issue #7 measurements at one fixed NFE: the DiffFlow sampler against its noise g and its
witness/score weight w, KALE against MMD, the adaptive grid against the uniform one, and the
effective-noise diagnostic of the trained model.

    python benchmarks/diffflow_sweep.py --dmmd outputs/celebahq_taef2_64/pipeline \
        --ddpm outputs/celebahq_taef2_64_ddpm/baseline --kale outputs/celebahq_taef2_64_kale/pipeline \
        --reference ../shared/data/celebahq256/images --reference_first_index 3500 --reference_count 500 \
        --statistics_data outputs/celebahq_taef2_64/latent_cache --num_samples 500 --name diffflow_celebahq64

Every point uses the same initial noise (per-image seeds), the same grid (T x N_s) and the same
reference images; FID/KID/precision/recall on the FID Inception features. Writes
benchmarks/results/<name>.{json,png} and <name>_effective_noise.png.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from common import RESULTS, add_name_arg, add_reference_args, add_sampling_args, plt, save_figure, write


def evaluate(pipe, metric, args, label, **call):
    from latent_dmmd.evaluation import generate

    images, seconds = generate(pipe, args.num_samples, args.batch_size, args.seed, num_inference_steps=None
                               if "timesteps" in call else args.levels, flow_steps_per_level=args.flow_steps, **call)  # fmt: skip
    metric.reset_fake()
    metric.update(images, real=False)
    sched = pipe.scheduler
    diffflow = {k: call.get(k) for k in ("noise_scale", "noise_schedule", "noise_mode", "score_weight")}
    cost = sched.nfe(**diffflow)  # per flow step: 3 for the witness, +1 for a score forward
    nfe = len(sched.timesteps) * args.flow_steps
    row = {"label": label, **{k: v for k, v in call.items() if k != "timesteps"}, "grid": sched.timesteps.tolist(),
           "nfe": nfe, "forward_equivalents": nfe * cost["forward_equivalents"] // cost["nfe"],
           "seconds_per_image": seconds / args.num_samples, **metric.compute()}  # fmt: skip
    print(json.dumps(row), flush=True)
    return row, images


def set_statistics(pipe, data, timesteps):
    from latent_dmmd.reference import compute_reference_statistics

    stats = compute_reference_statistics(pipe.discriminator, data.split(256), torch.as_tensor(timesteps),
                                         pipe.scheduler.alphas_cumprod, generator=torch.Generator().manual_seed(0))  # fmt: skip
    pipe.discriminator.set_reference_statistics(stats, vae=pipe.vae)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dmmd", required=True, help="DMMD pipeline folder")
    p.add_argument("--ddpm", required=True, help="--method ddpm baseline folder: its UNet is the score model")
    p.add_argument("--kale", default=None, help="pipeline folder of a KALE critic trained on the same data")
    add_reference_args(p, "reference images")
    p.add_argument("--statistics_data", required=True, help="latent cache: statistics for the adaptive grid and the trace")
    p.add_argument("--levels", type=int, default=10, help="T (fixed)")
    p.add_argument("--flow_steps", type=int, default=2, help="N_s (fixed): NFE = T x N_s")
    p.add_argument("--noise_scales", type=float, nargs="+", default=[0.3, 1.0, 3.0], help="g_0 values")
    p.add_argument("--score_weights", type=float, nargs="+", default=[0.25, 0.5, 0.75, 1.0], help="w values")
    p.add_argument("--weight_noise_scale", type=float, default=1.0, help="g_0 of the w sweep (score mode)")
    p.add_argument("--kale_step_sizes", type=float, nargs="+", default=[0.01, 0.1, 1.0], help="eta values for KALE")
    add_sampling_args(p)
    add_name_arg(p, "diffflow_sweep")
    args = p.parse_args()

    from diffusers import UNet2DModel

    from latent_dmmd import DMMDPipeline
    from latent_dmmd.diagnostics import adaptive_grid, plot_effective_noise, trace_effective_noise
    from latent_dmmd.evaluation import FIDKID, generate, output_resolution, reference_images, save_grid
    from latent_dmmd.latent_cache import LatentCacheDataset

    pipe = DMMDPipeline.from_pretrained(args.dmmd)
    pipe.register_modules(score_model=UNet2DModel.from_pretrained(os.path.join(args.ddpm, "unet")).eval())
    pipe.set_progress_bar_config(disable=True)
    data = LatentCacheDataset(args.statistics_data).tensors["mean"]
    uniform = pipe.scheduler.grid(args.levels).tolist()
    set_statistics(pipe, data, uniform)

    metric = FIDKID()
    for batch in reference_images(args.reference, output_resolution(pipe), args.reference_first_index, args.reference_count):
        metric.update(batch, real=True)

    rows = [evaluate(pipe, metric, args, "DMMD (g=0)")[0]]
    for mode in ("plain", "compensated", "score"):
        for g in args.noise_scales:
            rows.append(evaluate(pipe, metric, args, f"{mode} g0={g}", noise_scale=g, noise_mode=mode)[0])
    for w in args.score_weights:
        rows.append(evaluate(pipe, metric, args, f"score g0={args.weight_noise_scale} w={w}", noise_mode="score",
                             noise_scale=args.weight_noise_scale, score_weight=w)[0])  # fmt: skip

    # effective noise along the uniform grid, then the adaptive grid built from it
    held_out = data[-512:]
    trace = trace_effective_noise(pipe, held_out, num_images=256, seed=args.seed, num_inference_steps=args.levels,
                                  flow_steps_per_level=args.flow_steps)  # fmt: skip
    grid = adaptive_grid(trace["scheduled"], trace["effective"], t_min=pipe.scheduler.config.t_min)
    set_statistics(pipe, data, sorted(set(uniform) | set(grid), reverse=True))
    adaptive_row, _ = evaluate(pipe, metric, args, "DMMD adaptive grid", timesteps=grid)
    rows.append(adaptive_row)
    trace_adaptive = trace_effective_noise(pipe, held_out, num_images=256, seed=args.seed, timesteps=grid,
                                           flow_steps_per_level=args.flow_steps)  # fmt: skip
    traces = {"uniform grid": trace, "adaptive grid": trace_adaptive}

    if args.kale:
        kale = DMMDPipeline.from_pretrained(args.kale)
        kale.set_progress_bar_config(disable=True)
        for eta in args.kale_step_sizes:  # KALE's velocity has its own scale: sweep eta, and DMMD's alike
            rows.append(evaluate(kale, metric, args, f"KALE eta={eta}", step_size=eta)[0])
            if eta != pipe.scheduler.config.step_size:
                set_statistics(pipe, data, uniform)
                rows.append(evaluate(pipe, metric, args, f"DMMD eta={eta}", step_size=eta)[0])
        best = min((r for r in rows if r["label"].startswith("KALE")), key=lambda r: r["fid"])
        images, _ = generate(kale, 64, 64, args.seed, num_inference_steps=args.levels,
                             flow_steps_per_level=args.flow_steps, step_size=best["step_size"])  # fmt: skip
        save_grid(images, os.path.join(RESULTS, f"{args.name}_kale_samples.png"))

    record = {"benchmark": "DiffFlow / KALE / adaptive grid at fixed NFE", "args": vars(args), "rows": rows,
              "trace": {k: {"scheduled": v["scheduled"], "effective": v["effective"]} for k, v in traces.items()},
              "adaptive_grid": grid}  # fmt: skip
    path = write(args.name, record)
    plot_effective_noise(traces, path.replace(".json", "_effective_noise.png"),
                         title=f"Effective noise, T={args.levels} x N_s={args.flow_steps}")  # fmt: skip

    pyplot = plt()
    fig, axes = pyplot.subplots(1, 2, figsize=(10, 4))
    base = rows[0]
    for mode in ("plain", "compensated", "score"):
        sel = [base] + [r for r in rows if r.get("noise_mode") == mode and not r.get("score_weight")]
        axes[0].plot([r.get("noise_scale", 0) for r in sel], [r["fid"] for r in sel], "o-", label=mode)
    axes[0].set_xscale("symlog", linthresh=0.1)
    axes[0].set(xlabel="noise scale g0 (g = g0 sigma_t)", ylabel="FID",
                title=f"FID vs g, NFE {base['nfe']}")  # fmt: skip
    axes[0].legend()
    sel = [r for r in rows if r.get("noise_mode") == "score" and r.get("noise_scale") == args.weight_noise_scale]
    sel = sorted(sel, key=lambda r: r.get("score_weight") or 0)
    ws = [r.get("score_weight") or 0 for r in sel]
    axes[1].plot(ws, [r["fid"] for r in sel], "o-", label="FID")
    ax2 = axes[1].twinx()
    ax2.plot(ws, [r.get("recall", float("nan")) for r in sel], "s--", color="C1", label="recall")
    axes[1].set(xlabel="score weight w (0: DMMD + score churn, 1: annealed Langevin)", ylabel="FID",
                title=f"score mode, g0={args.weight_noise_scale}")  # fmt: skip
    ax2.set_ylabel("recall")
    save_figure(fig, path)


if __name__ == "__main__":
    main()
