"""Keep what a long run needs to resume on a fresh machine inside the repository, and put it back.

    python benchmarks/stash_run.py save outputs/curve_fashion32_dmmd benchmarks/runs/curve/fashion32_dmmd
    python benchmarks/stash_run.py restore benchmarks/runs/curve/fashion32_dmmd outputs/curve_fashion32_dmmd
    accelerate launch scripts/train_latent.py --config outputs/curve_fashion32_dmmd/config.yaml \\
        --output_dir outputs/curve_fashion32_dmmd --resume_from_checkpoint latest

``save`` copies the run's newest complete checkpoint (weights, EMA, optimiser, LR schedule, random states, its
recorded config and clock), its ``config.yaml`` and its logs (``progress.jsonl``, ``level_mmd.jsonl``), replacing
the previous stash (one checkpoint kept, so the repository grows by one checkpoint per session at most).
``--also STEP ...`` keeps checkpoints a learning curve has not scored yet. ``restore`` copies them back into a run
folder that holds no newer checkpoint (the newest resumes; the others are there for ``benchmarks/curve.py``).
"""

from __future__ import annotations

import argparse
import os
import shutil

FILES = ("config.yaml", "progress.jsonl", "level_mmd.jsonl", "training_summary.json")


def save(run: str, stash: str, also: tuple[int, ...] = ()) -> str:
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
    for s, p in found:  # checkpoints a learning curve has not scored yet
        if s in also and s != step:
            shutil.copytree(p, os.path.join(tmp, os.path.basename(p)))
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
    for _, path in stashed:
        if not os.path.isdir(os.path.join(run, os.path.basename(path))):
            shutil.copytree(path, os.path.join(run, os.path.basename(path)))
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
    p.add_argument("--also", type=int, nargs="*", default=[], help="save: also these checkpoints (steps a curve still needs)")
    args = p.parse_args(argv)
    return save(args.source, args.target, tuple(args.also)) if args.action == "save" else restore(args.source, args.target)


if __name__ == "__main__":
    main()
