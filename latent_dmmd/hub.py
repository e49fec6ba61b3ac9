"""Model cards, and a training run shipped as a model folder.

``write_model_card`` renders ``templates/model_card.md`` with huggingface_hub's card tools; ``ship_run``
turns a run into a model folder with its card. Uploads live in ``upload`` (re-exported here).
"""

from __future__ import annotations

import json
import logging
import os
from importlib import resources

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .upload import NEVER_UPLOAD, UPLOAD_PATTERNS, files_to_upload, push_pipeline_folder  # noqa: F401  (re-exported)

logger = logging.getLogger(__name__)

def _template() -> str:
    return resources.files("latent_dmmd").joinpath("templates/model_card.md").read_text()


def _objective(cfg: dict) -> str:
    """One line on the training loss: estimator, level balance and penalties (method §2-3)."""
    if cfg.get("objective") == "kale":
        return f"KALE critic, gradient penalty {cfg.get('lambda_gp', 1.0)}"
    pairing = {"paired": "paired unbiased MMD² (own noisy copy, diagonal left out)",
               "permuted": "two-sample MMD² against the next group's noisy copies",
               "independent": "two-sample MMD² on paired copies (biased; ablation only)"}.get(  # fmt: skip
        cfg.get("pairing", "independent"), str(cfg.get("pairing")))
    balance = cfg.get("level_weighting", "none")
    kernel = ""
    if cfg.get("kernel") == "rff_gaussian":
        kernel = f"Gaussian kernel on the features ({cfg.get('rff_features') or 1024} random Fourier features); "
    gp_every, gp_fraction = cfg.get("gp_every") or 1, cfg.get("gp_fraction") or 1.0
    lazy = "" if gp_every == 1 else f" every {gp_every} steps (weight x{gp_every})"
    lazy += "" if gp_fraction == 1 else f" on {gp_fraction:g} of the interpolates"
    return (f"{kernel}{pairing}; level weighting {balance}; l2 ({cfg.get('l2_mode', 'feature')}) "
            f"{cfg.get('lambda_l2', 1e-3)}, gradient penalty {cfg.get('lambda_gp', 1.0)}{lazy}")


def _clock(info: dict, budget: str) -> str | None:
    """The card's wall-clock row: the run's seconds, or for a run resumed over several sessions (or a checkpoint
    exported afterwards) the optimisation seconds its checkpoints summed (``progress.json``)."""
    seconds, optimize = info.get("train_seconds"), info.get("optimize_seconds")
    if optimize and optimize > (seconds or 0):
        return f"{optimize:,.0f} s of optimisation ({optimize / 3600:.2f} h), summed over resumed sessions"
    return f"{seconds} s{budget}" if seconds else None


# what a card said, kept in the card itself (an HTML comment, invisible on the Hub) so that a
# refresh without the run's config keeps it
CARD_STATE = "<!-- latent_dmmd card: {} -->"


def _previous_card(path: str) -> dict:
    """What an existing card says: its saved state, or for older cards the training table, the
    metrics table, the protocol line and the sample image read from the text; plus its metadata."""
    if not os.path.isfile(path):
        return {}
    import re

    card = ModelCard.load(path)
    found = re.search(r"<!-- latent_dmmd card: (.*) -->", card.text)
    state = json.loads(found.group(1)) if found else {}
    if not found:
        sections = re.split(r"^## ", card.text, flags=re.MULTILINE)
        for section in sections:
            title, _, body = section.partition("\n")
            rows = dict(re.findall(r"^\| ([^|]+?) \| (.+?) \|$", body, flags=re.MULTILINE))
            rows = {k: v for k, v in rows.items() if k not in ("metric", "---", "") and set(v) != {"-", " "}}
            if title.strip() == "Training":
                state["training"] = rows
            elif title.strip() == "Limitations":  # the template's two fixed bullets come first
                bullets = re.findall(r"^- (.*(?:\n  .*)*)", body, flags=re.MULTILINE)
                state["limitations"] = [b.replace("\n  ", " ") for b in bullets[2:]]
            elif title.strip() == "Evaluation":
                state["metrics"] = rows
                protocol = re.search(r"^Protocol: (.*)$", body, flags=re.MULTILINE)
                state["protocol"] = protocol.group(1) if protocol else ""
        image = re.search(r"^!\[samples\]\((.+?)\)$", card.text, flags=re.MULTILINE)
        state["sample_grid"] = image.group(1) if image else None
        note = re.search(r"^\*\*Autoencoder\.\*\* (.*)$", card.text, flags=re.MULTILINE)
        state["vae_note"] = note.group(1) if note else None
    data = card.data
    state["datasets"] = data.datasets
    state["eval_results"] = data.eval_results
    state["model_name"] = data.model_name
    return state


