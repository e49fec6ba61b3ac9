"""The training script: config handling, smoke runs in pixel and latent space, resume, stale cache."""

import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file

from latent_dmmd import DMMDPipeline
from latent_dmmd.training import list_checkpoints, load_config, main

from .conftest import CELEBA_DIR, TAEF2_DIR, tiny_vae_folder, write_image_folder

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")

TINY_MODEL = [
    "--block_out_channels", "8", "16", "--down_block_types", "DownBlock2D", "AttnDownBlock2D",
    "--up_block_types", "AttnUpBlock2D", "UpBlock2D", "--norm_num_groups", "4", "--attention_head_dim", "4",
]  # fmt: skip


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState

    yield
    AcceleratorState._reset_state(True)


def run(tmp_path, *extra, data=None, steps=4):
    data = data or str(tmp_path / "imgs")
    if not os.path.isdir(data):
        write_image_folder(data, n=16, size=12, corrupt=1)
    args = ["--train_data_dir", data, "--output_dir", str(tmp_path / "out"), "--resolution", "8",
            "--train_batch_size", "8", "--group_size", "4", "--max_train_steps", str(steps),
            "--num_inference_steps", "3", "--flow_steps_per_level", "2", "--report_to", "none",
            "--checkpointing_steps", "2", "--log_every", "1", *TINY_MODEL, *extra]  # fmt: skip
    return main([str(a) for a in args])


def load(folder):
    pipe = DMMDPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_config_file_overrides_and_errors(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train_data_dir: x\nlearning_rate: 0.5\nblock_out_channels: [4, 8]\nnorm_num_groups: 4\n")
    config = load_config(["--config", str(cfg), "--learning_rate", "0.25"])
    assert config.learning_rate == 0.25 and config.block_out_channels == [4, 8]
    cfg.write_text("train_data_dir: x\nlearning_rte: 0.5\n")
    with pytest.raises(ValueError, match="unknown key.*learning_rte"):
        load_config(["--config", str(cfg)])
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="fp16 needs a CUDA GPU.*bf16"):
            load_config(["--train_data_dir", "x", "--mixed_precision", "fp16"])
    with pytest.raises(ValueError, match="multiple of --group_size"):
        load_config(["--train_data_dir", "x", "--train_batch_size", "10", "--group_size", "4"])
    assert main(["--train_data_dir", "x", "--dry_run"]) is None
    assert "learning_rate: 0.0001" in capsys.readouterr().out


