"""The ``latent-dmmd`` command line: demo, sample, train, cache-latents, evaluate, calibrate, push, card.

User mistakes end with one clear line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from yaml import YAMLError

from . import __version__
from .argparsing import FlagParser

# the Fashion-MNIST pipeline shipped in the repository (pixel space: no autoencoder to fetch)
DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "fashion-mnist-dmmd")


MAX_GRID_IMAGES = 1024  # one PNG grid; beyond this, --no_grid writes the images one by one


class UserError(Exception):
    """A mistake in the command line or its inputs: reported in one line, exit status 2."""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _existing_dir_for(path: str) -> str:
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"output folder does not exist: {folder}")
    return path


# ---------------------------------------------------------------------------- demo


def cmd_demo(args: argparse.Namespace) -> None:
    """Train DMMD on the 2-D 8-Gaussians toy, flow particles, write a PNG and metrics JSON."""
    import torch

    from .toy import ToyConfig, plot_toy, run_toy_experiment

    _existing_dir_for(args.output)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = ToyConfig(train_steps=args.train_steps, num_particles=args.num_particles, seed=args.seed)
    start = time.perf_counter()
    result = run_toy_experiment(config, progress=True)
    result.metrics["wall_clock_s"] = round(time.perf_counter() - start, 2)
    plot_toy(result, args.output)
    metrics_path = os.path.splitext(args.output)[0] + ".json"
    with open(metrics_path, "w") as f:
        json.dump(result.metrics, f, indent=2)
    m = result.metrics
    print(
        f"DMMD: energy distance to held-out data {m['dmmd']['energy_distance']:.4f}, "
        f"{m['dmmd']['near_mode_fraction']:.0%} of particles near a mode, "
        f"smallest mode share {m['dmmd']['min_mode_fraction']:.1%}\n"
        f"fixed-kernel MMD flow ({m['flow_steps_total']} steps, median bandwidth "
        f"{m['gaussian_kernel_flow']['bandwidth_median_heuristic']:.2f}): energy distance "
        f"{m['gaussian_kernel_flow']['energy_distance']:.4f}\n"
        f"wrote {args.output} and {metrics_path} in {m['wall_clock_s']:.0f} s"
    )


# ---------------------------------------------------------------------------- sample


def _load_pipeline(model: str, vae: str | None = None):
    from .pipelines import DMMDPipeline
    from .pipelines.folders import looks_like_local_path

    if not os.path.isdir(model) and looks_like_local_path(model):
        raise UserError(f"no such folder: {model} (and it is not a Hub id of the form user/name)")
    kwargs = {}
    if vae:
        from .autoencoders import load_autoencoder

        try:
            kwargs["vae"] = load_autoencoder(vae)
        except OSError as err:
            raise UserError(f"cannot load the autoencoder {vae}: {str(err).splitlines()[0]}") from err
    try:
        return DMMDPipeline.from_pretrained(model, **kwargs)
    except OSError as err:
        raise UserError(f"cannot load {model}: {str(err).splitlines()[0]}") from err


SEED_RANGE = (0, 2**64 - 1)  # what torch.Generator.manual_seed takes


def _sample_seeds(args: argparse.Namespace):
    """The per-image seeds, checked before anything is loaded: counts first (a range, never a 10^9-entry list),
    then the seed range (torch refuses seeds outside 64 bits), then duplicates (one file each)."""
    if args.seeds and args.num_images != len(args.seeds) and args.num_images_given:
        raise UserError(f"--num_images {args.num_images} does not match the {len(args.seeds)} --seeds")
    seeds = args.seeds or range(args.seed, args.seed + args.num_images)
    if args.grid and len(seeds) > MAX_GRID_IMAGES:
        raise UserError(f"a grid of {len(seeds)} images is too large: pass --no_grid (one PNG per image, written as "
                        f"each batch of --batch_size finishes) or at most {MAX_GRID_IMAGES} images")  # fmt: skip
    lo, hi = (min(seeds), max(seeds)) if args.seeds else (seeds.start, seeds.stop - 1)
    if lo < SEED_RANGE[0] or hi > SEED_RANGE[1]:
        raise UserError(f"seeds must lie in [0, 2**64 - 1]; got {lo if lo < SEED_RANGE[0] else hi}")
    if args.seeds and len(set(args.seeds)) != len(args.seeds):
        twice = sorted({s for s in args.seeds if args.seeds.count(s) > 1})
        raise UserError(f"--seeds repeats {', '.join(map(str, twice))}: each seed names one image file")
    return seeds


def _write_png(image, path: str, overwrite: bool) -> None:
    """Write a PNG beside ``path`` and move it into place; without ``overwrite`` an existing file, including
    one a concurrent run wrote meanwhile, is never replaced (the hard link fails instead)."""
    from .atomic import write_file_atomically

    if overwrite:
        write_file_atomically(path, lambda tmp: image.save(tmp, format="PNG"))
        return
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".tmp-{os.getpid()}-{os.path.basename(path)}")
    image.save(tmp, format="PNG")
    try:
        os.link(tmp, path)  # atomic, and refuses an existing name
    except FileExistsError:
        raise UserError(f"{path} exists (another run?): pass --overwrite, or another --output_dir") from None
    finally:
        os.remove(tmp)


def cmd_sample(args: argparse.Namespace) -> None:
    import torch

    seeds = _sample_seeds(args)
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise UserError(f"--output_dir {args.output_dir} is a file, not a folder")
    names = ["grid.png"] if args.grid else [f"seed{s}.png" for s in seeds] if len(seeds) <= 10_000 else []
    existing = [n for n in names if os.path.exists(os.path.join(args.output_dir, n))]
    if existing and not args.overwrite:
        raise UserError(f"{os.path.join(args.output_dir, existing[0])} exists"
                        f"{f' (and {len(existing) - 1} more)' if len(existing) > 1 else ''}: pass --overwrite, or another --output_dir")  # fmt: skip
    if args.model is None:
        if not os.path.isdir(DEFAULT_MODEL):
            raise UserError(f"the shipped model is not at {DEFAULT_MODEL} (installed without the repository?): "
                            "pass a pipeline folder or Hub id")  # fmt: skip
        args.model = DEFAULT_MODEL
    pipe = _load_pipeline(args.model, args.vae)
    if pipe.vae is None and pipe.discriminator.config.reference_vae is not None:
        raise UserError(f"{args.model} flows in the latent space of a {pipe.discriminator.config.reference_vae['class']} "
                        "autoencoder it does not contain: pass --vae (a TAEF2 folder such as ../shared/weights/taef2, "
                        "a diffusers folder or a Hub id; the model card names it)")  # fmt: skip
    if args.score_model:
        from diffusers import UNet2DModel

        try:
            pipe.register_modules(score_model=UNet2DModel.from_pretrained(args.score_model))
        except OSError as err:
            raise UserError(f"cannot load the score model {args.score_model}: {str(err).splitlines()[0]}") from err
    pipe.set_progress_bar_config(desc="DMMD flow")
    keys = ("num_inference_steps", "flow_steps_per_level", "step_size", "noise_scale", "noise_schedule", "noise_mode",
            "score_weight", "noise_injection", "final_denoise", "use_generator")  # fmt: skip
    call = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
    if getattr(pipe, "generator", None) is not None and call.get("use_generator") is not False:
        flow_flags = sorted(k for k in call if k != "use_generator")
        if flow_flags:
            raise UserError(f"{args.model} samples with its one-step generator, which has no --{flow_flags[0]}: pass --flow "
                            f"to run the particle flow with those settings")  # fmt: skip
        pipe.set_progress_bar_config(desc="one-step generator")
    start = time.perf_counter()
    grid_images, written = [], []
    try:
        # batches of --batch_size bound the memory for any --num_images; particles interact within a batch only
        for first in range(0, len(seeds), args.batch_size):
            chunk = seeds[first : first + args.batch_size]
            images = pipe(num_images=len(chunk), generator=[torch.Generator().manual_seed(s) for s in chunk], **call).images
            if args.grid:
                grid_images += images
                continue
            os.makedirs(args.output_dir, exist_ok=True)
            for seed, image in zip(chunk, images):
                path = os.path.join(args.output_dir, f"seed{seed}.png")
                _write_png(image, path, args.overwrite)
                written.append(path)
    except KeyboardInterrupt:
        done = f": {', '.join(written)}" if 0 < len(written) <= 10 else f" in {args.output_dir}" if written else ""
        print(f"latent-dmmd sample: interrupted; {len(written)} of {len(seeds)} images written{done}", file=sys.stderr)
        raise SystemExit(130) from None
    seconds = time.perf_counter() - start
    if args.grid:
        from PIL import Image

        from .records import image_grid, to_uint8

        os.makedirs(args.output_dir, exist_ok=True)
        path = os.path.join(args.output_dir, "grid.png")
        _write_png(Image.fromarray(image_grid(to_uint8(grid_images), nrow=args.nrow)), path, args.overwrite)
        written = [path]
    print(f"{len(seeds)} images in {seconds:.1f} s -> {', '.join(written) if len(written) < 4 else args.output_dir}")


# ---------------------------------------------------------------------------- train / cache / evaluate


def cmd_train(args: argparse.Namespace, rest: list[str]) -> None:
    if "-h" in rest or "--help" in rest:
        from .training import build_parser as training_parser

        training_parser(prog="latent-dmmd train", parents=[train_launcher_parser()]).print_help()
        return
    if args.num_processes == 1:
        from .training import main as train_main

        train_main(rest)
        return
    import torch

    if torch.cuda.is_available():
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(args.num_processes),
               "-m", "latent_dmmd.training", *rest]  # fmt: skip
        env = os.environ
    else:  # several CPU processes (gloo): torchrun, as accelerate needs MPI for this
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.num_processes}", "-m",
               "latent_dmmd.training", *rest]  # fmt: skip
        env = {**os.environ, "ACCELERATE_USE_CPU": "1",
               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // args.num_processes)))}  # fmt: skip
    from .launch import die_with_parent

    code = subprocess.call(cmd, env=env, preexec_fn=die_with_parent)  # killing this command ends the run
    if code:
        raise UserError(f"training exited with status {code}")


def cmd_cache(args: argparse.Namespace, rest: list[str]) -> None:
    if "-h" in rest or "--help" in rest:
        from .training import build_parser as training_parser

        training_parser(prog="latent-dmmd cache-latents").print_help()
        return
    from .training import cache_main

    cache_main(rest, prog="latent-dmmd cache-latents")


def cmd_evaluate(args: argparse.Namespace, rest: list[str]) -> None:
    from .evaluation_args import METRIC_NAMES, evaluate_parser

    evaluate_parser("latent-dmmd evaluate").parse_args(rest)  # --help and flag errors before torch is imported
    from .evaluation import evaluate_main

    record = evaluate_main(rest, prog="latent-dmmd evaluate")
    m = record["metrics"]
    fd, kd = METRIC_NAMES[m.get("features", "inception")]
    print(f"{fd} {m['fid']:.2f}  {kd} {m['kid']:.4f} ± {m['kid_std']:.4f}  ({m['num_fake']} generated vs {m['num_real']} reference)")


# ---------------------------------------------------------------------------- push / card


def cmd_push(args: argparse.Namespace) -> None:
    from .upload import push_pipeline_folder

    if not os.path.isdir(args.folder):
        raise UserError(f"pipeline folder not found: {args.folder}")
    token = os.environ.get(args.token_env) if args.token_env else None
    try:
        files = push_pipeline_folder(args.folder, args.repo_id, private=args.private, revision=args.revision, token=token)
    except Exception as err:  # the Hub client's and httpx's errors: one line, not 70 lines of traceback
        if isinstance(err, (UserError, ValueError)):
            raise
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"could not upload to {args.repo_id} ({type(err).__name__}: {first}); check the network, "
                        "HF_HUB_OFFLINE and your login (huggingface-cli login)") from None
    print(f"uploaded {len(files)} files to {args.repo_id}{'@' + args.revision if args.revision else ''}")


def cmd_calibrate(args: argparse.Namespace) -> None:
    """Calibrate a model's step sizes on its training images and save the folder with the calibrated scheduler."""
    import torch

    from .calibration import calibrate_pipeline
    from .data import build_image_dataset

    out = args.output or args.model
    if args.output is None and not args.in_place:
        raise UserError("pass --output FOLDER for a calibrated copy, or --in_place to update the model folder")
    if not os.path.isdir(args.model):
        raise UserError(f"calibrate reads a local pipeline folder; {args.model} is not one")
    if not os.path.exists(args.data):
        raise UserError(f"no such training data: {args.data}")
    pipe = _load_pipeline(args.model, args.vae)
    if pipe.vae is None and pipe.discriminator.config.reference_vae is not None:
        raise UserError(f"{args.model} is a latent model without its autoencoder: pass --vae to encode the images")
    from .records import output_resolution

    resolution = output_resolution(pipe)
    data = build_image_dataset(args.data, resolution=resolution, first_index=args.first_index,
                               max_train_samples=args.num_particles, channels=pipe.particle_shape[0] if pipe.vae is None else 3)  # fmt: skip
    items = [x["pixel_values"] for x in (data[i] for i in range(len(data))) if x is not None]
    if len(items) < 2:
        raise UserError(f"{args.data} gave {len(items)} readable images from index {args.first_index}: need at least 2")
    x = torch.stack(items)
    if pipe.vae is not None:
        from .autoencoders import encode_images

        with torch.no_grad():
            x = torch.cat([encode_images(pipe.vae, chunk).mean for chunk in x.split(32)])
    pipe.set_progress_bar_config(disable=True)
    calibration = calibrate_pipeline(pipe, x, generator=torch.Generator().manual_seed(args.seed), step_size=args.step_size)
    chosen = ""
    if args.select:
        from .calibration import select_step_rule

        selection = select_step_rule(pipe, x, generator=torch.Generator().manual_seed(args.seed + 1), progress=True)
        distances = ", ".join(f"{k} {v:.4g}" for k, v in selection.distances.items())
        chosen = f"; the flow that lands closest to them: {selection.chosen} (energy distances {distances})"
    vae = pipe.vae if args.vae is None else None  # an attached autoencoder is not written into the folder
    from .pipelines import DMMDPipeline

    DMMDPipeline(pipe.discriminator, pipe.scheduler, vae=vae).save_pretrained(out)
    steps = ", ".join(f"{t}: {s:.3g}" for t, s in zip(calibration.timesteps, calibration.step_sizes))
    print(f"calibrated on {x.shape[0]} images ({args.data} from {args.first_index}); step sizes per level {steps}{chosen} -> {out}")


