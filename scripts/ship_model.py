"""Turn a trained run into a model folder that can live in the repository (or on the Hub).

    python scripts/ship_model.py outputs/fashion_mnist_pixel32_cpu models/fashion-mnist-dmmd \
        --metrics outputs/fashion_mnist_pixel32_cpu/metrics.json --sample-grid --dataset fashion_mnist

    python scripts/ship_model.py outputs/celebahq_taef2_64 models/celebahq-taef2-64-dmmd --drop-vae \
        --metrics outputs/celebahq_taef2_64/metrics.json --dataset celebahq \
        --data-terms "CelebA-HQ is for non-commercial research ..." --vae-note "..."

The run folder is what ``scripts/train_latent.py`` wrote (``pipeline/``, ``config.yaml``,
``training_summary.json``). ``--drop-vae`` saves the discriminator and scheduler only: the
discriminator keeps the autoencoder contract (class, factors, channels) it was trained with, so
the pipeline refuses a mismatched autoencoder and says how to attach the right one.
``--sample-grid`` writes ``samples.png`` into the folder (never use it for face data).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile

import torch
import yaml


def benchmark_metrics(pipe, benchmark: str, path: str, resolution: int, model: str | None = None) -> None:
    """A metrics.json (the ``latent-dmmd evaluate`` format) from the quality benchmark's DMMD row
    that used this model's saved sampler (T, N_s, step size); ``model`` picks the row's model name
    when the benchmark scored several."""
    from latent_dmmd.evaluation import sampling_protocol, write_metrics

    with open(benchmark) as f:
        record = json.load(f)
    cfg = pipe.scheduler.config
    rows = [r for r in record["rows"] if r["method"] == "dmmd" and r["levels"] == cfg.num_inference_steps
            and r["flow_steps"] == cfg.flow_steps_per_level and r.get("step_size") == cfg.step_size
            and (model is None or r.get("model", "dmmd") == model)]  # fmt: skip
    if not rows:
        raise SystemExit(f"{benchmark} has no DMMD row at T={cfg.num_inference_steps}, N_s={cfg.flow_steps_per_level}, "
                         f"eta={cfg.step_size}")  # fmt: skip
    row, a = rows[0], record["args"]
    folders = a["dmmd"] if isinstance(a["dmmd"], list) else [a["dmmd"]]  # NAME=FOLDER items, or one folder
    named = dict(item.split("=", 1) if "=" in item else ("dmmd", item) for item in folders)
    protocol = sampling_protocol(pipe, named.get(row.get("model", "dmmd"), folders[0]), row["num_fake"], row["num_real"], resolution,
                                 a["reference"], a["reference_first_index"], row["seconds_per_image"] * row["num_fake"],
                                 {}, particles_per_batch=a["batch_size"], seed=a["seed"])  # fmt: skip
    protocol["source"] = benchmark
    write_metrics(path, {k: row[k] for k in ("fid", "kid", "kid_std", "num_fake", "num_real", "precision", "recall")
                         if k in row}, protocol)  # fmt: skip


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="training output folder (holds pipeline/, config.yaml, training_summary.json)")
    p.add_argument("dest", help="folder to write (replaced if it exists)")
    p.add_argument("--drop-vae", action="store_true", help="save without the autoencoder's weights")
    p.add_argument("--metrics", default=None, help="metrics.json of latent-dmmd evaluate for the card")
    p.add_argument("--metrics-from-benchmark", default=None,
                   help="benchmarks/results/quality_*.json instead: its DMMD row at the model's own sampler settings")  # fmt: skip
    p.add_argument("--benchmark-model", default=None, help="the model name of the row to take (several in one benchmark)")
    p.add_argument("--sample-grid", action="store_true", help="write samples.png (16 images, seed 0) into the folder")
    p.add_argument("--dataset", nargs="+", default=None, help="dataset ids for the card metadata")
    p.add_argument("--data-terms", default=None, help="terms of the training data, stated under limitations")
    p.add_argument("--vae-note", default=None, help="how to attach the autoencoder (with --drop-vae)")
    p.add_argument("--limitation", action="append", default=[], help="extra limitation bullet (repeatable)")
    args = p.parse_args(argv)

    from latent_dmmd import DMMDPipeline
    from latent_dmmd.evaluation import output_resolution, save_grid
    from latent_dmmd.hub import write_model_card

    pipe = DMMDPipeline.from_pretrained(os.path.join(args.run, "pipeline"))
    resolution = output_resolution(pipe)
    if args.drop_vae:
        pipe = DMMDPipeline(discriminator=pipe.discriminator, scheduler=pipe.scheduler)
    with open(os.path.join(args.run, "config.yaml")) as f:
        config = yaml.safe_load(f)
    with open(os.path.join(args.run, "training_summary.json")) as f:
        info = json.load(f)
    tmp = args.dest.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        if args.sample_grid:
            pipe.set_progress_bar_config(disable=True)
            images = pipe(num_images=16, generator=torch.Generator().manual_seed(0), output_type="pt").images
            save_grid(images, os.path.join(tmp, "samples.png"), nrow=8)
        with tempfile.TemporaryDirectory() as scratch:
            metrics = args.metrics
            if args.metrics_from_benchmark:
                metrics = os.path.join(scratch, "metrics.json")
                benchmark_metrics(pipe, args.metrics_from_benchmark, metrics, resolution, args.benchmark_model)
            write_model_card(
                tmp, config, info, metrics_file=metrics, sample_grid="samples.png" if args.sample_grid else None,
                datasets=args.dataset, data_terms=args.data_terms, vae_note=args.vae_note,
                limitations=args.limitation, name=os.path.basename(os.path.normpath(args.dest)),
            )  # fmt: skip
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # no half-written folder left behind
        raise
    shutil.rmtree(args.dest, ignore_errors=True)
    os.replace(tmp, args.dest)
    print("wrote", args.dest)


if __name__ == "__main__":
    main()
