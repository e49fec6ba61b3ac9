"""Encode a dataset to a latent cache once (split across processes when launched with several).

    accelerate launch scripts/cache_latents.py --config configs/celebahq_taef2_64.yaml

Takes the training flags; only the data and autoencoder ones matter. A cache that exists and
matches is reused; one made with another VAE, scaling, resolution, crop or dataset is refused.
"""

import sys

from latent_dmmd.launch import maybe_relaunch_on_cpus
from latent_dmmd.training import cache_main

if __name__ == "__main__":
    maybe_relaunch_on_cpus(__file__, sys.argv[1:])
    cache_main()
