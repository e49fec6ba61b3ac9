"""Fault injection (docs/reliability.md): each test injects one fault and checks the outcome."""

import json
import multiprocessing
import os
import pickle
import subprocess
import sys

import pytest
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file

from latent_dmmd import DMMDPipeline
from latent_dmmd.latent_cache import write_cache_shard

from .conftest import tiny_pipeline, write_image_folder
from .test_training import TINY_MODEL, load, run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEIGHTS = os.path.join("discriminator", "diffusion_pytorch_model.safetensors")


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState

    yield
    AcceleratorState._reset_state(True)


@pytest.fixture
def saved(tmp_path):
    folder = tmp_path / "pipe"
    tiny_pipeline().save_pretrained(folder)
    return folder


class RunsCode:
    """Unpickling this writes a marker file: the classic malicious model file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


# ---------------------------------------------------------------------------- untrusted model files


def test_pickle_only_weights_are_refused_and_never_unpickled(saved, tmp_path):
    marker = tmp_path / "pwned"
    os.remove(saved / WEIGHTS)
    os.remove(saved / "checksums.json")
    with open(saved / "discriminator" / "diffusion_pytorch_model.bin", "wb") as f:
        pickle.dump(RunsCode(str(marker)), f)
    with pytest.raises(ValueError, match=r"diffusion_pytorch_model\.bin is a pickle.*allow_pickle=True"):
        DMMDPipeline.from_pretrained(saved)
    assert not marker.exists()


def test_truncated_safetensors_names_the_file(saved):
    data = (saved / WEIGHTS).read_bytes()
    (saved / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"diffusion_pytorch_model\.safetensors is not a readable safetensors"):
        DMMDPipeline.from_pretrained(saved)


def test_byte_flipped_safetensors_fails_its_checksum(saved):
    data = bytearray((saved / WEIGHTS).read_bytes())
    data[-100] ^= 0xFF  # inside the tensor data: the header still parses
    (saved / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(ValueError, match="does not match its checksum"):
        DMMDPipeline.from_pretrained(saved)


def test_shapes_that_do_not_fit_the_config_name_the_keys(saved):
    config = json.loads((saved / "discriminator" / "config.json").read_text())
    config["block_out_channels"] = [8, 32]
    (saved / "discriminator" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"shape mismatches.*unet\.\S+: file \(\d+"):
        DMMDPipeline.from_pretrained(saved)


def test_plain_diffusers_never_runs_folder_code_without_trust_remote_code(saved, tmp_path):
    marker = tmp_path / "ran"
    (saved / "pipeline.py").write_text(f"open({str(marker)!r}, 'w')\nfrom latent_dmmd import DMMDPipeline\n")
    with pytest.raises(Exception):
        DiffusionPipeline.from_pretrained(saved, custom_pipeline=str(saved))
    # without custom_pipeline, the class `import latent_dmmd` registered with diffusers is used: still no folder code
    assert isinstance(DiffusionPipeline.from_pretrained(saved), DMMDPipeline)
    assert not marker.exists()


# ---------------------------------------------------------------------------- training faults


def test_nan_steps_are_skipped_counted_then_stop_the_run(tmp_path, monkeypatch):
    from latent_dmmd.training import loop

    real = loop.dmmd_step_loss
    calls = {"n": 0}

    def sometimes_nan(*args, **kwargs):
        out = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] in (2, 3):
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(loop, "dmmd_step_loss", sometimes_nan)
    run(tmp_path, steps=4)
    summary = json.loads((tmp_path / "out" / "training_summary.json").read_text())
    assert summary["bad_steps"] == 2

    # now every step is bad: the run stops after --max_bad_steps, the last good checkpoint is untouched
    good = load_file(tmp_path / "out" / "checkpoint-4" / "model.safetensors")
    before = sorted(n for n in os.listdir(tmp_path / "out") if n.startswith("checkpoint-"))
    monkeypatch.setattr(loop, "dmmd_step_loss", lambda *a, **k: None)
    with pytest.raises(RuntimeError, match="3 consecutive steps with NaN/inf"):
        run(tmp_path, "--resume_from_checkpoint", "latest", "--max_bad_steps", "3", steps=8)
    after = load_file(tmp_path / "out" / "checkpoint-4" / "model.safetensors")
    assert all(torch.equal(good[k], after[k]) for k in good)
    assert sorted(n for n in os.listdir(tmp_path / "out") if n.startswith("checkpoint-")) == before


KILLER = """
import os, shutil, signal, sys
import latent_dmmd.training as training
where, at_step = sys.argv[1], int(sys.argv[2])
saves = {"n": 0}

