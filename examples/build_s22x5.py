"""Regenerate ``examples/s22x5/``: the S22x5 dimers with a Hartree-Fock baseline.

Usage::

    pip install -r examples/requirements.txt      # ase, pyscf (build-time only)
    python examples/build_s22x5.py [--out examples/s22x5] [--basis def2-svp]

For each of the 22 S22 dimers at 0.9, 1.0, 1.2, 1.5 and 2.0 x the equilibrium separation
(110 rows) it writes, in the format of ``docs/DATA_FORMAT.md``:

* ``<id>/A.pdb``, ``<id>/B.pdb``: the monomers in the *dimer frame* (A's centroid at the origin,
  B's centroid on +z);
* ``<id>/dimer.npz``: ``mulliken_spd`` (per-atom Mulliken populations summed by l = 0, 1, 2),
  ``dipole`` (Debye) and ``quadrupole`` (traceless Buckingham quadrupole, Debye*Angstrom, about
  the centroid of all atoms), all from the dimer RHF calculation in the same frame;
* ``<id>/energies.json``: the raw energies of that row (Hartree), which also marks it finished;
* ``meta.xlsx``: one row per dimer with ``V0`` = RHF supermolecular interaction energy
  E_AB - E_A - E_B (no counterpoise) and ``Vref`` = CCSD(T)/CBS from ASE, both kcal/mol.

Resumable: a row whose ``energies.json`` exists is not recomputed; ``meta.xlsx`` is rewritten
from all finished rows at the end. Level of theory: RHF/def2-SVP with density fitting
(def2-universal-jkfit), PySCF defaults otherwise.
"""
import argparse
import json
import os
import time

import numpy as np
import pandas as pd
from ase.data import s22 as ase_s22
from pyscf import gto, scf

EV_TO_KCAL_MOL = 23.060548  # kcal/mol per eV
HARTREE_TO_KCAL_MOL = 627.5094740631  # kcal/mol per Hartree (CODATA 2018)
ANGSTROM_TO_BOHR = 1.0 / 0.52917721092  # bohr per Angstrom (PySCF's BOHR)
ANGSTROM_PER_NM = 10.0
MULTIPLIERS = ("0.9", "1.0", "1.2", "1.5", "2.0")
ANGULAR_LETTERS = "spd"  # Mulliken populations kept per atom: l = 0, 1, 2


def rotation_to_z(direction):
    """Proper rotation matrix R (3, 3) with R @ unit(direction) = +z (Rodrigues)."""
    d = np.asarray(direction, float) / np.linalg.norm(direction)  # (3,)
    z = np.array([0.0, 0.0, 1.0])
    v = np.cross(d, z)  # (3,) rotation axis * sin
    c = float(d @ z)  # cos of the angle
    if np.linalg.norm(v) < 1e-12:
        return np.eye(3) if c > 0 else np.diag([1.0, -1.0, -1.0])  # 180 deg about x
    vx = np.array([[0, -v[2], v[1]], [v[2], 0, -v[0]], [-v[1], v[0], 0]])
    return np.eye(3) + vx + vx @ vx / (1.0 + c)


def first_principal_axis(pos):
    """Unit vector (3,) of largest spread of an atom cloud (unweighted covariance)."""
    centred = pos - pos.mean(0)  # (N, 3)
    evals, evecs = np.linalg.eigh(centred.T @ centred)
    return evecs[:, np.argmax(evals)]


def write_pdb(path, symbols, pos, chain):
    """Minimal PDB with HETATM records and the element in columns 77-78."""
    lines = []
    for i, (sym, (x, y, z)) in enumerate(zip(symbols, pos), start=1):
        name = f"{sym}{i}"[:4]
        lines.append(
            f"HETATM{i:5d} {name:<4s} MOL {chain}   1    "
            f"{x:8.3f}{y:8.3f}{z:8.3f}  1.00  0.00          {sym:>2s}"
        )
    lines.append("END")
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")


def rhf(symbols, pos_angstrom, basis):
    """Density-fitted RHF; returns (mol, converged mean-field object)."""
    mol = gto.M(atom=list(zip(symbols, pos_angstrom.tolist())), basis=basis, unit="Angstrom",
                verbose=0)
    mf = scf.RHF(mol).density_fit(auxbasis="def2-universal-jkfit")
    mf.conv_tol = 1e-9
    mf.kernel()
    if not mf.converged:
        raise RuntimeError(f"RHF did not converge for {symbols}")
    return mol, mf


def mulliken_spd(mol, mf):
    """Mulliken AO populations summed per atom and angular momentum: (N, 3) electrons."""
    pop, _ = mf.mulliken_pop(verbose=0)  # (n_ao,)
    out = np.zeros((mol.natm, len(ANGULAR_LETTERS)))
    for p, (atom, _sym, shell, _m) in zip(pop, mol.ao_labels(fmt=False)):
        letter = shell[-1]
        if letter not in ANGULAR_LETTERS:
            raise ValueError(f"basis has l > 2 functions ({shell}); choose another basis")
        out[atom, ANGULAR_LETTERS.index(letter)] += p
    return out


