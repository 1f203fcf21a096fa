"""Write the pretrained model's corpus inputs (XYZ files + dimers.csv) from psi4's databases.

This is a one-off preparation step; its outputs (``inputs/``, ``dimers.csv``, ``excluded.csv``)
are committed, so nobody needs to run it again. To reproduce them::

    git clone https://github.com/psi4/psi4 /tmp/psi4        # any recent master
    pip install qcelemental                                 # psi4's qcdb parses the Z-matrices
    python data/corpus/make_corpus_inputs.py --psi4 /tmp/psi4

psi4's ``qcdb`` package is pure Python apart from a few type hints that name ``psi4.core``;
the script stubs those so it runs without a psi4 build. Each database module holds the dimer
geometries (``GEOS``, Cartesian or Z-matrix, fragments separated by ``--``) and the reference
interaction energies in kcal/mol (``BIND``, which each module points at its best benchmark).

Then build the folder with the dataset builder (resumable; see README.md in this folder)::

    python tools/build_dataset.py data/corpus/dimers.csv --out data/corpus/build
"""
import argparse
import csv
import importlib
import os
import re
import sys
import types

import numpy as np

BOHR_TO_ANGSTROM = 0.52917721067  # Angstrom per bohr (psi4/qcdb's CODATA 2014 value)

# database module -> (reference dictionary, how a reaction name maps to its system/curve)
DATABASES = {
    "S22by5": ("BIND", r"^(\d+)-[\d.]+$"),  # '13-0.9' -> system 13
    "NBC10": ("BIND_NBC10A", r"^(.+)-[\d.]+$"),  # 'BzBz_S-3.2' -> BzBz_S
    "HBC6": ("BIND_HBC6A", r"^(.+)-[\d.]+$"),  # 'FaOOFaOO-3.4' -> FaOOFaOO
    "A24": ("BIND", r"^(.+)$"),
    "HSG": ("BIND_HSGA", r"^(.+)$"),
    "JSCH": ("BIND", r"^(.+)$"),
    "BBI": ("BIND_SILVER", r"^(.+)$"),
}
HELD_OUT = ("S66", "S66by8")  # the transfer test sets: nothing of them enters the corpus

# Known S66 duplicates (their whole curves are dropped); others are found by geometry below.
KNOWN_DUPLICATES = {
    ("S22by5", "13"): "uracil dimer, stacked = S66 #26",
    ("S22by5", "17"): "benzene-water = S66 #54",
    ("A24", "12"): "ethyne dimer = S66 #51",
}
# Two monomers are the same structure when their sorted interatomic distances agree to this
# RMS (Angstrom); a dimer is a duplicate of an S66/S66x8 dimer when both monomers are the same
# structures and the sorted A-B distances agree to it too (same configuration).
SAME_STRUCTURE_RMS_ANGSTROM = 0.02
ALLOWED_ELEMENTS = set("H He Li Be B C N O F Ne Na Mg Al Si P S Cl Ar K Ca".split())


def import_qcdb(psi4_root):
    """Import psi4's pure-Python qcdb from a psi4 source tree, stubbing its psi4.core hints."""
    stub = types.ModuleType("psi4")
    stub.core = types.SimpleNamespace(Molecule=object, BasisSet=object, Wavefunction=object,
                                      Matrix=object, Vector=object)
    sys.modules.setdefault("psi4", stub)
    sys.path.insert(0, os.path.join(psi4_root, "psi4", "driver"))
    sys.path.insert(0, os.path.join(psi4_root, "psi4", "share", "psi4", "databases"))
    return importlib.import_module("qcdb")


def fragments(mol):
    """[(symbols, xyz (n, 3) Angstrom, charge, multiplicity)] of the two fragments of a dimer."""
    mol.update_geometry()
    if mol.nfragments() != 2:
        raise ValueError(f"{mol.name()}: {mol.nfragments()} fragments, expected 2")
    # extract_fragments re-centres each fragment on its own, so split the dimer's geometry
    # (one frame for both, dummy atoms already dropped) by fragment A's atom count instead
    n_a = mol.extract_fragments(1).natom()
    xyz = np.array(mol.geometry()) * BOHR_TO_ANGSTROM  # (N, 3); qcdb's geometry() is bohr
    symbols = [mol.symbol(i).capitalize() for i in range(mol.natom())]
    return [(symbols[:n_a], xyz[:n_a], int(mol.fragment_charges[0]),
             int(mol.fragment_multiplicities[0])),
            (symbols[n_a:], xyz[n_a:], int(mol.fragment_charges[1]),
             int(mol.fragment_multiplicities[1]))]


def formula(symbols):
    counts = {}
    for s in symbols:
        counts[s] = counts.get(s, 0) + 1
    return "".join(f"{s}{counts[s] if counts[s] > 1 else ''}" for s in sorted(counts))


def distance_signature(xyz):
    """Sorted interatomic distances (Angstrom): invariant to rotation, translation, atom order."""
    d = np.linalg.norm(xyz[:, None] - xyz[None], axis=-1)  # (n, n)
    return np.sort(d[np.triu_indices(len(xyz), 1)])


def same_structure(a, b):
    sa, sb = distance_signature(a), distance_signature(b)
    return len(sa) == len(sb) and (len(sa) == 0 or
                                   np.sqrt(np.mean((sa - sb) ** 2)) < SAME_STRUCTURE_RMS_ANGSTROM)


