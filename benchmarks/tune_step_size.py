"""Pick the flow step size eta of a DMMD pipeline on *training* images, before any test-set number.

    python benchmarks/tune_step_size.py outputs/fashion_mnist_pixel32_cpu/pipeline \
        --reference /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz --reference_count 1000 \
        --name step_size_fashion32

FID (and KID) of ``--num_samples`` images at one grid (T x N_s) for each eta in ``--step_sizes``,
against training images: the selection never sees the held-out set the benchmarks report on.
Writes benchmarks/results/<name>.{json,png} and prints the eta with the lowest FID.
"""

from __future__ import annotations

import argparse
import json

from common import add_name_arg, add_reference_args, add_sampling_args, plt, save_figure, write


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dmmd", help="DMMD pipeline folder")
    add_reference_args(p, "training images", count=1000)
    p.add_argument("--step_sizes", type=float, nargs="+", default=[0.1, 0.3, 1.0, 3.0])
    p.add_argument("--step_size_schedule", default=None, choices=["constant", "sigma2", "rms", "level"],
                   help="the schedule the step sizes are tried with (default: the model's)")
    p.add_argument("--levels", type=int, default=10, help="T")
    p.add_argument("--flow_steps", type=int, default=2, help="N_s")
    add_sampling_args(p, num_samples=300, seed=10_000)
    add_name_arg(p, "step_size")
    args = p.parse_args()

    from latent_dmmd import DMMDPipeline
    from latent_dmmd.evaluation import FIDKID, generate, output_resolution, reference_images

    pipe = DMMDPipeline.from_pretrained(args.dmmd)
    pipe.set_progress_bar_config(disable=True)
    if args.step_size_schedule:
        pipe.scheduler.register_to_config(step_size_schedule=args.step_size_schedule)
    metric = FIDKID(kid_subset_size=min(100, args.num_samples))
    for batch in reference_images(args.reference, output_resolution(pipe), args.reference_first_index,
                                  args.reference_count):  # fmt: skip
        metric.update(batch, real=True)
    rows = []
    for eta in args.step_sizes:
        images, seconds = generate(pipe, args.num_samples, args.batch_size, args.seed, num_inference_steps=args.levels,
                                   flow_steps_per_level=args.flow_steps, step_size=eta)  # fmt: skip
        metric.reset_fake()
        metric.update(images, real=False)
        rows.append({"step_size": eta, "step_size_schedule": pipe.scheduler.config.step_size_schedule,
                     "levels": args.levels, "flow_steps": args.flow_steps,
                     "seconds_per_image": seconds / args.num_samples, **metric.compute()})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    best = min(rows, key=lambda r: r["fid"])
    path = write(args.name, {"benchmark": "step size selection on training images", "args": vars(args),
                             "rows": rows, "best_step_size": best["step_size"]})  # fmt: skip
    pyplot = plt()
    fig, ax = pyplot.subplots(figsize=(5, 3.5))
    ax.plot([r["step_size"] for r in rows], [r["fid"] for r in rows], "o-")
    ax.set(xscale="log", xlabel="step size eta", ylabel=f"FID vs training images ({args.num_samples} samples)",
           title=f"T={args.levels} x N_s={args.flow_steps}")  # fmt: skip
    save_figure(fig, path)
    print("best step size", best["step_size"])


if __name__ == "__main__":
    main()