def read_metrics_file(path: str) -> dict:
    """A ``metrics.json`` of ``latent-dmmd evaluate``, checked: a list, ``{}`` or a record without FID and KID is
    one clear error, not a KeyError in the card's template."""
    try:
        with open(path) as f:
            record = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not JSON ({err.msg}, line {err.lineno})") from None
    metrics = record.get("metrics") if isinstance(record, dict) else None
    if not isinstance(metrics, dict) or not isinstance(record.get("protocol"), dict):
        raise ValueError(f"{path} is not a metrics.json of `latent-dmmd evaluate`: it needs 'metrics' and 'protocol' objects")
    missing = [k for k in ("fid", "kid", "kid_std") if not isinstance(metrics.get(k), (int, float))]
    if missing:
        raise ValueError(f"{path}: metrics lacks the numbers {', '.join(missing)}")
    return record


def write_model_card(
    folder: str,
    config=None,
    info: dict | None = None,
    *,
    metrics_file: str | None = None,
    sample_grid: str | None = None,
    repo_id: str | None = None,
    datasets: list[str] | None = None,
    data_terms: str | None = None,
    vae_note: str | None = None,
    limitations: list[str] | None = None,
    name: str | None = None,
    one_step: str | None = None,
    samplers: dict | None = None,
) -> str:
    """Render the model card (README.md) of a pipeline folder.

    ``config`` is the training config (dataclass or dict); ``info`` the run summary;
    ``metrics_file`` a ``metrics.json`` of ``scripts/evaluate.py`` whose numbers and protocol go
    into both the YAML ``model-index`` and the body; ``limitations`` extra bullets for the card; ``name`` the model's name (default: from the repo id);
    ``one_step`` how the folder's one-step generator was trained, and ``samplers`` (:func:`sampler_rows`) its
    measured rows beside the flow's. What is not given is kept from the existing card.
    """
    import dataclasses

    from .schedulers import DMMDScheduler

    cfg = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config or {})
    info = info or {}
    if not cfg and os.path.isfile(os.path.join(folder, "..", "config.yaml")):
        import yaml

        with open(os.path.join(folder, "..", "config.yaml")) as f:
            cfg = yaml.safe_load(f) or {}
    summary_path = os.path.join(folder, "..", "training_summary.json")
    if not info and os.path.isfile(summary_path):
        with open(summary_path) as f:
            info = json.load(f)
    sched = DMMDScheduler.from_pretrained(os.path.join(folder, "scheduler"))
    with open(os.path.join(folder, "discriminator", "config.json")) as f:
        disc = json.load(f)
    with open(os.path.join(folder, "model_index.json")) as f:
        has_vae = (json.load(f).get("vae") or [None])[0] is not None
    space = "latent" if has_vae or disc.get("reference_vae") else "pixel"  # a latent model may ship without its VAE
    repo = repo_id or cfg.get("hub_model_id") or "path/to/this/folder"
    previous = _previous_card(os.path.join(folder, "README.md"))
    name = name or (None if repo_id else previous.get("model_name"))
    model_name = name or repo.split("/")[-1]

    metrics, protocol, eval_results = {}, "", None
    if metrics_file:
        record = read_metrics_file(metrics_file)
        m, proto = record["metrics"], record["protocol"]
        from .evaluation_args import METRIC_NAMES

        fd, kd = METRIC_NAMES[proto.get("features", "inception")]
        metrics = {fd: f"{m['fid']:.2f}", kd: f"{m['kid']:.4f} ± {m['kid_std']:.4f}",
                   "generated / reference images": f"{m['num_fake']} / {m['num_real']}"}  # fmt: skip
        if m.get("precision") is not None and m.get("recall") is not None:
            metrics["precision / recall (k-NN)"] = f"{m['precision']:.3f} / {m['recall']:.3f}"
        protocol = (f"{proto['nfe']} NFE ({proto['forward_equivalents']} forward-equivalents), "
                    f"{proto['sampler'].get('particles_per_batch')} particles per batch, reference "
                    f"{proto['reference']['path']} from index {proto['reference']['first_index']} "
                    f"({proto['reference']['count']} images at {proto['reference']['resolution']} px), "
                    f"{proto['feature_extractor']}; {proto['seconds_per_image']} s per image on "
                    f"{record['environment']['device']}.")  # fmt: skip
        dataset_name = (datasets or ["custom"])[0]
        eval_results = [
            EvalResult(task_type="unconditional-image-generation", dataset_type=dataset_name, dataset_name=dataset_name,
                       metric_type=name.lower(), metric_value=round(float(m[key]), 4), metric_name=name)  # fmt: skip
            for name, key in ((fd, "fid"), (kd, "kid"))
        ]
    card_data = ModelCardData(
        library_name="latent_dmmd",
        pipeline_tag="unconditional-image-generation",
        tags=["dmmd", "mmd-gradient-flow", f"{space}-space", "diffusers", "unconditional-image-generation"],
        license="apache-2.0",
        datasets=datasets,
        model_name=model_name if eval_results else None,
        eval_results=eval_results,
    )
    steps = info.get("train_steps") or cfg.get("max_train_steps")
    budget = f" (wall-clock budget {cfg['max_train_minutes']:g} min)" if cfg.get("max_train_minutes") else ""
    training = {
        "data": cfg.get("train_data_dir") or cfg.get("dataset_name"),
        "resolution": cfg.get("resolution"),
        "autoencoder": cfg.get("pretrained_vae") or ("none (pixel space)" if space == "pixel" else None),
        "discriminator": f"UNet2DModel backbone, block_out_channels {disc.get('block_out_channels')}, feature dim "
        f"{disc.get('projection_dim') or 'flattened output'}",
        "objective": _objective(cfg) if cfg else None,
        "steps × batch": f"{steps} × {cfg.get('train_batch_size')} ({info.get('num_processes', 1)} process(es))"
        if steps and cfg.get("train_batch_size") else None,
        "wall-clock": _clock(info, budget),
        "reference statistics": f"over {disc.get('reference_count')} training samples"
        + (" (each image and its mirror image)" if cfg.get("random_flip") else ""),
    }
    # a refresh without the run's config (a copied folder) keeps what the card already said
    for key, value in previous.get("training", {}).items():
        if training.get(key) is None or not cfg:
            training[key] = value
    training = {k: ("see the training config" if v is None else v) for k, v in training.items()}
    if not metrics and previous.get("metrics"):
        metrics, protocol = previous["metrics"], previous.get("protocol", "")
    if card_data.datasets is None and previous.get("datasets"):
        card_data.datasets = previous["datasets"]
    if not card_data.eval_results and previous.get("eval_results"):
        card_data.eval_results, card_data.model_name = previous["eval_results"], previous.get("model_name")
    sample_grid = sample_grid or previous.get("sample_grid")
    vae_note = vae_note or previous.get("vae_note")
    data_terms = data_terms or previous.get("data_terms")
    limitations = limitations or previous.get("limitations") or []
    one_step = one_step or previous.get("one_step")
    samplers = samplers or previous.get("samplers")
    if not os.path.isdir(os.path.join(folder, "generator")):  # a folder saved without its generator
        one_step = samplers = None
    keep = {"training": training, "metrics": metrics, "protocol": protocol, "sample_grid": sample_grid,
            "vae_note": vae_note, "data_terms": data_terms, "limitations": limitations, "one_step": one_step,
            "samplers": samplers}  # fmt: skip
    card = ModelCard.from_template(
        card_data,
        template_str=_template(),
        title=f"DMMD {space}-space model" + (f": {model_name}" if repo_id or name else ""),
        space=space,
        repo_id=repo,
        vae_note=vae_note,
        sample_grid=sample_grid,
        training=training,
        metrics=metrics,
        protocol=protocol,
        levels=sched.config.num_inference_steps,
        flow_steps=sched.config.flow_steps_per_level,
        nfe=sched.config.num_inference_steps * sched.config.flow_steps_per_level,
        step_size=sched.config.step_size,
        step_size_schedule=sched.config.step_size_schedule,
        particle_mean=sched.config.particle_mean,
        reference=sched.config.reference,
        data_terms=data_terms,
        limitations=limitations,
        one_step=one_step,
        samplers=(samplers or {}).get("rows"),
        samplers_protocol=(samplers or {}).get("protocol"),
    )
    card.text = card.text.rstrip() + "\n\n" + CARD_STATE.format(json.dumps(keep, ensure_ascii=False)) + "\n"
    path = os.path.join(folder, "README.md")
    card.save(path)
    return path