def build_row(name, mult, basis):
    """Compute one S22x5 row; returns (meta dict, npz arrays, pdb data, energies dict)."""
    d = ase_s22.data[name]
    n_a, _n_b = d["dimer atoms"]
    symbols = list(ase_s22.create_s22_system(name, mult).get_chemical_symbols())
    pos = np.array(d[f"positions {mult}"], float)  # (N, 3) Angstrom
    c_a, c_b = pos[:n_a].mean(0), pos[n_a:].mean(0)
    rot = rotation_to_z(c_b - c_a)
    pos = (pos - c_a) @ rot.T  # dimer frame: A's centroid at 0, B's on +z
    r_angstrom = float(np.linalg.norm(c_b - c_a))

    t0 = time.time()
    mol_ab, mf_ab = rhf(symbols, pos, basis)
    _, mf_a = rhf(symbols[:n_a], pos[:n_a], basis)
    _, mf_b = rhf(symbols[n_a:], pos[n_a:], basis)
    e_ab, e_a, e_b = float(mf_ab.e_tot), float(mf_a.e_tot), float(mf_b.e_tot)
    centroid_bohr = pos.mean(0) * ANGSTROM_TO_BOHR  # (3,) quadrupole origin
    dm = mf_ab.make_rdm1()
    arrays = {
        "mulliken_spd": mulliken_spd(mol_ab, mf_ab),  # (N, 3) electrons
        "dipole": np.asarray(mf_ab.dip_moment(unit="Debye", dm=dm, verbose=0)),  # (3,) D
        "quadrupole": np.asarray(  # (3, 3) Debye*Angstrom, traceless
            mf_ab.quad_moment(unit="DebyeAngstrom", dm=dm, origin=centroid_bohr, verbose=0)),
    }
    v0 = (e_ab - e_a - e_b) * HARTREE_TO_KCAL_MOL
    vref = ase_s22.get_interaction_energy_s22x5(name, mult) * EV_TO_KCAL_MOL
    theta = np.degrees(np.arccos(min(1.0, abs(float(
        first_principal_axis(pos[:n_a]) @ first_principal_axis(pos[n_a:]))))))
    row_id = f"{name}_{mult}"
    meta = {"id": row_id, "pdb_a": f"{row_id}/A.pdb", "pdb_b": f"{row_id}/B.pdb",
            "npz": f"{row_id}/dimer.npz", "R_nm": r_angstrom / ANGSTROM_PER_NM,
            "theta_deg": float(theta), "V0": v0, "Vref": vref, "PR": float(mult), "group": name}
    energies = {"E_AB": e_ab, "E_A": e_a, "E_B": e_b, "unit": "Hartree", "basis": basis,
                "method": "RHF, density fitting (def2-universal-jkfit), no counterpoise",
                "seconds": time.time() - t0, "meta": meta}
    return meta, arrays, (symbols[:n_a], pos[:n_a], symbols[n_a:], pos[n_a:]), energies


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


def write_readme(out, rows, seconds, basis):
    import ase
    import pyscf
    frame = pd.DataFrame(rows)
    text = README_TEMPLATE.format(
        n_rows=len(rows), ase_version=ase.__version__, pyscf_version=pyscf.__version__,
        method="RHF (density fitting, def2-universal-jkfit)", basis=basis,
        minutes=seconds / 60.0, table=baseline_table(frame))
    with open(os.path.join(out, "README.md"), "w") as fh:
        fh.write(text)


def main(argv=None):
    here = os.path.dirname(os.path.abspath(__file__))
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join(here, "s22x5"),
                        help="output folder (default: examples/s22x5)")
    parser.add_argument("--basis", default="def2-svp", help="AO basis (default: def2-svp)")
    parser.add_argument("--only", nargs="*", default=None,
                        help="restrict to these S22 names (default: all 22)")
    args = parser.parse_args(argv)

    names = args.only or list(ase_s22.s22)
    rows, total_seconds = [], 0.0
    for name in names:
        for mult in MULTIPLIERS:
            row_dir = os.path.join(args.out, f"{name}_{mult}")
            done = os.path.join(row_dir, "energies.json")
            if os.path.exists(done):
                with open(done) as fh:
                    finished = json.load(fh)
                rows.append(finished["meta"])
                total_seconds += finished["seconds"]
                continue
            os.makedirs(row_dir, exist_ok=True)
            meta, arrays, (sym_a, pos_a, sym_b, pos_b), energies = build_row(name, mult, args.basis)
            write_pdb(os.path.join(row_dir, "A.pdb"), sym_a, pos_a, "A")
            write_pdb(os.path.join(row_dir, "B.pdb"), sym_b, pos_b, "B")
            np.savez(os.path.join(row_dir, "dimer.npz"), **arrays)
            tmp = done + ".tmp"
            with open(tmp, "w") as fh:  # written last and atomically: marks the row finished
                json.dump(energies, fh, indent=1)
            os.replace(tmp, done)
            rows.append(meta)
            total_seconds += energies["seconds"]
            print(f"{meta['id']:50s} V0 {meta['V0']:8.3f}  Vref {meta['Vref']:8.3f} kcal/mol "
                  f"({energies['seconds']:.0f} s)", flush=True)
    pd.DataFrame(rows).to_excel(os.path.join(args.out, "meta.xlsx"), index=False)
    write_readme(args.out, rows, total_seconds, args.basis)
    print(f"wrote {len(rows)} rows to {os.path.join(args.out, 'meta.xlsx')} and README.md")


if __name__ == "__main__":
    main()