def test_yaml_numbers_without_a_dot_are_numbers(tmp_path):
    """PyYAML reads `1e-4` as a string (YAML 1.1 wants `1.0e-4`); the config takes it as the number."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train_data_dir: x\nlearning_rate: 1e-4\nmax_train_steps: '20'\nuse_ema: 'false'\n")
    config = load_config(["--config", str(cfg)])
    assert config.learning_rate == 1e-4 and config.max_train_steps == 20 and config.use_ema is False
    cfg.write_text("train_data_dir: x\nlearning_rate: fast\n")
    with pytest.raises(ValueError, match="learning_rate: expected a number"):
        load_config(["--config", str(cfg)])


@pytest.mark.parametrize("name", sorted(f for f in os.listdir(CONFIGS) if f.endswith(".yaml") and f != "debug_cpu.yaml"))
def test_every_model_config_exports_with_the_selected_step_rule(name):
    """A config that names a step size keeps it and skips calibration and selection at export: the model configs
    must leave the step rule to the export (the 8,000-step Fashion model sampled FID 163.6 with the calibrated
    steps and 57.7 with the rule the selection chose)."""
    from latent_dmmd.training.export import wants_calibration

    config = load_config(["--config", os.path.join(CONFIGS, name)])
    assert config.step_size is None and config.step_size_schedule in (None, "calibrated")
    assert wants_calibration(config) and config.step_size_selection == "energy"


def test_dashed_training_flags_are_accepted():
    config = load_config(["--train-data-dir", "x", "--learning-rate", "0.125", "--train_batch_size", "32"])
    assert config.learning_rate == 0.125 and config.train_batch_size == 32


def test_pixel_smoke_training_skips_corrupt_images_and_exports_a_pipeline(tmp_path):
    folder = run(tmp_path)
    summary = json.loads((tmp_path / "out" / "training_summary.json").read_text())
    assert summary["reference_count"] == 16  # 17 files, the broken jpg is not among the statistics
    assert not any(name.startswith("checkpoint") for name in os.listdir(folder))
    pipe = load(folder)
    assert pipe.vae is None
    images = pipe(num_images=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (2, 8, 8, 3)
    card = (tmp_path / "out" / "pipeline" / "README.md").read_text()
    assert "pipeline_tag: unconditional-image-generation" in card and "DMMDPipeline.from_pretrained" in card
    # the step rule left unset: a step size per level calibrated on training samples at export (issue 26), then the
    # calibrated steps or a constant eta, whichever flow lands closest to those samples (the choice is recorded)
    c = pipe.scheduler.config
    assert c.calibrated_timesteps == pipe.scheduler.timesteps.tolist()
    assert len(c.calibrated_step_sizes) == 3 and all(s > 0 for s in c.calibrated_step_sizes)
    assert summary["step_size_calibration"]["samples"] == 16
    selection = summary["step_size_selection"]
    assert selection["num_particles"] == 16 and "calibrated" in selection["energy_distances"]
    assert selection["chosen"] == min(selection["energy_distances"], key=selection["energy_distances"].get)
    if selection["chosen"] == "calibrated":
        assert c.step_size_schedule == "calibrated"
    else:
        assert c.step_size_schedule == "constant" and f"constant {c.step_size:.4g}" == selection["chosen"]


@pytest.mark.parametrize("flags", [["--step_size_schedule", "constant", "--step_size", "0.3"], ["--step_size", "0.3"]])
def test_an_explicit_step_rule_is_kept_at_export(tmp_path, flags):
    pipe = load(run(tmp_path, *flags, steps=2))
    assert pipe.scheduler.config.step_size_schedule == "constant" and pipe.scheduler.config.step_size == 0.3
    assert pipe.scheduler.config.calibrated_step_sizes is None


def test_a_calibrated_schedule_with_a_step_size_scales_the_calibration(tmp_path):
    pipe = load(run(tmp_path, "--step_size_schedule", "calibrated", "--step_size", "0.5", "--step_size_selection", "none",
                    steps=2))  # fmt: skip
    c = pipe.scheduler.config
    assert c.step_size_schedule == "calibrated" and c.step_size == 0.5
    assert pipe.scheduler.step_sizes() == pytest.approx([0.5 * s for s in c.calibrated_step_sizes])


def test_corrupt_image_is_counted(tmp_path):
    write_image_folder(tmp_path / "imgs", n=16, size=12, corrupt=2)
    run(tmp_path, steps=4)
    summary = json.loads((tmp_path / "out" / "training_summary.json").read_text())
    # 18 files, batches of 8 with drop_last: 2 batches per epoch, each corrupt file seen when its batch is drawn
    assert summary["skipped_images"] >= 1
    assert summary["reference_count"] == 16


def test_latent_smoke_training_with_a_tiny_autoencoder(tmp_path):
    vae = tiny_vae_folder(tmp_path / "vae")
    folder = run(tmp_path, "--pretrained_vae", vae, "--resolution", "16")
    meta = json.loads((tmp_path / "out" / "latent_cache" / "meta.json").read_text())
    assert meta["count"] == 17 and meta["latent_shape"] == [4, 8, 8] and meta["vae"]["scaling_factor"] == 0.5
    pipe = load(folder)
    assert pipe.vae is not None
    assert pipe(num_images=2, output_type="latent").images.shape == (2, 4, 8, 8)
    assert pipe(num_images=2, output_type="np").images.shape == (2, 16, 16, 3)


def test_stale_latent_cache_is_refused(tmp_path):
    run(tmp_path, "--pretrained_vae", tiny_vae_folder(tmp_path / "vae"), "--resolution", "16", steps=2)
    other = tiny_vae_folder(tmp_path / "vae2", scaling_factor=0.25, seed=1)
    with pytest.raises(ValueError, match="vae.scaling_factor"):
        run(tmp_path, "--pretrained_vae", other, "--resolution", "16", "--overwrite_output_dir", steps=2)


@pytest.mark.parametrize("options", [(), ("--level_weighting", "normalized", "--pairing", "permuted"),
                                     ("--gp_every", "3", "--gp_fraction", "0.5"),
                                     ("--kernel", "rff_gaussian", "--rff_features", "64")])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, options):
    """Also with level balance, whose running per-bucket MMD² are training state in the checkpoint, and with
    the Gaussian kernel, whose running bandwidth is a buffer of the model."""
    straight = tmp_path / "a"
    straight.mkdir()
    run(straight, *options, steps=6, data=None)
    final = load_file(straight / "out" / "checkpoint-6" / "model.safetensors")

    resumed = tmp_path / "b"
    resumed.mkdir()
    run(resumed, *options, steps=6, data=str(straight / "imgs"))
    # pretend the run died after step 4: drop everything later, then resume from the newest checkpoint
    import shutil

    shutil.rmtree(resumed / "out" / "checkpoint-6")
    shutil.rmtree(resumed / "out" / "pipeline")
    assert [s for s, _ in list_checkpoints(resumed / "out")] == [2, 4]
    run(resumed, *options, "--resume_from_checkpoint", "latest", steps=6, data=str(straight / "imgs"))
    again = load_file(resumed / "out" / "checkpoint-6" / "model.safetensors")
    assert final.keys() == again.keys()
    for key in final:
        assert torch.equal(final[key], again[key]), key


def test_the_optimisation_clock_continues_across_a_resume(tmp_path):
    """The learning curve's seconds: each checkpoint records the optimisation seconds so far, and a resumed run
    starts its clock where the checkpoint left it (not at zero), so curves of runs stopped and continued over
    several sessions compare at equal training seconds."""
    run(tmp_path, steps=4)
    log = [json.loads(line) for line in (tmp_path / "out" / "progress.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4]
    assert 0 < log[0]["optimize_seconds"] < log[1]["optimize_seconds"]
    in_checkpoint = json.loads((tmp_path / "out" / "checkpoint-4" / "progress.json").read_text())
    assert in_checkpoint == log[1]
    run(tmp_path, "--resume_from_checkpoint", "latest", steps=6)
    log = [json.loads(line) for line in (tmp_path / "out" / "progress.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4, 6]
    assert log[2]["optimize_seconds"] > log[1]["optimize_seconds"]
    summary = json.loads((tmp_path / "out" / "training_summary.json").read_text())
    assert summary["optimize_seconds"] == pytest.approx(log[2]["optimize_seconds"], abs=0.1)


@pytest.mark.parametrize("method", ["dmmd", "ddpm"])
def test_a_checkpoint_exports_what_the_run_itself_exported_at_that_step(tmp_path, method):
    """A learning curve's point: ``export_checkpoint`` on the last checkpoint gives the very folder the run
    exported when it ended there (same EMA weights, same reference statistics), into another folder, leaving the
    run untouched; an earlier checkpoint gives other weights."""
    from latent_dmmd.training import export_checkpoint

    run(tmp_path, "--method", method, steps=4)
    kind = "pipeline" if method == "dmmd" else "baseline"
    sub = "discriminator" if method == "dmmd" else "unet"
    before = sorted(os.listdir(tmp_path / "out"))
    folder = export_checkpoint(str(tmp_path / "out" / "checkpoint-4"), str(tmp_path / "curve"))
    assert folder == str(tmp_path / "curve" / kind)
    assert sorted(os.listdir(tmp_path / "out")) == before
    own = load_file(tmp_path / "out" / kind / sub / "diffusion_pytorch_model.safetensors")
    again = load_file(tmp_path / "curve" / kind / sub / "diffusion_pytorch_model.safetensors")
    assert own.keys() == again.keys()
    for key in own:
        assert torch.equal(own[key], again[key]), key
    early = export_checkpoint(str(tmp_path / "out" / "checkpoint-2"), str(tmp_path / "curve2"))
    weights = load_file(os.path.join(early, sub, "diffusion_pytorch_model.safetensors"))
    assert any(not torch.equal(own[k], weights[k]) for k in own)
    with pytest.raises(ValueError, match="another folder"):
        export_checkpoint(str(tmp_path / "out" / "checkpoint-4"), str(tmp_path / "out"))
    with pytest.raises(ValueError, match="checkpoint-N"):
        export_checkpoint(str(tmp_path / "out" / kind), str(tmp_path / "x"))


def test_checkpoint_limit_prunes_only_after_a_complete_save(tmp_path):
    run(tmp_path, "--checkpoints_total_limit", "2", steps=6)
    assert [s for s, _ in list_checkpoints(tmp_path / "out")] == [4, 6]
    assert not [n for n in os.listdir(tmp_path / "out") if n.startswith(".tmp")]


@pytest.mark.skipif(not (os.path.isdir(TAEF2_DIR) and os.path.isdir(CELEBA_DIR)), reason="../shared TAEF2 or CelebA-HQ absent")
def test_taef2_latent_training_on_real_faces(tmp_path):
    folder = run(tmp_path, "--pretrained_vae", TAEF2_DIR, "--resolution", "64", "--max_train_samples", "16",
                 data=CELEBA_DIR, steps=2)  # fmt: skip
    pipe = load(folder)
    assert type(pipe.vae).__name__ == "TAEF2"
    images = pipe(num_images=2, output_type="pt").images
    assert images.shape == (2, 3, 64, 64) and torch.isfinite(images).all()


@pytest.mark.parametrize("name", sorted(os.listdir(os.path.join(os.path.dirname(__file__), "..", "configs"))))
def test_every_shipped_config_resolves(name, capsys):
    path = os.path.join(os.path.dirname(__file__), "..", "configs", name)
    try:
        assert main(["--config", path, "--dry_run"]) is None
    except ValueError as err:  # fp16 configs on a CPU-only machine are the one allowed refusal
        assert "fp16" in str(err)
    assert "output_dir" in capsys.readouterr().out


def test_gradient_accumulation_and_bf16_run(tmp_path):
    folder = run(tmp_path, "--gradient_accumulation_steps", "2", "--mixed_precision", "bf16", "--use_ema", "false",
                 "--validation_steps", "2", "--num_validation_images", "4", steps=2)  # fmt: skip
    assert [s for s, _ in list_checkpoints(tmp_path / "out")] == [2]
    from PIL import Image

    assert Image.open(tmp_path / "out" / "validation" / "step-000002.png").size == (2 * 8, 2 * 8)
    assert load(folder)(num_images=2, output_type="latent").images.dtype == torch.float32


def test_cache_script_reports_the_cache(tmp_path, capsys):
    from latent_dmmd.training import cache_main

    write_image_folder(tmp_path / "imgs", n=5, size=12, corrupt=1)
    cache_main(["--train_data_dir", str(tmp_path / "imgs"), "--output_dir", str(tmp_path / "out"),
                "--pretrained_vae", tiny_vae_folder(tmp_path / "vae"), "--resolution", "16"])  # fmt: skip
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["latents"] == 5 and report["latent_shape"] == [4, 8, 8] and report["bytes"] > 0


def test_latent_training_without_a_cache_encodes_every_batch(tmp_path):
    folder = run(tmp_path, "--pretrained_vae", tiny_vae_folder(tmp_path / "vae"), "--resolution", "16",
                 "--cache_latents", "false", "--random_flip", "true", steps=2)  # fmt: skip
    assert not (tmp_path / "out" / "latent_cache").exists()
    assert load(folder)(num_images=2, output_type="np").images.shape == (2, 16, 16, 3)


def test_ddpm_baseline_trains_the_same_backbone_and_samples_with_ddpm_and_ddim(tmp_path):
    from diffusers import UNet2DModel

    from latent_dmmd.baselines import baseline_scheduler, sample_baseline
    from latent_dmmd.schedulers import DMMDScheduler

    folder = run(tmp_path, "--method", "ddpm", steps=3)
    unet = UNet2DModel.from_pretrained(os.path.join(folder, "unet"))
    dmmd_unet = run(tmp_path / "d", data=str(tmp_path / "imgs"), steps=1)
    disc = DMMDPipeline.from_pretrained(dmmd_unet).discriminator.unet
    assert sum(p.numel() for p in unet.parameters()) == sum(p.numel() for p in disc.parameters())
    ours = DMMDScheduler()
    for kind in ("ddpm", "ddim"):
        sched = baseline_scheduler(ours, kind)
        assert torch.equal(sched.alphas_cumprod, ours.alphas_cumprod)
        images = sample_baseline(unet, sched, 2, 5, generator=torch.Generator().manual_seed(0))
        assert images.shape == (2, 3, 8, 8) and torch.isfinite(images).all()
    # clipping the predicted x0 (diffusers' pixel default) bounds DDIM's last step, which returns x0
    with torch.no_grad():
        unet.conv_out.bias.fill_(-50.0)  # a wildly wrong epsilon network
    clipped = sample_baseline(unet, baseline_scheduler(ours, "ddim", clip_sample_range=0.5), 2, 5,
                              generator=torch.Generator().manual_seed(0))  # fmt: skip
    free = sample_baseline(unet, baseline_scheduler(ours, "ddim"), 2, 5, generator=torch.Generator().manual_seed(0))
    assert clipped.abs().max() <= 0.5 + 1e-6 < free.abs().max()


def test_level_balance_changes_training_and_the_log_reports_heldout_mmd_per_level(tmp_path):
    """normalized weighting trains other weights than none from the same draws; the held-out
    paired MMD²_t of every sampling level is logged as JSON lines at the requested steps."""
    heldout = str(tmp_path / "heldout")
    write_image_folder(heldout, n=6, size=12, seed=3)
    plain = run(tmp_path / "a", steps=2)
    balanced = run(tmp_path / "b", "--level_weighting", "normalized", "--eval_data_dir", heldout,
                   "--eval_mmd_steps", "1", data=str(tmp_path / "a" / "imgs"), steps=2)  # fmt: skip
    w_plain = load_file(os.path.join(plain, "..", "checkpoint-2", "model.safetensors"))
    w_bal = load_file(os.path.join(balanced, "..", "checkpoint-2", "model.safetensors"))
    assert any(not torch.equal(w_plain[k], w_bal[k]) for k in w_plain)
    lines = [json.loads(x) for x in open(tmp_path / "b" / "out" / "level_mmd.jsonl")]
    assert [x["step"] for x in lines] == [1, 2] and lines[0]["heldout"] is True
    assert [r["t"] for r in lines[0]["levels"]] == DMMDPipeline.from_pretrained(balanced).scheduler.timesteps.tolist()
    assert all(math.isfinite(r["mmd2"]) and r["feature_norm_clean"] > 0 for r in lines[-1]["levels"])
    # without --eval_data_dir the log says that its samples are training samples
    run(tmp_path / "c", "--eval_mmd_steps", "2", data=str(tmp_path / "a" / "imgs"), steps=2)
    line = json.loads(open(tmp_path / "c" / "out" / "level_mmd.jsonl").readline())
    assert line["heldout"] is False and "training samples" in line["source"]


def test_reference_statistics_average_each_sample_and_its_mirror_image(tmp_path):
    """With --random_flip the training distribution holds every image and its mirror image equally:
    m_P must be the mean over both, not over the unflipped images only."""
    from latent_dmmd.data import collate_skipping
    from latent_dmmd.training import image_dataset, reference_batches

    data = str(tmp_path / "imgs")
    write_image_folder(data, n=8, size=12, seed=1)
    config = load_config(["--train_data_dir", data, "--resolution", "8", "--random_flip", "true"])
    dataset = image_dataset(config)
    batch = collate_skipping([dataset[i] for i in range(len(dataset))])
    items = list(reference_batches(batch, config, "cpu"))
    assert len(items) == 2
    (x, keys), (x_flip, keys_flip) = items
    assert torch.equal(x_flip, x.flip(-1)) and keys != keys_flip
    config.random_flip = False
    assert len(list(reference_batches(batch, config, "cpu"))) == 1
    # a flip-symmetric feature map sees the same mean either way; a left-right-asymmetric one does not
    from latent_dmmd.reference import compute_reference_statistics

    left = lambda x, t: x[..., : x.shape[-1] // 2].flatten(1)
    stats = compute_reference_statistics(left, items, torch.tensor([0]), torch.ones(1000))
    both = torch.cat([x, x_flip])[..., :4].flatten(1).double().mean(0).float()
    assert stats.count == 16 and torch.allclose(stats.mean_data[0], both, atol=1e-6)


def test_ema_warmup_settings_reach_the_checkpointed_ema(tmp_path):
    """--ema_warmup/--ema_power reach diffusers' EMAModel, whose state is in every checkpoint. (Without
    the warm-up EMAModel still ramps its decay as (1 + s) / (10 + s); the warm-up is the power law
    1 - (1 + s / inv_gamma)^-power of diffusers' training scripts.)"""
    write_image_folder(tmp_path / "imgs", n=16, size=12)
    for flag in ("true", "false"):
        run(tmp_path / flag, "--ema_warmup", flag, "--ema_power", "0.75", data=str(tmp_path / "imgs"), steps=2)
        state = torch.load(tmp_path / flag / "out" / "checkpoint-2" / "custom_checkpoint_0.pkl", weights_only=False)
        assert state["use_ema_warmup"] is (flag == "true") and state["power"] == 0.75 and state["optimization_step"] == 2


