"""Dissociation scans: dV and V0 + dV of trained models as the monomers of a few corpus dimers
are pulled apart from 0.9x to 4x their equilibrium separation (docs/DESIGN.md, decision 25).

    python benchmarks/scan.py build OUT                       # the scan dimers, HF/def2-SVP + D4
    python benchmarks/scan.py predict OUT LABEL=VARIANT:MODEL ...   # VARIANT hf or hfd4
    python benchmarks/scan.py plot OUT                        # OUT/scan.png, OUT/scan.csv

``build`` moves monomer B of each dimer along the line of the two centroids (its distance
times each multiplier) and builds the scan with ``tools/build_dataset.py --dispersion d4``
(no Vref: a folder to predict). ``predict`` writes, for each model, a view of the folder with
V0 = V0_HF (``hf``) or V0_HF + E_disp (``hfd4``) and the matching level of theory, runs
``delta_coupling.py --predict`` with MODEL (a checkpoint or an ensemble.json) and keeps its dV.
``plot`` draws dV and V0 + dV against the multiplier, one panel per dimer, with HF + D4 alone
and each dimer's reference at equilibrium (its corpus Vref) for scale.
"""
import argparse
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))
import delta_coupling as dc  # noqa: E402
import build_dataset as builder  # noqa: E402

CORPUS = os.path.join(ROOT, "data", "corpus")
# a hydrogen bond, a dispersion-bound pair of small molecules, an alkane on a pi system
SCAN_IDS = ("S22by5-2-1.0", "S22by5-8-1.0", "D1200-1.06.09_100")
NAMES = {"S22by5-2-1.0": "water dimer", "S22by5-8-1.0": "methane dimer",
         "D1200-1.06.09_100": "2,3-dimethylbutane...ethene"}
MULTIPLIERS = (0.9, 1.0, 1.1, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0)


