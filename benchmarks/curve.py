"""Learning curves of long training runs (issue 27): FID, KID, precision and recall of DMMD (its default sampler)
and of the DDPM baseline (DDIM at NFE 20 and 100, ancestral DDPM at 100) against training steps and seconds.

    python benchmarks/curve.py --dmmd_run outputs/curve_fashion32_dmmd --ddpm_run outputs/curve_fashion32_ddpm \\
        --steps 1000 2000 4000 8000 --reference /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz \\
        --num_samples 1000 --last_num_samples 2000 --name curve_fashion32

Each point is a checkpoint of a run, exported exactly as the run would have exported had it ended there
(``latent_dmmd.training.export_checkpoint``: EMA weights, reference statistics over the training data, step sizes
calibrated on training data). The baseline is scored at the same steps and, for each DMMD point, at its checkpoint
nearest in optimisation seconds (the ``progress.jsonl`` clock of both runs, trained side by side). Rows are kept in
``benchmarks/results/<name>.json`` as they are made; a rerun with more ``--steps`` scores only the new points.
``python benchmarks/curve.py --report NAME`` prints the table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import time

import torch
from common import (
    RESULTS,
    add_name_arg,
    add_real_features_arg,
    add_reference_args,
    plt,
    reference_metric,
    run_summary,
    save_figure,
    write,
)

BASELINE_POINTS = (("ddim", 20), ("ddim", 100), ("ddpm", 100))


def progress(run: str) -> dict[int, float]:
    """``{step: optimisation seconds}`` of a run's checkpoints (its ``progress.jsonl``)."""
    path = os.path.join(run, "progress.jsonl")
    if not os.path.isfile(path):
        raise SystemExit(f"{path} is missing: the run was not trained with a clock (train it with this version)")
    with open(path) as f:
        return {r["step"]: r["optimize_seconds"] for r in map(json.loads, f)}


def export_folder(kind: str, run: str, step: int, scratch: str) -> str:
    return os.path.join(scratch, f"{kind}_{os.path.basename(os.path.normpath(run))}_{step}")


def exported(kind: str, run: str, step: int, scratch: str, overrides: list[str]) -> str:
    """The exported folder of ``run``'s checkpoint-``step`` (exported once, then reused)."""
    from latent_dmmd.training import export_checkpoint

    out = export_folder(kind, run, step, scratch)
    for folder in ("pipeline", "baseline"):
        if os.path.isdir(os.path.join(out, folder)):
            return os.path.join(out, folder)
    checkpoint = os.path.join(run, f"checkpoint-{step}")
    if not os.path.isdir(checkpoint):
        raise SystemExit(f"{checkpoint} does not exist (checkpoints: {sorted(progress(run))})")
    folder = export_checkpoint(checkpoint, out, overrides)
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)  # the next export builds its own Accelerator
    return folder


def resolution(folder: str, kind: str = "ddpm") -> int:
    """Side of the images an exported folder samples: a DMMD pipeline, or a baseline (its UNet, decoded by its VAE)."""
    from latent_dmmd.records import output_resolution

    if kind == "dmmd":
        from latent_dmmd import DMMDPipeline

        return output_resolution(DMMDPipeline.from_pretrained(folder))
    from diffusers import UNet2DModel

    from latent_dmmd.autoencoders import decode_latents, load_autoencoder

    config = UNet2DModel.load_config(os.path.join(folder, "unet"))
    if not os.path.isdir(os.path.join(folder, "vae")):
        return config["sample_size"]
    z = torch.zeros(1, config["in_channels"], config["sample_size"], config["sample_size"])
    return int(decode_latents(load_autoencoder(os.path.join(folder, "vae")), z).shape[-1])


def score(images: torch.Tensor, metric) -> dict:
    metric.reset_fake()
    metric.update(images, real=False)
    return metric.compute()


