"""The ``latent-dmmd`` command line: the README's main command on a tiny setting, clear errors."""

import json
import re
import subprocess
import sys

from latent_dmmd.cli import main


def test_demo_writes_png_and_metrics(tmp_path, capsys):
    out = tmp_path / "toy.png"
    assert main(["demo", "--output", str(out), "--train-steps", "10", "--num-particles", "64"]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    metrics = json.loads((tmp_path / "toy.json").read_text())
    assert metrics["flow_steps_total"] == 100 and metrics["config"]["train_steps"] == 10
    assert "energy distance" in capsys.readouterr().out


def test_missing_output_folder_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["demo", "--output", str(tmp_path / "nope" / "x.png"), "--train-steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "output folder does not exist" in err[0]


def test_console_script_help():
    proc = subprocess.run([sys.executable, "-m", "latent_dmmd.cli", "demo", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "--train_steps" in proc.stdout and "default" in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "latent_dmmd.cli", "demo", "--train-steps", "0"], capture_output=True, text=True)
    assert bad.returncode == 2 and "must be >= 1" in bad.stderr and "Traceback" not in bad.stderr


import os

import numpy as np
import pytest
import torch

from .conftest import tiny_pipeline


@pytest.fixture
def saved_pipeline(tmp_path):
    folder = tmp_path / "pipe"
    tiny_pipeline().save_pretrained(folder)
    return folder


def test_sample_writes_a_grid_or_one_png_per_seed(saved_pipeline, tmp_path, capsys):
    from PIL import Image

    assert main(["sample", str(saved_pipeline), "--num-images", "3", "--output-dir", str(tmp_path / "g")]) == 0
    grid = Image.open(tmp_path / "g" / "grid.png")
    assert grid.size == (3 * 8, 8)
    assert main(["sample", str(saved_pipeline), "--seeds", "5", "9", "--no-grid", "--output-dir", str(tmp_path / "s")]) == 0
    assert sorted(os.listdir(tmp_path / "s")) == ["seed5.png", "seed9.png"]
    # the same seeds through the Python API give the same images
    import numpy as np
    import torch

    from latent_dmmd import DMMDPipeline

    pipe = DMMDPipeline.from_pretrained(saved_pipeline)
    api = pipe(num_images=2, generator=[torch.Generator().manual_seed(s) for s in (5, 9)]).images
    assert np.array_equal(np.asarray(api[1]), np.asarray(Image.open(tmp_path / "s" / "seed9.png")))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["sample", "/no/such/folder"], "no such folder"),
        (["card", "/no/such/folder"], "not a pipeline folder"),
        (["push", "/no/such/folder", "me/x"], "pipeline folder not found"),
    ],
)
def test_user_mistakes_are_one_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0]


def test_bad_flag_value_exits_2_with_usage(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["sample", "x/y", "--num-images", "0"])
    assert exit_info.value.code == 2 and "must be >= 1" in capsys.readouterr().err


def test_card_command_renders_metadata_and_the_loader(saved_pipeline, tmp_path):
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({
        "metrics": {"fid": 12.345, "kid": 0.0123, "kid_std": 0.001, "num_fake": 500, "num_real": 500},
        "protocol": {"nfe": 100, "forward_equivalents": 300, "sampler": {"particles_per_batch": 100},
                     "reference": {"path": "faces", "first_index": 3500, "count": 500, "resolution": 64},
                     "feature_extractor": "FID Inception", "seconds_per_image": 0.1},
        "environment": {"device": "cpu"},
    }))  # fmt: skip
    assert main(["card", str(saved_pipeline), "--metrics", str(metrics), "--repo-id", "me/dmmd-tiny",
                 "--dataset", "celebahq-4k", "--data-terms", "non-commercial research only"]) == 0  # fmt: skip
    card = (saved_pipeline / "README.md").read_text()
    meta = card.split("---")[1]
    for line in ("library_name: latent_dmmd", "pipeline_tag: unconditional-image-generation", "- dmmd",
                 "- pixel-space", "license: apache-2.0", "- celebahq-4k", "name: FID", "value: 12.345"):  # fmt: skip
        assert line in meta, line
    body = card.split("---", 2)[2]
    first_code = body.split("```python", 1)[1].split("```", 1)[0]
    assert 'DMMDPipeline.from_pretrained("me/dmmd-tiny")' in first_code
    assert "non-commercial research only" in body and "interact" in body and "100 NFE" in body