def benchmark_metrics(pipe, benchmark: str, path: str, resolution: int, model: str | None = None,
                      step: int | None = None) -> None:
    """Write a ``metrics.json`` (the ``latent-dmmd evaluate`` format) from the DMMD row of a benchmark that used
    this pipeline's own sampler: a quality benchmark (``benchmarks/results/quality_*.json``; its T, N_s and step
    size; ``model`` names the row's model when it scored several) or a learning curve (``curve_*.json``; the row of
    the checkpoint at ``step``, the run's trained steps, with these calibrated step sizes)."""
    from .records import sampling_protocol, write_metrics

    with open(benchmark) as f:
        record = json.load(f)
    cfg, a = pipe.scheduler.config, record.get("args", {})
    if "dmmd_run" in a:  # benchmarks/curve.py: one DMMD row per scored checkpoint, the largest sample last
        rows = sorted((r for r in record["rows"] if r["method"] == "dmmd" and r["step"] == step
                       and r["nfe"] == cfg.num_inference_steps * cfg.flow_steps_per_level
                       and r.get("step_size") == cfg.step_size and _same_step_sizes(r.get("folder"), cfg)),
                      key=lambda r: r["num_fake"], reverse=True)  # fmt: skip
        where = f"for step {step} with this model's step sizes"
    else:
        rows = [r for r in record["rows"] if r["method"] == "dmmd" and r.get("levels") == cfg.num_inference_steps
                and r.get("flow_steps") == cfg.flow_steps_per_level and r.get("step_size") == cfg.step_size
                and (model is None or r.get("model", "dmmd") == model)]  # fmt: skip
        where = (f"at T={cfg.num_inference_steps}, N_s={cfg.flow_steps_per_level}, eta={cfg.step_size}"
                 + (f" for model {model!r}" if model else ""))  # fmt: skip
    if not rows:
        raise ValueError(f"{benchmark} has no DMMD row {where}")
    row = rows[0]
    if "dmmd_run" in a:
        scored = row["folder"]
    else:
        folders = a["dmmd"] if isinstance(a["dmmd"], list) else [a["dmmd"]]  # NAME=FOLDER items, or one folder
        named = dict(item.split("=", 1) if "=" in item else ("dmmd", item) for item in folders)
        scored = named.get(row.get("model", "dmmd"), folders[0])
    protocol = sampling_protocol(pipe, scored, row["num_fake"], row["num_real"], resolution, a["reference"],
                                 a["reference_first_index"], row["seconds_per_image"] * row["num_fake"], {},
                                 particles_per_batch=a["batch_size"], seed=a["seed"])  # fmt: skip
    protocol["source"] = benchmark
    if a.get("metric_features", "inception") != "inception":  # the benchmark scored in another feature space
        from .dinov2 import PREPROCESSING

        protocol["features"] = a["metric_features"]
        protocol["feature_extractor"] = f"DINOv2 ({a.get('dinov2_model')}), {PREPROCESSING}"
    keys = ("fid", "kid", "kid_std", "num_fake", "num_real", "precision", "recall")
    write_metrics(path, {k: row[k] for k in keys if k in row} | {"features": protocol["features"]}, protocol)


