"""Regenerate ``examples/s22x5/``: the S22x5 dimers with a Hartree-Fock baseline.

Usage::

    pip install -r examples/requirements.txt      # ase, pyscf (build-time only)
    python examples/build_s22x5.py [--out examples/s22x5] [--only Water_dimer] [--multipliers 1.0]

A short driver over ``tools/build_dataset.py``: it writes the input CSV (one XYZ file per dimer,
A's atoms first, ``n_atoms_a`` from ASE's S22 data; ``Vref`` = CCSD(T)/CBS from ASE in kcal/mol;
``PR`` = the separation multiplier 0.9 ... 2.0; ``group`` = the dimer's name), builds the
folder with the builder's defaults (RHF/def2-SVP, density fitting with def2-universal-jkfit, no
counterpoise) and rewrites the folder's README with the V0-vs-Vref table. Resumable like the
builder: a row whose ``<id>/energies.json`` exists is not recomputed.
"""
import argparse
import json
import os
import sys
import tempfile

import numpy as np
import pandas as pd
from ase.data import s22 as ase_s22

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tools"))
import build_dataset  # noqa: E402

EV_TO_KCAL_MOL = 23.060548  # kcal/mol per eV
MULTIPLIERS = ("0.9", "1.0", "1.2", "1.5", "2.0")


def write_input(folder, names, multipliers):
    """Write ``folder/s22x5.csv`` and one XYZ per row; returns the CSV's path."""
    rows = []
    for name in names:
        n_a, _n_b = ase_s22.data[name]["dimer atoms"]
        symbols = ase_s22.create_s22_system(name, multipliers[0]).get_chemical_symbols()
        for mult in multipliers:
            pos = np.array(ase_s22.data[name][f"positions {mult}"], float)  # (N, 3) Angstrom
            row_id = f"{name}_{mult}"
            lines = [str(len(symbols)), f"n_atoms_a={n_a}"]
            lines += [f"{s} {x!r} {y!r} {z!r}" for s, (x, y, z) in zip(symbols, pos.tolist())]
            with open(os.path.join(folder, f"{row_id}.xyz"), "w") as fh:
                fh.write("\n".join(lines) + "\n")
            vref = ase_s22.get_interaction_energy_s22x5(name, mult) * EV_TO_KCAL_MOL
            rows.append({"id": row_id, "xyz": f"{row_id}.xyz", "Vref": repr(vref),
                         "PR": mult, "group": name})
    path = os.path.join(folder, "s22x5.csv")
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


