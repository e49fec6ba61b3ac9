"""Benchmark c: DMMD training step time divided by DDPM step time, same backbone and batch.

Both steps include the forward, backward and an AdamW update of the same UNet (the
discriminator of configs/celebahq_taef2_64.yaml on 32 x 8 x 8 latents, the Fashion-MNIST
pixel backbone on 1 x 32 x 32, and the default blocks on the same pixels), timed alternately
in one process so both see the same machine noise.

    python benchmarks/train_cost.py              # writes benchmarks/results/train_cost.{json,png}
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from common import latent64_discriminator, plt, save_figure, timeit_pair, write


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


def steps(make_model, batch: int, shape: tuple, lambda_gp: float):
    from latent_dmmd.baselines import ddpm_step_loss
    from latent_dmmd.schedulers import DMMDScheduler
    from latent_dmmd.training import TrainConfig, dmmd_step_loss

    config = TrainConfig(train_data_dir="-", train_batch_size=batch, group_size=16, lambda_gp=lambda_gp)
    sched = DMMDScheduler()
    x0 = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0))
    index = torch.arange(batch)
    disc = make_model().requires_grad_(True)
    unet = make_model().unet.requires_grad_(True)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=1e-5)
    opt_u = torch.optim.AdamW(unet.parameters(), lr=1e-5)
    counter = {"step": 0}

    def dmmd():
        counter["step"] += 1
        loss = dmmd_step_loss(disc, sched, x0, index, config, counter["step"], 0).loss
        loss.backward()
        opt_d.step()
        opt_d.zero_grad(set_to_none=True)

    def ddpm():
        counter["step"] += 1
        loss = ddpm_step_loss(unet, sched, x0, index, 0, counter["step"], 0).loss
        loss.backward()
        opt_u.step()
        opt_u.zero_grad(set_to_none=True)

    return dmmd, ddpm


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=64, help="samples per step")
    p.add_argument("--repeats", type=int, default=7, help="timed steps per measurement (alternating DMMD/DDPM)")
    p.add_argument("--plot_only", action="store_true", help="redraw the plot from results/train_cost.json")
    args = p.parse_args()
    if args.plot_only:
        from common import RESULTS

        path = os.path.join(RESULTS, "train_cost.json")
        with open(path) as f:
            plot(json.load(f)["rows"], path)
        return
    rows = []
    for name, make, shape in (("celebahq_taef2_64 (32x8x8 latents)", latent64_discriminator, (32, 8, 8)),
                              ("fashion_mnist_pixel32 (1x32x32 pixels, attention at 8x8)", fashion_discriminator, (1, 32, 32)),
                              ("default blocks (1x32x32 pixels, attention at 16x16)", default_attention_discriminator, (1, 32, 32))):  # fmt: skip
        for lambda_gp in (1.0, 0.0):
            dmmd, ddpm = steps(make, args.batch, shape, lambda_gp)
            td, tp = timeit_pair(dmmd, ddpm, args.repeats)
            row = {"model": name, "lambda_gp": lambda_gp, "batch": args.batch, "dmmd_step": td, "ddpm_step": tp,
                   "ratio": td["median_s"] / tp["median_s"]}  # fmt: skip
            rows.append(row)
            print(json.dumps({"model": name, "lambda_gp": lambda_gp, "ratio": round(row["ratio"], 2),
                              "dmmd_s": round(td["median_s"], 4), "ddpm_s": round(tp["median_s"], 4)}), flush=True)  # fmt: skip
    path = write("train_cost", {"benchmark": "DMMD step / DDPM step, same backbone and batch", "rows": rows,
                                "target": "<= 2.5"})  # fmt: skip
    plot(rows, path)


def plot(rows: list[dict], path: str) -> None:
    pyplot = plt()
    fig, ax = pyplot.subplots(figsize=(11, 4))
    labels = [f"{r['model'].split(' (')[0]}\n{r['model'].split(', ')[-1].rstrip(')') if 'attention' in r['model'] else ''}\nlambda_gp={r['lambda_gp']:g}" for r in rows]
    ax.bar(range(len(rows)), [r["ratio"] for r in rows], color="tab:blue")
    ax.axhline(2.5, color="gray", ls="--", label="target 2.5x")
    ax.set_xticks(range(len(rows)), labels, fontsize=8)
    ax.set_ylabel("DMMD step / DDPM step")
    ax.legend()
    save_figure(fig, path)


if __name__ == "__main__":
    main()