def sampler_rows(benchmark: str) -> dict:
    """The one-step generator's and the flow's rows of ``benchmarks/onestep.py --pipeline`` (its JSON), as the
    card shows them: ``{"rows": [...], "protocol": "..."}``."""
    with open(benchmark) as f:
        record = json.load(f)
    names = {"onestep": "one-step generator", "flow": "particle flow"}
    rows = [r for r in record.get("rows", []) if r.get("method") in names]
    if {r["method"] for r in rows} != set(names):
        raise ValueError(f"{benchmark} is not a one-step benchmark of a pipeline: it needs an 'onestep' and a 'flow' row")
    a = record.get("args", {})
    return {
        "rows": [{"sampler": names[r["method"]], "nfe": r["nfe"], "fid": f"{r['fid']:.2f}", "kid": f"{r['kid']:.4f}",
                  "precision": f"{r['precision']:.3f}", "recall": f"{r['recall']:.3f}",
                  "ms": f"{1e3 * r['seconds_per_image']:.2f}"} for r in rows],  # fmt: skip
        "protocol": (f"Both rows: {rows[0]['num_fake']} images each against {rows[0]['num_real']} reference images "
                     f"({a.get('reference')} from index {a.get('reference_first_index', 0)}), Inception features, "
                     f"k-NN precision/recall (k = {rows[0].get('pr_k', 3)}); `benchmarks/onestep.py`."),
    }