def test_lazy_and_subsampled_penalty_follow_the_step_index():
    """--gp_every k: the penalty on steps with step % k == 0 only, weighted by k; --gp_fraction f: on
    round(f * group_size) interpolates of every group, chosen by keyed draws (the same on a rerun)."""
    from latent_dmmd.schedulers import DMMDScheduler
    from latent_dmmd.training import dmmd_step_loss

    from .conftest import tiny_discriminator

    disc, sched = tiny_discriminator(), DMMDScheduler()
    x0 = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    index = torch.arange(8)
    lazy = load_config(["--train_data_dir", "x", "--train_batch_size", "8", "--group_size", "4", "--gp_every", "4"])
    on, off = (dmmd_step_loss(disc, sched, x0, index, lazy, step, 0) for step in (8, 9))
    assert on.gradient_penalty > 0 and off.gradient_penalty == 0
    assert torch.allclose(on.loss, -on.mmd2 + 1e-3 * on.l2 + 4 * on.gradient_penalty, atol=1e-5)
    assert torch.allclose(off.loss, -off.mmd2 + 1e-3 * off.l2, atol=1e-5)
    full = load_config(["--train_data_dir", "x", "--train_batch_size", "8", "--group_size", "4"])
    half = load_config(["--train_data_dir", "x", "--train_batch_size", "8", "--group_size", "4", "--gp_fraction", "0.5"])
    a, b = dmmd_step_loss(disc, sched, x0, index, half, 3, 0), dmmd_step_loss(disc, sched, x0, index, half, 3, 0)
    assert torch.equal(a.gradient_penalty, b.gradient_penalty)
    assert not torch.allclose(a.gradient_penalty, dmmd_step_loss(disc, sched, x0, index, full, 3, 0).gradient_penalty)
    with pytest.raises(ValueError, match="gp_fraction"):
        load_config(["--train_data_dir", "x", "--gp_fraction", "0"])


