"""One-step DMMD (issue 29): a generator trained from a converged DMMD model against the flow at NFE 100 and DDIM at
NFE 1 and 10, on the convergence benchmark's digits and 2-D targets (their committed converged weights).

    python benchmarks/onestep.py --data digits          # also gaussians8
    python benchmarks/onestep.py --data digits --report

Arms: ``flow`` (the DMMD particle flow, T 10 x N_s 10, calibrated steps); ``distill`` (an MLP of the backbone's size
regressed onto 20,000 flow endpoints from their noise, 1,000 particles flowed together); ``field_linear`` and
``field_local`` (the stop-gradient regression along the DMMD field of method §10 with the linear-kernel witness,
and with the local attraction-repulsion field on the discriminator's features); ``ddim`` at NFE 1 and 10 with the
DDPM of the same backbone. Quality in the convergence benchmark's feature spaces (FD, KID, precision, recall,
class/mode coverage, energy distance) on --num_samples samples; seconds per image measured in this run, one thread.
Field arms log the batch diversity (mean pairwise distance over the data's) during training. The field arms' step
size and temperature are chosen on training data (energy distance to training samples) from a small grid.
Writes benchmarks/results/onestep_<data>.{json,png}.

Images: ``--pipeline FOLDER`` (a pipeline with a generator, from ``scripts/train_generator.py``) scores the generator
in one step and the same folder's flow (its scheduler's T x N_s, or ``--flow_nfe``), and with ``--ddpm BASELINE``
DDIM at NFE 1 and 10 on the same backbone, in FID/KID/precision/recall against ``--reference`` images:

    python benchmarks/onestep.py --pipeline outputs/fashion_onestep/pipeline --ddpm outputs/curve_fashion32_ddpm/baseline \
        --reference /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz \
        --real_features runs/curve/fashion_t10k_inception.pt --num_samples 2000 --name onestep_fashion32
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from common import RESULTS, plt, reference_metric, run_summary, save_figure, write
from convergence import Dataset, Scorer, TimeMLP, diffusion_sample, dmmd_sample, load
from safetensors.torch import load_file

from latent_dmmd.mmd import energy_distance
from latent_dmmd.onestep import diversity, field_target
from latent_dmmd.reference import compute_reference_statistics
from latent_dmmd.schedulers import DMMDScheduler

WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "runs", "convergence")
TEACHERS = {"digits": ("digits_dmmd_gp_seed1", "digits_ddpm_seed1"),
            "gaussians8": ("gaussians8_dmmd_gp_seed0", "gaussians8_ddpm_seed0")}  # fmt: skip


class Generator(torch.nn.Module):
    """The backbone MLP (3 hidden layers, SiLU) at a fixed time input, as a displacement of its noise (like the
    flow, it starts from the particles' spread): z -> z + MLP(z)."""

    def __init__(self, data: Dataset):
        super().__init__()
        self.net = TimeMLP(data.dim, data.dim, hidden=data.hidden, fourier=data.fourier)

    def forward(self, z):
        return z + self.net(z, torch.full((z.shape[0],), 999, dtype=torch.long))


def flow_args(args):
    return argparse.Namespace(levels=10, flow_steps=10, t_min=0, calibration_particles=1000)


def train_generator(data, phi, args, mode, eta=None, tau=None, seed=0):
    """A generator trained by regression onto flow endpoints (``distill``) or along the field; returns it, its
    training seconds and its log (loss, diversity)."""
    torch.manual_seed(seed)
    gen_model = Generator(data)
    opt = torch.optim.Adam(gen_model.parameters(), lr=args.learning_rate)
    g = torch.Generator().manual_seed(seed)
    if mode == "distill":
        noise, ends = args.endpoints
    else:
        sched = DMMDScheduler(num_inference_steps=10, flow_steps_per_level=10)
        stats = compute_reference_statistics(phi, data.batch(20000, g).split(4096), sched.timesteps, sched.alphas_cumprod,
                                             generator=g)  # fmt: skip
    reference = data.batch(1000, torch.Generator().manual_seed(99))
    log, seconds = [], 0.0
    steps = args.distill_steps if mode == "distill" else args.field_steps
    for step in range(1, steps + 1):
        start = time.perf_counter()
        if mode == "distill":
            idx = torch.randint(len(noise), (args.batch_size,), generator=g)
            z, target = noise[idx], ends[idx]
            out = gen_model(z)
        else:
            z = torch.randn(args.batch_size, data.dim, generator=g)
            out = gen_model(z)
            k = int(torch.randint(len(sched.timesteps), (1,), generator=g))
            t = int(sched.timesteps[k])
            alpha, sigma = (float(v) for v in sched.alpha_sigma(t))
            batch = data.batch(args.batch_size, g)
            target = field_target(phi, out, t, alpha, sigma, eta, torch.randn(out.shape, generator=g),
                                  mean_data=stats.mean_data[k], kernel=mode.split("_")[1], data=batch,
                                  data_noise=torch.randn(batch.shape, generator=g), tau=tau or 1.0)  # fmt: skip
        loss = torch.nn.functional.mse_loss(out, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        seconds += time.perf_counter() - start
        if step % args.log_every == 0 or step == steps:
            with torch.no_grad():
                x = gen_model(torch.randn(1000, data.dim, generator=torch.Generator().manual_seed(5)))
            log.append({"step": step, "loss": float(loss), "diversity": diversity(x, reference)})
    return gen_model.eval().requires_grad_(False), seconds, log


def images(args) -> None:
    """The image case: a pipeline folder's one-step generator against its own flow (and DDIM of a DDPM baseline)."""
    import curve

    from latent_dmmd import DMMDPipeline
    from latent_dmmd.evaluation import generate
    from latent_dmmd.records import output_resolution

    pipe = DMMDPipeline.from_pretrained(args.pipeline)
    if pipe.generator is None:
        raise SystemExit(f"{args.pipeline} has no one-step generator (scripts/train_generator.py trains one)")
    pipe.set_progress_bar_config(disable=True)
    metric = reference_metric(args, output_resolution(pipe))
    rows = []
    for label, call in (("onestep", {"use_generator": True}), ("flow", {"use_generator": False})):
        images_, seconds = generate(pipe, args.num_samples, args.batch_size, 0, progress=True, **call)
        cfg = pipe.scheduler.config
        rows.append({"method": label, "nfe": 1 if label == "onestep" else cfg.num_inference_steps * cfg.flow_steps_per_level,
                     "seconds_per_image": seconds / args.num_samples, **curve.score(images_, metric)})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    trained = run_summary(args.pipeline, "generator_summary.json") or None
    if trained:
        rows[0]["train_seconds"] = trained.get("optimize_seconds")
    curve.BASELINE_POINTS = (("ddim", 1), ("ddim", 10))
    baseline = argparse.Namespace(batch_size=args.batch_size, seed=0, clip_sample_range=None)
    for folder in args.ddpm or []:  # DDPM checkpoints of the same backbone (e.g. at equal steps and equal seconds)
        info = run_summary(folder)
        for row in curve.baseline_rows(folder, args.num_samples, baseline, metric):
            rows.append({**row, "baseline": folder, "ddpm_step": info.get("train_steps"),
                         "train_seconds": info.get("optimize_seconds")})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    path = write(args.name, {"benchmark": "one-step DMMD, images", "pipeline": args.pipeline, "ddpm": args.ddpm,
                             "generator_training": trained, "args": vars(args), "rows": rows})  # fmt: skip
    print("wrote", path)
    print(image_report(rows))


def image_report(rows: list[dict]) -> str:
    lines = ["| sampler | NFE | FID | KID | precision | recall | ms / image | training s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        label = r["method"] + (f" (DDPM step {r['ddpm_step']:,})" if r.get("ddpm_step") else "")
        train = "—" if r.get("train_seconds") is None else f"{r['train_seconds']:,.0f}"
        lines.append(f"| {label} | {r['nfe']} | {r['fid']:.1f} | {r['kid']:.4f} | {r['precision']:.3f} | "
                     f"{r['recall']:.3f} | {1e3 * r.get('seconds_per_image', float('nan')):.2f} | {train} |")  # fmt: skip
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", choices=sorted(TEACHERS), default="digits")
    p.add_argument("--pipeline", default=None, help="images: a pipeline folder with a one-step generator")
    p.add_argument("--ddpm", nargs="+", default=None,
                   help="images: DDPM baseline folders of the same backbone (DDIM 1 and 10 of each)")
    p.add_argument("--reference", default=None, help="images: reference images (folder or IDX file)")
    p.add_argument("--reference_first_index", type=int, default=0)
    p.add_argument("--reference_count", type=int, default=None)
    p.add_argument("--real_features", default=None, help="images: cache of the reference set's Inception features")
    p.add_argument("--name", default=None, help="images: results file stem")
    p.add_argument("--num_samples", type=int, default=2000)
    p.add_argument("--num_endpoints", type=int, default=20000)
    p.add_argument("--flow_batch", type=int, default=1000, help="particles flowed together for the endpoints")
    p.add_argument("--distill_steps", type=int, default=6000)
    p.add_argument("--field_steps", type=int, default=3000)
    p.add_argument("--field_etas", type=float, nargs="+", default=[1.0, 3.0])
    p.add_argument("--field_taus", type=float, nargs="+", default=[0.1])
    p.add_argument("--batch_size", type=int, default=512)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--log_every", type=int, default=250)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--report", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.pipeline:
        if not args.reference:
            p.error("--pipeline needs --reference")
        args.name = args.name or "onestep_images"
        args.batch_size = min(args.batch_size, 250)
        return images(args)
    name = args.name or f"onestep_{args.data}"
    if args.report:
        record = json.load(open(os.path.join(RESULTS, name + ".json")))
        print(image_report(record["rows"]) if record["benchmark"] == "one-step DMMD, images" else report(record))
        return

    data = Dataset(args.data)
    dmmd_name, ddpm_name = TEACHERS[args.data]
    disc = load("dmmd", data, load_file(os.path.join(WEIGHTS, dmmd_name + ".safetensors")))
    ddpm = load("ddpm", data, load_file(os.path.join(WEIGHTS, ddpm_name + ".safetensors")))
    scorer = Scorer(data)
    rows = []

    def add(row):
        x = row.pop("x")
        row = {**row, **scorer(x)}
        if data.dim == 2:  # a picture of where the samples sit
            row["samples"] = [[round(float(a), 3), round(float(b), 3)] for a, b in x[:400]]
        row.pop("class_share", None)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("log", "samples")}), flush=True)

    x, seconds, info = dmmd_sample(disc, data, args.num_samples, 0, flow_args(args))
    add({"method": "flow", "nfe": 100, "x": x, "seconds_per_image": seconds / args.num_samples, "step_sizes": info["step_sizes"]})
    step_sizes = info["step_sizes"]
    for nfe in (1, 10):
        x, seconds = diffusion_sample(ddpm, data, args.num_samples, 0, nfe, "ddim")
        add({"method": "ddim", "nfe": nfe, "x": x, "seconds_per_image": seconds / args.num_samples})

    # distillation: endpoints of flows of --flow_batch particles (seeds 100, 101, ...), then regression
    start, noise, ends = time.perf_counter(), [], []
    for b in range(args.num_endpoints // args.flow_batch):
        x, _, _ = dmmd_sample(disc, data, args.flow_batch, 100 + b, flow_args(args), step_sizes=step_sizes)
        noise.append(torch.randn(args.flow_batch, data.dim, generator=torch.Generator().manual_seed(100 + b)))
        ends.append(x.clamp(-1, 1) if data.bounded else x)
    endpoint_seconds = time.perf_counter() - start
    args.endpoints = (torch.cat(noise), torch.cat(ends))
    gen_model, seconds, log = train_generator(data, disc, args, "distill")
    x, sample_seconds = sample(gen_model, data, args.num_samples)
    add({"method": "onestep", "mode": "distill", "nfe": 1, "x": x, "seconds_per_image": sample_seconds / args.num_samples,
         "train_seconds": seconds, "endpoint_seconds": endpoint_seconds, "log": log})  # fmt: skip

    # the field: the linear witness at eta 1 (the collapse), the local field with eta and tau chosen on training data
    gen_model, seconds, log = train_generator(data, disc, args, "field_linear", eta=1.0)
    x, sample_seconds = sample(gen_model, data, args.num_samples)
    add({"method": "onestep", "mode": "field_linear", "eta": 1.0, "nfe": 1, "x": x, "log": log,
         "seconds_per_image": sample_seconds / args.num_samples, "train_seconds": seconds})  # fmt: skip
    choices = []
    train_ref = data.batch(2000, torch.Generator().manual_seed(11))
    for eta in args.field_etas:
        for tau in args.field_taus:
            gen_model, seconds, log = train_generator(data, disc, args, "field_local", eta=eta, tau=tau)
            x, sample_seconds = sample(gen_model, data, args.num_samples)
            choices.append({"eta": eta, "tau": tau, "energy_distance_train": float(energy_distance(x[:2000], train_ref)),
                            "model": gen_model, "seconds": seconds, "log": log, "x": x, "sample_seconds": sample_seconds})  # fmt: skip
            print(json.dumps({k: v for k, v in choices[-1].items() if k in ("eta", "tau", "energy_distance_train")}), flush=True)
    best = min(choices, key=lambda c: c["energy_distance_train"])
    add({"method": "onestep", "mode": "field_local", "eta": best["eta"], "tau": best["tau"], "nfe": 1, "x": best["x"],
         "seconds_per_image": best["sample_seconds"] / args.num_samples, "train_seconds": best["seconds"], "log": best["log"],
         "selection": [{k: c[k] for k in ("eta", "tau", "energy_distance_train")} for c in choices]})  # fmt: skip
    record = {"benchmark": "one-step DMMD", "data": args.data, "teachers": TEACHERS[args.data], "args": {
        k: v for k, v in vars(args).items() if k != "endpoints"}, "classifier_accuracy": scorer.accuracy, "rows": rows}  # fmt: skip
    path = write(name, record)
    plot(rows, path, args.data)
    print(report(record))


@torch.no_grad()
def sample(gen_model, data, n):
    noise = torch.randn(n, data.dim, generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    x = gen_model(noise)
    return x, time.perf_counter() - start


def plot(rows, path, data_name):
    pyplot = plt()
    scatter = [r for r in rows if r.get("samples")]
    fig, axes = pyplot.subplots(1, 2 + len(scatter), figsize=(11 + 3.2 * len(scatter), 4))
    ax, ax_d = axes[:2]
    for a, r in zip(axes[2:], scatter):
        pts = torch.tensor(r["samples"])
        a.scatter(pts[:, 0], pts[:, 1], s=2)
        a.set(xlim=(-3, 3), ylim=(-3, 3), aspect="equal", title=r["method"] + (f" {r['mode']}" if r.get("mode") else ""))
    for r in rows:
        label = r["method"] + (f" {r['mode']}" if r.get("mode") else "") + f" (NFE {r['nfe']})"
        ax.scatter(r["seconds_per_image"] * 1e6, r["fd"], label=label)
        if r.get("log"):
            ax_d.plot([e["step"] for e in r["log"]], [e["diversity"] for e in r["log"]], label=label)
    ax.set(xscale="log", yscale="log", xlabel="microseconds per sample (one thread)", ylabel="FD",
           title=f"One-step DMMD on {data_name}")  # fmt: skip
    ax.legend(fontsize=7)
    ax_d.set(xlabel="generator training step", ylabel="diversity (pairwise distance / data's)", ylim=(0, None))
    ax_d.legend(fontsize=7)
    save_figure(fig, path)


def report(record) -> str:
    lines = ["| sampler | NFE | FD | KID | precision | recall | coverage | energy dist. | µs / sample | train s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in record["rows"]:
        label = r["method"] + (f" ({r['mode']})" if r.get("mode") else "")
        lines.append(f"| {label} | {r['nfe']} | {r['fd']:.3g} | {r['kid']:.3g} | {r['precision']:.2f} | {r['recall']:.2f} | "
                     f"{r['coverage']:.2f} | {r['energy_distance']:.3g} | {1e6 * r['seconds_per_image']:.3g} | "
                     f"{'—' if r.get('train_seconds') is None else format(r['train_seconds'], '.0f')} |")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
