"""What is left for dV to learn, by the closest intermolecular contact: Vref - V0 with V0 = HF
and with V0 = HF + D4, per band of the shortest A-B atom distance, over a built folder.

This picks the switch distances of ``--dv_switch contact`` (docs/DESIGN.md, decision 25): dV is
turned off where the residual it would have to learn is negligible.

    python benchmarks/residual_by_contact.py data/corpus/build [--out table.txt]

Reads every finished dimer (``<id>/energies.json``: V0 and Vref in its ``meta``; A.pdb, B.pdb)
and computes the D4 term from the PDB geometry with the builder's function (dftd4, the HF
parameters), so it runs on a folder built with or without ``--dispersion d4``.
"""
import argparse
import glob
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tools"))
import delta_coupling as dc  # noqa: E402
import build_dataset as builder  # noqa: E402

BANDS = (0.0, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 7.0, 8.0, 10.0, 1e9)  # Angstrom


def rows_of(folder, method="hf"):
    """(id, closest contact in Angstrom, V0_HF, E_disp, Vref) of every finished dimer."""
    params = builder.d4_parameters(method)
    out = []
    for path in sorted(glob.glob(os.path.join(folder, "*", builder.FINISHED_FILE))):
        with open(path) as fh:
            record = json.load(fh)
        meta = record["meta"]
        if meta.get("Vref") is None:
            continue
        d = os.path.dirname(path)
        symbols, pos, n_a = builder.pdb_dimer(os.path.join(d, "A.pdb"),
                                              os.path.join(d, "B.pdb"))
        contact = dc.closest_pair(pos[:n_a], pos[n_a:])[0]
        disp = builder.d4_parts(symbols, pos, n_a, record.get("charge_a", 0),
                                record.get("charge_b", 0), params)
        out.append((meta["id"], contact, builder.interaction_kcal(record),
                    builder.interaction_kcal(disp, builder.D4_KEYS), meta["Vref"]))
    return out


def table(rows):
    lines = ["closest contact (A) |    n | mean |Vref-V0| HF   HF+D4 | max |Vref-V0| HF   HF+D4 "
             "| mean Vref",
             "--- | --- | --- | --- | ---"]
    contact = np.array([r[1] for r in rows])
    v0, disp, vref = (np.array([r[k] for r in rows]) for k in (2, 3, 4))
    for lo, hi in zip(BANDS[:-1], BANDS[1:]):
        m = (contact >= lo) & (contact < hi)
        if not m.any():
            continue
        hf, d4 = np.abs(vref[m] - v0[m]), np.abs(vref[m] - v0[m] - disp[m])
        label = f"{lo:.1f}-{hi:.1f}" if hi < 1e8 else f">= {lo:.1f}"
        lines.append(f"{label:>19s} | {m.sum():4d} | {hf.mean():8.3f} {d4.mean():8.3f} | "
                     f"{hf.max():8.3f} {d4.max():8.3f} | {vref[m].mean():8.3f}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folder")
    p.add_argument("--out", default=None, help="also write the table to this file")
    args = p.parse_args(argv)
    rows = rows_of(args.folder)
    text = f"{len(rows)} dimers of {args.folder} (kcal/mol)\n" + table(rows)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
