"""Markdown tables of benchmark results, for docs/benchmarks.md (numbers copied by code, not by hand).

    python benchmarks/report.py quality_celebahq64 diffflow_celebahq64 options_celebahq64 step_size_fashion32
"""

from __future__ import annotations

import json
import os
import sys

from common import RESULTS


def fmt(x, digits=1):
    return "—" if x is None else f"{x:.{digits}f}"


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def quality(record) -> str:
    rows = []
    for r in sorted(record["rows"], key=lambda r: (r["nfe"], r["method"], r.get("levels") or 0)):
        name = f"DMMD T={r['levels']}×N_s={r['flow_steps']}" if r["method"] == "dmmd" else r["method"].upper()
        rows.append([r["nfe"], name, r["forward_equivalents"], fmt(r["fid"]), f"{r['kid']:.4f} ± {r['kid_std']:.4f}",
                     fmt(r.get("precision"), 3), fmt(r.get("recall"), 3), fmt(r["seconds_per_image"], 3)])  # fmt: skip
    return table(["NFE", "sampler", "forward-equiv.", "FID", "KID", "precision", "recall", "s / image"], rows)


def sweep(record) -> str:
    rows = [[r["label"], r["nfe"], r.get("forward_equivalents", "—"), fmt(r["fid"]), f"{r['kid']:.4f}",
             fmt(r.get("precision"), 3), fmt(r.get("recall"), 3), fmt(r["seconds_per_image"], 3)]
            for r in record["rows"]]  # fmt: skip
    return table(["setting", "NFE", "forward-equiv.", "FID", "KID", "precision", "recall", "s / image"], rows)


def step_size(record) -> str:
    rows = [[r["step_size"], fmt(r["fid"]), f"{r['kid']:.4f}", fmt(r.get("recall"), 3)] for r in record["rows"]]
    return table(["eta", "FID (vs training images)", "KID", "recall"], rows)


def main():
    for name in sys.argv[1:]:
        with open(os.path.join(RESULTS, name + ".json")) as f:
            record = json.load(f)
        kind = record["benchmark"]
        render = quality if kind.startswith("FID/KID vs NFE") else step_size if kind.startswith("step size") else sweep
        print(f"### {name}\n\n{render(record)}\n")


if __name__ == "__main__":
    main()
