"""One-step sampling (method §10): the field's targets against their closed forms, the generator as a pipeline
component (save, load, checksums, one evaluation per image), and scripts/train_generator.py end to end."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from latent_dmmd import DMMDGenerator, DMMDPipeline
from latent_dmmd.onestep import diversity, field_target, flow_endpoints, local_direction

from .conftest import tiny_pipeline, write_image_folder


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState

    yield
    AcceleratorState._reset_state(True)


def identity_phi(x, t):
    return x.flatten(1)


def test_linear_field_target_with_identity_features_is_a_step_towards_the_data_mean():
    """phi = x: the witness gradient is m_Q(t) - m_P(t) for every sample, so the target is
    x - eta alpha (mean(alpha x + sigma eps) - m_P) exactly."""
    torch.manual_seed(0)
    x, eps = torch.randn(16, 3), torch.randn(16, 3)
    m_p = torch.tensor([1.0, -2.0, 0.5])
    alpha, sigma, eta = 0.8, 0.6, 0.7
    target = field_target(identity_phi, x, 500, alpha, sigma, eta, eps, mean_data=m_p)
    expected = x - eta * alpha * ((alpha * x + sigma * eps).mean(0) - m_p)
    assert torch.allclose(target, expected, atol=1e-6)
    # the shared direction: every sample moves by the same vector (why a linear-kernel generator collapses together)
    moves = target - x
    assert torch.allclose(moves, moves[:1].expand_as(moves), atol=1e-6)


def test_local_direction_attracts_to_nearby_data_and_vanishes_in_expectation_at_the_data():
    torch.manual_seed(0)
    data = torch.randn(400, 2) * 0.3 + torch.tensor([5.0, 0.0])
    lone = torch.cat([torch.zeros(1, 2), torch.randn(7, 2) * 0.3 + torch.tensor([-5.0, 0.0])])
    v = local_direction(lone, data, tau=1.0)
    assert v[0, 0] > 2.0  # the far point is pulled towards the data (+x)
    same = torch.randn(400, 2) * 0.3 + torch.tensor([5.0, 0.0])  # a fresh batch of the data distribution
    collapsed = torch.full((400, 2), 5.0) + 0.01 * torch.randn(400, 2)
    at_data = local_direction(same, data, tau=0.2).norm(dim=1).mean()
    at_collapse = local_direction(collapsed, data, tau=0.2).norm(dim=1).mean()
    assert at_data < 0.5 * at_collapse


def test_local_field_target_moves_samples_along_the_feature_drift():
    """phi = x: the move -eta alpha grad equals eta alpha V (the feature-space drift)."""
    torch.manual_seed(1)
    x, eps = torch.randn(32, 2), torch.zeros(32, 2)
    data = torch.randn(64, 2) + 3.0
    target = field_target(identity_phi, x, 10, 1.0, 0.0, 0.5, eps, kernel="local", data=data,
                          data_noise=torch.zeros_like(data), tau=0.5)  # fmt: skip
    v = local_direction(x, data, tau=0.5)
    assert torch.allclose(target - x, 0.5 * v, atol=1e-5)
    with pytest.raises(ValueError, match="local field needs"):
        field_target(identity_phi, x, 10, 1.0, 0.0, 0.5, eps, kernel="local")
    with pytest.raises(ValueError, match="kernel"):
        field_target(identity_phi, x, 10, 1.0, 0.0, 0.5, eps, kernel="gaussian", mean_data=data.mean(0))


def test_diversity_is_one_for_a_copy_and_near_zero_for_a_collapse():
    data = torch.randn(100, 5)
    assert diversity(data, data) == pytest.approx(1.0)
    assert diversity(torch.zeros(50, 5) + 1e-3 * torch.randn(50, 5), data) < 0.01


def tiny_generator(pipe, seed=0):
    torch.manual_seed(seed)
    c, s = pipe.particle_shape[0], pipe.particle_shape[1]
    return DMMDGenerator(sample_size=s, in_channels=c, block_out_channels=(8, 16), norm_num_groups=4,
                         attention_head_dim=4)  # fmt: skip


def test_a_pipeline_with_a_generator_samples_in_one_step_and_round_trips(tmp_path):
    pipe = tiny_pipeline(num_inference_steps=2, flow_steps_per_level=1)
    pipe.set_progress_bar_config(disable=True)
    with_gen = DMMDPipeline(pipe.discriminator, pipe.scheduler, generator=tiny_generator(pipe))
    with_gen.set_progress_bar_config(disable=True)
    z = torch.randn(3, *pipe.particle_shape)
    one = with_gen(num_images=3, latents=z, output_type="latent").images
    assert with_gen.num_timesteps == 1
    assert torch.allclose(one, with_gen.generator(z), atol=1e-6)  # one evaluation of G on the given noise
    flow = with_gen(num_images=3, latents=z, output_type="latent", use_generator=False).images
    assert torch.allclose(flow, pipe(num_images=3, latents=z, output_type="latent").images)
    with pytest.raises(ValueError, match="no one-step generator"):
        pipe(num_images=2, use_generator=True)
    with_gen.save_pretrained(tmp_path / "p")
    assert os.path.isfile(tmp_path / "p" / "generator" / "diffusion_pytorch_model.safetensors")
    assert "generator/diffusion_pytorch_model.safetensors" in json.loads((tmp_path / "p" / "checksums.json").read_text())
    loaded = DMMDPipeline.from_pretrained(tmp_path / "p")
    loaded.set_progress_bar_config(disable=True)
    again = loaded(num_images=3, latents=z, output_type="latent").images
    assert torch.allclose(again, one, atol=1e-6)
    images = loaded(num_images=2, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert images.shape == (2, 3, 8, 8) and images.min() >= 0 and images.max() <= 1
    # a damaged generator file is refused like any other component
    weights = tmp_path / "p" / "generator" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(ValueError, match="generator"):
        DMMDPipeline.from_pretrained(tmp_path / "p")


def test_a_generator_of_another_shape_is_refused():
    pipe = tiny_pipeline()
    other = DMMDGenerator(sample_size=16, in_channels=3, block_out_channels=(8, 16), norm_num_groups=4)
    with pytest.raises(ValueError, match="not trained together"):
        DMMDPipeline(pipe.discriminator, pipe.scheduler, generator=other)(num_images=1)


def test_flow_endpoints_are_the_flow_of_their_own_noise():
    pipe = tiny_pipeline(num_inference_steps=2, flow_steps_per_level=1)
    pipe.set_progress_bar_config(disable=True)
    noise, ends = flow_endpoints(pipe, 5, batch_size=5, seed=3)
    direct = pipe(num_images=5, latents=noise, output_type="latent").images
    assert torch.allclose(ends, direct, atol=1e-6)
    again, _ = flow_endpoints(pipe, 5, batch_size=5, seed=3)
    assert torch.equal(noise, again)


def run_script(tmp_path, *extra, steps=4):
    from latent_dmmd.generator_training import main

    pipe = tiny_pipeline(num_inference_steps=2, flow_steps_per_level=1)
    if not (tmp_path / "teacher").is_dir():
        pipe.save_pretrained(tmp_path / "teacher")
    args = ["--pipeline", tmp_path / "teacher", "--output_dir", tmp_path / "out", "--train_batch_size", "4",
            "--max_train_steps", steps, "--checkpointing_steps", "2", "--log_every", "1", "--num_endpoints", "16",
            "--flow_batch_size", "8", "--block_out_channels", "8", "16", "--down_block_types", "DownBlock2D",
            "DownBlock2D", "--up_block_types", "UpBlock2D", "UpBlock2D", "--norm_num_groups", "4", *extra]  # fmt: skip
    return main([str(a) for a in args])


def test_distillation_trains_exports_and_resumes_exactly(tmp_path):
    folder = run_script(tmp_path / "a", steps=4)
    pipe = DMMDPipeline.from_pretrained(folder)
    assert pipe.generator.config.mode == "distill"
    assert "One-step generator" in open(os.path.join(folder, "README.md")).read()
    log = [json.loads(line) for line in open(tmp_path / "a" / "out" / "generator_log.jsonl")]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all(r["diversity"] > 0 for r in log)
    straight = load_file(tmp_path / "a" / "out" / "checkpoint-4" / "model.safetensors")
    # the same run stopped after step 2 and resumed gives the same weights
    run_script(tmp_path / "b", steps=2)
    run_script(tmp_path / "b", "--resume_from_checkpoint", "latest", steps=4)
    resumed = load_file(tmp_path / "b" / "out" / "checkpoint-4" / "model.safetensors")
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


def test_field_mode_needs_data_and_logs_the_diversity(tmp_path):
    with pytest.raises(ValueError, match="train_data"):
        run_script(tmp_path, "--mode", "field")
    write_image_folder(tmp_path / "imgs", n=12, size=8)
    folder = run_script(tmp_path, "--mode", "field", "--field_kernel", "local", "--train_data", tmp_path / "imgs",
                        "--data_batch_size", "8", steps=2)  # fmt: skip
    assert DMMDPipeline.from_pretrained(folder).generator.config.mode == "field"
    log = [json.loads(line) for line in open(tmp_path / "out" / "generator_log.jsonl")]
    assert len(log) == 2 and all(r["diversity"] > 0 for r in log)


def test_the_generator_samples_latents_that_the_autoencoder_decodes_and_runs_in_bf16(tmp_path):
    from .conftest import tiny_autoencoder

    vae = tiny_autoencoder()
    pipe = tiny_pipeline(in_channels=4, sample_size=4, vae=vae, num_inference_steps=2, flow_steps_per_level=1)
    with_gen = DMMDPipeline(pipe.discriminator, pipe.scheduler, vae=vae, generator=tiny_generator(pipe))
    with_gen.set_progress_bar_config(disable=True)
    z = torch.randn(2, *pipe.particle_shape)
    latents = with_gen(num_images=2, latents=z, output_type="latent").images
    images = with_gen(num_images=2, latents=z, output_type="pt").images
    assert latents.shape == (2, 4, 4, 4) and images.shape == (2, 3, 8, 8)
    from latent_dmmd.autoencoders import decode_latents

    expected = ((decode_latents(vae, latents) + 1) / 2).clamp(0, 1)
    assert torch.allclose(images, expected, atol=1e-5)  # the generator's latents, decoded as the flow's would be
    with_gen.save_pretrained(tmp_path / "p")
    loaded = DMMDPipeline.from_pretrained(tmp_path / "p")
    loaded.set_progress_bar_config(disable=True)
    assert torch.allclose(loaded(num_images=2, latents=z, output_type="latent").images, latents, atol=1e-6)
    loaded.generator.to(torch.bfloat16)
    half = loaded(num_images=2, latents=z, output_type="latent").images
    assert half.dtype == torch.float32 and (half - latents).abs().max() < 0.1  # bf16 weights, fp32 particles


def test_the_sample_command_uses_the_generator_and_runs_the_flow_with_flow(tmp_path, capsys):
    from latent_dmmd.cli import main

    pipe = tiny_pipeline(num_inference_steps=2, flow_steps_per_level=1)
    DMMDPipeline(pipe.discriminator, pipe.scheduler, generator=tiny_generator(pipe)).save_pretrained(tmp_path / "p")
    assert main(["sample", str(tmp_path / "p"), "--num-images", "2", "--output-dir", str(tmp_path / "a")]) == 0
    assert (tmp_path / "a" / "grid.png").is_file()
    assert main(["sample", str(tmp_path / "p"), "--num-images", "2", "--step-size", "0.1",
                 "--output-dir", str(tmp_path / "b")]) != 0  # fmt: skip
    assert "--flow" in capsys.readouterr().err
    assert main(["sample", str(tmp_path / "p"), "--num-images", "2", "--step-size", "0.1", "--flow",
                 "--output-dir", str(tmp_path / "c")]) == 0  # fmt: skip
    assert (tmp_path / "c" / "grid.png").is_file()


def test_the_card_of_a_one_step_folder_shows_both_samplers_and_survives_a_refresh(tmp_path, capsys):
    from latent_dmmd.cli import main as cli
    from latent_dmmd.hub import write_model_card

    pipe = tiny_pipeline()
    folder = tmp_path / "p"
    DMMDPipeline(pipe.discriminator, pipe.scheduler, generator=tiny_generator(pipe)).save_pretrained(folder)
    write_model_card(str(folder), one_step="`generator/` was distilled from 64 flow endpoints.")
    card = (folder / "README.md").read_text()
    assert "One-step generator" in card and "distilled from 64 flow endpoints" in card
    assert "No generator" not in card and "use_generator=False" in card
    score = {"kid": 0.02, "precision": 0.5, "recall": 0.25, "num_fake": 2000, "num_real": 10000, "pr_k": 3}
    bench = tmp_path / "onestep_x.json"
    bench.write_text(json.dumps({"args": {"reference": "t10k.idx"}, "rows": [
        {"method": "onestep", "nfe": 1, "fid": 31.25, "seconds_per_image": 2e-5, **score},
        {"method": "flow", "nfe": 20, "fid": 25.5, "seconds_per_image": 0.1, **score},
        {"method": "ddim", "nfe": 10, "fid": 20.0, "seconds_per_image": 0.01, **score}]}))  # fmt: skip
    assert cli(["card", str(folder), "--samplers-from-benchmark", str(bench)]) == 0
    card = (folder / "README.md").read_text()
    for text in ("| one-step generator | 1 | 31.25 | 0.0200 | 0.500 | 0.250 | 0.02 |",
                 "| particle flow | 20 | 25.50 |", "2000 images each against 10000", "distilled from 64 flow endpoints"):
        assert text in card, text
    assert "20.00" not in card  # the DDIM row is another model's
    assert cli(["card", str(folder), "--limitation", "small"]) == 0  # a refresh keeps both
    card = (folder / "README.md").read_text()
    assert "| one-step generator | 1 | 31.25 |" in card and "distilled from 64 flow endpoints" in card
    bench.write_text(json.dumps({"rows": [{"method": "flow"}]}))
    assert cli(["card", str(folder), "--samplers-from-benchmark", str(bench)]) == 2
    assert "needs an 'onestep' and a 'flow' row" in capsys.readouterr().err
