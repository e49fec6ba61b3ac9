"""`latent-dmmd card FOLDER --from-run RUN`: a run folder becomes a model folder without the autoencoder, with its card."""

import json
import os

import torch
import yaml

from latent_dmmd import DMMDPipeline
from latent_dmmd.cli import main as cli
from latent_dmmd.models.discriminator import vae_contract

from .conftest import tiny_autoencoder, tiny_pipeline


def test_ship_without_vae_keeps_the_contract_and_takes_numbers_from_the_benchmark(tmp_path):
    vae = tiny_autoencoder()
    full = tiny_pipeline(in_channels=4, vae=vae)
    full.discriminator.register_to_config(reference_vae=vae_contract(vae))
    run = tmp_path / "run"
    full.save_pretrained(run / "pipeline")
    (run / "config.yaml").write_text(yaml.safe_dump({"train_data_dir": "faces", "resolution": 16,
                                                     "max_train_steps": 100, "max_train_minutes": 5.0,
                                                     "train_batch_size": 4}))  # fmt: skip
    (run / "training_summary.json").write_text(json.dumps({"train_seconds": 300.0, "train_steps": 42}))
    cfg = full.scheduler.config
    bench = tmp_path / "quality.json"
    bench.write_text(json.dumps({
        "args": {"dmmd": str(run / "pipeline"), "reference": "faces", "reference_first_index": 3500,
                 "batch_size": 100, "seed": 0},
        "rows": [{"method": "dmmd", "levels": cfg.num_inference_steps, "flow_steps": cfg.flow_steps_per_level,
                  "step_size": cfg.step_size, "fid": 77.7, "kid": 0.05, "kid_std": 0.01, "num_fake": 500,
                  "num_real": 500, "seconds_per_image": 0.1, "precision": 0.25, "recall": 0.1},
                 {"method": "ddim", "nfe": 20, "fid": 1.0}],
    }))  # fmt: skip

    dest = tmp_path / "models" / "tiny"
    assert cli(["card", str(dest), "--from-run", str(run), "--drop-vae", "--metrics-from-benchmark", str(bench),
                "--data-terms", "non-commercial research only", "--vae-note", "attach it with load_x",
                "--limitation", "trained for five minutes"]) == 0  # fmt: skip

    files = sorted(os.path.relpath(os.path.join(r, f), dest) for r, _, fs in os.walk(dest) for f in fs)
    assert not any(f.startswith("vae") for f in files) and not any(f.endswith(".png") for f in files), files
    assert sorted(os.listdir(tmp_path / "models")) == ["tiny"]
    card = (dest / "README.md").read_text()
    for text in ("77.70", "500 / 500", "attach it with load_x", "non-commercial research only", "42 × 4",
                 "trained for five minutes", "wall-clock budget 5 min", "reference faces from index 3500",
                 "0.250 / 0.100"):  # fmt: skip
        assert text in card, text
    bare = DMMDPipeline.from_pretrained(dest)
    assert bare.vae is None and bare.discriminator.config.reference_vae == vae_contract(vae)
    attached = DMMDPipeline.from_pretrained(dest, vae=vae)
    attached.set_progress_bar_config(disable=True)
    gen = lambda p: p(num_images=2, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert torch.allclose(gen(attached), gen(full), atol=1e-5)


def test_a_benchmark_without_the_models_own_sampler_row_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    tiny_pipeline().save_pretrained(run / "pipeline")
    (run / "config.yaml").write_text("resolution: 8\n")
    (run / "training_summary.json").write_text("{}")
    bench = tmp_path / "q.json"
    bench.write_text(json.dumps({"args": {}, "rows": [{"method": "dmmd", "levels": 99, "flow_steps": 1}]}))
    assert cli(["card", str(tmp_path / "out"), "--from-run", str(run), "--metrics-from-benchmark", str(bench)]) == 2
    assert "no DMMD row" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["q.json", "run"]  # no half-written folder left behind


def test_ship_writes_the_sample_grid_and_card_flags_that_need_a_run_are_refused(tmp_path, capsys):
    run = tmp_path / "run"
    tiny_pipeline().save_pretrained(run / "pipeline")
    (run / "config.yaml").write_text("resolution: 8\n")
    (run / "training_summary.json").write_text(json.dumps({"train_steps": 3}))
    dest = tmp_path / "model"
    assert cli(["card", str(dest), "--from-run", str(run), "--sample-grid"]) == 0
    assert (dest / "samples.png").is_file() and "samples.png" in (dest / "README.md").read_text()
    for flags in (["--drop-vae"], ["--sample-grid"], ["--metrics-from-benchmark", "q.json"]):
        assert cli(["card", str(dest), *flags]) == 2
        assert "--from-run" in capsys.readouterr().err
    assert cli(["card", str(tmp_path / "x"), "--from-run", str(tmp_path / "nothing")]) == 2
    assert "not a finished training run" in capsys.readouterr().err


def test_a_run_from_before_the_fp16_fingerprint_ships_with_it(tmp_path):
    pipe = tiny_pipeline()
    expected = pipe.discriminator.config.reference_fingerprint_fp16
    assert expected is not None
    pipe.discriminator.register_to_config(reference_fingerprint_fp16=None)  # as saved by an older version
    run = tmp_path / "run"
    pipe.save_pretrained(run / "pipeline")
    (run / "config.yaml").write_text("resolution: 8\n")
    (run / "training_summary.json").write_text("{}")
    assert cli(["card", str(tmp_path / "model"), "--from-run", str(run)]) == 0
    shipped = DMMDPipeline.from_pretrained(tmp_path / "model")
    assert shipped.discriminator.config.reference_fingerprint_fp16 == expected
    # no path of the machine it was shipped from
    for config in ("model_index.json", "discriminator/config.json", "scheduler/scheduler_config.json"):
        assert str(tmp_path) not in (tmp_path / "model" / config).read_text(), config


def test_a_resumed_run_ships_with_its_learning_curve_row_and_summed_clock(tmp_path):
    """A checkpoint exported after several sessions: the card takes the curve's row of that step (the largest
    sample, with the model's own step sizes) and the optimisation seconds its checkpoints summed."""
    pipe = tiny_pipeline()
    run = tmp_path / "run"
    pipe.save_pretrained(run / "pipeline")
    (run / "config.yaml").write_text(yaml.safe_dump({"resolution": 8, "train_batch_size": 4, "max_train_minutes": 1e5}))
    (run / "training_summary.json").write_text(json.dumps({"train_seconds": 0.6, "train_steps": 8,
                                                           "optimize_seconds": 7200.0}))  # fmt: skip
    other = tmp_path / "other" / "scheduler"  # scored at step 8 too, but with other step sizes
    other.mkdir(parents=True)
    (other / "scheduler_config.json").write_text(json.dumps({"step_size_schedule": "calibrated",
                                                            "calibrated_step_sizes": [0.5, 2.0]}))  # fmt: skip
    cfg = pipe.scheduler.config
    nfe = cfg.num_inference_steps * cfg.flow_steps_per_level
    row = lambda step, num, fid, folder: {"method": "dmmd", "step": step, "nfe": nfe, "step_size": cfg.step_size,
                                          "num_fake": num, "num_real": 300, "fid": fid, "kid": 0.01, "kid_std": 0.001,
                                          "precision": 0.5, "recall": 0.4, "seconds_per_image": 0.01,
                                          "folder": str(folder)}  # fmt: skip
    bench = tmp_path / "curve_x.json"
    bench.write_text(json.dumps({
        "args": {"dmmd_run": "outputs/x", "reference": "test.idx", "reference_first_index": 0, "batch_size": 50,
                 "seed": 0},
        "rows": [row(4, 2000, 50.0, run / "pipeline"), row(8, 1000, 40.0, run / "pipeline"),
                 row(8, 2000, 33.3, run / "pipeline"), row(8, 4000, 11.1, tmp_path / "other"),
                 {"method": "ddim", "step": 8, "nfe": 20, "fid": 1.0}],
    }))  # fmt: skip
    dest = tmp_path / "model"
    assert cli(["card", str(dest), "--from-run", str(run), "--metrics-from-benchmark", str(bench)]) == 0
    card = (dest / "README.md").read_text()
    for text in ("33.30", "2000 / 300", "0.500 / 0.400", "7,200 s of optimisation (2.00 h), summed over resumed sessions",
                 "8 × 4", "reference test.idx from index 0"):  # fmt: skip
        assert text in card, text
    assert "11.10" not in card and "40.00" not in card and "0.6 s" not in card
    # a curve without this step is refused, and nothing is written
    (run / "training_summary.json").write_text(json.dumps({"train_steps": 16}))
    assert cli(["card", str(tmp_path / "model2"), "--from-run", str(run), "--metrics-from-benchmark", str(bench)]) == 2
    assert not (tmp_path / "model2").exists()
