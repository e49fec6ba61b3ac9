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
    key = lambda r: (r["nfe"], r["method"], r.get("model") or "", r.get("levels") or 0)
    for r in sorted(record["rows"], key=key):
        if r["method"] == "dmmd":
            model = f"{r['model']} " if r.get("model") not in (None, "dmmd") else ""
            name = f"DMMD {model}T={r['levels']}×N_s={r['flow_steps']}"
        else:
            name = r["method"].upper() + (f" ({r['timestep_spacing']})" if r.get("timestep_spacing") else "")
        r2 = r.get("noise_memory_r2")
        rows.append([r["nfe"], name, r["forward_equivalents"], fmt(r["fid"]), f"{r['kid']:.4f} ± {r['kid_std']:.4f}",
                     fmt(r.get("precision"), 3), fmt(r.get("recall"), 3), "—" if r2 is None else f"{r2:.2f}",
                     fmt(r["seconds_per_image"], 3)])  # fmt: skip
    return table(["NFE", "sampler", "forward-equiv.", "FID", "KID", "precision", "recall", "R² on noise", "s / image"],
                 rows)  # fmt: skip


def flow(record) -> str:
    rows = []
    for name, r in record["reports"].items():
        for k, t in enumerate(r["levels"]):
            grad = r["witness_gradient_norm"][k] if r["witness_gradient_norm"] else None
            rows.append([name, t, fmt(r.get("heldout_mmd2", [None] * (k + 1))[k], 4), fmt(grad, 3),
                         fmt(r["path_share"][k], 3), fmt(r.get("feature_gap_generated", [None] * (k + 1))[k], 3),
                         fmt(r.get("feature_gap_data", [None] * (k + 1))[k], 3), r["effective_noise"]["effective"][k]])  # fmt: skip
    out = table(["model", "level t_k", "held-out MMD²_t", "witness-grad norm", "path share", "gap: samples",
                 "gap: held-out", "effective level entering"], rows)  # fmt: skip
    memory = ", ".join(f"{n}: R² {r['noise_memory']['r2']:.2f} (slope {r['noise_memory']['coefficient']:.2f})"
                       for n, r in record["reports"].items())  # fmt: skip
    return out + f"\n\nFinal particles on their starting noise: {memory}."


def sweep(record) -> str:
    rows = [[r["label"], r["nfe"], r.get("forward_equivalents", "—"), fmt(r["fid"]), f"{r['kid']:.4f}",
             fmt(r.get("precision"), 3), fmt(r.get("recall"), 3), fmt(r["seconds_per_image"], 3)]
            for r in record["rows"]]  # fmt: skip
    return table(["setting", "NFE", "forward-equiv.", "FID", "KID", "precision", "recall", "s / image"], rows)


def remedies(record) -> str:
    base = next((r for r in record["rows"] if r["label"] == record["args"].get("baseline", "plain")), None)
    rows = []
    for r in record["rows"]:
        versus = ["—", "—"]
        if base is not None and r is not base:
            versus = [f"{100 * (r['fid'] / base['fid'] - 1):+.1f} %",
                      "—" if not base["recall"] else f"{r['recall'] / base['recall']:.1f}×"]  # fmt: skip
        rows.append([r["label"], r["model"], r["nfe"], r["forward_equivalents"], fmt(r["fid"]),
                     f"{r['kid']:.4f} ± {r['kid_std']:.4f}", fmt(r["precision"], 3), fmt(r["recall"], 3), *versus,
                     f"{r['noise_memory_r2']:.2f}", fmt(r["seconds_per_image"], 3)])  # fmt: skip
    return table(["arm", "model", "NFE", "forward-equiv.", "FID", "KID", "precision", "recall", "FID vs plain",
                  "recall vs plain", "R² on noise", "s / image"], rows)  # fmt: skip


def step_size(record) -> str:
    rows = [[r["step_size"], fmt(r["fid"]), f"{r['kid']:.4f}", fmt(r.get("recall"), 3)] for r in record["rows"]]
    return table(["eta", "FID (vs training images)", "KID", "recall"], rows)


def epsilon_mse(record) -> str:
    curves = record["curves"]
    names = list(curves)
    levels = [r["t"] for r in curves[names[0]]]
    rows = [[t, *(f"{curves[n][k]['eps_mse']:.3f}" for n in names)] for k, t in enumerate(levels)]
    return table(["level t", *(f"epsilon MSE ({n})" for n in names)], rows)


def selection(record) -> str:
    rows = []
    for name, m in record["models"].items():
        for r in m["rows"]:
            best = " (chosen)" if r == m["best"] else ""
            rows.append([name, r["schedule"], r["eta"], f"{r['energy_distance_train']:.3f}{best}"])
    return table(["model", "step-size schedule", "eta", "energy distance to training latents"], rows)


def main():
    for name in sys.argv[1:]:
        with open(os.path.join(RESULTS, name + ".json")) as f:
            record = json.load(f)
        kind = record["benchmark"]
        render = (quality if kind.startswith("FID/KID vs NFE") else step_size if kind.startswith("step size")
                  else flow if kind == "flow diagnostics" else epsilon_mse if kind.startswith("DDPM baseline")
                  else selection if kind.startswith("sampler selection")
                  else remedies if kind.startswith("sampler remedies") else sweep)  # fmt: skip
        print(f"### {name}\n\n{render(record)}\n")


if __name__ == "__main__":
    main()