def die():
    os.kill(os.getpid(), signal.SIGKILL)

real_save_state = None
class Patched:
    pass

import accelerate
orig = accelerate.Accelerator.save_state
def save_state(self, output_dir=None, **kw):
    step = int(output_dir.rsplit("-", 1)[1])
    if where == "while_writing" and step == at_step:
        os.makedirs(output_dir, exist_ok=True)
        open(os.path.join(output_dir, "model.safetensors"), "wb").write(b"half a file")
        die()
    out = orig(self, output_dir, **kw)
    if where == "before_rename" and step == at_step:
        die()
    return out
accelerate.Accelerator.save_state = save_state

orig_rmtree = shutil.rmtree
def rmtree(path, *a, **k):
    if where == "while_pruning" and os.path.basename(str(path)).startswith("checkpoint-"):
        die()
    return orig_rmtree(path, *a, **k)
shutil.rmtree = rmtree
training.main(sys.argv[3:])
"""


@pytest.mark.slow
@pytest.mark.parametrize("where", ["while_writing", "before_rename", "while_pruning"])
def test_sigkill_during_checkpoint_save_then_resume_reaches_the_uninterrupted_weights(tmp_path, where):
    data = str(tmp_path / "imgs")
    write_image_folder(data, n=16, size=12)
    args = ["--train_data_dir", data, "--resolution", "8", "--train_batch_size", "8", "--group_size", "4",
            "--max_train_steps", "6", "--checkpointing_steps", "2", "--checkpoints_total_limit", "1",
            "--report_to", "none", "--num_inference_steps", "3", *TINY_MODEL]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    clean = subprocess.run([sys.executable, "-c", KILLER, "none", "0", *args, "--output_dir", str(tmp_path / "a")],
                           env=env, capture_output=True, text=True)  # fmt: skip
    assert clean.returncode == 0, clean.stderr[-3000:]

    out = str(tmp_path / "b")
    killed = subprocess.run([sys.executable, "-c", KILLER, where, "4", *args, "--output_dir", out],
                            env=env, capture_output=True, text=True)  # fmt: skip
    assert killed.returncode == -9, killed.stderr[-3000:]
    complete = sorted(n for n in os.listdir(out) if n.startswith("checkpoint-"))
    assert complete, "the previous complete checkpoint must survive the kill"
    resumed = subprocess.run([sys.executable, "-c", KILLER, "none", "0", *args, "--output_dir", out,
                              "--resume_from_checkpoint", "latest"], env=env, capture_output=True, text=True)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = load_file(tmp_path / "a" / "checkpoint-6" / "model.safetensors")
    b = load_file(os.path.join(out, "checkpoint-6", "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not [n for n in os.listdir(out) if n.startswith(".tmp")]


def _write_shard(args):
    cache, value = args
    tensors = {"index": torch.arange(2000), "mean": torch.full((2000, 4, 8, 8), float(value))}
    for _ in range(5):
        write_cache_shard(cache, tensors, 0, 1)


def test_two_processes_writing_the_same_cache_shard_leave_a_whole_file(tmp_path):
    cache = str(tmp_path / "cache")
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        pool.map(_write_shard, [(cache, 1), (cache, 2)])
    shard = load_file(os.path.join(cache, "latents-00000-of-00001.safetensors"))
    assert shard["mean"].shape == (2000, 4, 8, 8)
    assert shard["mean"].unique().numel() == 1  # one writer's file, whole, never a mix
    assert not [f for f in os.listdir(cache) if f.startswith(".tmp")]


def test_fp16_training_without_cuda_fails_immediately(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(ValueError, match="fp16 needs a CUDA GPU; on this machine use bf16 or no"):
        run(tmp_path, "--mixed_precision", "fp16")
    assert not (tmp_path / "out").exists()  # nothing was started


def test_statistics_made_with_another_autoencoder_are_refused(tmp_path):
    from diffusers import AutoencoderKL

    from latent_dmmd.reference import compute_reference_statistics

    torch.manual_seed(0)
    make = lambda s: AutoencoderKL(latent_channels=3, block_out_channels=(8,), norm_num_groups=4, scaling_factor=s)
    pipe = tiny_pipeline(vae=make(0.5))
    disc, sched = pipe.discriminator, pipe.scheduler
    data = torch.randn(8, 3, 8, 8)
    disc.set_reference_statistics(compute_reference_statistics(disc, [data], sched.timesteps, sched.alphas_cumprod), vae=make(0.5))
    pipe(num_images=1, output_type="latent")  # the matching VAE works
    pipe.vae = make(0.18215)
    with pytest.raises(ValueError, match="another autoencoder.*scaling_factor: statistics 0.5, pipeline VAE 0.18215"):
        pipe(num_images=1, output_type="latent")


# ---------------------------------------------------------------------------- round 2: links, checksums, non-finite values


def test_a_symlinked_component_with_flipped_weights_fails_its_checksum(saved, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    os.rename(saved / "discriminator", elsewhere)
    os.symlink(elsewhere, saved / "discriminator")
    data = bytearray((elsewhere / "diffusion_pytorch_model.safetensors").read_bytes())
    data[-100] ^= 0xFF
    (elsewhere / "diffusion_pytorch_model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="does not match its checksum"):
        DMMDPipeline.from_pretrained(saved)


@pytest.mark.parametrize("fault", ["dev_zero", "empty", "deleted", "folder", "unlisted"])
def test_a_checksums_file_that_cannot_vouch_is_an_error(saved, fault):
    path = saved / "checksums.json"
    os.remove(path)
    if fault == "dev_zero":
        os.symlink("/dev/zero", path)
    elif fault == "empty":
        path.write_text("")
    elif fault == "folder":
        path.mkdir()
    elif fault == "unlisted":
        path.write_text("{}")
    with pytest.raises(ValueError, match="checksums|checksum"):
        DMMDPipeline.from_pretrained(saved)


def test_push_refuses_symlinks_instead_of_uploading_their_targets(saved, tmp_path):
    from latent_dmmd.hub import push_pipeline_folder

    secret = tmp_path / "id_rsa"
    secret.write_text("PRIVATE KEY")
    os.remove(saved / "pipeline.py")
    os.symlink(secret, saved / "pipeline.py")

    class NoApi:
        def __getattr__(self, name):
            raise AssertionError("nothing may reach the Hub")

    with pytest.raises(ValueError, match="pipeline.py is a symbolic link"):
        push_pipeline_folder(str(saved), "me/x", api=NoApi())


def test_non_finite_statistics_or_weights_are_refused_before_sampling():
    pipe = tiny_pipeline()
    pipe.discriminator.reference_mean_data[1, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite reference statistics"):
        pipe(num_images=2)
    pipe = tiny_pipeline()
    with torch.no_grad():
        next(pipe.discriminator.parameters())[0] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        pipe(num_images=2)


def test_particles_that_blow_up_name_the_level():
    pipe = tiny_pipeline()
    pipe.discriminator.reference_mean_data.mul_(1e30)  # finite, but the flow overflows
    with pytest.raises(FloatingPointError, match=r"non-finite \(NaN or inf\) at level 0"):
        pipe(num_images=2, output_type="latent")


def test_generator_lists_are_checked_element_by_element(pipe):
    with pytest.raises(ValueError, match="torch.Generator"):
        pipe(num_images=2, generator=[torch.Generator().manual_seed(0), 3])
    with pytest.raises(ValueError, match="torch.Generator"):
        pipe(num_images=1, generator=7)


# ---------------------------------------------------------------------------- round 2: runs, checkpoints, exports


def test_replace_folder_keeps_the_previous_folder_when_writing_fails(tmp_path):
    from latent_dmmd.atomic import replace_folder

    final = tmp_path / "pipeline"
    with replace_folder(str(final)) as tmp:
        (tmp_path / os.path.basename(tmp) / "config.json").write_text('{"good": 1}')
    with pytest.raises(OSError, match="No space left"), replace_folder(str(final)) as tmp:
        (tmp_path / os.path.basename(tmp) / "config.json").write_text("")  # the 0-byte file of a full disk
        raise OSError(28, "No space left on device")
    assert json.loads((final / "config.json").read_text()) == {"good": 1}
    assert sorted(os.listdir(tmp_path)) == ["pipeline"]  # no temporary folder left behind


def test_disk_full_during_the_final_export_leaves_the_previous_pipeline_loadable(tmp_path, monkeypatch):
    folder = run(tmp_path, steps=2)
    before = load(folder)(num_images=2, generator=torch.Generator().manual_seed(0), output_type="latent").images

    def full_disk(self, save_directory, **kwargs):
        os.makedirs(os.path.join(save_directory, "discriminator"), exist_ok=True)
        open(os.path.join(save_directory, "discriminator", "config.json"), "w").close()
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(DMMDPipeline, "save_pretrained", full_disk)
    with pytest.raises(OSError, match="No space left"):
        run(tmp_path, "--resume_from_checkpoint", "latest", steps=4)
    monkeypatch.undo()
    again = load(folder)(num_images=2, generator=torch.Generator().manual_seed(0), output_type="latent").images
    assert torch.equal(before, again)


def test_a_fresh_run_into_a_finished_runs_folder_is_refused(tmp_path):
    run(tmp_path, steps=2)
    with pytest.raises(ValueError, match="holds another run.*--resume_from_checkpoint latest.*--overwrite_output_dir"):
        run(tmp_path, "--seed", "1", steps=2)
    run(tmp_path, "--seed", "1", "--overwrite_output_dir", steps=2)
    config = (tmp_path / "out" / "config.yaml").read_text()
    assert "seed: 1" in config


def test_a_second_concurrent_run_is_kept_out_by_the_lock(tmp_path):
    from latent_dmmd.atomic import RunLock

    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        out.mkdir()
        (out / ".lock").write_text(str(holder.pid))  # a live run holds the folder
        with pytest.raises(RuntimeError, match=f"another run \\(pid {holder.pid}\\)"):
            run(tmp_path, steps=2)
        assert not (out / "config.yaml").exists()  # refused before writing anything
    finally:
        holder.kill()
        holder.wait()
    # the holder died without releasing: its lock is stale and is taken over
    run(tmp_path, steps=2)
    assert not (out / ".lock").exists()
    with RunLock(str(out)):
        assert (out / ".lock").read_text() == str(os.getpid())


def test_resume_applies_a_changed_learning_rate_and_refuses_a_changed_model(tmp_path, caplog):
    run(tmp_path, steps=2)
    import logging

    with caplog.at_level(logging.WARNING):
        run(tmp_path, "--resume_from_checkpoint", "latest", "--learning_rate", "1e-7", "--adam_weight_decay", "0.5", steps=4)
    messages = caplog.text
    assert "--learning_rate changed from 0.0001 to 1e-07" in messages and "--adam_weight_decay changed" in messages
    optimizer = torch.load(tmp_path / "out" / "checkpoint-4" / "optimizer.bin", weights_only=True)
    group = optimizer["param_groups"][0]
    assert group["weight_decay"] == 0.5 and group["lr"] <= 1e-7 + 1e-12
    with pytest.raises(ValueError, match=r"the model changed \(--block_out_channels"):
        run(tmp_path, "--resume_from_checkpoint", "latest", "--block_out_channels", "8", "32", steps=6)


def test_a_zero_byte_file_in_the_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    import logging

    run(tmp_path, "--checkpoints_total_limit", "3", steps=4)
    newest = tmp_path / "out" / "checkpoint-4"
    victim = next(p for p in sorted(newest.iterdir()) if p.suffix in (".safetensors", ".bin"))
    victim.write_bytes(b"")  # power cut: the rename landed, the data did not
    from latent_dmmd.training import load_config, resolve_resume

    config = load_config(["--train_data_dir", "x", "--output_dir", str(tmp_path / "out"), "--resume_from_checkpoint", "latest"])
    with caplog.at_level(logging.WARNING):
        step, path = resolve_resume(config)
    assert step == 2 and path.endswith("checkpoint-2") and "checkpoint-4 is incomplete" in caplog.text


# ---------------------------------------------------------------------------- round 2: processes that must end


def test_a_hanging_process_group_teardown_still_exits(tmp_path):
    """gloo's teardown hung in 6 of 26 two-process runs: the worker exits anyway once its work is done."""
    script = tmp_path / "worker.py"
    script.write_text(
        "import os, time\n"
        "import torch.distributed as dist\n"
        "from latent_dmmd.launch import run_worker\n"
        "def main():\n"
        "    dist.init_process_group('gloo', rank=0, world_size=1, store=dist.HashStore())\n"
        "    open(os.environ['DONE'], 'w').write('pipeline written')\n"
        "dist.destroy_process_group = lambda *a, **k: time.sleep(3600)  # the hang\n"
        "run_worker(main, timeout=1.0)\n"
    )
    env = {**os.environ, "WORLD_SIZE": "2", "DONE": str(tmp_path / "done")}
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and (tmp_path / "done").read_text() == "pipeline written"
    assert "did not shut down within 1 s" in proc.stderr


