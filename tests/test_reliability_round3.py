"""Reliability, round 3 (issue 28): each test injects one fault found by a new user's probes and checks what
happens now (docs/reliability.md, "Round 3")."""

import json
import os

import pytest
import yaml

from latent_dmmd.cli import main as cli
from latent_dmmd.training import load_config

from .conftest import tiny_pipeline


def finished_run(folder, config=None):
    """A run folder as training leaves it: pipeline/, config.yaml, training_summary.json, a checkpoint, a cache."""
    tiny_pipeline().save_pretrained(folder / "pipeline")
    (folder / "config.yaml").write_text(yaml.safe_dump(config or {"resolution": 8, "lambda_gp": 1.0}))
    (folder / "training_summary.json").write_text(json.dumps({"train_seconds": 1.0, "train_steps": 2}))
    (folder / "checkpoint-2").mkdir()
    (folder / "checkpoint-2" / "state.txt").write_text("optimizer state")
    (folder / "latent_cache").mkdir()
    (folder / "latent_cache" / "meta.json").write_text("{}")
    return folder


def tree(folder):
    return sorted(os.path.relpath(os.path.join(r, f), folder) for r, _, fs in os.walk(folder) for f in fs)


@pytest.mark.parametrize("where", ["the run itself", "the run's parent", "inside the run", "a notes folder"])
def test_card_from_run_never_replaces_a_folder_it_did_not_write(tmp_path, capsys, where):
    """Round 3 #1: `card RUN --from-run RUN` (or a folder above it) deleted the checkpoints, the cache, a
    sibling run and a notes file, exit 0."""
    parent = tmp_path / "work"
    run = finished_run(parent / "run")
    (parent / "sibling").mkdir()
    (parent / "sibling" / "x.txt").write_text("another run")
    (parent / "notes.txt").write_text("mine")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.md").write_text("keep me")
    dest = {"the run itself": run, "the run's parent": parent, "inside the run": run / "model", "a notes folder": notes}[where]
    before = {p: tree(p) for p in (parent, notes)}
    assert cli(["card", str(dest), "--from-run", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "new folder" in err
    assert {p: tree(p) for p in (parent, notes)} == before
    assert not any(name.startswith((".tmp-", ".old-")) for p in (parent, notes, run) for name in os.listdir(p))


def test_card_from_run_replaces_a_model_folder_it_wrote(tmp_path):
    run = finished_run(tmp_path / "run")
    dest = tmp_path / "models" / "m"
    assert cli(["card", str(dest), "--from-run", str(run)]) == 0
    assert cli(["card", str(dest), "--from-run", str(run)]) == 0  # a second ship refreshes it
    assert (dest / "model_index.json").is_file() and (run / "checkpoint-2" / "state.txt").is_file()


def test_a_refused_resume_leaves_the_run_record_and_the_card_reads_the_trained_config(tmp_path):
    """Round 3 #3: a refused resume had already rewritten config.yaml, and the card then published the refused settings."""
    from latent_dmmd.training import main as train

    from .test_training import TINY_MODEL
    from .test_training import run as train_run

    train_run(tmp_path, steps=2)
    out = tmp_path / "out"
    record = (out / "config.yaml").read_text()
    args = ["--train_data_dir", str(tmp_path / "imgs"), "--output_dir", str(out), "--resolution", "8",
            "--train_batch_size", "8", "--group_size", "4", "--max_train_steps", "4", "--report_to", "none",
            "--num_inference_steps", "3", "--flow_steps_per_level", "2", "--checkpointing_steps", "2",
            "--resume_from_checkpoint", "latest", *TINY_MODEL]  # fmt: skip
    with pytest.raises(ValueError, match="the model changed"):
        train([str(a) for a in args] + ["--norm_num_groups", "8", "--lambda_gp", "5", "--pairing", "independent"])
    assert (out / "config.yaml").read_text() == record
    (out / "config.yaml").write_text(record.replace("lambda_gp: 1.0", "lambda_gp: 5.0"))  # a record gone wrong anyway
    dest = tmp_path / "model"
    assert cli(["card", str(dest), "--from-run", str(out)]) == 0
    card = (dest / "README.md").read_text()
    assert "gradient penalty 1.0" in card and "gradient penalty 5.0" not in card  # the checkpoint's record, not the yaml


@pytest.mark.parametrize("value", [-1.0, 0.0, "1.0"])
def test_a_folders_step_size_is_checked_when_the_scheduler_loads(tmp_path, capsys, value):
    """Round 3 #4: step_size -1 sampled a maze, 0 pure noise (exit 0), "1.0" a TypeError traceback."""
    folder = tmp_path / "m"
    tiny_pipeline().save_pretrained(folder)
    path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps(config | {"step_size": value}))
    from latent_dmmd.safety import write_checksums

    write_checksums(str(folder))
    assert cli(["sample", str(folder), "--num_images", "2", "--output_dir", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and "step_size must be a finite number > 0" in err.splitlines()[-1]
    assert not (tmp_path / "s").exists()  # friction: a failed sample left an empty --output_dir behind


def write_yaml(tmp_path, **values):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"train_data_dir": str(tmp_path), **values}))
    return str(path)


