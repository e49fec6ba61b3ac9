"""Issue #13 measurements: the sampler remedies of method §5 and §7 against the plain DMMD sampler
of the same model, at one fixed grid (T x N_s), on the quality protocol (FID, KID, precision, recall).

    python benchmarks/sampler_remedies.py --model dmmd=models/celebahq-taef2-64-dmmd \
        --score_model benchmarks/runs/celeba64/ddpm_4988/baseline --vae ../shared/weights/taef2 \
        --reference ../shared/data/celebahq256/images --reference_first_index 3500 --reference_count 500 \
        --real_features c64_ref.pt --num_samples 2000 --rows remedies.jsonl \
        --arm plain --arm "beta=1:noise_injection=1" --arm "tweedie:final_denoise=tweedie" \
        --arm "rff@rff" --name remedies_celebahq64

An arm is ``LABEL[@MODEL][:KEY=VALUE,...]``: the model (default: the first ``--model``) and the
options that differ from its saved sampler. A key of ``DMMDPipeline.__call__`` is passed to the call;
any other key must be a scheduler config key (``noise_injection_schedule``, ``step_size_schedule``,
``final_denoise_steps``, ``drift_scale``, ...) and is set on a copy of the model's scheduler for that arm.
Every arm uses the same per-image seeds. Each finished row is appended to ``--rows`` (JSON lines), and
an arm whose label is already there is skipped: a run resumes, and two processes may share the file
with different arms. ``--plot_only`` writes benchmarks/results/<name>.{json,png} from the rows alone.
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


def parse_value(text: str):
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


def split_options(pipe, options: dict) -> tuple[dict, dict]:
    """(call kwargs, scheduler config overrides); unknown keys are refused before any work."""
    call_keys = set(inspect.signature(type(pipe).__call__).parameters) - {"self"}
    call = {k: v for k, v in options.items() if k in call_keys}
    config = {k: v for k, v in options.items() if k not in call_keys}
    unknown = [k for k in config if k not in pipe.scheduler.config]
    if unknown:
        raise SystemExit(f"unknown option(s) {unknown}: neither DMMDPipeline.__call__ arguments nor scheduler config keys")
    return call, config


def score_arm(pipe, arm, metric, args) -> dict:
    from latent_dmmd.diagnostics import noise_memory
    from latent_dmmd.evaluation import generate

    call, config = split_options(pipe, arm["options"])
    saved = pipe.scheduler
    # a copy of the model's scheduler with this arm's settings and the benchmark's N_s (its NFE count reads the
    # config); the reference statistics live in the discriminator, so they are shared
    pipe.scheduler = type(saved).from_config(saved.config, flow_steps_per_level=args.flow_steps, **config)
    try:
        particles = {}
        images, seconds = generate(pipe, args.num_samples, args.batch_size, args.seed, particles=particles,
                                   num_inference_steps=args.levels, **call)  # fmt: skip
        sched = pipe.scheduler
        diffflow = {k: call.get(k) for k in ("noise_scale", "noise_schedule", "noise_mode", "score_weight")}
        cost = sched.nfe(final_denoise=call.get("final_denoise"), **diffflow)
        settings = {k: sched.config[k] for k in ("step_size", "step_size_schedule", "noise_injection",
                                                   "noise_injection_schedule", "final_denoise", "drift_scale")}  # fmt: skip
        settings.update({k: v for k, v in call.items() if v is not None})
    finally:
        pipe.scheduler = saved
    metric.reset_fake()
    metric.update(images, real=False)
    row = {"label": arm["label"], "model": arm["model"], "options": arm["options"], "settings": settings,
           "levels": args.levels, "flow_steps": args.flow_steps, **cost,
           "noise_memory_r2": noise_memory(particles["initial"], particles["final"])["r2"],
           "seconds_per_image": seconds / args.num_samples, **metric.compute()}  # fmt: skip
    return row


def read_rows(path: str | None) -> list[dict]:
    if not path or not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot(rows: list[dict], baseline: str, path: str) -> None:
    """FID against recall, one point per arm, with the target region of issue #13 shaded: every arm on the
    left (labels for the far ones), the arms near the plain sampler enlarged on the right."""
    pyplot = plt()
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
        if base is not None:  # recall >= 2x and FID <= +5 % of the plain sampler
            right = max(0.05, 1.2 * max(r["recall"] for r in shown))
            bottom = ax.get_ylim()[0]
            ax.fill_between([2 * base["recall"], right], bottom, 1.05 * base["fid"], color="g", alpha=0.12,
                            label="target: recall >= 2x, FID <= +5 %")  # fmt: skip
            ax.set_ylim(bottom=bottom)
            ax.legend(fontsize=8)
        ax.set(xlabel="recall (k-NN, k = 3)", ylabel=f"FID ({rows[0]['num_fake']} samples)")
    grid = f"NFE {rows[0]['levels'] * rows[0]['flow_steps']} (T={rows[0]['levels']} x N_s={rows[0]['flow_steps']})"
    ax_all.set_title(f"Sampler remedies at {grid}: every arm")
    ax_near.set_title("the arms within +20 % FID of the plain sampler")
    save_figure(fig, path)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", required=True, help="NAME=FOLDER: a DMMD pipeline (repeatable)")
    p.add_argument("--arm", action="append", default=[], help="LABEL[@MODEL][:KEY=VALUE,...] (repeatable)")
    p.add_argument("--score_model", default=None,
                   help="--method ddpm baseline folder: its UNet becomes every pipeline's score_model (Tweedie, score mode)")
    p.add_argument("--vae", default=None, help="autoencoder of latent models saved without one")
    add_reference_args(p, "reference images")
    add_real_features_arg(p)
    p.add_argument("--levels", type=int, default=10, help="T")
    p.add_argument("--flow_steps", type=int, default=2, help="N_s")
    p.add_argument("--kid_subset_size", type=int, default=100, help="KID subset size")
    p.add_argument("--rows", default=None, help="JSON-lines file the rows are appended to (and resumed from)")
    p.add_argument("--baseline", default="plain", help="label of the arm the others are compared with (plot)")
    p.add_argument("--plot_only", action="store_true", help="write the JSON and plot from --rows, score nothing")
    add_sampling_args(p)
    add_name_arg(p, "sampler_remedies")
    args = p.parse_args()

    models = dict(item.split("=", 1) if "=" in item else ("dmmd", item) for item in args.model)
    arms = [parse_arm(spec, list(models)) for spec in args.arm]
    done, new = {r["label"] for r in read_rows(args.rows)}, []
    todo = [a for a in arms if a["label"] not in done]
    if not args.plot_only and todo:
        from diffusers import UNet2DModel

        from latent_dmmd import DMMDPipeline
        from latent_dmmd.autoencoders import load_autoencoder
        from latent_dmmd.evaluation import output_resolution

        vae = load_autoencoder(args.vae) if args.vae else None
        score = UNet2DModel.from_pretrained(os.path.join(args.score_model, "unet")).eval() if args.score_model else None
        pipes = {}
        for name in {a["model"] for a in todo}:
            pipe = DMMDPipeline.from_pretrained(models[name])
            pipe = DMMDPipeline(discriminator=pipe.discriminator, scheduler=pipe.scheduler, vae=pipe.vae or vae,
                                score_model=score)  # fmt: skip
            pipe.set_progress_bar_config(disable=True)
            for arm in todo:  # refuse a bad option before the first (long) arm runs
                if arm["model"] == name:
                    split_options(pipe, arm["options"])
            pipes[name] = pipe
        resolution = {output_resolution(pipe) for pipe in pipes.values()}
        if len(resolution) != 1:
            raise SystemExit(f"the models decode to different resolutions: {sorted(resolution)}")
        metric = reference_metric(args, resolution.pop(), args.kid_subset_size)
        for arm in todo:
            row = score_arm(pipes[arm["model"]], arm, metric, args)
            print(json.dumps(row), flush=True)
            new.append(row)
            if args.rows:
                with open(args.rows, "a") as f:
                    f.write(json.dumps(row) + "\n")
    rows = read_rows(args.rows) if args.rows else new
    order = {a["label"]: i for i, a in enumerate(arms)}
    rows = sorted((r for r in rows if not arms or r["label"] in order), key=lambda r: order.get(r["label"], 0))
    if not rows:
        raise SystemExit("no rows to write")
    path = write(args.name, {"benchmark": "sampler remedies at fixed NFE", "args": vars(args), "rows": rows})
    plot(rows, args.baseline, path)


if __name__ == "__main__":
    main()
