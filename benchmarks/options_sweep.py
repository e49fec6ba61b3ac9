"""Benchmark e: the options the paper leaves open, FID at one fixed NFE.

Training options (the two l2 readings, the gradient-penalty weight) need one model each: every
variant trains from the same base config with one override, for the same number of steps and
the same seed. Sampling options (particle_mean, the T x N_s split) reuse the base model.

    python benchmarks/options_sweep.py --config configs/celebahq_taef2_64.yaml \
        --train_args --block_out_channels 32 64 --train_batch_size 32 --max_train_steps 600 \
        --latent_cache_dir outputs/celebahq_taef2_64/latent_cache -- \
        --reference ../shared/data/celebahq256/images --reference_first_index 3500 --reference_count 500 \
        --num_samples 500 --nfe 20 --name options_celebahq64

Writes benchmarks/results/<name>.{json,png}; the trained variants go to outputs/<name>/<variant>.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from common import add_name_arg, add_reference_args, add_sampling_args, plt, save_figure, write

VARIANTS = {  # name: training overrides on top of the base config
    "base (l2=feature, gp=1)": [],
    "l2=witness": ["--l2_mode", "witness"],
    "gp=0": ["--lambda_gp", "0"],
    "gp=0.1": ["--lambda_gp", "0.1"],
    "gp=10": ["--lambda_gp", "10"],
}


def train_variants(args, train_args) -> dict[str, str]:
    from accelerate.state import AcceleratorState

    from latent_dmmd.training import main as train_main

    folders = {}
    for i, (name, extra) in enumerate(VARIANTS.items()):
        out = os.path.join("outputs", args.name, f"variant{i}")
        folder = os.path.join(out, "pipeline")
        if not os.path.isdir(folder):  # resumable: a finished variant is not retrained
            train_main(["--config", args.config, *train_args, *extra, "--output_dir", out, "--report_to", "none",
                        "--validation_steps", "0"])  # fmt: skip
            AcceleratorState._reset_state(True)
        folders[name] = folder
    return folders


def main():
    argv = sys.argv[1:]
    train_args = []
    if "--train_args" in argv:
        start = argv.index("--train_args")
        end = argv.index("--", start)
        train_args, argv = argv[start + 1 : end], argv[:start] + argv[end + 1 :]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="base training config")
    add_reference_args(p, "reference images")
    p.add_argument("--nfe", type=int, default=20, help="the fixed NFE")
    p.add_argument("--levels", type=int, nargs="+", default=[5, 10, 20], help="T values of the split sweep")
    add_sampling_args(p)
    add_name_arg(p, "options_sweep")
    args = p.parse_args(argv)

    from latent_dmmd import DMMDPipeline
    from latent_dmmd.evaluation import FIDKID, generate, output_resolution, reference_images
    from latent_dmmd.latent_cache import LatentCacheDataset
    from latent_dmmd.reference import compute_reference_statistics
    from latent_dmmd.training import load_config

    folders = train_variants(args, train_args)
    config = load_config(["--config", args.config, *train_args])
    data = LatentCacheDataset(config.cache_dir).tensors["mean"]
    rows, metric = [], None
    for name, folder in folders.items():
        pipe = DMMDPipeline.from_pretrained(folder)
        pipe.set_progress_bar_config(disable=True)
        if metric is None:
            metric = FIDKID()
            for batch in reference_images(args.reference, output_resolution(pipe), args.reference_first_index,
                                          args.reference_count):  # fmt: skip
                metric.update(batch, real=True)
        sched = pipe.scheduler
        grids = [t for t in args.levels if args.nfe % t == 0] if name.startswith("base") else [10]
        times = torch.cat([sched.grid(t) for t in grids]).unique().flip(0)
        stats = compute_reference_statistics(pipe.discriminator, data.split(256), times, sched.alphas_cumprod,
                                             generator=torch.Generator().manual_seed(0))  # fmt: skip
        pipe.discriminator.set_reference_statistics(stats, vae=pipe.vae)
        settings = [(f"{name}", "ensemble", 10)]
        if name.startswith("base"):
            settings += [("particle_mean=forward_marginal", "forward_marginal", 10)]
            settings += [(f"T={t} x N_s={args.nfe // t}", "ensemble", t) for t in grids if t != 10]
        for label, mean, levels in settings:
            pipe.scheduler.register_to_config(particle_mean=mean)
            images, seconds = generate(pipe, args.num_samples, args.batch_size, args.seed, num_inference_steps=levels,
                                       flow_steps_per_level=args.nfe // levels)  # fmt: skip
            metric.reset_fake()
            metric.update(images, real=False)
            rows.append({"label": label, "variant": name, "particle_mean": mean, "levels": levels,
                         "flow_steps": args.nfe // levels, "nfe": args.nfe,
                         "seconds_per_image": seconds / args.num_samples, **metric.compute()})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)

    path = write(args.name, {"benchmark": "open options at fixed NFE", "args": vars(args), "train_args": train_args,
                             "variants": VARIANTS, "rows": rows})  # fmt: skip
    pyplot = plt()
    fig, ax = pyplot.subplots(figsize=(7, 3.5))
    ax.barh([r["label"] for r in rows], [r["fid"] for r in rows], color="C0")
    ax.invert_yaxis()
    ax.set(xlabel=f"FID ({args.num_samples} samples, NFE {args.nfe})", title="Open options of DMMD")
    save_figure(fig, path)


if __name__ == "__main__":
    main()