@pytest.mark.parametrize(
    "values, match",
    [
        ({"max_train_steps": 2.5}, "max_train_steps: expected an integer"),  # round 3 #7: trained 3 steps
        ({"step_size": -0.1}, "step_size must be a finite number > 0"),  # #4: trained and exported
        ({"t_min": 5000}, "t_min"),  # #10: refused only after the cache was encoded
        ({"block_out_channels": 32}, "block_out_channels: expected a list"),  # #9: traceback after encoding
        ({"norm_num_groups": "eight"}, "norm_num_groups: expected a number"),
        ({"learning_rate": "fast"}, "learning_rate: expected a number"),
        ({"max-train-steps": 10}, r"max-train-steps \(spell it max_train_steps\)"),  # friction: dashed YAML keys
        ({"block_out_channels": [12, 24], "norm_num_groups": 8}, "multiples of --norm_num_groups"),
    ],
)
def test_yaml_values_are_checked_before_any_work(tmp_path, values, match):
    with pytest.raises(ValueError, match=match):
        load_config(["--config", write_yaml(tmp_path, **values)])


def test_yaml_numbers_keep_their_meaning(tmp_path):
    config = load_config(["--config", write_yaml(tmp_path, max_train_steps=2.0, learning_rate="1e-4", lambda_gp=1)])
    assert config.max_train_steps == 2 and isinstance(config.max_train_steps, int)
    assert config.learning_rate == 1e-4 and config.lambda_gp == 1.0


