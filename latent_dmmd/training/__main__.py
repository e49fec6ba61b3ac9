"""``python -m latent_dmmd.training``: what ``latent-dmmd train --num_processes N`` launches in each process."""

from ..launch import run_worker
from .loop import main

run_worker(main)