def test_readme_main_command_samples_the_shipped_model(tmp_path, capsys):
    """`latent-dmmd sample --num-images 8` (README quick start) with no model: the shipped Fashion-MNIST one."""
    from PIL import Image

    from latent_dmmd.cli import DEFAULT_MODEL

    assert os.path.isfile(os.path.join(DEFAULT_MODEL, "model_index.json")), "the shipped model is part of the repo"
    assert main(["sample", "--num-images", "2", "--output-dir", str(tmp_path)]) == 0
    grid = np.asarray(Image.open(tmp_path / "grid.png").convert("L"), dtype=np.float64)
    assert grid.shape == (32, 64)
    assert grid.std() > 10  # a picture, not a constant frame


# the shipped CelebA-HQ models: folder name, latent side, image side
SHIPPED_LATENT = [("celebahq-taef2-64-dmmd", 8, 64), ("celebahq-taef2-256-dmmd", 32, 256)]


def shipped(name: str) -> str:
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", name)


@pytest.mark.parametrize("name,latent_side,image_side", SHIPPED_LATENT)
def test_shipped_latent_model_has_no_autoencoder_and_says_how_to_attach_it(name, latent_side, image_side):
    """The CelebA-HQ models ship without TAEF2's weights and without face images."""
    from latent_dmmd import DMMDPipeline

    folder = shipped(name)
    files = [os.path.relpath(os.path.join(r, f), folder) for r, _, fs in os.walk(folder) for f in fs]
    assert files and not any(f.startswith("vae") or f.endswith((".png", ".jpg")) for f in files), files
    assert "load_taef2" in open(os.path.join(folder, "README.md")).read()
    pipe = DMMDPipeline.from_pretrained(folder)
    with pytest.raises(ValueError, match="from_pretrained\\(folder, vae=...\\)"):
        pipe(num_images=1, num_inference_steps=10, flow_steps_per_level=1)
    latents = pipe(num_images=2, num_inference_steps=10, flow_steps_per_level=1, output_type="latent").images
    assert latents.shape == (2, 32, latent_side, latent_side) and torch.isfinite(latents).all()


