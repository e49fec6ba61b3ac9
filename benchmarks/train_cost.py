"""Benchmark c: DMMD training step time divided by DDPM step time, same backbone and batch.

Both steps include the forward, backward and an AdamW update of the same UNet (the
discriminator of configs/celebahq_taef2_64.yaml on 32 x 8 x 8 latents, the Fashion-MNIST
pixel backbone on 1 x 32 x 32, and the default blocks on the same pixels), timed alternately
in one process so both see the same machine noise. The lazy penalty (``gp_every = k``) puts the
double backward on one step in k, so one timed unit is a cycle of k consecutive DMMD steps
(exactly one with the penalty) against k DDPM steps; the ratio is per step either way.

    python benchmarks/train_cost.py              # writes benchmarks/results/train_cost.{json,png}
    python benchmarks/train_cost.py --backbone latent256_cpu --name train_cost_256cpu   # sizing the 256² CPU config
    python benchmarks/train_cost.py --backbone fashion32_cpu --batch 32 --name train_cost_fashion32cpu  # issue 27's clock
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from common import (
    config_discriminator,
    latent64_discriminator,
    latent256_cpu_discriminator,
    plt,
    save_figure,
    timeit_pair,
    write,
)


def fashion_discriminator():
    """The backbone of configs/fashion_mnist_pixel32.yaml: attention only at 8x8 (64 tokens)."""
    from latent_dmmd import DMMDDiscriminator

    torch.manual_seed(0)
    return DMMDDiscriminator(
        sample_size=32, in_channels=1, block_out_channels=(32, 64, 64), norm_num_groups=16, attention_head_dim=32,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    )  # fmt: skip


def default_attention_discriminator():
    """DMMDDiscriminator's default blocks (attention at 16x16, head dim 8) on the same data."""
    from latent_dmmd import DMMDDiscriminator

    torch.manual_seed(0)
    return DMMDDiscriminator(sample_size=32, in_channels=1, block_out_channels=(32, 64, 64), norm_num_groups=16)


def steps(make_model, batch: int, shape: tuple, lambda_gp: float, gp_every: int = 1, gp_fraction: float = 1.0):
    """Two callables: ``gp_every`` consecutive DMMD steps, and as many DDPM steps."""
    from latent_dmmd.baselines import ddpm_step_loss
    from latent_dmmd.schedulers import DMMDScheduler
    from latent_dmmd.training import TrainConfig, dmmd_step_loss

    config = TrainConfig(train_data_dir="-", train_batch_size=batch, group_size=16, lambda_gp=lambda_gp,
                         gp_every=gp_every, gp_fraction=gp_fraction)  # fmt: skip
    sched = DMMDScheduler()
    x0 = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0))
    index = torch.arange(batch)
    disc = make_model().requires_grad_(True)
    unet = make_model().unet.requires_grad_(True)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=1e-5)
    opt_u = torch.optim.AdamW(unet.parameters(), lr=1e-5)
    counter = {"step": 0}

    def dmmd():
        for _ in range(gp_every):  # a cycle holds exactly one penalised step (step % gp_every == 0)
            counter["step"] += 1
            loss = dmmd_step_loss(disc, sched, x0, index, config, counter["step"], 0).loss
            loss.backward()
            opt_d.step()
            opt_d.zero_grad(set_to_none=True)

    def ddpm():
        for _ in range(gp_every):
            counter["step"] += 1
            loss = ddpm_step_loss(unet, sched, x0, index, 0, counter["step"], 0).loss
            loss.backward()
            opt_u.step()
            opt_u.zero_grad(set_to_none=True)

    return dmmd, ddpm


# (lambda_gp, gp_every, gp_fraction) per backbone: the lazy/subsampled grid on the two configs' backbones,
# the full penalty and none on the default blocks (the layout the configs left for its attention cost)
GRID = [(1.0, k, f) for f in (1.0, 0.25) for k in (1, 4, 16)] + [(0.0, 1, 1.0)]
BACKBONES = (
    ("celebahq_taef2_64 (32x8x8 latents)", latent64_discriminator, (32, 8, 8), GRID),
    ("fashion_mnist_pixel32 (1x32x32 pixels, attention at 8x8)", fashion_discriminator, (1, 32, 32), GRID),
    ("default blocks (1x32x32 pixels, attention at 16x16)", default_attention_discriminator, (1, 32, 32),
     [(1.0, 1, 1.0), (0.0, 1, 1.0)]),
)

