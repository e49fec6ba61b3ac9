"""DMMDPipeline: the diffusers contract (design.md), save/load, both loader paths, bad input."""

import os

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import AutoencoderKL, DiffusionPipeline

from latent_dmmd import DMMDDiscriminator, DMMDPipeline, DMMDScheduler
from latent_dmmd.pipelines import pipeline_dmmd

from .conftest import tiny_autoencoder, tiny_data, tiny_discriminator, tiny_pipeline


def sample(pipe, seed=0, **kwargs):
    kwargs.setdefault("num_images", 4)
    kwargs.setdefault("output_type", "np")
    return pipe(generator=torch.Generator().manual_seed(seed), **kwargs).images


def test_public_imports_and_defaults():
    disc, sched = DMMDDiscriminator(), DMMDScheduler()
    assert disc(torch.randn(2, 3, 32, 32), 10).shape == (2, disc.feature_dim) == (2, 3 * 32 * 32)
    assert sched.config.num_inference_steps == 10 and sched.config.flow_steps_per_level == 10
    assert sched.config.particle_mean == "ensemble" and sched.config.reference == "cached"
    pooled = DMMDDiscriminator(pool_size=4, projection_dim=32)
    assert pooled(torch.randn(2, 3, 32, 32), torch.tensor([1, 2])).shape == (2, 32)


def test_seeded_generator_makes_runs_reproducible(pipe):
    a, b, c = sample(pipe, 0), sample(pipe, 0), sample(pipe, 1)
    assert np.array_equal(a, b)
    assert not np.allclose(a, c)


def test_generator_list_seeds_each_image(pipe):
    gens = [torch.Generator().manual_seed(s) for s in (3, 4)]
    out = pipe(num_images=2, generator=gens, output_type="latent").images
    latents = torch.stack([torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(s)) for s in (3, 4)])
    same = pipe(num_images=2, latents=latents, output_type="latent").images
    assert torch.allclose(out, same)


def test_output_types(pipe):
    pil = sample(pipe, output_type="pil")
    assert len(pil) == 4 and all(isinstance(im, PIL.Image.Image) and im.size == (8, 8) for im in pil)
    arr = sample(pipe, output_type="np")
    assert arr.shape == (4, 8, 8, 3) and arr.min() >= 0 and arr.max() <= 1
    pt = sample(pipe, output_type="pt")
    assert pt.shape == (4, 3, 8, 8) and torch.allclose(pt.permute(0, 2, 3, 1), torch.from_numpy(arr))
    latent = sample(pipe, output_type="latent")
    # latent output is the raw particles; images are (particles + 1) / 2 clipped to [0, 1]
    assert torch.allclose(((latent + 1) / 2).clamp(0, 1), pt, atol=1e-6)


def test_return_dict_false_gives_a_tuple(pipe):
    out = pipe(num_images=2, generator=torch.Generator().manual_seed(0), output_type="np", return_dict=False)
    assert isinstance(out, tuple) and out[0].shape == (2, 8, 8, 3)


def test_flow_moves_particles_and_overrides_apply(pipe):
    noise = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    moved = pipe(num_images=4, latents=noise, output_type="latent").images
    assert not torch.allclose(moved, noise)
    tiny = pipe(num_images=4, latents=noise, output_type="latent", step_size=1e-9).images
    assert (tiny - noise).abs().max() < 1e-6 < (moved - noise).abs().max()  # the step size is the one applied
    longer = pipe(num_images=4, latents=noise, output_type="latent", flow_steps_per_level=5).images
    assert not torch.allclose(longer, moved)