def _same_step_sizes(folder: str | None, cfg) -> bool:
    """Whether the scored folder's scheduler (when it is still on disk) used the same per-level step sizes."""
    saved = os.path.join(folder or "", "scheduler", "scheduler_config.json")
    if not folder or not os.path.isfile(saved):
        return True
    with open(saved) as f:
        scored = json.load(f)
    return (scored.get("step_size_schedule"), scored.get("calibrated_step_sizes")) == (
        cfg.get("step_size_schedule"), cfg.get("calibrated_step_sizes"))


# what a model folder written by ``ship_run`` may hold at its top level: anything else in an existing
# destination is somebody's data, and the folder is then refused rather than replaced
MODEL_FOLDER_ENTRIES = frozenset({"model_index.json", "discriminator", "scheduler", "vae", "score_model", "generator",
                                  "README.md", "samples.png", "checksums.json", "pipeline.py", "metrics.json"})  # fmt: skip


def check_ship_destination(run: str, dest: str) -> None:
    """Refuse a destination that would swallow a run: the run itself, a folder inside it or above it, or an
    existing folder that is not a model folder this command wrote (issue 28: ``card RUN --from-run RUN``
    deleted the run's checkpoints and cache)."""
    run_real, dest_real = os.path.realpath(run), os.path.realpath(dest)
    inside = lambda a, b: a == b or a.startswith(b.rstrip(os.sep) + os.sep)
    if inside(dest_real, run_real):
        raise ValueError(f"the model folder {dest} is the run {run} or lies inside it: write the model to a new folder")
    if inside(run_real, dest_real):
        raise ValueError(f"the model folder {dest} contains the run {run}: replacing it would delete the run; "
                         "write the model to a new folder")  # fmt: skip
    if os.path.lexists(dest):
        if not os.path.isdir(dest) or os.path.islink(dest):
            raise ValueError(f"{dest} exists and is not a folder: choose a new model folder")
        entries = set(os.listdir(dest))
        foreign = sorted(entries - MODEL_FOLDER_ENTRIES)
        if "model_index.json" not in entries or foreign:
            what = f"it holds {', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}" if foreign else "it has no model_index.json"
            raise ValueError(f"{dest} exists and is not a model folder written by `card --from-run` ({what}); "
                             "it is left as it is: choose a new folder, or empty it yourself")  # fmt: skip


