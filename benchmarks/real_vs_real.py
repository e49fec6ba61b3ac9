"""The protocol's floor: real images scored as if generated, against the reference set.

    python benchmarks/real_vs_real.py --reference ../shared/data/celebahq256/images --reference_first_index 3500 \\
        --reference_count 500 --data ../shared/data/celebahq256/images --first_index 0 --count 500 --resolution 256 \\
        --real_features c256_ref.pt --name real_vs_real_celebahq256

What FID, KID, precision and recall read when the "samples" are real training images: the best a model can score
with this many images at this resolution. Writes benchmarks/results/<name>.json.
"""

from __future__ import annotations

import argparse
import json

from common import add_name_arg, add_real_features_arg, add_reference_args, reference_metric, write


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_reference_args(p, "reference images")
    add_reference_args(p, "images scored as samples", prefix="data")
    p.add_argument("--resolution", type=int, required=True, help="image side both sets are resized to")
    p.add_argument("--kid_subset_size", type=int, default=100, help="KID subset size")
    add_real_features_arg(p)
    add_name_arg(p, "real_vs_real")
    args = p.parse_args()

    from latent_dmmd.evaluation import reference_images

    metric = reference_metric(args, args.resolution, args.kid_subset_size)
    for batch in reference_images(args.data, args.resolution, args.first_index, args.count):
        metric.update(batch, real=False)
    row = metric.compute()
    print(json.dumps(row))
    print("wrote", write(args.name, {"benchmark": "real vs real (protocol floor)", "args": vars(args), "row": row}))


if __name__ == "__main__":
    main()
