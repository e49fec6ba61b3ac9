"""DMMD against DDPM/DDIM along learning curves, on data that converges on a CPU (issue 26).

The same time-conditional MLP (3 hidden layers of 512, SiLU, sinusoidal t-embedding; random Fourier
input features on the 2-D targets) is trained as a DMMD discriminator (the library's ``dmmd_loss``,
paired, feature head) and as a DDPM (epsilon head), with one optimiser (Adam 3e-4), batch (512; DMMD:
16 groups of 32), EMA (0.999) and forward process. EMA snapshots are kept at geometric steps and
scored afterwards, so the recorded training seconds are those of the optimisation alone (each method
timed alone, one thread, the same run). DMMD samples with the library's ``sample_flow`` (ensemble,
T 10 × N_s 10) and its per-level step sizes calibrated on training data (``latent_dmmd.calibration``);
DDIM (NFE 20, 100) and ancestral DDPM (NFE 100) with diffusers' schedulers (trailing spacing).

Metrics, every one against the training split (nothing is tuned on held-out data): Fréchet distance
and KID in the penultimate features of a classifier the benchmark trains on the same split (digits;
its held-out accuracy goes in the JSON) or of the 2-D point and 64 random Fourier features of it (2-D), k-NN precision/recall (k = 3), class
or mode coverage, energy distance in data space; the held-out real data's scores are the floor.

    python benchmarks/convergence.py --data digits --seeds 0 1 2 --max_steps 8000 --ddpm_max_steps 32000
    python benchmarks/convergence.py --data gaussians8 --seeds 0 1 2
    python benchmarks/convergence.py --data digits --arms gp gp_quarter sn --seeds 0 --budget_seconds 600
    python benchmarks/convergence.py --data digits --plot_only
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time

import torch
from common import RESULTS, plt, save_figure
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.training_utils import EMAModel
from torch import nn

from latent_dmmd.calibration import calibrate_step_sizes, choose_step_rule
from latent_dmmd.evaluation import FIDKID
from latent_dmmd.flow import euler_update, sample_flow
from latent_dmmd.mmd import dmmd_loss, energy_distance, rff_frequencies, rff_map
from latent_dmmd.reference import compute_reference_statistics
from latent_dmmd.schedulers import DMMDScheduler
from latent_dmmd.toy import eight_gaussians

# --------------------------------------------------------------------------- data


def checkerboard(n: int, generator: torch.Generator) -> torch.Tensor:
    """A 4×4 board on [-2, 2]² with the 8 'black' unit cells filled uniformly."""
    cells = torch.tensor([(i, j) for i in range(4) for j in range(4) if (i + j) % 2 == 0], dtype=torch.float32)
    pick = cells[torch.randint(0, len(cells), (n,), generator=generator)]
    return pick + torch.rand(n, 2, generator=generator) - 2.0


def checkerboard_cell(x: torch.Tensor) -> torch.Tensor:
    """Index 0..7 of the black cell each point lies in, -1 outside every black cell."""
    ij = torch.floor(x + 2.0).long()
    inside = ((ij >= 0) & (ij < 4)).all(1) & ((ij.sum(1) % 2) == 0)
    return torch.where(inside, (ij[:, 0] * 4 + ij[:, 1]) // 2, torch.full_like(ij[:, 0], -1))


class Dataset:
    """Training split, held-out split (the floor), a sampler of training batches and the labels used
    for class/mode coverage."""

    def __init__(self, name: str, seed: int = 0):
        self.name = name
        gen = torch.Generator().manual_seed(1234)
        if name == "digits":
            from sklearn.datasets import load_digits

            d = load_digits()
            x = torch.tensor(d.data, dtype=torch.float32) / 8.0 - 1.0  # 0..16 -> [-1, 1]
            y = torch.tensor(d.target)
            perm = torch.randperm(len(x), generator=gen)
            self.train, self.train_y = x[perm[:1497]], y[perm[:1497]]
            self.held_out, self.held_out_y = x[perm[1497:]], y[perm[1497:]]
            self.bounded, self.fourier, self.num_classes, self.hidden = True, 0, 10, 512
        elif name in ("gaussians8", "checkerboard"):
            draw = eight_gaussians if name == "gaussians8" else checkerboard
            self.train = draw(5000, gen)  # 2-D targets are analytic: the reference is a fresh large sample
            self.held_out = draw(5000, gen)
            self.draw = lambda n, g: draw(n, g)
            self.bounded, self.fourier, self.num_classes, self.hidden = False, 32, 8, 256
        else:
            raise ValueError(f"unknown --data {name!r}")
        self.dim = self.train.shape[1]

    def batch(self, n: int, generator: torch.Generator) -> torch.Tensor:
        if self.name == "digits":
            return self.train[torch.randint(0, len(self.train), (n,), generator=generator)]
        return self.draw(n, generator)

    def classes(self, x: torch.Tensor, classifier=None) -> torch.Tensor:
        if self.name == "digits":
            return classifier(x).argmax(1)
        if self.name == "gaussians8":
            from latent_dmmd.toy import mode_centers

            d = torch.cdist(x, mode_centers())
            return torch.where(d.min(1).values < 0.5, d.argmin(1), torch.full_like(d.argmin(1), -1))
        return checkerboard_cell(x)


# --------------------------------------------------------------------------- backbone


class TimeMLP(nn.Module):
    """``f(x, t)``: an MLP on ``[x, (Fourier features of x), sinusoidal embedding of t]``; the same
    body for both methods, only the head's width differs (features for DMMD, epsilon for DDPM)."""

    def __init__(self, dim: int, out: int, hidden: int = 512, depth: int = 3, t_embed: int = 128, fourier: int = 0):
        super().__init__()
        self.t_embed = t_embed
        self.register_buffer("freqs", torch.randn(dim, fourier, generator=torch.Generator().manual_seed(0)))
        layers, width = [], dim + 2 * fourier + t_embed
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        self.net = nn.Sequential(*layers, nn.Linear(width, out))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device).expand(x.shape[0]).float()
        half = self.t_embed // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=x.device) / half)
        angle = t[:, None] * freqs[None]
        parts = [x, angle.sin(), angle.cos()]
        if self.freqs.shape[1]:
            proj = x @ self.freqs
            parts += [proj.sin(), proj.cos()]
        return self.net(torch.cat(parts, 1))


