"""Which sampler settings give the best samples on this model? One sweep entry for every sampler question: step
sizes and step rules, the T x N_s split, DiffFlow noise and score weight, remedies, KALE against MMD, training
variants, scored by FID/KID/precision/recall against reference images and/or by energy distance to training data.

    python benchmarks/sweep.py --model dmmd=models/celebahq-taef2-64-dmmd \
        --score_model benchmarks/runs/celeba64/ddpm_4988/baseline --vae ../shared/weights/taef2 \
        --reference ../shared/data/celebahq256/images --reference_first_index 3500 --reference_count 500 \
        --real_features c64_ref.pt --num_samples 2000 --rows remedies.jsonl \
        --arm plain --arm "beta=1:noise_injection=1" --arm "tweedie:final_denoise=tweedie" \
        --arm "rff@rff" --name remedies_celebahq64

An arm is ``LABEL[@MODEL][:KEY=VALUE,...]``: the model (default: the first ``--model``) and the options that differ
from its saved sampler. A key of ``DMMDPipeline.__call__`` is passed to the call; ``levels`` and ``flow_steps`` set
the arm's T x N_s (default ``--levels`` x ``--flow_steps``); ``timesteps`` an explicit grid (``980/700/...``); any
other key must be a scheduler config key (``step_size_schedule``, ``noise_injection_schedule``, ``drift_scale``, ...)
and is set on a copy of the model's scheduler for that arm. ``--grid KEY=V1,V2`` (repeatable) adds one arm per
combination of the values on every model: ``--grid step_size=0.1,0.3,1,3`` is the step-size sweep,
``--grid noise_mode=plain,score --grid noise_scale=0.3,1,3`` the DiffFlow one. ``--train NAME=FLAGS`` trains a
variant of ``--config`` first (one model per training option, same seed and steps) and sweeps it as model NAME.

Scores: ``--reference`` images give FID, KID, precision and recall (held-out images for a report; training images
to choose a setting); ``--energy_data`` (a latent cache or training images) gives the energy distance of the final
particles to 256 training samples, a bandwidth-free selection that needs no Inception pass. ``--statistics_data``
recomputes each model's reference statistics on every grid its arms use. Every arm uses the same per-image seeds.
Each finished row is appended to ``--rows`` (JSON lines) and an arm whose label is there is skipped: a run resumes,
and two processes may share the file with different arms. ``--plot_only`` writes benchmarks/results/<name>.{json,png}
from the rows alone. Results of the former per-question scripts (options_sweep, diffflow_sweep, sampler_remedies,
select_sampler, tune_step_size; see git history) still render with report.py.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os

from common import (
    add_name_arg,
    add_real_features_arg,
    add_reference_args,
    add_sampling_args,
    plt,
    reference_metric,
    save_figure,
    write,
)

ARM_KEYS = ("levels", "flow_steps", "timesteps")  # an arm's grid, not a call or scheduler option


def parse_value(text: str):
    if "/" in text:  # a grid: 980/700/400
        return [parse_value(part) for part in text.split("/")]
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"none": None, "true": True, "false": False}.get(text.lower(), text)


def parse_arm(spec: str, models: list[str]) -> dict:
    """``LABEL[@MODEL][:KEY=VALUE,...]`` -> {"label", "model", "options"}."""
    head, _, tail = spec.partition(":")
    label, _, model = head.partition("@")
    model = model or models[0]
    if not label:
        raise SystemExit(f"arm {spec!r} has no label")
    if model not in models:
        raise SystemExit(f"arm {spec!r} names model {model!r}; the models are {', '.join(models)}")
    options = {}
    for item in filter(None, tail.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise SystemExit(f"arm {spec!r}: option {item!r} is not KEY=VALUE")
        options[key.strip()] = parse_value(value.strip())
    return {"label": label, "model": model, "options": options}


def grid_arms(grids: list[str], models: list[str]) -> list[dict]:
    """``--grid KEY=V1,V2`` flags -> one arm per combination of their values, on every model."""
    import itertools

    axes = []
    for spec in grids:
        key, eq, values = spec.partition("=")
        if not eq or not values:
            raise SystemExit(f"--grid {spec!r} is not KEY=V1,V2,...")
        axes.append([(key.strip(), parse_value(v.strip())) for v in values.split(",")])
    arms = []
    for model in models if axes else []:
        for combo in itertools.product(*axes):
            label = " ".join(f"{k}={v}" for k, v in combo) + (f"@{model}" if len(models) > 1 else "")
            arms.append({"label": label, "model": model, "options": dict(combo)})
    return arms


def split_options(pipe, options: dict) -> tuple[dict, dict]:
    """(call kwargs, scheduler config overrides); unknown keys are refused before any work."""
    call_keys = set(inspect.signature(type(pipe).__call__).parameters) - {"self", *ARM_KEYS}
    call = {k: v for k, v in options.items() if k in call_keys}
    config = {k: v for k, v in options.items() if k not in call_keys and k not in ARM_KEYS}
    unknown = [k for k in config if k not in pipe.scheduler.config]
    if unknown:
        raise SystemExit(f"unknown option(s) {unknown}: neither DMMDPipeline.__call__ arguments nor scheduler config keys")
    return call, config


def arm_grid(pipe, arm: dict, args) -> tuple[int, int, list[int] | None]:
    """(T, N_s, explicit timesteps or None) of an arm."""
    options = arm["options"]
    timesteps = options.get("timesteps")
    levels = len(timesteps) if timesteps else int(options.get("levels", args.levels))
    return levels, int(options.get("flow_steps", args.flow_steps)), timesteps


def score_arm(pipe, arm, metric, args, energy_data=None) -> dict:
    """One arm's samples, scored by ``metric`` (FID/KID/P/R; None to skip) and by their energy distance to
    ``energy_data`` (training samples, as particles; None to skip)."""
    from latent_dmmd.diagnostics import noise_memory
    from latent_dmmd.evaluation import generate
    from latent_dmmd.mmd import energy_distance

    call, config = split_options(pipe, arm["options"])
    levels, flow_steps, timesteps = arm_grid(pipe, arm, args)
    where = {"timesteps": timesteps} if timesteps else {"num_inference_steps": levels}
    saved = pipe.scheduler
    # a copy of the model's scheduler with this arm's settings and N_s (its NFE count reads the config); the
    # reference statistics live in the discriminator, so they are shared
    pipe.scheduler = type(saved).from_config(saved.config, flow_steps_per_level=flow_steps, **config)
    try:
        particles = {}
        images, seconds = generate(pipe, args.num_samples, args.batch_size, args.seed, particles=particles,
                                   **where, **call)  # fmt: skip
        sched = pipe.scheduler
        diffflow = {k: call.get(k) for k in ("noise_scale", "noise_schedule", "noise_mode", "score_weight")}
        cost = sched.nfe(final_denoise=call.get("final_denoise"), **diffflow)
        settings = {k: sched.config[k] for k in ("step_size", "step_size_schedule", "noise_injection",
                                                   "noise_injection_schedule", "final_denoise", "drift_scale")}  # fmt: skip
        settings.update({k: v for k, v in call.items() if v is not None})
        grid = sched.timesteps.tolist()
    finally:
        pipe.scheduler = saved
    row = {"label": arm["label"], "model": arm["model"], "options": arm["options"], "settings": settings,
           "levels": levels, "flow_steps": flow_steps, "grid": grid, **cost,
           "noise_memory_r2": noise_memory(particles["initial"], particles["final"])["r2"],
           "seconds_per_image": seconds / args.num_samples, "num_fake": args.num_samples}  # fmt: skip
    if energy_data is not None:
        final = particles["final"][: args.energy_particles].flatten(1)
        row["energy_distance_train"] = float(energy_distance(final, energy_data.flatten(1)))
    if metric is not None:
        metric.reset_fake()
        metric.update(images, real=False)
        row.update(metric.compute())
    return row


def training_samples(path: str, pipe, count: int | None = None, seed: int = 0):
    """Clean training samples as the flow sees them (a latent cache, or images encoded by the model's autoencoder)."""
    from latent_dmmd.generator_training import training_particles

    return training_particles(path, pipe, count, seed)


def set_statistics(pipe, data, arms: list[dict], args) -> None:
    """The model's reference statistics recomputed on every level its arms visit (their grids' union)."""
    import torch

    from latent_dmmd.reference import compute_reference_statistics

    sched = pipe.scheduler
    grids = [torch.as_tensor(t) if t else sched.grid(n) for n, _, t in (arm_grid(pipe, a, args) for a in arms)]
    times = torch.cat(grids).unique().flip(0)
    stats = compute_reference_statistics(pipe.discriminator, data.split(256), times, sched.alphas_cumprod,
                                         generator=torch.Generator().manual_seed(0))  # fmt: skip
    pipe.discriminator.set_reference_statistics(stats, vae=pipe.vae)


def train_variants(args) -> dict[str, str]:
    """``--train NAME=FLAGS``: each variant trained from ``--config`` with ``--train_args`` and its own flags, into
    ``outputs/<name>/<NAME>`` (a finished variant is not retrained)."""
    import shlex

    from accelerate.state import AcceleratorState

    from latent_dmmd.training import main as train_main

    folders = {}
    for spec in args.train:
        name, _, flags = spec.partition("=")
        out = os.path.join("outputs", args.name, name)
        if not os.path.isdir(os.path.join(out, "pipeline")):
            train_main(["--config", args.config, *shlex.split(args.train_args), *shlex.split(flags), "--output_dir", out,
                        "--report_to", "none", "--validation_steps", "0"])  # fmt: skip
            AcceleratorState._reset_state(True)
        folders[name] = os.path.join(out, "pipeline")
    return folders


def read_rows(path: str | None) -> list[dict]:
    if not path or not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot(rows: list[dict], baseline: str, path: str) -> None:
    """FID against recall, one point per arm, with the target region of issue #13 shaded: every arm on the
    left (labels for the far ones), the arms near the baseline arm enlarged on the right. Without FID: the
    energy distance of every arm, as bars."""
    pyplot = plt()
    grid = f"NFE {rows[0]['levels'] * rows[0]['flow_steps']} (T={rows[0]['levels']} x N_s={rows[0]['flow_steps']})"
    if "fid" not in rows[0]:
        fig, ax = pyplot.subplots(figsize=(7, 0.3 * len(rows) + 1.5))
        ax.barh([r["label"] for r in rows], [r["energy_distance_train"] for r in rows], color="C0")
        ax.invert_yaxis()
        ax.set(xscale="log", xlabel="energy distance to training samples", title=f"Sampler sweep at {grid}")
        save_figure(fig, path)
        return
    fig, (ax_all, ax_near) = pyplot.subplots(1, 2, figsize=(13, 5))
    base = next((r for r in rows if r["label"] == baseline), None)
    limit = 1.2 * base["fid"] if base is not None else float("inf")
    for ax, near in ((ax_all, False), (ax_near, True)):
        shown = [r for r in rows if r["fid"] <= limit] if near else rows
        placed = []
        for r in shown:
            is_base = r["label"] == baseline
            ax.scatter(r["recall"], r["fid"], s=40 if is_base else 22, color="k" if is_base else "C0", zorder=3)
            if near or r["fid"] > limit or is_base:
                close = sum(abs(r["recall"] - x) < 1e-3 and abs(r["fid"] / y - 1) < 0.03 for x, y in placed)
                ax.annotate(r["label"], (r["recall"], r["fid"]), fontsize=7, xytext=(3, 3 - 9 * close),
                            textcoords="offset points")  # fmt: skip
                placed.append((r["recall"], r["fid"]))
        if not near:
            ax.set_yscale("log")
        if base is not None:  # recall >= 2x and FID <= +5 % of the baseline arm
            right = max(0.05, 1.2 * max(r["recall"] for r in shown))
            bottom = ax.get_ylim()[0]
            ax.fill_between([2 * base["recall"], right], bottom, 1.05 * base["fid"], color="g", alpha=0.12,
                            label="target: recall >= 2x, FID <= +5 %")  # fmt: skip
            ax.set_ylim(bottom=bottom)
            ax.legend(fontsize=8)
        ax.set(xlabel="recall (k-NN, k = 3)", ylabel=f"FID ({rows[0]['num_fake']} samples)")
    ax_all.set_title(f"Sampler sweep at {grid}: every arm")
    ax_near.set_title(f"the arms within +20 % FID of {baseline!r}")
    save_figure(fig, path)


def load_pipes(models: dict, todo: list[dict], args) -> dict:
    from diffusers import UNet2DModel

    from latent_dmmd import DMMDPipeline
    from latent_dmmd.autoencoders import load_autoencoder

    vae = load_autoencoder(args.vae) if args.vae else None
    score = UNet2DModel.from_pretrained(os.path.join(args.score_model, "unet")).eval() if args.score_model else None
    pipes = {}
    for name in dict.fromkeys(a["model"] for a in todo):
        pipe = DMMDPipeline.from_pretrained(models[name])
        pipe = DMMDPipeline(discriminator=pipe.discriminator, scheduler=pipe.scheduler, vae=pipe.vae or vae,
                            score_model=score)  # fmt: skip
        pipe.set_progress_bar_config(disable=True)
        for arm in todo:  # refuse a bad option before the first (long) arm runs
            if arm["model"] == name:
                split_options(pipe, arm["options"])
        pipes[name] = pipe
    return pipes


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", default=[], help="NAME=FOLDER: a DMMD pipeline (repeatable)")
    p.add_argument("--arm", action="append", default=[], help="LABEL[@MODEL][:KEY=VALUE,...] (repeatable)")
    p.add_argument("--grid", action="append", default=[], help="KEY=V1,V2,...: one arm per combination, every model")
    p.add_argument("--config", default=None, help="base training config of --train variants")
    p.add_argument("--train", action="append", default=[], help='NAME="--flag value ...": a variant to train and sweep')
    p.add_argument("--train_args", default="", help="flags every --train variant shares (e.g. a shorter run)")
    p.add_argument("--score_model", default=None,
                   help="--method ddpm baseline folder: its UNet becomes every pipeline's score_model (Tweedie, score mode)")
    p.add_argument("--vae", default=None, help="autoencoder of latent models saved without one")
    add_reference_args(p, "images for FID/KID/precision/recall (held-out to report, training to choose)", required=False)
    add_real_features_arg(p)
    p.add_argument("--energy_data", default=None, help="latent cache or training images: energy distance of each arm")
    p.add_argument("--energy_particles", type=int, default=256, help="final particles (and training samples) it compares")
    p.add_argument("--statistics_data", default=None, help="latent cache or images: statistics on every arm's grid")
    p.add_argument("--levels", type=int, default=10, help="T of arms that do not set levels")
    p.add_argument("--flow_steps", type=int, default=2, help="N_s of arms that do not set flow_steps")
    p.add_argument("--kid_subset_size", type=int, default=100, help="KID subset size")
    p.add_argument("--rows", default=None, help="JSON-lines file the rows are appended to (and resumed from)")
    p.add_argument("--baseline", default="plain", help="label of the arm the others are compared with (plot)")
    p.add_argument("--plot_only", action="store_true", help="write the JSON and plot from --rows, score nothing")
    add_sampling_args(p)
    add_name_arg(p, "sweep")
    args = p.parse_args(argv)

    models = dict(item.split("=", 1) if "=" in item else ("dmmd", item) for item in args.model)
    if args.train:
        if not args.config:
            p.error("--train needs --config")
        models.update(train_variants(args))
    if not models:
        p.error("give --model and/or --train")
    if not (args.reference or args.energy_data or args.plot_only):
        p.error("give --reference (FID/KID/precision/recall) and/or --energy_data (energy distance)")
    arms = [parse_arm(spec, list(models)) for spec in args.arm] + grid_arms(args.grid, list(models))
    arms = arms or [{"label": name, "model": name, "options": {}} for name in models]
    done, new = {r["label"] for r in read_rows(args.rows)}, []
    todo = [a for a in arms if a["label"] not in done]
    if not args.plot_only and todo:
        from latent_dmmd.records import output_resolution

        pipes = load_pipes(models, todo, args)
        metric = None
        if args.reference:
            resolution = {output_resolution(pipe) for pipe in pipes.values()}
            if len(resolution) != 1:
                raise SystemExit(f"the models decode to different resolutions: {sorted(resolution)}")
            metric = reference_metric(args, resolution.pop(), args.kid_subset_size)
        for name, pipe in pipes.items():
            if args.statistics_data:
                set_statistics(pipe, training_samples(args.statistics_data, pipe), [a for a in arms if a["model"] == name], args)
        energy = {}
        for arm in todo:
            pipe = pipes[arm["model"]]
            if args.energy_data and arm["model"] not in energy:
                energy[arm["model"]] = training_samples(args.energy_data, pipe, args.energy_particles)
            row = score_arm(pipe, arm, metric, args, energy.get(arm["model"]))
            print(json.dumps(row), flush=True)
            new.append(row)
            if args.rows:
                with open(args.rows, "a") as f:
                    f.write(json.dumps(row) + "\n")
    rows = read_rows(args.rows) if args.rows else new
    order = {a["label"]: i for i, a in enumerate(arms)}
    rows = sorted((r for r in rows if r["label"] in order), key=lambda r: order[r["label"]])
    if not rows:
        raise SystemExit("no rows to write")
    path = write(args.name, {"benchmark": "sampler sweep at fixed NFE", "args": vars(args), "rows": rows})
    plot(rows, args.baseline, path)
    return rows


if __name__ == "__main__":
    main()