@pytest.mark.parametrize("world_size", [1, 2])
def test_a_distributed_worker_never_frees_its_held_model(tmp_path, world_size):
    """Freeing a DDP model destroys gloo's process group with the GIL held, which deadlocked the end of about
    1 two-process run in 6 (the slow multiprocess test timed out in CI): a distributed worker holds its model
    until os._exit, so that release never runs; a single process frees it as usual."""
    script = tmp_path / "worker.py"
    script.write_text(
        "import os\n"
        "from latent_dmmd.launch import hold_until_exit, run_worker\n"
        "class Model:\n"
        "    def __del__(self):\n"
        "        open(os.environ['FREED'], 'w').write('released')\n"
        "def main():\n"
        "    hold_until_exit(Model())\n"
        "    open(os.environ['DONE'], 'w').write('pipeline written')\n"
        "run_worker(main)\n"
        "import gc; gc.collect()\n"
    )
    env = {**os.environ, "WORLD_SIZE": str(world_size), "DONE": str(tmp_path / "done"), "FREED": str(tmp_path / "freed")}
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "done").read_text() == "pipeline written"
    assert (tmp_path / "freed").exists() == (world_size == 1)


def test_killing_the_launcher_ends_its_workers(tmp_path):
    """A worker that called die_with_parent() gets SIGTERM when its launcher is killed with SIGKILL."""
    import signal
    import time

    pid_file = tmp_path / "worker.pid"
    (tmp_path / "worker.py").write_text(
        "import os, sys, time\n"
        "from latent_dmmd.launch import die_with_parent\n"
        "assert die_with_parent()\n"
        "open(sys.argv[1], 'w').write(str(os.getpid()))\n"
        "time.sleep(3600)\n"
    )
    (tmp_path / "launcher.py").write_text(
        "import subprocess, sys, time\n"
        "subprocess.Popen([sys.executable, sys.argv[1], sys.argv[2]])\n"
        "time.sleep(3600)\n"
    )
    launcher = subprocess.Popen([sys.executable, str(tmp_path / "launcher.py"), str(tmp_path / "worker.py"), str(pid_file)])
    try:
        for _ in range(600):
            if pid_file.exists() and pid_file.read_text():
                break
            time.sleep(0.1)
        worker = int(pid_file.read_text())
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait()
        for _ in range(100):
            try:
                os.kill(worker, 0)
            except ProcessLookupError:
                break
            with open(f"/proc/{worker}/stat") as f:
                if f.read().split()[2] == "Z":  # exited, waiting to be reaped by init
                    break
            time.sleep(0.1)
        else:
            os.kill(worker, signal.SIGKILL)
            pytest.fail("the worker outlived its launcher")
    finally:
        if launcher.poll() is None:
            launcher.kill()


@pytest.mark.parametrize("component, key, value", [("discriminator", "num_reference_levels", 10**9),
                                                   ("discriminator", "sample_size", 10**6),
                                                   ("scheduler", "num_train_timesteps", 10**10)])  # fmt: skip
def test_huge_sizes_in_a_folders_configs_are_refused_before_anything_is_allocated(saved, component, key, value):
    name = "config.json" if component == "discriminator" else "scheduler_config.json"
    path = saved / component / name
    config = json.loads(path.read_text())
    config[key] = value
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"{key} = {value} is not a size"):
        DMMDPipeline.from_pretrained(saved)