def cmd_card(args: argparse.Namespace) -> None:
    from .hub import sampler_rows, ship_run, write_model_card

    samplers = sampler_rows(args.samplers_from_benchmark) if args.samplers_from_benchmark else None
    if args.from_run:
        sample_grid = args.sample_grid is not None
        if sample_grid and args.sample_grid != WRITE_SAMPLES:
            raise UserError("with --from-run, --sample-grid takes no file: it writes samples.png from the model")
        if args.config:
            raise UserError("with --from-run the training config is the run's config.yaml; drop --config")
        path = ship_run(args.from_run, args.folder, drop_vae=args.drop_vae, sample_grid=sample_grid,
                        metrics_file=args.metrics, benchmark=args.metrics_from_benchmark,
                        benchmark_model=args.benchmark_model, repo_id=args.repo_id, datasets=args.dataset,
                        data_terms=args.data_terms, vae_note=args.vae_note, limitations=args.limitation,
                        samplers=samplers)  # fmt: skip
        print(f"wrote {path}")
        return
    if args.drop_vae or args.metrics_from_benchmark:
        raise UserError("--drop-vae and --metrics-from-benchmark need --from-run RUN")
    if args.sample_grid == WRITE_SAMPLES:
        raise UserError("--sample-grid without a file needs --from-run RUN (name a PNG inside the folder instead)")
    if not os.path.isfile(os.path.join(args.folder, "model_index.json")):
        raise UserError(f"not a pipeline folder (no model_index.json): {args.folder}")
    for path in (args.metrics, args.config):
        if path and not os.path.isfile(path):
            raise UserError(f"file not found: {path}")
    config = None
    if args.config:
        import yaml

        with open(args.config) as f:
            config = yaml.safe_load(f)
    path = write_model_card(
        args.folder, config, metrics_file=args.metrics, sample_grid=args.sample_grid, repo_id=args.repo_id,
        datasets=args.dataset, data_terms=args.data_terms, vae_note=args.vae_note, limitations=args.limitation or None,
        samplers=samplers,
    )  # fmt: skip
    print(f"wrote {path}")