README_TEMPLATE = """# S22x5 example data set (bundled with DeltaCoupling)

The 22 non-covalent dimers of the S22 set (hydrogen-bonded, dispersion-bound and mixed), each at
0.9, 1.0, 1.2, 1.5 and 2.0 times its equilibrium intermolecular separation: {n_rows} rows, in the
format of `../../docs/DATA_FORMAT.md`. `python delta_coupling.py` trains on this folder by default.

## Sources
- Geometries and the reference **Vref**: CCSD(T)/CBS (counterpoise-corrected) interaction
  energies as distributed with ASE (`ase.data.s22`, ASE {ase_version}), converted from eV with
  1 eV = 23.060548 kcal/mol; S22x5 values with ASE's default offset correction, so the 1.0
  rows equal the S22 reference.
  - S22: P. Jurecka, J. Sponer, J. Cerny, P. Hobza, *Phys. Chem. Chem. Phys.* 8, 1985 (2006).
  - S22x5: L. Grafova, M. Pitonak, J. Rezac, P. Hobza, *J. Chem. Theory Comput.* 6, 2365 (2010).
  - ASE's S22 energies: T. Takatani et al., *J. Chem. Phys.* 132, 144104 (2010).
- Baseline **V0**: supermolecular {method} interaction energy
  E_AB - E_A - E_B with basis {basis} (monomers in their own basis: no counterpoise
  correction), computed with PySCF {pyscf_version}. Energies in kcal/mol
  (1 Hartree = 627.5094740631 kcal/mol).
- NPZ properties from the same dimer RHF calculation: `mulliken_spd` (Mulliken AO populations
  summed per atom over s, p and d functions), `dipole` (Debye) and `quadrupole` (traceless
  Buckingham quadrupole, 1/2 sum q (3 r r - r^2 I), Debye*Angstrom, about the centroid of all
  atoms).

## Frame and columns
Each dimer is rotated so that the vector from A's centroid to B's centroid (unweighted means of
the atom positions) is +z; `A.pdb`/`B.pdb` are written in that orientation (A's centroid at the
origin) and the dipole/quadrupole are computed in it. `R_nm` is the centroid separation,
`theta_deg` the acute angle between the two monomers' first principal axes (largest-variance
direction of the atom positions), `PR` the separation multiplier (0.9 ... 2.0), `group` the dimer's
name (its five separations stay in one split), `id` = name and multiplier. `<id>/energies.json`
holds the raw Hartree energies.

## Build
`python examples/build_s22x5.py` (needs `pip install -r examples/requirements.txt`) regenerates
this folder; it is resumable (rows with an `energies.json` are skipped) and rewrites this README.
The PySCF calculations took {minutes:.0f} minutes of wall time in total on 2 CPU cores.

## How good is the baseline? (V0 against Vref, kcal/mol)
This is what the model has to beat: the test-set MAE of V0 + dV printed at the end of training
should be compared with the V0 figures printed beside it.

| rows | n | MAE | RMSE | max abs error | mean signed error (V0 - Vref) |
| --- | --- | --- | --- | --- | --- |
{table}
"""


def baseline_table(frame):
    """Markdown rows of V0-vs-Vref error statistics, overall and per multiplier."""
    lines = []
    parts = [("all", frame)] + [(f"x {m:.1f}", frame[np.isclose(frame["PR"], m)])
                                for m in sorted(frame["PR"].unique())]
    for name, part in parts:
        err = part["V0"] - part["Vref"]
        lines.append(f"| {name} | {len(part)} | {err.abs().mean():.3f} | "
                     f"{np.sqrt((err ** 2).mean()):.3f} | {err.abs().max():.3f} | "
                     f"{err.mean():+.3f} |")
    return "\n".join(lines)


def write_readme(out, seconds):
    import ase
    level = build_dataset.read_level_of_theory(out)
    frame = pd.read_excel(os.path.join(out, "meta.xlsx"))
    text = README_TEMPLATE.format(
        n_rows=len(frame), ase_version=ase.__version__, pyscf_version=level["program_version"],
        method=f"RHF (density fitting, {level['auxbasis']})", basis=level["basis"],
        minutes=seconds / 60.0, table=baseline_table(frame))
    build_dataset.dc.atomic_write_text(text, os.path.join(out, "README.md"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join(HERE, "s22x5"),
                        help="output folder (default: examples/s22x5)")
    parser.add_argument("--only", nargs="*", default=None, choices=list(ase_s22.s22),
                        metavar="NAME", help="restrict to these S22 names (default: all 22)")
    parser.add_argument("--multipliers", nargs="*", default=list(MULTIPLIERS),
                        choices=MULTIPLIERS, help="separations (default: all five)")
    parser.add_argument("--processes", type=int, default=1, help="dimers computed at once")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        csv_path = write_input(folder, args.only or list(ase_s22.s22), args.multipliers)
        summary = build_dataset.build_dataset(csv_path, args.out, processes=args.processes)
    print(build_dataset.report(summary, args.out))
    seconds = 0.0
    for rid in summary.done:
        with open(os.path.join(args.out, rid, build_dataset.FINISHED_FILE)) as fh:
            seconds += json.load(fh)["seconds"]
    write_readme(args.out, seconds)
    return summary.exit_code


if __name__ == "__main__":
    sys.exit(main())
