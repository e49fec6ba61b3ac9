"""What diffusers' common pipeline tests check (``PipelineTesterMixin``), re-expressed for DMMDPipeline.

Our own test code: the call signature, batch consistency where images are independent
(``forward_marginal``), dict and tuple outputs, save/load, optional components, ``to(dtype)``,
the callback contract (``num_timesteps``, ``_interrupt``, ``PipelineCallback``), components,
attention slicing and plain ``DiffusionPipeline`` loading.
"""

import inspect

import pytest
import torch
from diffusers import DiffusionPipeline
from diffusers.callbacks import PipelineCallback

from latent_dmmd import DMMDPipeline

from .conftest import tiny_pipeline

# fp16 / bf16 against fp32 on the tiny pipeline's latents (|z| up to ~4; the flow moves them ~0.65):
# measured 8e-4 (fp16) and 7e-3 (bf16); the bounds leave a few-fold margin.
FP16_ATOL, BF16_ATOL = 5e-3, 5e-2


def latents(pipe, n=4, seed=0, **kwargs):
    gens = [torch.Generator().manual_seed(seed + i) for i in range(n)]
    return pipe(num_images=n, generator=gens, output_type="latent", **kwargs).images


def test_call_signature_has_the_diffusers_parameters():
    params = inspect.signature(DMMDPipeline.__call__).parameters
    for name in ("num_images", "generator", "num_inference_steps", "latents", "output_type", "return_dict",
                 "callback_on_step_end", "callback_on_step_end_tensor_inputs"):  # fmt: skip
        assert name in params, name
    assert params["output_type"].default == "pil" and params["return_dict"].default is True
    assert DMMDPipeline._callback_tensor_inputs == ["latents"]


def test_batch_consistency_under_forward_marginal():
    """With independent particles, image i is the same alone or in a batch of 3 (same seed)."""
    pipe = tiny_pipeline(particle_mean="forward_marginal")
    batch = latents(pipe, n=3)
    for i in range(3):
        alone = latents(pipe, n=1, seed=i)
        assert torch.allclose(alone[0], batch[i], atol=1e-5)


