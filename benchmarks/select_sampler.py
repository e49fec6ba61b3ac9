"""Pick each DMMD model's step-size rule on *training* latents, before any held-out number.

    python benchmarks/select_sampler.py --cache outputs/cache_celebahq64 \
        --pipeline old_loss_1000=outputs/c64_arm_old/pipeline --pipeline balanced_2753=outputs/c64_dmmd/pipeline \
        --name sampler_selection_celebahq64

For every pipeline and every (schedule, eta) of --candidates: the energy distance (a bandwidth-free
MMD) between 128 particles after T x N_s flow steps and 256 training latents of the latent cache
(or, for a pixel model, 256 training images: --data).
Cheap enough to run for every model of an ablation, so that each is scored with its own best sampler.
Writes benchmarks/results/<name>.json.
"""

from __future__ import annotations

import argparse
import json

import torch
from common import add_name_arg, write


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pipeline", action="append", required=True, help="NAME=FOLDER (repeatable)")
    p.add_argument("--cache", default=None, help="the latent cache of the training data (latent models)")
    p.add_argument("--data", default=None, help="training images, folder or IDX file (pixel models)")
    p.add_argument("--resolution", type=int, default=32, help="image side for --data")
    p.add_argument("--candidates", nargs="+", default=["constant:1", "sigma2:3", "sigma2:10", "sigma2:30"],
                   help="SCHEDULE:ETA pairs")  # fmt: skip
    p.add_argument("--levels", type=int, default=10, help="T")
    p.add_argument("--flow_steps", type=int, default=2, help="N_s")
    p.add_argument("--num_images", type=int, default=128, help="particles")
    add_name_arg(p, "sampler_selection")
    args = p.parse_args()

    from latent_dmmd import DMMDPipeline
    from latent_dmmd.latent_cache import LatentCacheDataset
    from latent_dmmd.mmd import energy_distance

    if (args.cache is None) == (args.data is None):
        p.error("give --cache (latent models) or --data (pixel models)")
    if args.cache:
        train = LatentCacheDataset(args.cache).tensors["mean"]
        ref = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:256]]
    else:
        from latent_dmmd import DMMDDiscriminator
        from latent_dmmd.data import build_image_dataset

        channels = DMMDDiscriminator.load_config(args.pipeline[0].split("=", 1)[1], subfolder="discriminator")["in_channels"]
        ds = build_image_dataset(args.data, resolution=args.resolution, channels=channels)
        picks = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:256].tolist()
        ref = torch.stack([ds[i]["pixel_values"] for i in picks])
    out = {}
    for item in args.pipeline:
        name, folder = item.split("=", 1)
        pipe = DMMDPipeline.from_pretrained(folder)
        pipe.set_progress_bar_config(disable=True)
        rows = []
        for candidate in args.candidates:
            schedule, eta = candidate.split(":")
            pipe.scheduler.register_to_config(step_size_schedule=schedule)
            z = pipe(num_images=args.num_images, generator=torch.Generator().manual_seed(1), output_type="latent",
                     num_inference_steps=args.levels, flow_steps_per_level=args.flow_steps, step_size=float(eta)).images  # fmt: skip
            rows.append({"schedule": schedule, "eta": float(eta), "energy_distance_train": float(energy_distance(z, ref))})
            print(name, json.dumps(rows[-1]), flush=True)
        out[name] = {"rows": rows, "best": min(rows, key=lambda r: r["energy_distance_train"])}
    print("wrote", write(args.name, {"benchmark": "sampler selection on training latents", "args": vars(args),
                                     "models": out}))  # fmt: skip


if __name__ == "__main__":
    main()
