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
    """sampler_remedies.py and sweep.py rows (a sweep scored by energy distance only has no FID columns)."""
    baseline = record["args"].get("baseline", "plain")
    base = next((r for r in record["rows"] if r["label"] == baseline and "fid" in r), None)
    has_fid = any("fid" in r for r in record["rows"])
    has_energy = any("energy_distance_train" in r for r in record["rows"])
    rows = []
    for r in record["rows"]:
        cells = [r["label"], r["model"], r["nfe"], r["forward_equivalents"]]
        if has_fid:
            versus = ["—", "—"]
            if base is not None and r is not base:
                versus = [f"{100 * (r['fid'] / base['fid'] - 1):+.1f} %",
                          "—" if not base["recall"] else f"{r['recall'] / base['recall']:.1f}×"]  # fmt: skip
            cells += [fmt(r["fid"]), f"{r['kid']:.4f} ± {r['kid_std']:.4f}", fmt(r["precision"], 3), fmt(r["recall"], 3),
                      *versus]  # fmt: skip
        if has_energy:
            cells.append(fmt(r.get("energy_distance_train"), 4))
        rows.append([*cells, f"{r['noise_memory_r2']:.2f}", fmt(r["seconds_per_image"], 3)])
    header = ["arm", "model", "NFE", "forward-equiv."]
    if has_fid:
        header += ["FID", "KID", "precision", "recall", f"FID vs {baseline}", f"recall vs {baseline}"]
    if has_energy:
        header.append("energy distance (train)")
    return table([*header, "R² on noise", "s / image"], rows)


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


def renderer(record):
    """The table renderer of a results record, or None (records with their own report, e.g. convergence.py --report)."""
    kind = record.get("benchmark", "")
    if kind.startswith("FID/KID vs NFE"):
        return quality
    if kind.startswith("step size"):
        return step_size
    if kind == "flow diagnostics":
        return flow
    if kind.startswith("DDPM baseline"):
        return epsilon_mse
    if kind.startswith("sampler selection"):
        return selection
    if kind.startswith(("sampler remedies", "sampler sweep")):
        return remedies
    if record.get("rows") and all("label" in r and "fid" in r for r in record["rows"]):
        return sweep  # the former options_sweep / diffflow_sweep records
    return None


def main():
    for name in sys.argv[1:]:
        with open(os.path.join(RESULTS, name + ".json")) as f:
            record = json.load(f)
        render = renderer(record)
        if render is None:
            print(f"### {name}\n\n(no table here: the script that wrote it renders it, e.g. its --report flag)\n")
            continue
        print(f"### {name}\n\n{render(record)}\n")


if __name__ == "__main__":
    main()
