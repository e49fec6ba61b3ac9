"""The 256 x 256 config on a CUDA GPU: train a few hundred steps, then sample; print s/step, s/image and peak memory.

    python benchmarks/gpu_256.py                      # configs/celebahq_taef2_256.yaml, 300 steps, 64 images
    python benchmarks/gpu_256.py --steps 500 --num_images 256 --name gpu_256_h100

Training runs in this process (one GPU; the config's bf16), from a fresh output folder; its latent cache
is built first on the GPU and not timed. s/step is the training loop's wall-clock over its steps (the
first steps' compilation and allocation included). Sampling flows ``--num_images`` particles together
at the config's T x N_s and decodes them with TAEF2; s/image includes the decode, timed after one
warm-up call. Peak memory is ``torch.cuda.max_memory_allocated`` of each phase. Writes
benchmarks/results/<name>.json. Without CUDA it stops with a message, unless ``--allow_cpu`` (a smoke
run of the script itself, e.g. with configs/debug_cpu.yaml and a handful of steps).

``--curve_steps 1000 2000 4000 8000`` produces the 256² learning curve of issue 27 in one command instead: DMMD
trained to the last step with a checkpoint at each, DDPM on the same backbone for the same wall-clock (at least the
same steps), then ``benchmarks/curve.py`` on both (FID/KID/precision/recall against the 500 held-out faces, DMMD
with the default step rule (calibrated, then selected on training latents), DDIM at NFE 20/100 and DDPM at 100), into benchmarks/results/<name>_curve.json:

    python benchmarks/gpu_256.py --curve_steps 1000 2000 4000 8000 --name gpu_256_h100
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from common import add_name_arg, write


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_gb() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/celebahq_taef2_256.yaml", help="training config")
    p.add_argument("--steps", type=int, default=300, help="training steps")
    p.add_argument("--num_images", type=int, default=64, help="particles flowed together when sampling")
    p.add_argument("--output_dir", default="outputs/gpu_256", help="training output folder (replaced)")
    p.add_argument("--latent_cache_dir", default=None, help="latent cache (default: inside --output_dir)")
    p.add_argument("--allow_cpu", action="store_true", help="run without CUDA (a smoke run, not a measurement)")
    p.add_argument("--curve_steps", type=int, nargs="*", default=[],
                   help="learning curve: DMMD checkpoints to score against DDPM (replaces the timing run)")
    p.add_argument("--curve_samples", type=int, default=2000, help="generated images at the last curve point")
    p.add_argument("--reference", default="../shared/data/celebahq256/images", help="held-out faces of the curve")
    p.add_argument("--reference_first_index", type=int, default=3500)
    p.add_argument("--reference_count", type=int, default=500)
    p.add_argument("--train_args", nargs=argparse.REMAINDER, default=[], help="further training flags, last")
    add_name_arg(p, "gpu_256")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        raise SystemExit("benchmarks/gpu_256.py measures a CUDA GPU and none is visible (torch.cuda.is_available() "
                         "is False); --allow_cpu runs it anyway as a smoke test")  # fmt: skip

    from latent_dmmd import DMMDPipeline
    from latent_dmmd.training import main as train

    cache = args.latent_cache_dir or os.path.join(args.output_dir, "latent_cache")
    if args.curve_steps:
        return curve(args, cache, cuda)
    flags = ["--config", args.config, "--max_train_steps", str(args.steps), "--output_dir", args.output_dir,
             "--overwrite_output_dir", "--validation_steps", "0", "--checkpointing_steps", str(args.steps),
             "--latent_cache_dir", cache, "--report_to", "none", *args.train_args]  # fmt: skip
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:  # the CPU smoke run: no bf16 autocast
        flags += ["--mixed_precision", "no"]
    folder = train(flags)
    train_peak = peak_gb()
    with open(os.path.join(args.output_dir, "training_summary.json")) as f:
        summary = json.load(f)

    device = "cuda" if cuda else "cpu"
    pipe = DMMDPipeline.from_pretrained(folder).to(device)
    pipe.set_progress_bar_config(disable=True)
    pipe(num_images=args.num_images, generator=torch.Generator().manual_seed(0), output_type="pt")  # warm-up
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    sync()
    start = time.perf_counter()
    images = pipe(num_images=args.num_images, generator=torch.Generator().manual_seed(1), output_type="pt").images
    sync()
    seconds = time.perf_counter() - start
    record = {
        "device": torch.cuda.get_device_name() if cuda else "cpu (smoke run)",
        "config": args.config, "train_steps": summary["train_steps"],
        "seconds_per_step": summary["train_loop_seconds"] / max(1, summary["train_steps"]),
        "train_peak_memory_gb": train_peak, "num_images": args.num_images,
        "image_shape": list(images.shape[1:]), "seconds_per_image": seconds / args.num_images,
        "sample_peak_memory_gb": peak_gb(), "nfe": pipe.scheduler.nfe()["nfe"],
    }  # fmt: skip
    print(json.dumps(record, indent=2))
    write(args.name, {"benchmark": "256x256 config on a GPU", "args": vars(args), **record})
    return record


def curve(args, cache: str, cuda: bool) -> dict:
    """DMMD and DDPM on the config's backbone, then their learning curves (benchmarks/curve.py)."""
    import curve as curve_benchmark
    from accelerate.state import AcceleratorState

    from latent_dmmd.training import main as train

    steps = sorted(args.curve_steps)
    every = steps[0] if all(s % steps[0] == 0 for s in steps) else 1
    common = ["--config", args.config, "--latent_cache_dir", cache, "--overwrite_output_dir", "--validation_steps", "0",
              "--report_to", "none", "--checkpointing_steps", str(every), "--checkpoints_total_limit", "10000",
              *([] if cuda else ["--mixed_precision", "no"]), *args.train_args]  # fmt: skip
    runs = {m: f"{args.output_dir}_{m}" for m in ("dmmd", "ddpm")}
    train([*common, "--max_train_steps", str(steps[-1]), "--output_dir", runs["dmmd"]])
    AcceleratorState._reset_state(True)
    with open(os.path.join(runs["dmmd"], "training_summary.json")) as f:
        minutes = json.load(f)["train_loop_seconds"] / 60
    # the baseline for the same wall-clock (equal seconds), and at least to DMMD's last step (equal steps)
    train([*common, "--method", "ddpm", "--max_train_steps", str(100 * steps[-1]), "--output_dir", runs["ddpm"],
           "--max_train_minutes", str(minutes)])  # fmt: skip
    AcceleratorState._reset_state(True)
    rows = curve_benchmark.main([
        "--dmmd_run", runs["dmmd"], "--ddpm_run", runs["ddpm"], "--steps", *map(str, steps), "--reference", args.reference,
        "--reference_first_index", str(args.reference_first_index), "--reference_count", str(args.reference_count),
        "--num_samples", str(max(1, args.curve_samples // 2)), "--last_num_samples", str(args.curve_samples),
        "--scratch", os.path.join(args.output_dir, "curve"), "--name", f"{args.name}_curve",
    ])  # fmt: skip
    return {"device": torch.cuda.get_device_name() if cuda else "cpu (smoke run)", "rows": rows}


if __name__ == "__main__":
    main()
