"""Recompute a few rows of the bundled examples/s22x5 with examples/build_s22x5.py (a driver over
tools/build_dataset.py) and compare them with the bundled files.

    python benchmarks/reproduce_s22x5.py [--only Water_dimer Ammonia_dimer] [--multipliers 1.0 2.0]

Prints, per row, |V0 - V0_bundled| (kcal/mol), the largest |difference| of each NPZ array, the
differences of R_nm, theta_deg, PR and Vref, and whether A.pdb/B.pdb are byte-identical.
Exit status 1 when V0 differs by more than 1e-6 kcal/mol or an NPZ array by more than 1e-6.
"""
import argparse
import os
import sys
import tempfile

import numpy as np
import pandas as pd

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "examples"))
import build_s22x5  # noqa: E402

BUNDLED = os.path.join(os.path.dirname(HERE), "examples", "s22x5")
TOLERANCE = 1e-6  # kcal/mol for V0, the arrays' units for the NPZ


def compare(out, bundled=BUNDLED):
    """{id: {quantity: largest |difference|}} of the rows in ``out`` against ``bundled``."""
    new = pd.read_excel(os.path.join(out, "meta.xlsx")).set_index("id")
    old = pd.read_excel(os.path.join(bundled, "meta.xlsx")).set_index("id")
    result = {}
    for rid, row in new.iterrows():
        diffs = {col: abs(row[col] - old.loc[rid, col])
                 for col in ("V0", "R_nm", "theta_deg", "PR", "Vref")}
        with np.load(os.path.join(out, row["npz"])) as a, \
                np.load(os.path.join(bundled, old.loc[rid, "npz"])) as b:
            for key in ("mulliken_spd", "dipole", "quadrupole"):
                diffs[key] = float(np.abs(a[key] - b[key]).max())
        for col in ("pdb_a", "pdb_b"):
            with open(os.path.join(out, row[col])) as fa, \
                    open(os.path.join(bundled, old.loc[rid, col])) as fb:
                diffs[col + " identical"] = fa.read() == fb.read()
        result[rid] = diffs
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="*", default=["Water_dimer", "Ammonia_dimer"])
    parser.add_argument("--multipliers", nargs="*", default=["1.0", "2.0"])
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as out:
        build_s22x5.main(["--out", out, "--only", *args.only,
                          "--multipliers", *args.multipliers])
        result = compare(out)
    worst = 0.0
    for rid, diffs in result.items():
        print(rid, " ".join(f"{k}={v:.2e}" if not isinstance(v, bool) else f"{k}={v}"
                            for k, v in diffs.items()))
        worst = max(worst, diffs["V0"], diffs["mulliken_spd"], diffs["dipole"],
                    diffs["quadrupole"])
    print(f"largest |difference| of V0 and the NPZ arrays: {worst:.2e} (tolerance {TOLERANCE})")
    return 0 if worst <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