# backbones measured only when named (--backbone): the full penalty, the configs' setting
EXTRA = {
    "fashion32_cpu": ("fashion_mnist_pixel32_cpu (1x32x32 pixels; the long runs of issue 27)",
                      lambda: config_discriminator("fashion_mnist_pixel32_cpu.yaml"), (1, 32, 32), [(1.0, 1, 1.0)]),
    "latent256_cpu": ("celebahq_taef2_256_cpu (32x32x32 latents)", latent256_cpu_discriminator, (32, 32, 32), [(1.0, 1, 1.0)]),
}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=64, help="samples per step")
    p.add_argument("--repeats", type=int, default=7, help="timed steps per measurement (alternating DMMD/DDPM)")
    p.add_argument("--plot_only", action="store_true", help="redraw the plot from results/train_cost.json")
    p.add_argument("--backbone", choices=sorted(EXTRA), default=None,
                   help="measure this backbone alone instead of benchmark c's three")
    p.add_argument("--name", default="train_cost", help="output file stem in benchmarks/results")
    args = p.parse_args()
    if args.plot_only:
        from common import RESULTS

        path = os.path.join(RESULTS, args.name + ".json")
        with open(path) as f:
            plot(json.load(f)["rows"], path)
        return
    rows = []
    for name, make, shape, grid in [EXTRA[args.backbone]] if args.backbone else BACKBONES:
        for lambda_gp, k, f in grid:
            dmmd, ddpm = steps(make, args.batch, shape, lambda_gp, k, f)
            tc_d, tc_p = timeit_pair(dmmd, ddpm, args.repeats)
            per_step = lambda t, k=k: {key: (v / k if key.endswith("_s") else v) for key, v in t.items()}
            td, tp = per_step(tc_d), per_step(tc_p)
            row = {"model": name, "lambda_gp": lambda_gp, "gp_every": k, "gp_fraction": f, "batch": args.batch,
                   "dmmd_step": td, "ddpm_step": tp, "ratio": td["median_s"] / tp["median_s"]}  # fmt: skip
            rows.append(row)
            print(json.dumps({key: (round(v, 4) if isinstance(v, float) else v) for key, v in row.items()
                              if key not in ("dmmd_step", "ddpm_step", "batch")}), flush=True)  # fmt: skip
    path = write(args.name, {"benchmark": "DMMD step / DDPM step, same backbone and batch (per step over "
                                "cycles of gp_every steps)", "rows": rows, "target": "<= 2.0"})  # fmt: skip
    plot(rows, path)


def setting(row: dict) -> str:
    if not row["lambda_gp"]:
        return "no penalty"
    return f"k={row.get('gp_every', 1)}, f={row.get('gp_fraction', 1.0):g}"


def plot(rows: list[dict], path: str) -> None:
    pyplot = plt()
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = pyplot.subplots(1, len(models), figsize=(5 * len(models), 4), sharey=True, squeeze=False)
    for ax, model in zip(axes[0], models):
        mine = [r for r in rows if r["model"] == model]
        colors = ["tab:gray" if not r["lambda_gp"] else ("tab:blue" if r.get("gp_fraction", 1) == 1 else "tab:orange")
                  for r in mine]  # fmt: skip
        ax.bar(range(len(mine)), [r["ratio"] for r in mine], color=colors)
        ax.axhline(2.0, color="black", ls="--", lw=1, label="target 2.0x")
        ax.set_xticks(range(len(mine)), [setting(r) for r in mine], rotation=45, ha="right", fontsize=8)
        ax.set_title(model.replace(" (", "\n("), fontsize=9)
    axes[0][0].set_ylabel("DMMD step / DDPM step")
    axes[0][0].legend()
    save_figure(fig, path)


if __name__ == "__main__":
    main()