def trained_config(run: str) -> dict:
    """The configuration the run's weights were trained with: the newest complete checkpoint's
    ``training_config.json`` (what the resume check compared), else the run's ``config.yaml``."""
    import yaml

    from .atomic import incomplete_files
    from .training.checkpoints import CHECKPOINT_CONFIG, list_checkpoints

    for _, path in reversed(list_checkpoints(run)):
        recorded = os.path.join(path, CHECKPOINT_CONFIG)
        if os.path.isfile(recorded) and not incomplete_files(path):
            with open(recorded) as f:
                return json.load(f)
    with open(os.path.join(run, "config.yaml")) as f:
        return yaml.safe_load(f)


def ship_run(run: str, dest: str, *, drop_vae: bool = False, sample_grid: bool = False, metrics_file: str | None = None,
             benchmark: str | None = None, benchmark_model: str | None = None, **card) -> str:  # fmt: skip
    """Turn a training run (``pipeline/``, ``config.yaml``, ``training_summary.json``) into a model
    folder ``dest`` with its card, replacing ``dest`` only once the new folder is complete.

    ``drop_vae`` saves the discriminator and scheduler only (the discriminator keeps the autoencoder
    contract it was trained with, so a mismatched autoencoder is refused later); ``sample_grid``
    writes ``samples.png`` (16 images, seed 0; never for face data); ``benchmark`` takes the card's
    numbers from a quality benchmark's row (:func:`benchmark_metrics`); ``card`` goes to
    :func:`write_model_card` (datasets, data_terms, vae_note, limitations, repo_id).
    """
    import tempfile

    import torch

    from .atomic import replace_folder
    from .pipelines import DMMDPipeline
    from .records import output_resolution, save_grid

    for name in ("pipeline/model_index.json", "config.yaml", "training_summary.json"):
        if not os.path.isfile(os.path.join(run, name)):
            raise ValueError(f"{run} is not a finished training run: no {name}")
    check_ship_destination(run, dest)
    pipe = DMMDPipeline.from_pretrained(os.path.join(run, "pipeline"))
    resolution = output_resolution(pipe)
    disc = pipe.discriminator
    if disc.has_reference_statistics and disc.statistics_are_current() and disc.config.reference_fingerprint_fp16 is None:
        # a run from before the fp16 key: the statistics also serve the weights cast to fp16
        disc.register_to_config(reference_fingerprint_fp16=disc.weights_fingerprint(via=torch.float16))
    if drop_vae:
        pipe = DMMDPipeline(discriminator=disc, scheduler=pipe.scheduler)
    config = trained_config(run)
    with open(os.path.join(run, "training_summary.json")) as f:
        info = json.load(f)
    with replace_folder(dest) as tmp, tempfile.TemporaryDirectory() as scratch:
        pipe.save_pretrained(tmp, safe_serialization=True)
        if sample_grid:
            pipe.set_progress_bar_config(disable=True)
            images = pipe(num_images=16, generator=torch.Generator().manual_seed(0), output_type="pt").images
            save_grid(images, os.path.join(tmp, "samples.png"), nrow=8)
        if benchmark:
            metrics_file = os.path.join(scratch, "metrics.json")
            benchmark_metrics(pipe, benchmark, metrics_file, resolution, benchmark_model, info.get("train_steps"))
        write_model_card(tmp, config, info, metrics_file=metrics_file, sample_grid="samples.png" if sample_grid else None,
                         name=card.pop("name", None) or os.path.basename(os.path.normpath(dest)), **card)  # fmt: skip
    return dest
