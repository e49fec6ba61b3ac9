"""Train DMMD in latent (``--pretrained_vae``) or pixel space.

    accelerate launch scripts/train_latent.py --config configs/debug_cpu.yaml [--flag value ...]
    accelerate launch --num_processes 2 --cpu scripts/train_latent.py --config configs/debug_cpu.yaml

Every flag and its default: ``python scripts/train_latent.py --help``.
"""

import sys

from latent_dmmd.launch import maybe_relaunch_on_cpus, run_worker
from latent_dmmd.training import main

if __name__ == "__main__":
    maybe_relaunch_on_cpus(__file__, sys.argv[1:])
    run_worker(main)