@pytest.mark.parametrize("name,latent_side,image_side", SHIPPED_LATENT)
def test_shipped_latent_model_samples_faces_with_taef2_attached(name, latent_side, image_side):
    from latent_dmmd import DMMDPipeline
    from latent_dmmd.autoencoders import load_taef2

    from .conftest import TAEF2_DIR

    if not os.path.isdir(TAEF2_DIR):
        pytest.skip(f"TAEF2 weights not found at {TAEF2_DIR}")
    pipe = DMMDPipeline.from_pretrained(shipped(name), vae=load_taef2(TAEF2_DIR))
    images = pipe(num_images=2, num_inference_steps=10, flow_steps_per_level=1, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images  # fmt: skip
    assert images.shape == (2, 3, image_side, image_side)
    assert 0 <= images.min() and images.max() <= 1 and images.std() > 0.05


# ---------------------------------------------------------------------------- what a diffusers user expects


def test_both_flag_spellings_work_and_help_documents_one(saved_pipeline, tmp_path, capsys):
    from latent_dmmd.cli import build_parser

    dash = build_parser().parse_args(["sample", "--num-images", "3", "--output-dir", "x", "--no-grid"])
    under = build_parser().parse_args(["sample", "--num_images", "3", "--output_dir", "x", "--no_grid"])
    assert vars(dash) == vars(under) and dash.num_images == 3 and dash.grid is False
    assert main(["sample", str(saved_pipeline), "--num_images", "2", "--seeds", "1", "2", "--output_dir", str(tmp_path)]) == 0
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    help_text = capsys.readouterr().out
    assert "--num_images" in help_text and "--num-images" not in help_text


@pytest.mark.parametrize("command", ["train", "cache-latents", "evaluate"])
def test_subcommand_help_names_the_subcommand_and_states_each_default_once(command, capsys):
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: latent-dmmd {command} ")
    blocks = re.split(r"\n  (?=-)", out.split("options:", 1)[1])  # one block per flag
    assert len(blocks) > 5
    for block in blocks:
        assert block.count("(default:") <= 1, block  # each default stated once
    if command == "train":
        assert "--num_processes" in out and "--learning_rate" in out


def test_sample_help_has_no_bogus_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: the model's scheduler config) (default: None)" not in out and "(default: None)" not in out
    no_grid = out.split("--no_grid", 1)[1].split("--nrow", 1)[0]
    assert "default" not in no_grid


def test_a_mistyped_local_path_says_no_such_folder(tmp_path, capsys, monkeypatch):
    from latent_dmmd import DMMDPipeline

    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    assert main(["sample", "models/fashion-mnist-dmm"]) == 2
    assert "no such folder: models/fashion-mnist-dmm" in capsys.readouterr().err
    for name in ("models/fashion-mnist-dmm", "outputs/run/pipeline", "./nope"):
        with pytest.raises(FileNotFoundError, match="no such folder"):
            DMMDPipeline.from_pretrained(name)


def test_card_refresh_on_a_copied_folder_keeps_what_the_card_said(tmp_path):
    """A shipped model copied elsewhere has no ../config.yaml: `card` must keep its training table,
    metrics, datasets metadata, sample image and limitations instead of writing None."""
    import shutil

    from latent_dmmd.cli import DEFAULT_MODEL

    folder = tmp_path / "copy"
    shutil.copytree(DEFAULT_MODEL, folder)
    before = (folder / "README.md").read_text()
    assert main(["card", str(folder)]) == 0
    after = (folder / "README.md").read_text()
    assert "| None |" not in after and "custom" not in after.split("---", 2)[1]
    for kept in ("![samples](samples.png)", "datasets:", "name: FID", "| data | /usr/share/datasets/fashion-mnist |"):
        assert (kept in before) == (kept in after), kept
    assert main(["card", str(folder)]) == 0  # idempotent
    assert (folder / "README.md").read_text() == after


def test_cli_samples_and_evaluates_the_celeba_model_with_vae(tmp_path, capfd):
    """The shipped CelebA model from the command line: `--vae ../shared/weights/taef2`."""
    from .conftest import CELEBA_DIR, TAEF2_DIR

    if not (os.path.isdir(TAEF2_DIR) and os.path.isdir(CELEBA_DIR)):
        pytest.skip(f"TAEF2 weights or CelebA-HQ faces not found under {os.path.dirname(TAEF2_DIR)}/..")
    from latent_dmmd.evaluation import inception_path

    try:
        inception_path()
    except ImportError as err:
        pytest.skip(str(err))
    folder = shipped("celebahq-taef2-64-dmmd")
    assert main(["sample", folder, "--vae", TAEF2_DIR, "--num_images", "2", "--flow_steps_per_level", "1",
                 "--output_dir", str(tmp_path)]) == 0  # fmt: skip
    from PIL import Image

    assert Image.open(tmp_path / "grid.png").size == (128, 64)
    out = tmp_path / "metrics.json"
    assert main(["evaluate", folder, "--vae", TAEF2_DIR, "--reference", CELEBA_DIR, "--reference_first_index", "3500",
                 "--reference_count", "6", "--num_samples", "4", "--batch_size", "4", "--flow_steps_per_level", "1",
                 "--kid_subset_size", "3", "--output", str(out)]) == 0  # fmt: skip
    record = json.loads(out.read_text())
    assert record["metrics"]["num_fake"] == 4 and record["metrics"]["num_real"] == 6
    err = capfd.readouterr().err
    for bar in ("sampling", "Inception: reference images", "Inception: generated images"):
        assert bar in err, bar  # evaluate shows its progress


def test_sample_runs_in_batches_and_refuses_a_giant_grid(saved_pipeline, tmp_path, capsys):
    """`--num_images 400000` once filled the machine; images are now made --batch_size at a time."""
    assert main(["sample", str(saved_pipeline), "--num_images", "5", "--batch_size", "2", "--no_grid",
                 "--output_dir", str(tmp_path / "s")]) == 0  # fmt: skip
    assert sorted(os.listdir(tmp_path / "s")) == [f"seed{i}.png" for i in range(5)]
    assert main(["sample", str(saved_pipeline), "--num_images", "400000", "--output_dir", str(tmp_path)]) == 2
    assert "too large: pass --no_grid" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["sample", "{pipe}", "--output_dir", "{file}"], "is a file, not a folder"),
        (["train", "--config", "{bad_yaml}"], "is not valid YAML"),
        (["train", "--train_data_dir", "x", "--resolution", "0"], "--resolution must be >= 1"),
        (["train", "--train_data_dir", "{unreadable}", "--output_dir", "{out}", "--report_to", "none"], "no readable image"),
        (["sample", "{pipe}", "--step_size", "nan"], "step_size must be a finite number"),
    ],
)
def test_cli_error_paths_are_one_line_and_exit_2(argv, message, saved_pipeline, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "bad.yaml").write_text("learning_rate: [1, 2\n")
    (tmp_path / "unreadable").mkdir()
    (tmp_path / "unreadable" / "a.png").write_bytes(b"not a png")
    names = {"pipe": saved_pipeline, "file": tmp_path / "afile", "bad_yaml": tmp_path / "bad.yaml",
             "unreadable": tmp_path / "unreadable", "out": tmp_path / "out"}  # fmt: skip
    assert main([a.format(**names) for a in argv]) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "Loading pipeline components" not in line]
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0], err