def test_gaussian_kernel_training_measures_its_bandwidth_and_exports_psi_statistics(tmp_path):
    run(tmp_path, "--kernel", "rff_gaussian", "--rff_features", "64", steps=3)
    pipe = load(tmp_path / "out" / "pipeline")
    disc = pipe.discriminator
    assert disc.config.kernel == "rff_gaussian" and disc.reference_mean_data.shape == (3, 64)
    measured = disc.rff_bandwidth[disc.rff_bandwidth > 0]
    assert 1 <= len(measured) <= 6  # 3 steps x 2 groups: at most six buckets read
    assert torch.isfinite(measured).all()
    images = pipe(num_images=2, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert torch.isfinite(images).all()


@pytest.mark.parametrize("kind", ["FSDP", "DEEPSPEED"])
def test_sharded_training_is_refused_for_the_penalised_dmmd_objective(kind):
    from latent_dmmd.training import check_distributed_type

    config = load_config(["--train_data_dir", "x"])
    with pytest.raises(ValueError, match=f"{kind} is not supported.*use DDP"):
        check_distributed_type(kind, config)
    check_distributed_type("MULTI_CPU", config)  # DDP over gloo: the tested path
    check_distributed_type(kind, load_config(["--train_data_dir", "x", "--method", "ddpm"]))


def test_the_loops_named_steps_work_on_their_own(monkeypatch):
    """issue 30: the loop is prepare / micro_step / count_bad_step / log_step / checkpoint_and_evaluate / export,
    each callable with just the state it reads."""
    from types import SimpleNamespace

    from latent_dmmd.training import loop

    config = load_config(["--train_data_dir", "x", "--max_bad_steps", "2", "--checkpointing_steps", "5"])
    run = SimpleNamespace(config=config, global_step=7, bad_in_a_row=0, bad_total=0)
    loop.count_bad_step(run)
    assert (run.bad_in_a_row, run.bad_total) == (1, 1)
    with pytest.raises(RuntimeError, match="2 consecutive steps"):
        loop.count_bad_step(run)
    saved = []
    monkeypatch.setattr(loop, "save_checkpoint", lambda acc, out, step, limit, cfg, progress: saved.append((step, progress)))
    run = SimpleNamespace(config=config, accelerator=None, heldout=None, dmmd=True, global_step=5)
    run.progress = lambda: {"step": run.global_step, "optimize_seconds": 1.5}
    loop.checkpoint_and_evaluate(run, last=False)
    run.global_step = 6
    loop.checkpoint_and_evaluate(run, last=False)
    loop.checkpoint_and_evaluate(run, last=True)  # the last step is always saved
    assert saved == [(5, {"step": 5, "optimize_seconds": 1.5}), (6, {"step": 6, "optimize_seconds": 1.5})]


def stash_runs(tmp_path):
    """benchmarks/stash_run.py, the final weights of a 6-step run in tmp_path/a, and a 4-step run of the same data
    in tmp_path/b (to stash, restore and resume to 6)."""
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    import stash_run

    (tmp_path / "a").mkdir()
    run(tmp_path / "a", steps=6)
    straight = load_file(tmp_path / "a" / "out" / "checkpoint-6" / "model.safetensors")
    (tmp_path / "b").mkdir()
    run(tmp_path / "b", steps=4, data=str(tmp_path / "a" / "imgs"))
    return stash_run, straight


def test_a_stashed_run_resumes_on_a_fresh_folder_like_the_uninterrupted_run(tmp_path):
    """benchmarks/stash_run.py: the newest checkpoint and the run's logs kept aside, restored into a fresh folder
    (a new machine), and resumed there: the same weights as the run that never stopped."""
    stash_run, straight = stash_runs(tmp_path)
    stash_run.main(["save", str(tmp_path / "b" / "out"), str(tmp_path / "stash"), "--also", "2"])
    assert {"checkpoint-2", "checkpoint-4", "config.yaml", "progress.jsonl"} <= set(os.listdir(tmp_path / "stash"))
    stash_run.main(["save", str(tmp_path / "b" / "out"), str(tmp_path / "stash")])  # replaces the stash
    assert {"checkpoint-4", "config.yaml", "progress.jsonl"} <= set(os.listdir(tmp_path / "stash"))
    assert not [n for n in os.listdir(tmp_path / "stash") if n.startswith("checkpoint-") and n != "checkpoint-4"]
    stash_run.main(["restore", str(tmp_path / "stash"), str(tmp_path / "fresh" / "out")])
    with pytest.raises(SystemExit, match="already has"):
        stash_run.main(["restore", str(tmp_path / "stash"), str(tmp_path / "fresh" / "out")])
    (tmp_path / "fresh" / "imgs").mkdir(parents=True)
    run(tmp_path / "fresh", "--resume_from_checkpoint", "latest", steps=6, data=str(tmp_path / "a" / "imgs"))
    resumed = load_file(tmp_path / "fresh" / "out" / "checkpoint-6" / "model.safetensors")
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    log = [json.loads(line) for line in (tmp_path / "fresh" / "out" / "progress.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4, 6]  # the clock and its log continue


def test_a_stash_with_bfloat16_moments_resumes_close_and_its_scoring_checkpoints_export(tmp_path):
    """``--optimizer bf16`` halves the newest checkpoint's Adam state (the moments in bfloat16); a resume from it
    lands near the uninterrupted run (not bit for bit), and a checkpoint kept for the curve without optimiser
    state is restored with an empty Adam state that ``export_checkpoint`` loads."""
    from latent_dmmd.training import export_checkpoint

    stash_run, straight = stash_runs(tmp_path)
    full = torch.load(tmp_path / "b" / "out" / "checkpoint-4" / "optimizer.bin", weights_only=True)
    stash_run.main(["save", str(tmp_path / "b" / "out"), str(tmp_path / "stash"), "--also", "2", "--optimizer", "bf16"])
    assert set(os.listdir(tmp_path / "stash" / "checkpoint-4")) >= {"optimizer.bf16.safetensors", "model.safetensors"}
    assert "optimizer.bin" not in os.listdir(tmp_path / "stash" / "checkpoint-4")
    assert not {"optimizer.bin", "optimizer.bf16.safetensors"} & set(os.listdir(tmp_path / "stash" / "checkpoint-2"))

    stash_run.main(["restore", str(tmp_path / "stash"), str(tmp_path / "fresh" / "out")])
    back = torch.load(tmp_path / "fresh" / "out" / "checkpoint-4" / "optimizer.bin", weights_only=True)
    assert back["param_groups"] == full["param_groups"] and back["state"].keys() == full["state"].keys()
    for index, entry in full["state"].items():
        for name, value in entry.items():
            assert back["state"][index][name].dtype == value.dtype
            assert torch.allclose(back["state"][index][name], value, rtol=2**-8, atol=0), (index, name)
    assert "optimizer.bf16.safetensors" not in os.listdir(tmp_path / "fresh" / "out" / "checkpoint-4")
    empty = torch.load(tmp_path / "fresh" / "out" / "checkpoint-2" / "optimizer.bin", weights_only=True)
    assert empty["state"] == {} and empty["param_groups"] == full["param_groups"]

    (tmp_path / "fresh" / "imgs").mkdir(parents=True)
    run(tmp_path / "fresh", "--resume_from_checkpoint", "latest", steps=6, data=str(tmp_path / "a" / "imgs"))
    resumed = load_file(tmp_path / "fresh" / "out" / "checkpoint-6" / "model.safetensors")
    moved = max((straight[k] - load_file(tmp_path / "a" / "out" / "checkpoint-4" / "model.safetensors")[k]).abs().max().item()
                for k in straight)  # fmt: skip
    worst = max((straight[k] - resumed[k]).abs().max().item() for k in straight)
    print(f"\nresumed from bfloat16 moments: largest weight difference {worst:.3g}, steps 5-6 moved {moved:.3g}")
    assert worst < 0.05 * moved, (worst, moved)  # two steps from nearly the same moments: nearly the same weights

    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    folder = export_checkpoint(str(tmp_path / "fresh" / "out" / "checkpoint-2"), str(tmp_path / "export2"))
    assert os.path.isfile(os.path.join(folder, "model_index.json"))
    assert load_file(os.path.join(folder, "..", "checkpoint-2", "model.safetensors")).keys() == straight.keys()