WRITE_SAMPLES = "<write samples.png>"


# ---------------------------------------------------------------------------- parser


PASS_THROUGH = {"train": cmd_train, "cache-latents": cmd_cache, "evaluate": cmd_evaluate}


def train_launcher_parser() -> argparse.ArgumentParser:
    """The one flag ``latent-dmmd train`` reads itself; the rest goes to the training script."""
    p = FlagParser(prog="latent-dmmd train", add_help=False)
    p.add_argument("--num_processes", type=_positive_int, default=1,
                   help="processes: GPUs with CUDA (accelerate), else CPU processes (gloo, torchrun)")  # fmt: skip
    return p


def build_parser() -> argparse.ArgumentParser:
    from .argparsing import HelpFormatter as fmt

    parser = FlagParser(prog="latent-dmmd",
                                     description="DMMD: generative modelling with the diffusion MMD gradient flow.")  # fmt: skip
    parser.add_argument("--version", action="version", version=f"latent_dmmd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", formatter_class=fmt,
                          help="train the 2-D toy (~25 s on 2 CPU cores) and plot particles flowing onto 8 modes")  # fmt: skip
    demo.add_argument("--output", default="dmmd_toy.png", help="PNG to write; metrics go next to it as .json")
    demo.add_argument("--train-steps", type=_positive_int, default=2000, help="discriminator training steps")
    demo.add_argument("--num-particles", type=_positive_int, default=1000, help="particles flowed together")
    demo.add_argument("--seed", type=int, default=0, help="seed of data, weights and initial noise")
    demo.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    demo.set_defaults(func=cmd_demo)

    sample = sub.add_parser("sample", formatter_class=fmt, help="generate images from a pipeline folder or Hub id")
    sample.add_argument("model", nargs="?", default=None,
                        help="pipeline folder (save_pretrained) or Hub id user/name (default: the shipped "
                             "Fashion-MNIST model, models/fashion-mnist-dmmd)")  # fmt: skip
    sample.add_argument("--num-images", type=_positive_int, default=8, help="images (particles) generated together")
    sample.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    sample.add_argument("--seeds", type=int, nargs="+", help="explicit per-image seeds (overrides --seed/--num_images)")
    sample.add_argument("--num-inference-steps", dest="num_inference_steps", type=_positive_int, default=None,
                        help="T noise levels (default: the model's scheduler config)")  # fmt: skip
    sample.add_argument("--flow-steps-per-level", dest="flow_steps_per_level", type=_positive_int, default=None,
                        help="N_s flow steps per level (default: the model's scheduler config)")  # fmt: skip
    sample.add_argument("--step-size", dest="step_size", type=_positive_float, default=None,
                        help="flow step size eta (default: the model's scheduler config)")  # fmt: skip
    sample.add_argument("--noise-scale", dest="noise_scale", type=float, default=None,
                        help="DiffFlow noise g0 (default: the scheduler config, 0 = plain DMMD)")  # fmt: skip
    sample.add_argument("--noise-schedule", dest="noise_schedule", choices=("sigma", "constant", "window"), default=None,
                        help="g(t) = g0 sigma_t, g0, or g0 inside the config's noise_window")  # fmt: skip
    sample.add_argument("--noise-mode", dest="noise_mode", choices=("plain", "compensated", "score"), default=None,
                        help="DiffFlow noise mode (method 7)")  # fmt: skip
    sample.add_argument("--score-weight", dest="score_weight", type=float, default=None,
                        help="w in [0, 1]: witness drift x (1 - w); needs --noise-mode score")  # fmt: skip
    sample.add_argument("--noise-injection", dest="noise_injection", type=float, default=None,
                        help="beta: witness gradient at z + beta sigma_t u, particles z moved (default: the scheduler config)")  # fmt: skip
    sample.add_argument("--final-denoise", dest="final_denoise", choices=("none", "tweedie", "flow"), default=None,
                        help="after the last level: one Tweedie step with --score-model, or more flow steps there")  # fmt: skip
    sample.add_argument("--score-model", dest="score_model", default=None,
                        help="epsilon UNet folder of a DDPM on the same forward process (e.g. <run>/baseline/unet)")  # fmt: skip
    sample.add_argument("--vae", default=None,
                        help="autoencoder of a latent model that ships without one: a diffusers folder or Hub id, "
                             "or a TAEF2 folder (e.g. ../shared/weights/taef2)")  # fmt: skip
    sample.add_argument("--flow", dest="use_generator", action="store_false", default=None,
                        help="run the particle flow even when the folder has a one-step generator (default: use it)")  # fmt: skip
    sample.add_argument("--output-dir", default="samples", help="folder for the PNG(s)")
    sample.add_argument("--no-grid", dest="grid", action="store_false", help="one PNG per image instead of a grid")
    sample.add_argument("--nrow", type=_positive_int, default=8, help="images per grid row")
    sample.add_argument("--overwrite", action="store_true",
                        help="replace PNGs already in --output_dir (without it an existing file is never replaced)")  # fmt: skip
    sample.add_argument("--batch_size", type=_positive_int, default=64,
                        help="images flowed together; more are made batch by batch, so memory stays bounded (under "
                             "particle_mean='ensemble' images interact within their batch only)")  # fmt: skip
    sample.set_defaults(func=cmd_sample)

    sub.add_parser("train", formatter_class=fmt, add_help=False,
                   help="train; --num-processes N, other flags go to scripts/train_latent.py (see train --help)")  # fmt: skip
    sub.add_parser("cache-latents", formatter_class=fmt, add_help=False,
                   help="encode a dataset into a latent cache (training flags; see cache-latents --help)")  # fmt: skip
    sub.add_parser("evaluate", formatter_class=fmt, add_help=False,
                   help="FID/KID of a pipeline against reference images (see evaluate --help)")  # fmt: skip

    push = sub.add_parser("push", formatter_class=fmt, help="upload a pipeline folder (and nothing else) to the Hub")
    push.add_argument("folder", help="pipeline folder written by save_pretrained / the training script")
    push.add_argument("repo_id", help="Hub repo id, user/name")
    push.add_argument("--private", action="store_true", help="create the repo as private")
    push.add_argument("--revision", default=None, help="branch to upload to (created if missing)")
    push.add_argument("--token-env", default=None,
                      help="environment variable holding a token (default: huggingface_hub's own login)")  # fmt: skip
    push.set_defaults(func=cmd_push)

    calibrate = sub.add_parser("calibrate", formatter_class=fmt,
                               help="choose a flow step size per level on training images (method 5) and store it in "
                                    "the model's scheduler")  # fmt: skip
    calibrate.add_argument("model", help="local pipeline folder")
    calibrate.add_argument("--data", required=True, help="training images (folder or IDX file): never held-out data")
    calibrate.add_argument("--first-index", dest="first_index", type=int, default=0, help="first image of --data used")
    calibrate.add_argument("--num-particles", dest="num_particles", type=_positive_int, default=512,
                           help="images flowed together; also the ensemble size the steps assume")  # fmt: skip
    calibrate.add_argument("--vae", default=None, help="autoencoder of a latent model that ships without one")
    calibrate.add_argument("--step-size", dest="step_size", type=_positive_float, default=1.0,
                           help="multiplier of the calibrated steps stored with them")  # fmt: skip
    calibrate.add_argument("--seed", type=int, default=0, help="seed of the particles' noise and the targets' noise")
    calibrate.add_argument("--no-select", dest="select", action="store_false",
                           help="keep the calibrated steps (default: keep them or a constant eta, whichever flow lands "
                                "closest to the images in energy distance)")  # fmt: skip
    calibrate.add_argument("--output", default=None, help="write the calibrated model here")
    calibrate.add_argument("--in-place", dest="in_place", action="store_true", help="update the model folder itself")
    calibrate.set_defaults(func=cmd_calibrate)

    card = sub.add_parser("card", formatter_class=fmt,
                          help="write or refresh the model card (README.md) of a pipeline folder, or ship a run "
                               "as a model folder with --from-run")  # fmt: skip
    card.add_argument("folder", help="pipeline folder (with --from-run: the model folder to write, replaced if it exists)")
    card.add_argument("--from-run", default=None,
                      help="training run folder (pipeline/, config.yaml, training_summary.json) to ship as FOLDER")  # fmt: skip
    card.add_argument("--drop-vae", action="store_true", help="with --from-run: save without the autoencoder's weights")
    card.add_argument("--metrics", default=None, help="metrics.json from latent-dmmd evaluate")
    card.add_argument("--metrics-from-benchmark", default=None,
                      help="with --from-run: benchmarks/results/quality_*.json instead of --metrics, its DMMD row at "
                           "the model's own sampler settings")  # fmt: skip
    card.add_argument("--benchmark-model", default=None, help="the model name of that row (several in one benchmark)")
    card.add_argument("--samplers-from-benchmark", default=None,
                      help="benchmarks/results/onestep_*.json of this folder: the one-step generator's and the flow's "
                           "rows, shown side by side in the card")  # fmt: skip
    card.add_argument("--config", default=None, help="training config YAML (default: ../config.yaml if present)")
    card.add_argument("--sample-grid", nargs="?", const=WRITE_SAMPLES, default=None,
                      help="PNG path (relative to the folder) shown in the card; with --from-run and no path, "
                           "write samples.png (16 images, seed 0; not for face data)")  # fmt: skip
    card.add_argument("--repo-id", default=None, help="Hub id used in the card's loading code")
    card.add_argument("--dataset", nargs="+", default=None, help="Hub dataset ids for the card metadata")
    card.add_argument("--data-terms", default=None, help="terms of the training data, stated under limitations")
    card.add_argument("--vae-note", default=None, help="how to attach the autoencoder, when it is not in the folder")
    card.add_argument("--limitation", action="append", default=[], help="extra limitation bullet (repeatable)")
    card.set_defaults(func=cmd_card)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    command = argv[0] if argv else None
    try:
        if command in PASS_THROUGH:
            rest = argv[1:]
            if command == "train":
                known, rest = train_launcher_parser().parse_known_args(rest)
            else:
                known = argparse.Namespace()
            try:
                PASS_THROUGH[command](known, rest)
            except SystemExit as stop:  # argparse's --help (0) or usage error (2) in the sub-command
                return stop.code if isinstance(stop.code, int) else 2
            return 0
        args = parser.parse_args(argv)
        if command == "sample":
            args.num_images_given = any(a.split("=")[0] in ("--num-images", "--num_images") for a in argv)
        args.func(args)
    except (UserError, ValueError, OSError, ImportError, FloatingPointError, YAMLError) as err:
        print(f"latent-dmmd {command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