def dmmd_row(folder: str, num: int, args, metric) -> dict:
    from latent_dmmd import DMMDPipeline
    from latent_dmmd.diagnostics import noise_memory
    from latent_dmmd.evaluation import generate

    pipe = DMMDPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    particles = {}
    images, seconds = generate(pipe, num, args.batch_size, args.seed, particles=particles, progress=True)
    cfg = pipe.scheduler.config
    info = run_summary(folder)
    return {"nfe": cfg.num_inference_steps * cfg.flow_steps_per_level, "sampler": cfg.step_size_schedule or "constant",
            "statistics_samples": info.get("reference_count"), "step_size_selection": info.get("step_size_selection"),
            "step_size": cfg.step_size, "noise_memory_r2": noise_memory(particles["initial"], particles["final"])["r2"],
            "seconds_per_image": seconds / num, **score(images, metric)}  # fmt: skip


def baseline_rows(folder: str, num: int, args, metric, skip=(), on_row=None) -> list[dict]:
    """DDIM/DDPM rows of a baseline folder at ``BASELINE_POINTS`` (those in ``skip`` left out); ``on_row`` gets each
    row as soon as it is scored (so a stopped run keeps it)."""
    from diffusers import DDPMScheduler, UNet2DModel

    from latent_dmmd.autoencoders import load_autoencoder
    from latent_dmmd.baselines import baseline_scheduler, sample_baseline
    from latent_dmmd.records import to_uint8

    unet = UNet2DModel.from_pretrained(os.path.join(folder, "unet")).eval()
    vae = load_autoencoder(os.path.join(folder, "vae")) if os.path.isdir(os.path.join(folder, "vae")) else None
    betas = DDPMScheduler.from_pretrained(os.path.join(folder, "scheduler"))
    clip = args.clip_sample_range if args.clip_sample_range is not None else (1.0 if vae is None else None)
    rows = []
    for kind, nfe in BASELINE_POINTS:
        if (kind, nfe) in skip:
            continue
        sched = baseline_scheduler(betas, kind, clip_sample_range=clip, timestep_spacing="trailing")
        chunks, seconds = [], 0.0
        for first in range(0, num, args.batch_size):
            k = min(args.batch_size, num - first)
            gens = [torch.Generator().manual_seed(args.seed + first + i) for i in range(k)]
            start = time.perf_counter()
            images = sample_baseline(unet, sched, k, nfe, gens, vae)
            seconds += time.perf_counter() - start
            chunks.append(to_uint8(((images + 1) / 2).clamp(0, 1)))
        rows.append({"method": kind, "nfe": nfe, "clip_sample_range": clip, "seconds_per_image": seconds / num,
                     **score(torch.cat(chunks), metric)})  # fmt: skip
        if on_row is not None:
            on_row(rows[-1])
    return rows


def nearest_in_seconds(clock: dict[int, float], seconds: float) -> int:
    return min(clock, key=lambda s: abs(math.log(clock[s] / seconds)))


def plot(rows: list[dict], path: str) -> None:
    pyplot = plt()
    fig, axes = pyplot.subplots(1, 3, figsize=(15, 4.2))
    curves = sorted({(r["method"], r["nfe"], rule(r)) for r in rows}, key=lambda c: (c[0] != "dmmd", c))
    for method, nfe, how in curves:
        sel = sorted((r for r in rows if (r["method"], r["nfe"], rule(r)) == (method, nfe, how)), key=lambda r: r["step"])
        label = f"{method.upper()} NFE {nfe}" + (f" ({how})" if how else "")
        style = "o-" if method == "dmmd" else "s--"
        axes[0].plot([r["step"] for r in sel], [r["fid"] for r in sel], style, label=label)
        axes[1].plot([r["train_seconds"] / 3600 for r in sel], [r["fid"] for r in sel], style, label=label)
        axes[2].plot([r["step"] for r in sel], [r["recall"] for r in sel], style, label=label)
    axes[0].set(xscale="log", yscale="log", xlabel="training steps", ylabel="FID", title="equal steps")
    axes[1].set(xscale="log", yscale="log", xlabel="optimisation hours (one thread, side by side)", ylabel="FID",
                title="equal training time")  # fmt: skip
    axes[2].set(xscale="log", xlabel="training steps", ylabel="recall (k-NN, k = 3)", ylim=(0, 1))
    axes[0].legend(fontsize=8)
    save_figure(fig, path)