def inter_signature(xa, xb):
    """Sorted A-B distances (Angstrom): the configuration of the pair, independent of frame."""
    return np.sort(np.linalg.norm(xa[:, None] - xb[None], axis=-1).ravel())


def held_out_dimers():
    """Every S66/S66x8 dimer: [(name, {formula A, formula B}, xyz A, xyz B)]."""
    dimers = []
    for name in HELD_OUT:
        db = importlib.import_module(name)
        for rxn in db.HRXN:
            (sa, xa, _, _), (sb, xb, _, _) = fragments(db.GEOS[f"{db.dbse}-{rxn}-dimer"])
            dimers.append((f"{name} #{rxn}", (formula(sa), formula(sb)), xa, xb))
    return dimers


def duplicate_of(frags, held_out):
    """Name of the S66/S66x8 dimer this one duplicates (same monomers, same configuration)."""
    (sa, xa, _, _), (sb, xb, _, _) = frags
    fa, fb = formula(sa), formula(sb)
    for name, (ga, gb), ya, yb in held_out:
        if (fa, fb) == (gb, ga):  # the same pair listed B first
            ya, yb, ga, gb = yb, ya, gb, ga
        if (fa, fb) != (ga, gb) or not (same_structure(xa, ya) and same_structure(xb, yb)):
            continue
        si, sj = inter_signature(xa, xb), inter_signature(ya, yb)
        if np.sqrt(np.mean((si - sj) ** 2)) < SAME_STRUCTURE_RMS_ANGSTROM:
            return name
    return None


def write_xyz(path, symbols, xyz, comment):
    lines = [str(len(symbols)), comment]
    lines += [f"{s:<2s} {x:16.10f} {y:16.10f} {z:16.10f}" for s, (x, y, z) in zip(symbols, xyz)]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--psi4", required=True, help="a psi4 source tree (git clone)")
    parser.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)),
                        help="corpus folder (default: this script's folder)")
    args = parser.parse_args(argv)
    import_qcdb(args.psi4)
    held_out = held_out_dimers()
    rows, excluded = [], []
    n_atoms_b = {}  # id -> monomer B's atom count: with n_atoms_a, the sort key below
    for dbname, (bind_name, system_pattern) in DATABASES.items():
        db = importlib.import_module(dbname)
        bind = getattr(db, bind_name)
        dropped_systems = {}  # system -> reason: a duplicate drops its whole curve
        candidates = []
        for rxn in db.HRXN:
            key = f"{db.dbse}-{rxn}"
            system = re.match(system_pattern, str(rxn)).group(1)
            frags = fragments(db.GEOS[f"{key}-dimer"])
            reason = KNOWN_DUPLICATES.get((dbname, system))
            dup = duplicate_of(frags, held_out)
            if reason is None and dup is not None:
                reason = f"same dimer as {dup}"
            if reason is not None:
                dropped_systems.setdefault(system, reason)
            candidates.append((rxn, key, system, frags))
        for rxn, key, system, frags in candidates:
            (sa, xa, qa, ma), (sb, xb, qb, mb) = frags
            dimer_id = f"{dbname}-{rxn}"
            reason = None
            if system in dropped_systems:
                reason = f"S66 duplicate: {dropped_systems[system]}"
            elif qa != 0 or qb != 0:
                reason = f"charged fragment (charges {qa}, {qb})"
            elif not set(sa + sb) <= ALLOWED_ELEMENTS:
                reason = f"element beyond Ca: {sorted(set(sa + sb) - ALLOWED_ELEMENTS)}"
            elif key not in bind or bind[key] is None:
                reason = f"no {bind_name} reference"
            if reason is not None:
                excluded.append({"id": dimer_id, "database": dbname, "reason": reason})
                continue
            rel = os.path.join("inputs", dbname, f"{rxn}.xyz")
            write_xyz(os.path.join(args.out, rel), sa + sb,
                      np.concatenate([xa, xb]), f"n_atoms_a={len(sa)} source={dbname}:{rxn}")
            n_atoms_b[dimer_id] = len(sb)
            rows.append({"id": dimer_id, "xyz": rel, "n_atoms_a": len(sa),
                         "Vref": f"{bind[key]:.4f}", "charge_a": qa, "charge_b": qb,
                         "spin_a": ma - 1, "spin_b": mb - 1,
                         "group": f"{dbname}-{system}"})
    # smallest dimers first: a partial (resumed) build then holds as many dimers as possible
    rows.sort(key=lambda r: (r["n_atoms_a"] + n_atoms_b[r["id"]], r["id"]))
    for name, records in (("dimers.csv", rows), ("excluded.csv", excluded)):
        with open(os.path.join(args.out, name), "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(records[0]))
            writer.writeheader()
            writer.writerows(records)
    print(f"{len(rows)} dimers written, {len(excluded)} excluded")
    for dbname in DATABASES:
        n = sum(r["id"].startswith(dbname + "-") for r in rows)
        reasons = {}
        for e in excluded:
            if e["database"] == dbname:
                reasons[e["reason"]] = reasons.get(e["reason"], 0) + 1
        print(f"  {dbname:8s} {n:4d} kept; excluded: {reasons or 'none'}")


if __name__ == "__main__":
    main()
