"""Train a one-step generator from a trained DMMD pipeline (method §10).

    accelerate launch scripts/train_generator.py --pipeline models/fashion-mnist-dmmd --mode distill \
        --num_endpoints 8192 --max_train_steps 4000 --output_dir outputs/fashion_onestep
    accelerate launch scripts/train_generator.py --pipeline models/fashion-mnist-dmmd --mode field \
        --field_kernel local --train_data /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

Every flag and its default: ``python scripts/train_generator.py --help``.
"""

import sys

from latent_dmmd.generator_training import main
from latent_dmmd.launch import maybe_relaunch_on_cpus, run_worker

if __name__ == "__main__":
    maybe_relaunch_on_cpus(__file__, sys.argv[1:])
    run_worker(main)