def spectral_normalise(model: nn.Module) -> nn.Module:
    """Spectral normalisation of every linear layer (one power iteration per layer and step)."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            torch.nn.utils.parametrizations.spectral_norm(module)
    return model


# --------------------------------------------------------------------------- training

# Lipschitz controls of the DMMD discriminator (issue 26, item 3)
ARMS = {
    "gp": {"gp_fraction": 1.0, "spectral": False},  # the full gradient penalty on every interpolate (default)
    "gp_quarter": {"gp_fraction": 0.25, "spectral": False},  # the penalty on a keyed quarter of each batch
    "sn": {"gp_fraction": 0.0, "spectral": True},  # spectral normalisation, no penalty
    "none": {"gp_fraction": 0.0, "spectral": False},  # no control at all (the failure the others prevent)
    "scaled": {"gp_fraction": 0.0, "spectral": False, "feature_scale": "group"},  # a scale-invariant objective
}


def build(method: str, data: Dataset, arm: str = "gp", hidden: int | None = None) -> nn.Module:
    hidden = hidden or data.hidden
    model = TimeMLP(data.dim, hidden if method == "dmmd" else data.dim, hidden=hidden, fourier=data.fourier)
    if method == "dmmd" and ARMS[arm]["spectral"]:
        spectral_normalise(model)
    return model


def snapshot(model: nn.Module, ema: EMAModel) -> dict:
    ema.store(model.parameters())
    ema.copy_to(model.parameters())
    state = copy.deepcopy(model.state_dict())
    ema.restore(model.parameters())
    return state


def batch_loss(method, model, data, sched, gen, args, arm="gp"):
    """The loss of one training batch: DMMD with the arm's Lipschitz control, or DDPM's epsilon MSE; every
    random draw from ``gen``, in the same order for every run."""
    x0 = data.batch(args.batch_size, gen)
    eps = torch.randn(x0.shape, generator=gen)
    if method == "ddpm":
        t = torch.randint(0, 1000, (args.batch_size,), generator=gen)
        return (model(sched.add_noise(x0, eps, t), t) - eps).square().mean()
    t = sched.sample_training_timesteps(args.num_groups, gen).repeat_interleave(args.batch_size // args.num_groups)
    xt = sched.add_noise(x0, eps, t)
    fraction = ARMS[arm]["gp_fraction"]
    index = torch.randperm(args.batch_size, generator=gen)[: int(fraction * args.batch_size)] if 0 < fraction < 1 else None
    lambda_gp = args.lambda_gp if args.lambda_gp is not None else (1.0 if data.name == "digits" else 0.1)
    return dmmd_loss(model, x0, xt, t, args.num_groups, lambda_l2=args.lambda_l2,
                     lambda_gp=lambda_gp if fraction > 0 else 0.0, generator=gen, penalty_index=index,
                     feature_scale=ARMS[arm].get("feature_scale", "none")).loss  # fmt: skip


def train(method, data, seed, steps_at, args, arm="gp", budget_seconds=None):
    """Train one model; return [(step, train_seconds, ema_state_dict)] at the steps in ``steps_at`` (and at
    the budget's end). Only the optimisation is timed."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    sched = DMMDScheduler()
    model = build(method, data, arm).train()
    opt = torch.optim.Adam(model.parameters(), lr=args.learning_rate)
    ema = EMAModel(model.parameters(), decay=args.ema_decay)
    out, seconds, step, last = [], 0.0, 0, max(steps_at)
    nonfinite = 0
    while step < last:
        start = time.perf_counter()
        loss = batch_loss(method, model, data, sched, gen, args, arm)
        opt.zero_grad(set_to_none=True)
        if torch.isfinite(loss):
            loss.backward()
            opt.step()
            ema.step(model.parameters())
        else:
            nonfinite += 1
        seconds += time.perf_counter() - start
        step += 1
        over = budget_seconds is not None and seconds >= budget_seconds
        if step in steps_at or over:
            out.append({"step": step, "train_seconds": seconds, "state": snapshot(model, ema), "nonfinite": nonfinite,
                        "loss": float(loss.detach())})  # fmt: skip
            print(f"[{data.name} {method}/{arm} seed {seed}] step {step} {seconds:.0f}s loss {loss.item():.4g}", flush=True)
        if over:
            break
    return out


# --------------------------------------------------------------------------- sampling


def load(method, data, state, arm="gp"):
    model = build(method, data, arm)
    model.load_state_dict(state)
    return model.eval().requires_grad_(False)


def flow_setup(model, data, seed, args, calibrate=True):
    """What every DMMD sampling of one model shares: the scheduler, reference statistics over training data, the
    calibration particles (training data) and, with ``calibrate``, the per-level calibration on them."""
    sched = DMMDScheduler(num_inference_steps=args.levels, flow_steps_per_level=args.flow_steps,
                          t_min=args.t_min)  # fmt: skip
    gen = torch.Generator().manual_seed(10_000 + seed)
    ref_data = data.train.repeat(4, 1) if data.name == "digits" else data.draw(20000, gen)
    stats = compute_reference_statistics(model, ref_data.split(4096), sched.timesteps, sched.alphas_cumprod, generator=gen)
    cal_data = data.train[torch.randperm(len(data.train), generator=gen)[: args.calibration_particles]]
    calibration = None
    if calibrate:
        calibration = calibrate_step_sizes(model, cal_data, sched.timesteps, sched.alphas_cumprod, stats.mean_data,
                                           flow_steps=args.flow_steps, generator=gen)  # fmt: skip
    return sched, stats, cal_data, calibration


def flow(model, sched, stats, noise, step_sizes, flow_steps):
    try:
        return sample_flow(model, noise, sched.timesteps, stats.mean_data, flow_steps=flow_steps,
                           update=euler_update(step_sizes))  # fmt: skip
    except FloatingPointError:
        return torch.full_like(noise, float("nan"))


def dmmd_sample(model, data, n, seed, args, step_sizes=None, setup=None):
    """Reference statistics over the training data, the calibrated step sizes (unless given), the flow. ``setup``:
    what :func:`flow_setup` already computed for this model and seed (the same values; computed once per model)."""
    sched, stats, _, calibration = setup or flow_setup(model, data, seed, args, calibrate=step_sizes is None)
    if step_sizes is None:
        step_sizes = calibration.step_sizes
    noise = torch.randn(n, data.dim, generator=torch.Generator().manual_seed(seed))
    start = time.perf_counter()
    x = flow(model, sched, stats, noise, step_sizes, args.flow_steps)
    seconds = time.perf_counter() - start
    return x, seconds, {"step_sizes": [float(s) for s in step_sizes],
                        "calibration": None if calibration is None or step_sizes is not calibration.step_sizes
                        else calibration.distances}  # fmt: skip


def _select(model, data, seed, args, setup=None):
    """The library's default step rule (``choose_step_rule``, as the export runs it): the calibrated steps against
    constant eta on a factor-3 ladder from 1, each scored by the energy distance of the whole flow's final
    particles (one noise draw, as many as the calibration samples) to the calibration samples, training data
    only. Returns the selection and the chosen per-level step sizes."""
    sched, stats, cal_data, calibration = setup or flow_setup(model, data, seed, args)
    noise = torch.randn(cal_data.shape, generator=torch.Generator().manual_seed(20_000 + seed))

    def final(step_size_schedule=None, step_size=None):
        steps = calibration.step_sizes if step_size_schedule is None else [step_size] * args.levels
        return flow(model, sched, stats, noise.clone(), steps, args.flow_steps)

    selection = choose_step_rule(final, cal_data, calibrated=True)
    steps = calibration.step_sizes if selection.eta is None else [selection.eta] * args.levels
    return selection, [float(s) for s in steps], sched, stats


def select(model, data, seed, args):
    """:func:`_select` without the scheduler and statistics it computed: (selection, chosen per-level steps)."""
    return _select(model, data, seed, args)[:2]


def selection_row(model, data, seed, arm, step, args, scorer, record, setup=None) -> dict:
    """One model's row of the step-rule table: the selection, FD of the chosen steps and of them x 1/3 and x 3,
    and the constant sweep stored for the same model (arm, seed, step) when the JSON has one."""
    selection, steps, sched, stats = _select(model, data, seed, args, setup)  # its statistics serve the three flows below
    row = {"arm": arm, "seed": seed, "step": step, **selection.as_record(), "eta": selection.eta, "step_sizes": steps}
    noise = torch.randn(args.num_samples, data.dim, generator=torch.Generator().manual_seed(seed))  # dmmd_sample's
    for factor in (1.0, 1 / 3, 3.0):
        x = flow(model, sched, stats, noise.clone(), [factor * s for s in steps], args.flow_steps)
        row["selected" if factor == 1.0 else f"x{factor:.3g}"] = scorer(x)
    stored = [r for r in record["rows"] if r["method"] == "dmmd" and r.get("arm", "gp") == arm
              and r["seed"] == seed and r["step"] == step and r.get("sweep")]  # fmt: skip
    if stored:
        const = [s for s in stored[-1]["sweep"] if s["rule"] == "constant" and s["fd"] == s["fd"]]
        best = min(const, key=lambda s: s["fd"])
        row["best_constant"] = {"eta": best["eta"], "fd": best["fd"]}
        row["calibrated_fd"] = stored[-1]["fd"]
    return row


def reselect(args):
    """The default step rule on every saved DMMD model of ``--data`` (``--arms`` x ``--seeds``, from
    ``--save_dir``): FD of the selected rule, of the chosen steps x 1/3 and x 3 (the cliff), next to the constant
    sweep stored for the same model (its last checkpoint's row). Written to the JSON's ``selection`` list."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    data = Dataset(args.data)
    scorer = Scorer(data)
    name = args.name or f"convergence_{args.data}"
    path = os.path.join(RESULTS, name + ".json")
    with open(path) as f:
        record = json.load(f)
    done = record.setdefault("selection", [])
    for arm in args.arms:
        for seed in args.seeds:
            file = os.path.join(args.save_dir, f"{args.data}_dmmd_{arm}_seed{seed}.safetensors")
            if not os.path.exists(file):
                print(f"skipped (no saved model): {file}", flush=True)
                continue
            with safe_open(file, "pt") as f:
                step = int(f.metadata()["step"])
            row = selection_row(load("dmmd", data, load_file(file), arm), data, seed, arm, step, args, scorer, record)
            done[:] = [r for r in done if (r["arm"], r["seed"]) != (arm, seed)] + [row]
            with open(path, "w") as f:
                json.dump(record, f, indent=1)
            print({"arm": arm, "seed": seed, "chosen": row["chosen"], "fd": row["selected"]["fd"],
                   "best": row.get("best_constant")}, flush=True)  # fmt: skip


@torch.no_grad()
def diffusion_sample(model, data, n, seed, nfe, kind):
    # DDPM's ancestral step clips its x0 estimate consistently (the posterior mean uses it); DDIM's does not (it
    # keeps the unclipped epsilon unless use_clipped_model_output), which made DDIM worse with more training on
    # digits in a first run, so DDIM runs unclipped; every method's final samples are clamped to the data's range
    cls = DDIMScheduler if kind == "ddim" else DDPMScheduler
    sched = cls(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                clip_sample=data.bounded and kind == "ddpm", timestep_spacing="trailing")  # fmt: skip
    sched.set_timesteps(nfe)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, data.dim, generator=gen)
    start = time.perf_counter()
    for t in sched.timesteps:
        eps = model(x, torch.full((n,), int(t)))
        x = sched.step(eps, t, x, generator=gen).prev_sample
    return x, time.perf_counter() - start


# --------------------------------------------------------------------------- metrics


class DigitClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Linear(64, 256), nn.SiLU(), nn.Linear(256, 128), nn.SiLU())
        self.head = nn.Linear(128, 10)

    def forward(self, x):
        return self.head(self.features(x))


def train_classifier(data: Dataset) -> tuple[nn.Module, float]:
    """A digit classifier on the training split (light noise augmentation); returns it and its held-out accuracy."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    clf = DigitClassifier()
    opt = torch.optim.Adam(clf.parameters(), lr=1e-3, weight_decay=1e-4)
    for _ in range(3000):
        i = torch.randint(0, len(data.train), (256,), generator=gen)
        x = data.train[i] + 0.1 * torch.randn(256, 64, generator=gen)
        loss = nn.functional.cross_entropy(clf(x), data.train_y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    clf.eval().requires_grad_(False)
    accuracy = float((clf(data.held_out).argmax(1) == data.held_out_y).float().mean())
    return clf, accuracy


class PlaneFeatures(nn.Module):
    """``[x, psi(x)]`` for 2-D points, ``psi`` 64 random Fourier features of a Gaussian kernel of width 0.5."""

    def __init__(self, num_features: int = 64, bandwidth: float = 0.5):
        super().__init__()
        weight, bias = rff_frequencies(num_features, 2, seed=0)
        self.register_buffer("weight", weight.float())
        self.register_buffer("bias", bias.float())
        self.bandwidth = bandwidth

    def forward(self, x):
        return torch.cat([x, 4.0 * rff_map(x / self.bandwidth, self.weight, self.bias)], 1)


class Scorer:
    """FD, KID, precision/recall (torchmetrics + the library's k-NN P/R) in one feature space, against the
    training split; coverage and energy distance in data space."""

    def __init__(self, data: Dataset):
        self.data = data
        if data.name == "digits":
            self.clf, self.accuracy = train_classifier(data)
            self.embed = self.clf.features
        else:  # the point and 64 random Fourier features of it (bandwidth 0.5): FD then sees more than 2 moments
            self.clf, self.accuracy, self.embed = None, None, PlaneFeatures()
        self.reference = data.train
        self.metric = FIDKID(kid_subset_size=500, extractor=nn.Identity(), num_features=self.embed(data.train[:2]).shape[1])
        self.metric.add_features(self.embed(self.reference), real=True)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> dict:
        if not torch.isfinite(x).all():
            return {"fd": float("nan"), "kid": float("nan"), "precision": 0.0, "recall": 0.0, "coverage": 0.0,
                    "energy_distance": float("nan"), "num_fake": x.shape[0], "nonfinite": True}  # fmt: skip
        if self.data.bounded:
            x = x.clamp(-1, 1)
        self.metric.reset_fake()
        self.metric.add_features(self.embed(x), real=False)
        m = self.metric.compute()
        labels = self.data.classes(x, self.clf)
        share = torch.stack([(labels == c).float().mean() for c in range(self.data.num_classes)])
        # a class/mode is covered when it holds at least half of its share of a uniform spread
        covered = (share >= 0.5 / self.data.num_classes).float().mean()
        gen = torch.Generator().manual_seed(7)
        ref = self.reference[torch.randperm(len(self.reference), generator=gen)[:2000]]
        return {"fd": m["fid"], "kid": m["kid"], "kid_std": m["kid_std"], "precision": m["precision"],
                "recall": m["recall"], "coverage": float(covered), "class_share": share.tolist(),
                "energy_distance": float(energy_distance(x[:2000], ref)), "num_fake": x.shape[0]}  # fmt: skip


# --------------------------------------------------------------------------- the benchmark


def geometric_steps(first: int, last: int) -> list[int]:
    steps, s = [], first
    while s < last:
        steps.append(s)
        s *= 2
    return steps + [last]


def run(args):
    data = Dataset(args.data)
    scorer = Scorer(data)
    name = args.name or f"convergence_{args.data}"
    path = os.path.join(RESULTS, name + ".json")
    record = json.load(open(path)) if os.path.exists(path) and not args.fresh else {"rows": []}
    record["args"] = vars(args) | {"arms_done": record.get("args", {}).get("arms_done", [])}
    record["classifier_held_out_accuracy"] = scorer.accuracy
    floor = scorer(data.held_out[: args.num_samples])
    record["floor"] = floor | {"what": "held-out real data scored like samples"}
    print("floor", {k: v for k, v in floor.items() if k != "class_share"}, flush=True)

    def save():
        with open(path, "w") as f:
            json.dump(record, f, indent=1)

    def add(row):
        record["rows"].append(row)
        save()

    for seed in args.seeds:
        for arm in args.arms:
            if arm not in ARMS:
                raise SystemExit(f"unknown arm {arm!r}; choose from {sorted(ARMS)}")
            steps_at = geometric_steps(args.first_step, args.max_steps)
            checkpoints = train("dmmd", data, seed, set(steps_at), args, arm=arm, budget_seconds=args.budget_seconds)
            save_final(args, f"{args.data}_dmmd_{arm}_seed{seed}", checkpoints[-1])
            for i, ck in enumerate(checkpoints):
                model = load("dmmd", data, ck["state"], arm)
                last = i == len(checkpoints) - 1 and args.sweep
                # the last checkpoint's statistics and calibration serve its sweep and selection too (computed once)
                setup = flow_setup(model, data, seed, args) if last else None
                x, secs, info = dmmd_sample(model, data, args.num_samples, seed, args, setup=setup)
                row = {"method": "dmmd", "arm": arm, "seed": seed, "step": ck["step"], "train_seconds": ck["train_seconds"],
                       "nfe": args.levels * args.flow_steps, "step_rule": "calibrated", "sample_seconds": secs,
                       "nonfinite_steps": ck["nonfinite"], **info, **scorer(x)}  # fmt: skip
                if last:
                    row["sweep"] = sweep(model, data, seed, args, scorer, info["step_sizes"], setup)
                add(row)
                print({k: row[k] for k in ("method", "arm", "seed", "step", "fd", "precision", "recall", "coverage")}, flush=True)
                if last:  # the default rule next to the sweep (step-rule table)
                    chosen = selection_row(model, data, seed, arm, ck["step"], args, scorer, record, setup)
                    selected = record.setdefault("selection", [])
                    selected[:] = [r for r in selected if (r["arm"], r["seed"]) != (arm, seed)] + [chosen]
                    save()
        if args.ddpm_max_steps:
            steps_at = geometric_steps(args.first_step, args.ddpm_max_steps)
            checkpoints = train("ddpm", data, seed, set(steps_at), args)
            save_final(args, f"{args.data}_ddpm_seed{seed}", checkpoints[-1])
            for ck in checkpoints:
                model = load("ddpm", data, ck["state"])
                for kind, nfe in (("ddim", 20), ("ddim", 100), ("ddpm", 100)):
                    x, secs = diffusion_sample(model, data, args.num_samples, seed, nfe, kind)
                    row = {"method": kind, "seed": seed, "step": ck["step"], "train_seconds": ck["train_seconds"],
                           "nfe": nfe, "sample_seconds": secs, "clip_sample": data.bounded and kind == "ddpm",
                           **scorer(x)}  # fmt: skip
                    add(row)
                print({k: row[k] for k in ("method", "seed", "step", "fd", "precision", "recall")}, flush=True)
    plot(record, name)


def save_final(args, name: str, checkpoint: dict) -> None:
    """The last EMA weights as safetensors (``--save_dir``), so later work (step rules, one-step generators)
    can start from the converged models instead of training them again."""
    if not args.save_dir:
        return
    from safetensors.torch import save_file

    os.makedirs(args.save_dir, exist_ok=True)
    meta = {"step": str(checkpoint["step"]), "train_seconds": f"{checkpoint['train_seconds']:.1f}"}
    save_file({k: v.contiguous() for k, v in checkpoint["state"].items()}, os.path.join(args.save_dir, name + ".safetensors"), meta)


def sweep(model, data, seed, args, scorer, calibrated, setup=None):
    """FD at constant step sizes and at the calibrated steps × {1/3, 1, 3} (the cliff, before and after)."""
    rows = []
    for eta in args.sweep:
        x, _, _ = dmmd_sample(model, data, args.num_samples, seed, args, step_sizes=[eta] * args.levels, setup=setup)
        rows.append({"rule": "constant", "eta": eta, **scorer(x)})
    for factor in (1 / 3, 3.0):
        x, _, _ = dmmd_sample(model, data, args.num_samples, seed, args, step_sizes=[factor * s for s in calibrated],
                              setup=setup)  # fmt: skip
        rows.append({"rule": "calibrated", "factor": factor, **scorer(x)})
    return rows


# --------------------------------------------------------------------------- plot


def curves(rows, method, arm=None, nfe=None):
    """{step: [(seconds, fd, recall), ...over seeds]} for one curve."""
    out = {}
    for r in rows:
        if r["method"] != method or (arm and r.get("arm") != arm) or (nfe and r["nfe"] != nfe):
            continue
        out.setdefault(r["step"], []).append((r["train_seconds"], r["fd"], r["recall"]))
    return dict(sorted(out.items()))


def plot(record, name):
    p = plt()
    rows = record["rows"]
    fig, axes = p.subplots(1, 3, figsize=(16, 4.6))
    series = [("dmmd", arm, None) for arm in sorted({r.get("arm") for r in rows if r["method"] == "dmmd"})]
    series += [("ddim", None, 100), ("ddim", None, 20), ("ddpm", None, 100)]
    for method, arm, nfe in series:
        c = curves(rows, method, arm, nfe)
        if not c:
            continue
        label = f"DMMD ({arm}, NFE 100)" if method == "dmmd" else f"{method.upper()}-{nfe}"
        steps = list(c)
        mean = lambda k, vals: sum(v[k] for v in vals) / len(vals)
        fd = [mean(1, v) for v in c.values()]
        lo = [min(v[1] for v in vals) for vals in c.values()]
        hi = [max(v[1] for v in vals) for vals in c.values()]
        secs = [mean(0, v) for v in c.values()]
        line = axes[0].plot(steps, fd, marker="o", label=label)[0]
        axes[0].fill_between(steps, lo, hi, alpha=0.15, color=line.get_color())
        axes[1].plot(secs, fd, marker="o", label=label, color=line.get_color())
        axes[2].plot(steps, [mean(2, v) for v in c.values()], marker="o", label=label, color=line.get_color())
    floor = record.get("floor", {})
    for ax, key in ((axes[0], "fd"), (axes[1], "fd"), (axes[2], "recall")):
        if key in floor:
            ax.axhline(floor[key], color="k", ls=":", lw=1, label="held-out real data")
        ax.set_xscale("log")
    for ax in axes[:2]:
        ax.set_yscale("log")
    axes[0].set(xlabel="training steps", ylabel="Fréchet distance (mean of seeds; band: min-max)")
    axes[1].set(xlabel="training seconds (1 thread)", ylabel="Fréchet distance")
    axes[2].set(xlabel="training steps", ylabel="recall (k = 3)")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{record['args']['data']}: DMMD vs DDPM/DDIM on one MLP backbone")
    fig.tight_layout()
    save_figure(fig, os.path.join(RESULTS, name + ".png"))


# --------------------------------------------------------------------------- step cost, side by side


def step_cost(data, args, arms, steps: int = 20, rounds: int = 5) -> dict:
    """Median seconds per training step of DDPM and each DMMD arm, timed in alternating rounds on one thread
    (the same machine noise for all), and each arm's ratio to DDPM: the cost half of "equal seconds"."""
    import statistics

    gen = torch.Generator().manual_seed(0)
    sched = DMMDScheduler()
    runners = {}
    for name in ["ddpm", *arms]:
        method, arm = ("ddpm", "gp") if name == "ddpm" else ("dmmd", name)
        model = build(method, data, arm).train()
        opt = torch.optim.Adam(model.parameters(), lr=args.learning_rate)

        def one(model=model, opt=opt, method=method, arm=arm):
            loss = batch_loss(method, model, data, sched, gen, args, arm)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        runners[name] = one
    times = {name: [] for name in runners}
    for _ in range(rounds):
        for name, one in runners.items():
            one()  # warm-up of this round
            start = time.perf_counter()
            for _ in range(steps):
                one()
            times[name].append((time.perf_counter() - start) / steps)
    median = {name: statistics.median(ts) for name, ts in times.items()}
    return {name: {"seconds_per_step": median[name], "ratio_to_ddpm": median[name] / median["ddpm"],
                   "rounds": times[name]} for name in runners}  # fmt: skip


# --------------------------------------------------------------------------- markdown report


def _stats(values):
    values = [v for v in values if v == v]  # drop NaN
    if not values:
        return "NaN"
    mean = sum(values) / len(values)
    return f"{mean:.3g}" if len(values) == 1 else f"{mean:.3g} ({min(values):.3g}–{max(values):.3g})"


def _best_diffusion(rows, seed, step):
    """The better of DDIM NFE 20 and 100 at one seed and step (the issue's comparison)."""
    cands = [r for r in rows if r["method"] == "ddim" and r["seed"] == seed and r["step"] == step]
    return min(cands, key=lambda r: r["fd"]) if cands else None


def report(record) -> str:
    """Markdown tables: equal steps, equal training seconds, the step rule against a sweep (with the cliff)."""
    rows, out = record["rows"], []
    floor = record.get("floor", {})
    dmmd = [r for r in rows if r["method"] == "dmmd" and r.get("arm", "gp") == "gp"]
    seeds = sorted({r["seed"] for r in dmmd})
    out.append(f"Floor (held-out real data): FD {floor.get('fd', float('nan')):.3g}, precision "
               f"{floor.get('precision', float('nan')):.2f}, recall {floor.get('recall', float('nan')):.2f}. "
               f"Seeds {seeds}; cells: mean (min–max over seeds).\n")  # fmt: skip
    out.append("| steps | DMMD FD | DMMD P / R | best DDIM (NFE 20/100) FD | DDIM P / R | DDPM-100 FD | DMMD / DDIM |")
    out.append("| --- | --- | --- | --- | --- | --- | --- |")
    for step in sorted({r["step"] for r in rows}):
        here = [r for r in dmmd if r["step"] == step]
        best = [b for b in (_best_diffusion(rows, r["seed"], step) for r in here) if b] or \
            [b for b in (_best_diffusion(rows, s, step) for s in seeds) if b]  # fmt: skip
        ddpm = [r for r in rows if r["method"] == "ddpm" and r["step"] == step]
        ratio = [a["fd"] / b["fd"] for a in here for b in best if a["seed"] == b["seed"]]
        out.append(f"| {step:,} | {_stats([r['fd'] for r in here]) if here else '—'} | "
                   f"{_stats([r['precision'] for r in here]) if here else '—'} / {_stats([r['recall'] for r in here]) if here else '—'} | "
                   f"{_stats([b['fd'] for b in best]) if best else '—'} | "
                   f"{_stats([b['precision'] for b in best]) if best else '—'} / {_stats([b['recall'] for b in best]) if best else '—'} | "
                   f"{_stats([r['fd'] for r in ddpm]) if ddpm else '—'} | {_stats(ratio) if ratio else '—'} |")  # fmt: skip
    out.append("\nEqual training seconds (DMMD's last checkpoint against the diffusion checkpoint nearest in seconds, same seed):\n")
    out.append("| seed | DMMD steps / s | FD | DDPM steps / s | best DDIM FD | ratio |")
    out.append("| --- | --- | --- | --- | --- | --- |")
    for seed in seeds:
        last = max((r for r in dmmd if r["seed"] == seed), key=lambda r: r["step"])
        diff = [r for r in rows if r["method"] == "ddim" and r["seed"] == seed]
        if not diff:
            continue
        near = min(diff, key=lambda r: abs(math.log(r["train_seconds"] / last["train_seconds"])))
        best = _best_diffusion(rows, seed, near["step"])
        out.append(f"| {seed} | {last['step']:,} / {last['train_seconds']:.0f} | {last['fd']:.3g} | "
                   f"{near['step']:,} / {near['train_seconds']:.0f} | {best['fd']:.3g} | {last['fd'] / best['fd']:.2f} |")  # fmt: skip
    out.append("\nStep rule at the last checkpoint (FD; the sweep is constant eta, the cliff is the calibrated steps × 1/3 and × 3):\n")
    out.append("| seed | calibrated | best constant (eta) | calibrated / best | × 1/3 | × 3 | constant sweep |")
    out.append("| --- | --- | --- | --- | --- | --- | --- |")
    for r in dmmd:
        if not r.get("sweep"):
            continue
        const = [s for s in r["sweep"] if s["rule"] == "constant"]
        best = min((s for s in const if s["fd"] == s["fd"]), key=lambda s: s["fd"])
        f = {round(s["factor"], 3): s["fd"] for s in r["sweep"] if s["rule"] == "calibrated"}
        sweep = ", ".join(f"{s['eta']:g}: {s['fd']:.3g}" for s in const)
        out.append(f"| {r['seed']} | {r['fd']:.3g} | {best['fd']:.3g} ({best['eta']:g}) | {r['fd'] / best['fd']:.2f} | "
                   f"{f.get(0.333, float('nan')):.3g} | {f.get(3.0, float('nan')):.3g} | {sweep} |")  # fmt: skip
    if record.get("selection"):
        out.append("\nThe default step rule (selected by the final particles' energy distance to training data, "
                   "`choose_step_rule`) at the last checkpoint: FD of the chosen rule, of its steps × 1/3 and × 3 "
                   "(the cliff), against the best constant of the sweep:\n")  # fmt: skip
        out.append("| arm | seed | chosen | FD, selected | best constant FD (eta) | selected / best | × 1/3 | × 3 | P / R |")
        out.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for r in sorted(record["selection"], key=lambda r: (r["arm"], r["seed"])):
            best, sel = r.get("best_constant"), r["selected"]
            swept = f"{best['fd']:.3g} ({best['eta']:g})" if best else "—"
            ratio = f"{sel['fd'] / best['fd']:.2f}" if best else "—"
            out.append(f"| {r['arm']} | {r['seed']} | {r['chosen']} | {sel['fd']:.3g} | {swept} | {ratio} | "
                       f"{r['x0.333']['fd']:.3g} | {r['x3']['fd']:.3g} | "
                       f"{sel['precision']:.2f} / {sel['recall']:.2f} |")  # fmt: skip
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", choices=("digits", "gaussians8", "checkerboard"), default="digits")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--arms", nargs="*", default=["gp"],
                   help=f"DMMD Lipschitz controls, of {sorted(ARMS)} (none: the diffusion baseline only)")  # fmt: skip
    p.add_argument("--max_steps", type=int, default=8000, help="DMMD training steps (last checkpoint)")
    p.add_argument("--ddpm_max_steps", type=int, default=32000, help="DDPM steps (0: no diffusion baseline)")
    p.add_argument("--first_step", type=int, default=500, help="first checkpoint; then every doubling")
    p.add_argument("--budget_seconds", type=float, default=None, help="stop each DMMD arm after this many training seconds")
    p.add_argument("--batch_size", type=int, default=512)
    p.add_argument("--num_groups", type=int, default=16)
    p.add_argument("--learning_rate", type=float, default=3e-4)
    p.add_argument("--ema_decay", type=float, default=0.999)
    p.add_argument("--lambda_gp", type=float, default=None, help="default: 1 on digits, 0.1 on 2-D (the toy's)")
    p.add_argument("--lambda_l2", type=float, default=1e-3)
    p.add_argument("--levels", type=int, default=10)
    p.add_argument("--flow_steps", type=int, default=10)
    p.add_argument("--t_min", type=int, default=0)
    p.add_argument("--calibration_particles", type=int, default=1000)
    p.add_argument("--num_samples", type=int, default=1000)
    p.add_argument("--sweep", type=float, nargs="*", default=[0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0],
                   help="constant step sizes swept at the last checkpoint")  # fmt: skip
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--save_dir", default=os.path.join(os.path.dirname(RESULTS), "..", "runs", "convergence"),
                   help="where the last EMA weights of every run go ('' to keep none)")  # fmt: skip
    p.add_argument("--name", default=None)
    p.add_argument("--fresh", action="store_true", help="start a new JSON instead of appending rows")
    p.add_argument("--plot_only", action="store_true")
    p.add_argument("--report", action="store_true", help="print the markdown tables of an existing JSON and exit")
    p.add_argument("--reselect", action="store_true",
                   help="score the default (selected) step rule on the saved models of --arms x --seeds and exit")
    p.add_argument("--step_cost", action="store_true",
                   help="time a training step of DDPM and of each --arms side by side (alternating rounds) and exit")  # fmt: skip
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.step_cost:
        data = Dataset(args.data)
        record = {"benchmark": "training step cost, side by side", "data": args.data, "threads": args.threads,
                  "batch_size": args.batch_size, "arms": step_cost(data, args, args.arms)}  # fmt: skip
        path = os.path.join(RESULTS, (args.name or f"convergence_step_cost_{args.data}") + ".json")
        with open(path, "w") as f:
            json.dump(record, f, indent=1)
        print(json.dumps({k: round(v["seconds_per_step"] * 1000, 1) for k, v in record["arms"].items()}), "ms/step ->", path)
        return
    if args.reselect:
        reselect(args)
        return
    if args.plot_only or args.report:
        name = args.name or f"convergence_{args.data}"
        record = json.load(open(os.path.join(RESULTS, name + ".json")))
        plot(record, name) if args.plot_only else print(report(record))
        return
    run(args)


if __name__ == "__main__":
    main()