def test_dict_and_tuple_outputs_are_equal(pipe):
    as_dict = pipe(num_images=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    as_tuple = pipe(num_images=2, generator=torch.Generator().manual_seed(0), output_type="np", return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 1
    assert abs(as_dict - as_tuple[0]).max() == 0


def test_save_load_local_gives_the_same_images(pipe, tmp_path):
    before = latents(pipe)
    pipe.save_pretrained(tmp_path)
    loaded = DMMDPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert torch.allclose(latents(loaded), before, atol=1e-6)


def test_save_load_optional_components_stay_none(pipe, tmp_path):
    assert pipe.vae is None and pipe.score_model is None
    pipe.save_pretrained(tmp_path)
    loaded = DMMDPipeline.from_pretrained(tmp_path)
    assert loaded.vae is None and loaded.score_model is None


def test_components_rebuild_the_pipeline(pipe):
    assert set(pipe.components) == {"discriminator", "scheduler", "vae", "score_model", "generator"}
    again = DMMDPipeline(**pipe.components)
    again.set_progress_bar_config(disable=True)
    assert torch.equal(latents(again), latents(pipe))


@pytest.mark.parametrize("dtype, atol", [(torch.float16, FP16_ATOL), (torch.bfloat16, BF16_ATOL)])
def test_to_dtype_samples_and_matches_fp32(dtype, atol):
    reference = latents(tiny_pipeline())
    pipe = tiny_pipeline()
    pipe.to(dtype)
    assert pipe.discriminator.dtype == dtype
    out = latents(pipe)
    assert out.dtype == torch.float32  # particles stay fp32 whatever phi runs in (method 5)
    err = (out - reference).abs().max().item()
    assert err <= atol, f"{dtype}: max |z - z_fp32| = {err:.2e} > {atol}"
    assert err > 0  # it really ran in the lower precision


@pytest.mark.parametrize("key", ["dtype", "torch_dtype"])
def test_from_pretrained_in_fp16_is_not_stale(pipe, tmp_path, key):
    """The fp32 weights' fingerprint after an fp16 cast is stored too (double rounding fp16 -> bf16)."""
    import warnings

    reference = latents(pipe)
    pipe.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch_dtype is deprecated in favour of dtype
        loaded = DMMDPipeline.from_pretrained(tmp_path, **{key: torch.float16})
    loaded.set_progress_bar_config(disable=True)
    assert loaded.discriminator.dtype == torch.float16
    assert (latents(loaded) - reference).abs().max() <= FP16_ATOL


def test_changed_weights_are_still_stale_in_fp16(pipe):
    with torch.no_grad():
        next(pipe.discriminator.parameters()).add_(0.01)
    pipe.to(torch.float16)
    with pytest.raises(ValueError, match="stale reference statistics"):
        latents(pipe)


def test_callback_inputs_and_num_timesteps(pipe):
    """diffusers' test_callback_inputs: only the declared tensors are passed; the step index runs over
    range(pipe.num_timesteps); latents returned at the last step are the output."""
    seen = []

    def callback(p, i, t, kwargs):
        assert set(kwargs) <= set(p._callback_tensor_inputs)
        seen.append((i, int(t)))
        if i == p.num_timesteps - 1:
            kwargs["latents"] = torch.zeros_like(kwargs["latents"])
        return kwargs

    out = latents(pipe, n=2, callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["latents"])
    levels, steps = pipe.scheduler.config.num_inference_steps, pipe.scheduler.config.flow_steps_per_level
    assert pipe.num_timesteps == levels * steps
    assert [i for i, _ in seen] == list(range(pipe.num_timesteps))
    # the level's timestep repeats for its N_s flow steps
    assert [t for _, t in seen] == [int(t) for t in pipe.scheduler.timesteps for _ in range(steps)]
    assert out.abs().sum() == 0


def test_interrupt_stops_the_flow_where_the_callback_says(pipe):
    stop_at = 2
    kept = {}

    def callback(p, i, t, kwargs):
        if i == stop_at:
            p._interrupt = True
            kept["z"] = kwargs["latents"].clone()
        return kwargs

    out = latents(pipe, n=2, callback_on_step_end=callback)
    assert pipe.interrupt is True
    assert torch.equal(out, kept["z"])
    full = latents(pipe, n=2)  # a new call starts uninterrupted
    assert pipe.interrupt is False and not torch.equal(full, out)


def test_a_diffusers_pipeline_callback_object_works(pipe):
    class ScaleAtEnd(PipelineCallback):
        tensor_inputs = ["latents"]

        def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
            if step_index == pipeline.num_timesteps - 1:
                callback_kwargs["latents"] = callback_kwargs["latents"] * 0 + 3.0
            return callback_kwargs

    out = latents(pipe, n=2, callback_on_step_end=ScaleAtEnd())
    assert torch.all(out == 3.0)


def test_attention_slicing_gives_the_same_images(pipe):
    from diffusers.models.attention_processor import SlicedAttnProcessor

    before = latents(pipe)
    pipe.enable_attention_slicing()
    processors = [m.processor for m in pipe.discriminator.modules() if hasattr(m, "processor")]
    assert processors and all(isinstance(p, SlicedAttnProcessor) for p in processors)
    assert torch.allclose(latents(pipe), before, atol=1e-5)
    pipe.disable_attention_slicing()
    assert not any(isinstance(m.processor, SlicedAttnProcessor) for m in pipe.discriminator.modules() if hasattr(m, "processor"))
    with pytest.raises(ValueError, match="slice_size"):
        pipe.enable_attention_slicing(slice_size=1000)


def test_plain_diffusion_pipeline_loads_a_folder_once_the_package_is_imported(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(tmp_path)  # no custom_pipeline: `import latent_dmmd` registered it
    assert isinstance(loaded, DMMDPipeline)


def test_to_device_and_execution_device(pipe):
    pipe.to("cpu")
    assert pipe.device.type == "cpu" and pipe._execution_device.type == "cpu"
