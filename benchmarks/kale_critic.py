"""What a trained KALE critic gives the sampler: h and |grad h| at pure noise and at training latents per
level, and how far the KALE flow moves its particles for each step size.

    python benchmarks/kale_critic.py --pipeline outputs/c64_kale/pipeline --cache outputs/c64_kale/latent_cache \
        --name kale_critic_celebahq64

At the optimum h = log(p_0 / p_t), of order -300 for noise against faces in 2,048 latent dimensions;
a critic held near 1-Lipschitz by the gradient penalty cannot reach that. Writes benchmarks/results/<name>.json.
"""

from __future__ import annotations

import argparse
import json

import torch
from common import add_name_arg, write


def critic_at(disc, x: torch.Tensor, level: int) -> dict:
    x = x.clone().requires_grad_(True)
    h = disc.critic(x, torch.full((x.shape[0],), level))  # the clipped h the flow follows
    (grad,) = torch.autograd.grad(h.sum(), x)
    return {"h_mean": float(h.mean()), "grad_norm_mean": float(grad.flatten(1).norm(dim=1).mean())}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pipeline", required=True, help="pipeline folder of a KALE critic (--objective kale)")
    p.add_argument("--cache", required=True, help="latent cache of its training data")
    p.add_argument("--levels", type=int, nargs="+", default=[999, 673, 346, 124, 20], help="levels t probed")
    p.add_argument("--step_sizes", type=float, nargs="+", default=[0.1, 1.0, 10.0], help="eta of the flows")
    p.add_argument("--num_images", type=int, default=128, help="particles (and training latents) probed")
    p.add_argument("--flow_levels", type=int, default=10, help="T of the flows")
    p.add_argument("--flow_steps", type=int, default=2, help="N_s of the flows")
    add_name_arg(p, "kale_critic")
    args = p.parse_args()

    from latent_dmmd import DMMDPipeline
    from latent_dmmd.latent_cache import LatentCacheDataset
    from latent_dmmd.mmd import energy_distance

    pipe = DMMDPipeline.from_pretrained(args.pipeline)
    pipe.set_progress_bar_config(disable=True)
    disc = pipe.discriminator
    if disc.config.objective != "kale":
        raise SystemExit(f"{args.pipeline} is not a KALE critic (objective={disc.config.objective!r})")
    train = LatentCacheDataset(args.cache).tensors["mean"]
    data = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[: 2 * args.num_images]]
    data, held = data[: args.num_images], data[args.num_images :]
    noise = torch.randn(args.num_images, *data.shape[1:], generator=torch.Generator().manual_seed(1))
    probes = [{"t": t, "noise": critic_at(disc, noise, t), "data": critic_at(disc, data, t)} for t in args.levels]
    flows = [{"step_size": 0.0, "rms_displacement": 0.0, "energy_distance_to_data": float(energy_distance(noise, held))}]
    for eta in args.step_sizes:
        z = pipe(num_images=args.num_images, latents=noise.clone(), output_type="latent", step_size=eta,
                 num_inference_steps=args.flow_levels, flow_steps_per_level=args.flow_steps).images  # fmt: skip
        flows.append({"step_size": eta, "rms_displacement": float((z - noise).pow(2).mean().sqrt()),
                      "energy_distance_to_data": float(energy_distance(z, held))})  # fmt: skip
    record = {"benchmark": "KALE critic", "args": vars(args), "probes": probes, "flows": flows,
              "critic_clip": disc.config.critic_clip, "kale_lambda": disc.config.kale_lambda}  # fmt: skip
    print(json.dumps(record, indent=1))
    print("wrote", write(args.name, record))


if __name__ == "__main__":
    main()