def build(out):
    rows = {r["id"]: r for r in csv.DictReader(open(os.path.join(CORPUS, "dimers.csv")))}
    inputs = os.path.join(out, "inputs")
    os.makedirs(inputs, exist_ok=True)
    with open(os.path.join(out, "scan.csv"), "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "xyz", "n_atoms_a", "group"])
        for rid in SCAN_IDS:
            row = rows[rid]
            symbols, pos, _ = builder._read_structure(os.path.join(CORPUS, row["xyz"]), "xyz")
            n_a = int(row["n_atoms_a"])
            shift = pos[n_a:].mean(0) - pos[:n_a].mean(0)  # (3,) A's centroid -> B's
            for m in MULTIPLIERS:
                moved = pos.copy()
                moved[n_a:] += (m - 1.0) * shift
                name = f"{rid}_x{m:.2f}"
                with open(os.path.join(inputs, name + ".xyz"), "w") as x:
                    x.write(f"{len(symbols)}\nn_atoms_a={n_a}\n" + "".join(
                        f"{s} {a:.6f} {b:.6f} {c:.6f}\n" for s, (a, b, c) in zip(symbols, moved)))
                w.writerow([name, f"inputs/{name}.xyz", n_a, rid])
    cmd = [sys.executable, os.path.join(ROOT, "tools", "build_dataset.py"),
           os.path.join(out, "scan.csv"), "--out", os.path.join(out, "build"), "--threads", "1",
           "--dispersion", "d4", "--quiet"]
    return subprocess.call(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"})


def view(out, variant):
    """OUT/view_<variant>: the build's rows with V0 of the variant, absolute file paths."""
    folder = os.path.join(out, f"view_{variant}")
    os.makedirs(folder, exist_ok=True)
    build_dir = os.path.join(out, "build")
    meta = pd.read_excel(os.path.join(build_dir, "meta.xlsx"))
    for col in ("pdb_a", "pdb_b", "npz"):
        meta[col] = [os.path.abspath(os.path.join(build_dir, p)) for p in meta[col]]
    if variant == "hf":
        meta["V0"] = meta["V0_HF"]
    meta.drop(columns=["V0_HF", "E_disp"]).to_excel(os.path.join(folder, "meta.xlsx"),
                                                     index=False)
    level = dc.read_level_of_theory(build_dir)
    level = {k: v for k, v in level.items() if not k.startswith("dispersion_")}
    level["dispersion"] = "d4" if variant == "hfd4" else "none"
    dc.atomic_write_json(level, os.path.join(folder, dc.LEVEL_OF_THEORY_FILE))
    return folder


def predict(out, specs):
    results = {}
    path = os.path.join(out, "predictions.json")
    if os.path.exists(path):
        with open(path) as fh:
            results = json.load(fh)
    for spec in specs:
        label, rest = spec.split("=", 1)
        variant, model = rest.split(":", 1)
        folder = view(out, variant)
        cmd = [sys.executable, os.path.join(ROOT, "delta_coupling.py"), "--predict",
               "--checkpoint", model, "--root_dir", folder, "--device", "cpu", "--quiet"]
        rc = subprocess.call(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if rc:
            sys.exit(f"{label}: --predict exited {rc}")
        table = pd.read_csv(os.path.join(folder, dc.PREDICTIONS_FILE))
        results[label] = {"variant": variant, "model": model,
                          "dV": dict(zip(table["id"], table["dV"])),
                          "V0": dict(zip(table["id"], table["V0"]))}
    with open(path, "w") as fh:
        json.dump(results, fh, indent=1)


def plot(out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with open(os.path.join(out, "predictions.json")) as fh:
        results = json.load(fh)
    meta = pd.read_excel(os.path.join(out, "build", "meta.xlsx")).set_index("id")
    vref = {r["id"]: float(r["Vref"]) for r in csv.DictReader(
        open(os.path.join(CORPUS, "dimers.csv"))) if r["id"] in SCAN_IDS}
    rows = []
    fig, axes = plt.subplots(2, len(SCAN_IDS), figsize=(5 * len(SCAN_IDS), 8))
    for j, rid in enumerate(SCAN_IDS):
        ids = [f"{rid}_x{m:.2f}" for m in MULTIPLIERS]
        x = np.array(MULTIPLIERS)
        hf, d4 = meta.loc[ids, "V0_HF"].to_numpy(), meta.loc[ids, "V0"].to_numpy()
        axes[1, j].plot(x, hf, "k:", label="HF")
        axes[1, j].plot(x, d4, "k--", label="HF + D4")
        axes[1, j].plot([1.0], [vref[rid]], "k*", ms=10, label="reference (x1.0)")
        for label, r in results.items():
            dv = np.array([r["dV"][i] for i in ids])
            v0 = np.array([r["V0"][i] for i in ids])
            axes[0, j].plot(x, dv, "o-", ms=3, label=label)
            axes[1, j].plot(x, v0 + dv, "o-", ms=3, label=f"{label}: V0 + dV")
            for i, m, a, b in zip(ids, x, dv, v0):
                rows.append({"dimer": rid, "multiplier": m, "model": label, "dV": a,
                             "V0": b, "V0+dV": a + b})
        axes[0, j].axhline(0.0, color="grey", lw=0.5)
        axes[0, j].set_title(f"{NAMES[rid]}: dV")
        axes[1, j].set_title(f"{NAMES[rid]}: V0 + dV")
        axes[1, j].set_xlabel("separation / equilibrium")
        axes[0, j].set_ylabel("kcal/mol")
        axes[1, j].set_ylabel("kcal/mol")
        axes[0, j].legend(fontsize=7)
        axes[1, j].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "scan.png"), dpi=110)
    pd.DataFrame(rows).to_csv(os.path.join(out, "scan.csv"), index=False)
    print(f"wrote {os.path.join(out, 'scan.png')} and scan.csv")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("build").add_argument("out")
    a = sub.add_parser("predict")
    a.add_argument("out")
    a.add_argument("specs", nargs="+", help="LABEL=hf|hfd4:CHECKPOINT_OR_ENSEMBLE")
    sub.add_parser("plot").add_argument("out")
    args = p.parse_args(argv)
    if args.cmd == "build":
        sys.exit(build(args.out))
    if args.cmd == "predict":
        predict(args.out, args.specs)
    else:
        plot(args.out)


if __name__ == "__main__":
    main()