def test_a_discriminator_config_with_a_string_size_is_one_clear_error(tmp_path, capsys):
    folder = tmp_path / "m"
    tiny_pipeline().save_pretrained(folder)
    path = folder / "discriminator" / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"norm_num_groups": "8"}))
    from latent_dmmd.safety import write_checksums

    write_checksums(str(folder))
    assert cli(["sample", str(folder), "--num_images", "2", "--output_dir", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and "norm_num_groups must be an integer" in err.splitlines()[-1]


@pytest.fixture
def model(tmp_path):
    folder = tmp_path / "m"
    tiny_pipeline().save_pretrained(folder)
    return str(folder)


def test_sample_never_overwrites_an_image_without_being_told(tmp_path, model, capsys):
    """Round 3 #2: an existing samples/grid.png was overwritten silently, and two runs into one folder both
    reported success with one run's images gone."""
    out = str(tmp_path / "s")
    assert cli(["sample", model, "--num_images", "2", "--output_dir", out]) == 0
    first = (tmp_path / "s" / "grid.png").read_bytes()
    assert cli(["sample", model, "--num_images", "2", "--seed", "5", "--output_dir", out]) == 2
    assert "grid.png exists" in capsys.readouterr().err and (tmp_path / "s" / "grid.png").read_bytes() == first
    assert cli(["sample", model, "--num_images", "2", "--seed", "5", "--output_dir", out, "--overwrite"]) == 0
    assert (tmp_path / "s" / "grid.png").read_bytes() != first


def test_a_concurrent_writer_is_not_overwritten(tmp_path, model, capsys, monkeypatch):
    """The other run's file appears between the start check and the write: the write refuses, the file stays."""
    import latent_dmmd.cli as cli_module

    out = tmp_path / "s"
    real = cli_module._write_png

    def racing(image, path, overwrite):
        with open(path, "wb") as f:
            f.write(b"the other run's image")
        return real(image, path, overwrite)

    monkeypatch.setattr(cli_module, "_write_png", racing)
    assert cli(["sample", model, "--num_images", "2", "--output_dir", str(out), "--no_grid"]) == 2
    assert (out / "seed0.png").read_bytes() == b"the other run's image"
    assert "exists (another run?)" in capsys.readouterr().err
    assert not [n for n in os.listdir(out) if n.startswith(".tmp-")]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--seeds", "3", "3", "--no_grid"], "--seeds repeats 3"),  # wrote 1 file for 2 images
        (["--seed", str(2**64)], "seeds must lie in [0, 2**64 - 1]"),  # "Overflow when unpacking long long"
        (["--seeds", "-1"], "seeds must lie in"),
        (["--num_images", "1000000000"], "too large: pass --no_grid"),  # 27 s building seeds, then MemoryError
    ],
)
def test_sample_checks_its_seeds_before_any_work(tmp_path, model, capsys, argv, message):
    out = tmp_path / "s"
    assert cli(["sample", model, "--output_dir", str(out), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and not out.exists()


def test_a_latent_model_without_its_vae_names_the_flag(tmp_path, capsys):
    from latent_dmmd.models.discriminator import vae_contract

    from .conftest import tiny_autoencoder

    vae = tiny_autoencoder()
    pipe = tiny_pipeline(in_channels=4, vae=vae)
    pipe.discriminator.register_to_config(reference_vae=vae_contract(vae))
    from latent_dmmd import DMMDPipeline

    DMMDPipeline(pipe.discriminator, pipe.scheduler).save_pretrained(tmp_path / "bare")
    assert cli(["sample", str(tmp_path / "bare"), "--output_dir", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "pass --vae" in err and "from_pretrained" not in err


def test_interrupting_sample_lists_the_images_written(tmp_path, model, capsys, monkeypatch):
    """Round 3 #9: SIGINT during `sample` printed a KeyboardInterrupt traceback and did not say what was written."""
    from latent_dmmd import DMMDPipeline

    calls = {"n": 0}
    real = DMMDPipeline.__call__

    def interrupted(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(DMMDPipeline, "__call__", interrupted)
    with pytest.raises(SystemExit) as stop:
        cli(["sample", model, "--num_images", "4", "--batch_size", "2", "--no_grid", "--output_dir", str(tmp_path / "s")])
    assert stop.value.code == 130
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "interrupted; 2 of 4 images written" in err and "seed0.png" in err and "seed1.png" in err
    assert sorted(os.listdir(tmp_path / "s")) == ["seed0.png", "seed1.png"]


@pytest.fixture
def references(tmp_path):
    from .conftest import write_image_folder

    write_image_folder(tmp_path / "refs", n=6, size=8)
    return str(tmp_path / "refs")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--step_size", "0"], "must be a finite number > 0, got 0.0"),  # #5: 0 read as 'the default'
        (["--num_inference_steps", "0"], "steps: must be >= 1, got 0"),
        (["--reference_count", "-1"], "count: must be >= 2, got -1"),  # silently dropped an image
        (["--num_samples", "0"], "samples: must be >= 2, got 0"),  # cryptic error
        (["--batch_size", "0"], "size: must be >= 1, got 0"),
        (["--reference_first_index", "100"], "past the end of the reference set (6 images"),  # only after sampling
        (["--reference_first_index", "5"], "1 reference images: FID and KID need at least 2"),  # #6: traceback
        (["--num_inference_steps", "7"], "num_inference_steps"),  # a grid without statistics, before sampling
    ],
)
def test_evaluate_checks_its_arguments_before_any_work(tmp_path, model, references, capsys, monkeypatch, argv, message):
    import latent_dmmd.evaluation as ev

    monkeypatch.setattr(ev, "generate", lambda *a, **k: pytest.fail("sampled before the arguments were checked"))
    out = str(tmp_path / "metrics.json")
    assert cli(["evaluate", model, "--reference", references, "--output", out, *argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and message in err
    assert not os.path.exists(out)


def test_evaluate_warns_below_the_protocol_before_sampling(tmp_path, model, references, capsys, monkeypatch):
    """#6: 4-7 reference images printed 'FID 190.68' with no warning."""
    import latent_dmmd.evaluation as ev

    def stop(*a, **k):
        assert "below the protocol's 2,000" in capsys.readouterr().err  # said before any sampling
        raise KeyboardInterrupt

    monkeypatch.setattr(ev, "generate", stop)
    with pytest.raises(KeyboardInterrupt):
        cli(["evaluate", model, "--reference", references, "--num_samples", "4", "--output", str(tmp_path / "m.json")])


@pytest.mark.parametrize("content", ["[1, 2]", "{}", '{"metrics": {"fid": 3.0}, "protocol": {}}', "not json"])
def test_card_metrics_that_are_not_a_metrics_file_are_one_line(tmp_path, model, capsys, content):
    """Round 3 #9: `card --metrics` given a list or {} raised TypeError/KeyError."""
    bad = tmp_path / "m.json"
    bad.write_text(content)
    before = (tmp_path / "m" / "README.md").exists()
    assert cli(["card", model, "--metrics", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and "m.json" in err
    assert (tmp_path / "m" / "README.md").exists() == before


def test_push_without_a_network_is_one_line(model, capsys, monkeypatch):
    """Round 3 #9: push with no network and offline mode off printed a 71-line httpx traceback."""
    httpx = pytest.importorskip("httpx2", reason="the Hub client's HTTP library (httpx2 in huggingface_hub 2.x)")
    from huggingface_hub import HfApi

    def unreachable(self, *a, **k):
        raise httpx.ConnectError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(HfApi, "create_repo", unreachable)
    assert cli(["push", model, "me/model"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "ConnectError" in err and "check the network" in err


@pytest.mark.parametrize("command", ["", "sample", "demo", "evaluate", "train", "cache-latents", "push", "card"])
def test_help_never_imports_torch(command):
    """Friction: every --help took ~5.5 s because torch and diffusers were imported before argparse."""
    import subprocess
    import sys

    argv = [command, "--help"] if command else ["--help"]
    code = (f"import sys\nfrom latent_dmmd.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\nprint('ok')")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-500:]


def test_plain_diffusers_finds_the_pipeline_when_the_package_was_imported_first(tmp_path):
    """The lazy package keeps the documented promise: `import latent_dmmd`, then diffusers, then
    DiffusionPipeline.from_pretrained(folder) returns a DMMDPipeline (fresh interpreter, import order as written)."""
    import subprocess
    import sys

    tiny_pipeline().save_pretrained(tmp_path / "m")
    code = ("import latent_dmmd, sys\nassert 'torch' not in sys.modules\n"
            "from diffusers import DiffusionPipeline\n"
            f"p = DiffusionPipeline.from_pretrained({str(tmp_path / 'm')!r})\nprint(type(p).__name__)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert out.returncode == 0 and out.stdout.strip().splitlines()[-1] == "DMMDPipeline", out.stderr[-800:]


def test_loading_taef2_prints_no_empty_fp32_warning(capfd):
    from .conftest import TAEF2_DIR

    if not os.path.isfile(os.path.join(TAEF2_DIR, "taef2_encoder.safetensors")):
        pytest.skip(f"TAEF2 weights not in {TAEF2_DIR}")
    from latent_dmmd.autoencoders import load_taef2

    load_taef2(TAEF2_DIR)
    captured = capfd.readouterr()
    assert "should be kept in float32: []" not in captured.out + captured.err
