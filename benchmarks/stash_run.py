"""Keep what a long run needs to resume on a fresh machine inside the repository, and put it back.

    python benchmarks/stash_run.py save outputs/curve_fashion32_dmmd benchmarks/runs/curve/fashion32_dmmd
    python benchmarks/stash_run.py restore benchmarks/runs/curve/fashion32_dmmd outputs/curve_fashion32_dmmd
    accelerate launch scripts/train_latent.py --config outputs/curve_fashion32_dmmd/config.yaml \\
        --output_dir outputs/curve_fashion32_dmmd --resume_from_checkpoint latest

``save`` copies the run's newest complete checkpoint (weights, EMA, optimiser, LR schedule, random states, its
recorded config and clock), its ``config.yaml`` and its logs (``progress.jsonl``, ``level_mmd.jsonl``), replacing
the previous stash (one checkpoint kept, so the repository grows by one checkpoint per session at most).
``--also STEP ...`` keeps checkpoints a learning curve has not scored yet, without their optimiser state (only
the newest resumes; the others are exported, which reads weights and EMA). ``--optimizer bf16`` keeps the newest
checkpoint's Adam moments in bfloat16 (``optimizer.bf16.safetensors``, half of ``optimizer.bin``; a relative
error of at most 2^-8 per moment, which a resume continues from). ``restore`` copies them back into a run folder
that holds no newer checkpoint, writing ``optimizer.bin`` again: the packed moments in float32, or an empty Adam
state for a checkpoint stashed without one.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil

FILES = ("config.yaml", "progress.jsonl", "level_mmd.jsonl", "training_summary.json")
OPTIMIZER = "optimizer.bin"  # accelerate's name for the optimiser state in a checkpoint
PACKED = "optimizer.bf16.safetensors"
MOMENTS = ("exp_avg", "exp_avg_sq")  # what bfloat16 halves; every other tensor of the state stays float32


def pack_optimizer(checkpoint: str) -> str:
    """Replace ``optimizer.bin`` of a (copied) checkpoint by its tensors in safetensors, Adam's moments in
    bfloat16, its param groups in the file's metadata."""
    import torch
    from safetensors.torch import save_file

    state = torch.load(os.path.join(checkpoint, OPTIMIZER), map_location="cpu", weights_only=True)
    tensors = {f"{index}.{name}": (value.to(torch.bfloat16) if name in MOMENTS else value).contiguous()
               for index, entry in state["state"].items() for name, value in entry.items()}  # fmt: skip
    path = os.path.join(checkpoint, PACKED)
    save_file(tensors, path, metadata={"param_groups": json.dumps(state["param_groups"])})
    os.remove(os.path.join(checkpoint, OPTIMIZER))
    return path


def _param_groups(checkpoint: str) -> list[dict]:
    import torch
    from safetensors import safe_open

    if os.path.isfile(os.path.join(checkpoint, PACKED)):
        with safe_open(os.path.join(checkpoint, PACKED), "pt") as f:
            groups = json.loads(f.metadata()["param_groups"])
        return [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in groups]  # JSON made it a list
    return torch.load(os.path.join(checkpoint, OPTIMIZER), map_location="cpu", weights_only=True)["param_groups"]


def unpack_optimizer(checkpoint: str, newest: str) -> None:
    """Write ``optimizer.bin`` into a restored checkpoint: its packed moments in float32, or (a checkpoint stashed
    without them) an empty Adam state with the settings of the ``newest`` checkpoint."""
    import torch
    from safetensors.torch import load_file

    packed = os.path.join(checkpoint, PACKED)
    state = {}
    if os.path.isfile(packed):
        for key, value in load_file(packed).items():
            index, name = key.split(".", 1)
            state.setdefault(int(index), {})[name] = value.float() if name in MOMENTS else value
    torch.save({"state": state, "param_groups": _param_groups(checkpoint if state else newest)},
               os.path.join(checkpoint, OPTIMIZER))  # fmt: skip
    if os.path.isfile(packed):
        os.remove(packed)


def save(run: str, stash: str, also: tuple[int, ...] = (), optimizer: str = "full") -> str:
    from latent_dmmd.atomic import incomplete_files
    from latent_dmmd.training import list_checkpoints

    found = [(s, p) for s, p in list_checkpoints(run) if not incomplete_files(p)]
    if not found:
        raise SystemExit(f"{run} has no complete checkpoint to stash")
    step, path = found[-1]
    tmp = stash.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    shutil.copytree(path, os.path.join(tmp, os.path.basename(path)))
    if optimizer == "bf16":
        pack_optimizer(os.path.join(tmp, os.path.basename(path)))
    for s, p in found:  # checkpoints a learning curve has not scored yet: exported, never resumed
        if s in also and s != step:
            shutil.copytree(p, os.path.join(tmp, os.path.basename(p)), ignore=shutil.ignore_patterns(OPTIMIZER))
    for name in FILES:
        if os.path.isfile(os.path.join(run, name)):
            shutil.copy2(os.path.join(run, name), tmp)
    shutil.rmtree(stash, ignore_errors=True)
    os.replace(tmp, stash)
    print(f"stashed {path} (step {step}) and the run's logs in {stash}")
    return stash


def restore(stash: str, run: str) -> str:
    from latent_dmmd.training import list_checkpoints

    stashed = list_checkpoints(stash)
    if not stashed:
        raise SystemExit(f"{stash} holds no checkpoint")
    step = stashed[-1][0]
    newer = [s for s, _ in list_checkpoints(run) if s >= step]
    if newer:
        raise SystemExit(f"{run} already has checkpoint-{max(newer)} (>= the stash's {step}): nothing to restore")
    os.makedirs(run, exist_ok=True)
    newest = stashed[-1][1]
    for _, path in stashed:
        target = os.path.join(run, os.path.basename(path))
        if not os.path.isdir(target):
            shutil.copytree(path, target)
            if not os.path.isfile(os.path.join(target, OPTIMIZER)):
                unpack_optimizer(target, newest)
    for name in FILES:
        if os.path.isfile(os.path.join(stash, name)) and not os.path.isfile(os.path.join(run, name)):
            shutil.copy2(os.path.join(stash, name), run)
    print(f"restored checkpoint-{step} into {run}: resume with --resume_from_checkpoint latest")
    return run


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("action", choices=("save", "restore"))
    p.add_argument("source", help="save: the run folder; restore: the stash")
    p.add_argument("target", help="save: the stash folder (replaced); restore: the run folder")
    p.add_argument("--also", type=int, nargs="*", default=[],
                   help="save: also these checkpoints (steps a curve still needs), without optimiser state")
    p.add_argument("--optimizer", choices=("full", "bf16"), default="full",
                   help="save: the newest checkpoint's optimiser state as it is, or its Adam moments in bfloat16 (half the size)")
    args = p.parse_args(argv)
    if args.action == "save":
        return save(args.source, args.target, tuple(args.also), args.optimizer)
    return restore(args.source, args.target)


if __name__ == "__main__":
    main()
