"""Benchmark b: cost of one flow step relative to one discriminator forward on the same batch.

For particle_mean ensemble / forward_marginal and reference cached / data, across N = 1, 8,
64, 256 particles, with the discriminator of configs/celebahq_taef2_64.yaml (random weights:
timing only). Ratios are taken side by side in one process. Peak memory: torch's profiler is
not reliable on CPU, so each configuration's peak RSS is read in a fresh subprocess.

    python benchmarks/sampler_cost.py            # writes benchmarks/results/sampler_cost.{json,png}
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import torch
from common import RESULTS, add_name_arg, latent64_discriminator, plt, save_figure, timeit, write

MODES = [("ensemble", "cached"), ("forward_marginal", "cached"), ("ensemble", "data"), ("forward_marginal", "data")]


def setup(n: int, particle_mean: str, reference: str, data_size: int):
    from latent_dmmd.flow import data_reference, sample_flow
    from latent_dmmd.reference import compute_reference_statistics
    from latent_dmmd.schedulers import DMMDScheduler

    disc = latent64_discriminator()
    sched = DMMDScheduler(num_inference_steps=1, particle_mean=particle_mean, reference=reference)
    data = torch.randn(data_size, 32, 8, 8, generator=torch.Generator().manual_seed(1))
    stats = compute_reference_statistics(disc, [data], sched.timesteps, sched.alphas_cumprod)
    ref = data_reference(disc, data) if reference == "data" else stats.mean_data
    z = torch.randn(n, 32, 8, 8, generator=torch.Generator().manual_seed(2))
    t = torch.full((n,), int(sched.timesteps[0]))

    def step():
        sample_flow(disc, z, sched.timesteps, ref, flow_steps=1, update=0.1, particle_mean=particle_mean,
                    marginal_means=stats.mean_noised)  # fmt: skip

    def forward():
        with torch.no_grad():
            disc(z, t)

    return step, forward


def peak_rss_mb(n: int, mode: tuple[str, str], data_size: int) -> float:
    code = (f"import sys; sys.path.insert(0, {RESULTS!r} + '/..'); import resource, sampler_cost as b; "
            f"s, _ = b.setup({n}, {mode[0]!r}, {mode[1]!r}, {data_size}); s(); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 8, 64, 256], help="particle counts N")
    p.add_argument("--data_size", type=int, default=256, help="data batch behind reference='data'")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement")
    add_name_arg(p, "sampler_cost")
    p.add_argument("--no_memory", action="store_true", help="skip the peak-RSS subprocesses")
    args = p.parse_args()
    rows = []
    baseline_rss = None
    for n in args.sizes:
        for mode in MODES:
            step, forward = setup(n, *mode, args.data_size)
            ts, tf = timeit(step, args.repeats), timeit(forward, args.repeats)
            row = {"n": n, "particle_mean": mode[0], "reference": mode[1], "flow_step": ts, "forward": tf,
                   "step_over_forward": ts["median_s"] / tf["median_s"],
                   "step_seconds_per_particle": ts["median_s"] / n}  # fmt: skip
            if not args.no_memory:
                row["peak_rss_mb"] = peak_rss_mb(n, mode, args.data_size)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k not in ("flow_step", "forward")}), flush=True)
    if not args.no_memory:
        baseline_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    path = write(args.name, {"benchmark": "flow step / discriminator forward", "model": "celebahq_taef2_64 discriminator, random weights",
                             "rows": rows, "parent_peak_rss_mb": baseline_rss})  # fmt: skip
    pyplot = plt()
    fig, axes = pyplot.subplots(1, 2, figsize=(11, 4))
    for mode in MODES:
        sel = [r for r in rows if (r["particle_mean"], r["reference"]) == mode]
        label = f"{mode[0]}, reference={mode[1]}"
        axes[0].plot([r["n"] for r in sel], [r["step_over_forward"] for r in sel], "o-", label=label)
        axes[1].plot([r["n"] for r in sel], [1e3 * r["step_seconds_per_particle"] for r in sel], "o-", label=label)
    axes[0].axhline(3, color="gray", ls="--", label="target: 3x a forward")
    axes[0].set(xscale="log", xlabel="particles N", ylabel="flow step / forward (same batch)")
    axes[1].set(xscale="log", yscale="log", xlabel="particles N", ylabel="ms per particle per flow step")
    axes[0].legend(fontsize=7)
    fig.suptitle("Sampler cost (CPU, celebahq_taef2_64 discriminator)")
    save_figure(fig, path)


if __name__ == "__main__":
    main()
