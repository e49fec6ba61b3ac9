"""Tiny, seeded components shared by the tests (diffusers style: small and fast)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from latent_dmmd import DMMDDiscriminator, DMMDPipeline, DMMDScheduler
from latent_dmmd.reference import compute_reference_statistics

torch.set_num_threads(min(2, torch.get_num_threads()))


def tiny_discriminator(in_channels: int = 3, sample_size: int = 8, seed: int = 0) -> DMMDDiscriminator:
    torch.manual_seed(seed)
    return DMMDDiscriminator(
        sample_size=sample_size,
        in_channels=in_channels,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=4,
    )


def tiny_data(in_channels: int = 3, sample_size: int = 8, n: int = 16) -> torch.Tensor:
    """The tiny 'dataset' the tiny pipelines' reference statistics are computed on."""
    return torch.rand(n, in_channels, sample_size, sample_size, generator=torch.Generator().manual_seed(1)) * 2 - 1


def tiny_pipeline(in_channels: int = 3, sample_size: int = 8, vae=None, **scheduler_kwargs) -> DMMDPipeline:
    disc = tiny_discriminator(in_channels, sample_size)
    sched = DMMDScheduler(**{"num_inference_steps": 3, "flow_steps_per_level": 2, "step_size": 0.5, **scheduler_kwargs})
    data = tiny_data(in_channels, sample_size)
    stats = compute_reference_statistics(
        disc, data.split(8), sched.timesteps, sched.alphas_cumprod, generator=torch.Generator().manual_seed(2)
    )
    disc.set_reference_statistics(stats)
    pipe = DMMDPipeline(disc, sched, vae=vae)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def pipe():
    return tiny_pipeline()


SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared")
TAEF2_DIR = os.path.join(SHARED, "weights", "taef2")
CELEBA_DIR = os.path.join(SHARED, "data", "celebahq256", "images")


def write_image_folder(folder, n: int = 8, size: int = 12, seed: int = 0, corrupt: int = 0) -> list[str]:
    """``n`` random RGB PNGs (in two subfolders) plus ``corrupt`` unreadable .jpg files."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        sub = os.path.join(folder, f"part{i % 2}")
        os.makedirs(sub, exist_ok=True)
        path = os.path.join(sub, f"img{i:03d}.png")
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    for i in range(corrupt):
        path = os.path.join(folder, f"broken{i}.jpg")
        with open(path, "wb") as f:
            f.write(b"\xff\xd8\xff\xe0 this is not a jpeg")
        paths.append(path)
    return paths


def tiny_vae_folder(folder, latent_channels: int = 4, scaling_factor: float = 0.5, seed: int = 0) -> str:
    """A tiny random AutoencoderKL saved with save_pretrained (downsamples by 2)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(8, 8), norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        scaling_factor=scaling_factor,
    )  # fmt: skip
    vae.save_pretrained(folder)
    return str(folder)


def tiny_autoencoder(seed: int = 0):
    """A tiny random 4-channel AutoencoderKL that halves the resolution (not saved)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8), norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16,
    )  # fmt: skip


# End-to-end checks that take tens of seconds each on 2 CPU cores (training runs, subprocesses, the
# Inception network): left out of the default `python -m pytest -q` so it stays within a few minutes;
# `python -m pytest -q -m slow` runs them, and CI runs both.
SLOW_TESTS = {
    "test_cli.py": ["test_console_script_help", "test_demo_writes_png_and_metrics",
                    "test_cli_samples_and_evaluates_the_celeba_model_with_vae"],
    "test_evaluation.py": ["test_fid_is_near_zero_for_the_same_set_and_larger_for_a_different_one",
                           "test_evaluate_script_writes_metrics_with_protocol",
                           "test_update_feeds_the_extractor_in_chunks_with_the_same_result",
                           "test_saved_reference_features_give_the_same_scores"],
    "test_reliability.py": ["test_disk_full_during_the_final_export_leaves_the_previous_pipeline_loadable",
                            "test_resume_applies_a_changed_learning_rate_and_refuses_a_changed_model",
                            "test_a_fresh_run_into_a_finished_runs_folder_is_refused",
                            "test_a_zero_byte_file_in_the_newest_checkpoint_falls_back_to_the_previous_one",
                            "test_nan_steps_are_skipped_counted_then_stop_the_run",
                            "test_a_second_concurrent_run_is_kept_out_by_the_lock",
                            "test_a_hanging_process_group_teardown_still_exits",
                            "test_killing_the_launcher_ends_its_workers",
                            "test_two_processes_writing_the_same_cache_shard_leave_a_whole_file"],
    "test_training.py": ["test_resume_reproduces_the_uninterrupted_run", "test_checkpoint_limit_prunes_only_after_a_complete_save",
                         "test_level_balance_changes_training_and_the_log_reports_heldout_mmd_per_level",
                         "test_gradient_accumulation_and_bf16_run"],
    "test_kale.py": ["test_training_with_the_kale_objective_exports_a_sampling_pipeline"],
    "test_diagnostics.py": ["test_trace_and_custom_grid_through_the_pipeline"],
    "test_data.py": ["test_a_cache_of_images_that_changed_is_refused_naming_the_field",
                     "test_missing_extra_and_truncated_shards_are_errors_naming_the_file"],
}  # fmt: skip


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.originalname in SLOW_TESTS.get(item.path.name, ()):
            item.add_marker(pytest.mark.slow)