def test_callback_on_step_end(pipe):
    calls = []

    def callback(p, step, timestep, kwargs):
        calls.append((step, int(timestep)))
        return {"latents": kwargs["latents"] * 0 if step == 5 else kwargs["latents"]}

    out = pipe(num_images=2, output_type="latent", callback_on_step_end=callback).images
    grid = pipe.scheduler.timesteps.tolist()
    assert calls == [(i, grid[i // 2]) for i in range(6)]
    assert torch.equal(out, torch.zeros_like(out))


def test_progress_bar_counts_flow_steps(pipe, capsys):
    pipe.set_progress_bar_config(disable=False)
    pipe(num_images=2, output_type="latent")
    assert "6/6" in capsys.readouterr().err


def test_reference_data_mode_matches_cached_statistics_on_the_same_data():
    cached = tiny_pipeline()
    exact = tiny_pipeline(reference="data")
    noise = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    a = cached(num_images=3, latents=noise, output_type="latent").images
    b = exact(num_images=3, latents=noise, output_type="latent", reference_data=tiny_data()).images
    assert torch.allclose(a, b, atol=1e-5)
    with pytest.raises(ValueError, match="reference_data"):
        exact(num_images=3, output_type="latent")


def test_forward_marginal_images_do_not_depend_on_the_batch():
    pipe = tiny_pipeline(particle_mean="forward_marginal")
    noise = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(6))
    four = pipe(num_images=4, latents=noise, output_type="latent").images
    one = pipe(num_images=1, latents=noise[:1], output_type="latent").images
    assert torch.allclose(four[:1], one, atol=1e-5)


def test_save_and_load_round_trip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    files = {os.path.relpath(os.path.join(r, f), tmp_path) for r, _, fs in os.walk(tmp_path) for f in fs}
    assert "discriminator/diffusion_pytorch_model.safetensors" in files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]
    assert "pipeline.py" in files and "model_index.json" in files
    loaded = DMMDPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    for name, tensor in pipe.discriminator.state_dict().items():
        assert torch.equal(tensor, loaded.discriminator.state_dict()[name]), name
    np.testing.assert_allclose(sample(pipe), sample(loaded), atol=1e-6)  # same weights bit for bit
    with pytest.raises(ValueError, match="safetensors"):
        pipe.save_pretrained(tmp_path / "x", safe_serialization=False)


def test_saving_a_loaded_pipeline_writes_no_path_of_this_machine(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "first")
    loaded = DMMDPipeline.from_pretrained(tmp_path / "first")  # diffusers records where each part came from
    assert loaded.discriminator.config.get("_name_or_path")
    loaded.save_pretrained(tmp_path / "second")
    for config in ("model_index.json", "discriminator/config.json", "scheduler/scheduler_config.json"):
        text = (tmp_path / "second" / config).read_text()
        assert "_name_or_path" not in text and str(tmp_path) not in text, config
    DMMDPipeline.from_pretrained(tmp_path / "second")  # still loads, checksums intact


def test_plain_diffusers_loader_through_the_shim(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(tmp_path, custom_pipeline=str(tmp_path), trust_remote_code=True)
    assert isinstance(loaded, DMMDPipeline)
    loaded.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(sample(pipe), sample(loaded), atol=1e-6)  # same weights bit for bit


def test_from_pretrained_hub_id_uses_a_snapshot_download(pipe, tmp_path, monkeypatch):
    pipe.save_pretrained(tmp_path)
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(tmp_path)

    monkeypatch.setattr(pipeline_dmmd, "snapshot_download", fake_snapshot_download)
    loaded = DMMDPipeline.from_pretrained("someone/dmmd-tiny", revision="v1")
    assert isinstance(loaded, DMMDPipeline)
    (repo_id, kwargs), = calls
    assert repo_id == "someone/dmmd-tiny" and kwargs["revision"] == "v1"
    assert "*.safetensors" in kwargs["allow_patterns"] and not any("bin" in p for p in kwargs["allow_patterns"])
    loaded.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(sample(pipe), sample(loaded), atol=1e-6)  # same weights bit for bit


def test_latent_space_pipeline_decodes_with_the_vae():
    vae = tiny_autoencoder()
    pipe = tiny_pipeline(in_channels=4, vae=vae)
    latent = sample(pipe, num_images=2, output_type="latent")
    assert latent.shape == (2, 4, 8, 8)
    images = sample(pipe, num_images=2, output_type="pt")
    assert images.shape == (2, 3, 16, 16)
    expected = vae.decode(latent / vae.config.scaling_factor).sample
    assert torch.allclose(images, (expected / 2 + 0.5).clamp(0, 1), atol=1e-5)


def test_a_latent_model_without_its_autoencoder_says_how_to_attach_it(tmp_path):
    from latent_dmmd.models.discriminator import vae_contract

    vae = tiny_autoencoder()
    full = tiny_pipeline(in_channels=4, vae=vae)
    full.discriminator.register_to_config(reference_vae=vae_contract(vae))
    DMMDPipeline(full.discriminator, full.scheduler).save_pretrained(tmp_path)  # shipped without the VAE
    bare = DMMDPipeline.from_pretrained(tmp_path)
    bare.set_progress_bar_config(disable=True)
    with pytest.raises(ValueError, match="latent space of a AutoencoderKL.*vae="):
        sample(bare, num_images=2)
    assert sample(bare, num_images=2, output_type="latent").shape == (2, 4, 8, 8)
    attached = DMMDPipeline.from_pretrained(tmp_path, vae=vae)
    attached.set_progress_bar_config(disable=True)
    assert np.allclose(sample(attached, num_images=2), sample(full, num_images=2), atol=1e-5)


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("n", [0, -2, 1.5, True])
def test_num_images_must_be_a_positive_integer(pipe, n):
    with pytest.raises(ValueError, match="num_images"):
        pipe(num_images=n)


def test_numpy_integers_are_integers(pipe):
    out = pipe(num_images=np.int64(2), num_inference_steps=np.int64(3), flow_steps_per_level=np.int32(1), output_type="latent")
    assert out.images.shape[0] == 2


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"flow_steps_per_level": 0}, "flow_steps_per_level"),  # 0 was silently replaced by the config's N_s
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"step_size": float("nan")}, "step_size"),
        ({"step_size": float("inf")}, "step_size"),
        ({"step_size": 0.0}, "step_size must be > 0"),
        ({"noise_scale": float("nan")}, "noise_scale"),
    ],
)
def test_zero_and_non_finite_sampler_settings_are_refused(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pipe(num_images=2, **kwargs)


def test_generator_list_of_wrong_length(pipe):
    with pytest.raises(ValueError, match="generators"):
        pipe(num_images=3, generator=[torch.Generator()] * 2)


def test_unknown_output_type(pipe):
    with pytest.raises(ValueError, match="output_type"):
        pipe(num_images=1, output_type="jpeg")


def test_inference_mode_is_refused(pipe):
    with torch.inference_mode(), pytest.raises(ValueError, match="inference_mode"):
        pipe(num_images=1)


def test_latents_with_wrong_channels_shape_or_dtype(pipe):
    with pytest.raises(ValueError, match=r"latents have shape \(2, 4, 8, 8\)"):
        pipe(num_images=2, latents=torch.randn(2, 4, 8, 8))
    with pytest.raises(ValueError, match="latents have shape"):
        pipe(num_images=3, latents=torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="floating-point"):
        pipe(num_images=2, latents=torch.zeros(2, 3, 8, 8, dtype=torch.long))


def test_channel_mismatch_between_particles_and_discriminator():
    disc = tiny_pipeline().discriminator
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        disc(torch.randn(2, 4, 8, 8), 0)
    torch.manual_seed(0)
    vae = AutoencoderKL(latent_channels=2, block_out_channels=(8,), norm_num_groups=4)
    with pytest.raises(ValueError, match="latent channels"):
        tiny_pipeline(in_channels=3, vae=vae)(num_images=1)


def test_missing_reference_statistics():
    pipe = DMMDPipeline(tiny_discriminator(), DMMDScheduler())
    with pytest.raises(ValueError, match="no reference statistics"):
        pipe(num_images=1)


def test_stale_reference_statistics_are_refused(pipe):
    with torch.no_grad():
        pipe.discriminator.unet.conv_in.weight.add_(0.1)
    with pytest.raises(ValueError, match="stale"):
        pipe(num_images=1)


def test_bf16_cast_is_not_stale(pipe):
    pipe.discriminator.to(torch.bfloat16)
    assert pipe(num_images=2, output_type="latent").images.dtype == torch.float32


def test_num_inference_steps_outside_the_statistics_grid(pipe):
    with pytest.raises(ValueError, match="no reference statistics for timesteps"):
        pipe(num_images=1, num_inference_steps=5)


def test_statistics_from_another_forward_process_are_refused(pipe):
    pipe.scheduler = DMMDScheduler(**{**pipe.scheduler.config, "beta_schedule": "squaredcos_cap_v2"})
    with pytest.raises(ValueError, match="another forward process"):
        pipe(num_images=1)


def test_xformers_without_cuda_is_refused(pipe):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the refusal is for CPU-only machines")
    with pytest.raises(ValueError, match="CUDA"):
        pipe.enable_xformers_memory_efficient_attention()


def test_noise_injection_zero_is_the_plain_sampler_and_draws_nothing(pipe):
    gen = torch.Generator().manual_seed(0)
    plain = pipe(num_images=4, generator=gen, output_type="latent").images
    after_plain = gen.initial_seed(), torch.randn(1, generator=gen)
    gen = torch.Generator().manual_seed(0)
    zero = pipe(num_images=4, generator=gen, output_type="latent", noise_injection=0.0).images
    assert torch.equal(plain, zero) and torch.equal(torch.randn(1, generator=gen), after_plain[1])
    injected = pipe(num_images=4, generator=torch.Generator().manual_seed(0), output_type="latent", noise_injection=1.0)
    assert not torch.equal(plain, injected.images) and torch.isfinite(injected.images).all()
    sched = pipe.scheduler
    assert sched.injection_scale(0, 1.0) == pytest.approx(float(1 - sched.alphas_cumprod[sched.timesteps[0]]) ** 0.5)
    with pytest.raises(ValueError, match="noise_injection"):
        pipe(num_images=2, noise_injection=-1.0)