def rule(row: dict) -> str:
    """A DMMD row's step rule: calibrated per level, or the constant eta the export selected."""
    if row["method"] != "dmmd" or "sampler" not in row:
        return ""
    return "calibrated" if row["sampler"] == "calibrated" else f"eta {row['step_size']:.3g}"


def report(rows: list[dict]) -> str:
    """The curve as a markdown table: per step, DMMD and every baseline point (equal steps, then equal seconds)."""
    lines = ["| step | optimisation s | sampler | NFE | samples | FID | KID | precision | recall | compared at |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for r in sorted(rows, key=lambda r: (r["step"], r["method"] != "dmmd", r["method"], r["nfe"])):
        name = r["method"].upper() + (f" ({rule(r)})" if rule(r) else "")
        lines.append(f"| {r['step']:,} | {r['train_seconds']:,.0f} | {name} | {r['nfe']} | {r['num_fake']:,} | {r['fid']:.1f} | "
                     f"{r['kid']:.4f} | {r['precision']:.3f} | {r['recall']:.3f} | {r['comparison'].replace('_', ' ')} |")  # fmt: skip
    return "\n".join(lines)


PARTS = ("dmmd", "equal_steps", "equal_seconds")  # a point's DMMD row, its DDPM rows at equal steps, at equal seconds


def merge(name: str, others: list[str]) -> list[dict]:
    """Fold the rows of other curve results (the same curve scored in parts) into ``name``: a row already there
    (method, step, NFE, samples, comparison) is kept as it is; then the JSON and plot are rewritten."""
    path = os.path.join(RESULTS, f"{name}.json")
    with open(path) as f:
        record = json.load(f)
    key = lambda r: (r["method"], r["step"], r["nfe"], r["num_fake"], r["comparison"])
    have = {key(r) for r in record["rows"]}
    for other in others:
        with open(os.path.join(RESULTS, f"{other}.json")) as f:
            theirs = json.load(f)
        new = [r for r in theirs["rows"] if key(r) not in have]
        record["rows"] += new
        have |= {key(r) for r in new}
        for kind, clock in theirs.get("clock", {}).items():  # the longer clock (a run that went on since)
            if len(clock) > len(record.get("clock", {}).get(kind, {})):
                record.setdefault("clock", {})[kind] = clock
        print(f"{other}: {len(new)} rows merged into {name}")
    record["rows"].sort(key=lambda r: (r["step"], r["method"] != "dmmd", r["comparison"], r["method"], r["nfe"]))
    write(name, {k: v for k, v in record.items() if k != "environment"})
    plot(record["rows"], path)
    return record["rows"]


def main(argv: list[str] | None = None) -> list[dict]:
    if argv is None:
        import sys

        argv = sys.argv[1:]
    if argv[:1] == ["--report"]:  # curve.py --report NAME
        with open(os.path.join(RESULTS, f"{argv[1]}.json")) as f:
            print(report(json.load(f)["rows"]))
        return []
    if argv[:1] == ["--merge"]:  # curve.py --merge NAME OTHER...
        return merge(argv[1], argv[2:])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dmmd_run", required=True, help="output folder of a DMMD run (its checkpoint-N and progress.jsonl)")
    p.add_argument("--ddpm_run", default=None, help="output folder of the --method ddpm run on the same backbone")
    p.add_argument("--steps", type=int, nargs="+", required=True, help="DMMD checkpoints to score (their steps)")
    add_reference_args(p, "held-out reference images")
    p.add_argument("--num_samples", type=int, default=1000, help="generated images per point")
    p.add_argument("--last_num_samples", type=int, default=2000, help="generated images at the largest --steps")
    p.add_argument("--batch_size", type=int, default=250, help="particles per flow / images per sampler call")
    p.add_argument("--seed", type=int, default=0, help="first per-image seed")
    p.add_argument("--clip_sample_range", type=float, default=None,
                   help="baselines clip predicted x0 to [-r, r] (default: 1 for pixel models, no clipping in latent space)")
    p.add_argument("--export_flags", default="--step_size_schedule calibrated",
                   help="training flags of the DMMD exports, one string (default: step sizes calibrated on training "
                        "data, the library's rule; e.g. add --reference_max_samples 2000 for cheaper statistics)")
    p.add_argument("--scratch", default="runs/curve", help="folder of the exported checkpoints")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                   help="score only these parts of each point (to split one curve over processes, each with its own "
                        "--name; then `curve.py --merge NAME OTHER...`)")
    p.add_argument("--equal_seconds", choices=("all", "last", "none"), default="all",
                   help="score the DDPM checkpoint nearest in seconds for every DMMD point, the last only, or none "
                        "(the baseline's own points still plot against their seconds)")  # fmt: skip
    add_real_features_arg(p)
    add_name_arg(p, "curve")
    args = p.parse_args(argv)

    path = os.path.join(RESULTS, f"{args.name}.json")
    rows = []
    if os.path.isfile(path):
        with open(path) as f:
            rows = json.load(f)["rows"]
    done = {(r["method"], r["step"], r["nfe"], r["num_fake"]) for r in rows}
    dmmd_clock = progress(args.dmmd_run)
    ddpm_clock = progress(args.ddpm_run) if args.ddpm_run else {}
    metric = None

    def save():
        write(args.name, {"benchmark": "learning curves (issue 27)", "args": vars(args), "rows": rows,
                          "clock": {"dmmd": dmmd_clock, "ddpm": ddpm_clock}})  # fmt: skip
        plot(rows, path)

    for step in sorted(args.steps):
        num = args.last_num_samples if step == max(args.steps) else args.num_samples
        todo = [("dmmd", args.dmmd_run, step, "equal_steps")]
        if args.ddpm_run:
            todo.append(("ddpm", args.ddpm_run, step, "equal_steps"))
            if step in dmmd_clock and (args.equal_seconds == "all" or args.equal_seconds == "last" and step == max(args.steps)):
                todo.append(("ddpm", args.ddpm_run, nearest_in_seconds(ddpm_clock, dmmd_clock[step]), "equal_seconds"))
        todo = [t for t in todo if (t[0] if t[0] == "dmmd" else t[3]) in args.parts]
        for kind, run, at, comparison in todo:
            nfes = [n for m, n in BASELINE_POINTS] if kind == "ddpm" else [None]
            if kind == "dmmd" and any(r["method"] == "dmmd" and r["step"] == at and r["num_fake"] == num
                                      and r["folder"].startswith(export_folder("dmmd", run, at, args.scratch)) for r in rows):
                continue  # this export (its scratch folder: its step rule) is scored at this sample count
            if kind == "ddpm" and all(any(k[1:] == (at, n, num) for k in done) for n in nfes):
                continue
            clock = dmmd_clock if kind == "dmmd" else ddpm_clock
            if at not in clock:
                print(f"skipping {kind} step {at}: no checkpoint yet")
                continue
            folder = exported(kind, run, at, args.scratch, shlex.split(args.export_flags) if kind == "dmmd" else [])
            if metric is None:  # at the resolution the models output (decoded, in latent space)
                metric = reference_metric(args, resolution(folder, kind))
            base = {"step": at, "train_seconds": clock[at], "num_fake": num, "num_real": len(metric.real_features()),
                    "comparison": comparison, "folder": folder}  # fmt: skip

            def keep(row, base=base):
                row = {**row, **base} if row["method"] != "dmmd" else {"method": "dmmd", **base, **row}
                print(json.dumps(row), flush=True)
                done.add((row["method"], row["step"], row["nfe"], row["num_fake"]))
                rows.append(row)
                save()

            if kind == "dmmd":
                keep({"method": "dmmd", **dmmd_row(folder, num, args, metric)})
            else:
                have = {(m, n) for m, s_, n, f in done if s_ == at and f == num}
                baseline_rows(folder, num, args, metric, skip=have, on_row=keep)
    if rows:
        save()
    return rows


if __name__ == "__main__":
    main()
