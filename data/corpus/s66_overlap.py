"""Find corpus dimers that are near-copies of an S66 equilibrium dimer (the transfer test set).

A dimer is a near-copy of an S66 dimer when

* it is the same pair of monomers: the same element formula for both monomers and the same
  internal geometry, the sorted interatomic distances within ``MONOMER_RMS_ANGSTROM`` RMS
  (loose enough that a B3LYP-D3 and an MP2 optimisation of one molecule match), and
* the monomers touch the same way: for every pair of elements (one atom in each monomer) the
  shortest intermolecular contact agrees within ``CONTACT_ANGSTROM`` (the largest difference
  over the element pairs is the "contact difference" printed below).

Monomer order does not matter (A-B is compared with both A-B and B-A of the S66 dimer).
``make_corpus_inputs.py`` used a stricter test (0.02 Angstrom on every A-B distance) that finds
only exact duplicates; this one also finds the same complex re-optimised at another level.

Run on its own, it lists every row of ``data/corpus/dimers.csv`` near an S66 dimer::

    python data/corpus/s66_overlap.py [--csv data/corpus/dimers.csv] [--s66 data/s66/dimers.csv]

``make_ncia_inputs.py`` imports ``s66_near_copies`` to drop such dimers. Needs numpy only.
"""
import argparse
import csv
import os
import re

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
MONOMER_RMS_ANGSTROM = 0.05
CONTACT_ANGSTROM = 0.15


def read_xyz(path):
    """(symbols, xyz (n, 3) Angstrom, n_atoms_a from the comment line or None) of an XYZ file."""
    with open(path, encoding="utf-8") as fh:
        lines = fh.read().splitlines()
    n = int(lines[0].split()[0])
    match = re.search(r"n_atoms_a=(\d+)", lines[1])
    symbols, xyz = [], []
    for line in lines[2:2 + n]:
        fields = line.split()
        symbols.append(fields[0].capitalize())
        xyz.append([float(v) for v in fields[1:4]])
    return symbols, np.array(xyz, dtype=float).reshape(-1, 3), (int(match.group(1)) if match else None)


def formula(symbols):
    counts = {}
    for s in symbols:
        counts[s] = counts.get(s, 0) + 1
    return "".join(f"{s}{counts[s] if counts[s] > 1 else ''}" for s in sorted(counts))


def _distance_signature(xyz):
    d = np.linalg.norm(xyz[:, None] - xyz[None], axis=-1)
    return np.sort(d[np.triu_indices(len(xyz), 1)])


def _same_monomer(sym_x, x, sym_y, y, rms):
    if formula(sym_x) != formula(sym_y):
        return False
    sx, sy = _distance_signature(x), _distance_signature(y)
    return len(sx) == 0 or float(np.sqrt(np.mean((sx - sy) ** 2))) <= rms


def _contacts(sym_a, xa, sym_b, xb):
    """{(element in A, element in B): shortest A-B distance} (Angstrom)."""
    d = np.linalg.norm(xa[:, None] - xb[None], axis=-1)
    ea, eb = np.array(sym_a), np.array(sym_b)
    return {(p, q): float(d[np.ix_(ea == p, eb == q)].min())
            for p in sorted(set(sym_a)) for q in sorted(set(sym_b))}


class Dimer:
    """A dimer split into its monomers: symbols and positions (Angstrom) of A and of B."""

    def __init__(self, name, symbols, xyz, n_atoms_a):
        self.name = name
        self.sym_a, self.sym_b = list(symbols[:n_atoms_a]), list(symbols[n_atoms_a:])
        self.xa, self.xb = np.asarray(xyz[:n_atoms_a]), np.asarray(xyz[n_atoms_a:])
        self.formulas = (formula(self.sym_a), formula(self.sym_b))

    def swapped(self):
        out = Dimer.__new__(Dimer)
        out.name, out.sym_a, out.sym_b = self.name, self.sym_b, self.sym_a
        out.xa, out.xb, out.formulas = self.xb, self.xa, self.formulas[::-1]
        return out


def load_dimers(csv_path):
    """[Dimer] of a builder CSV (columns id, xyz, n_atoms_a; paths relative to the CSV)."""
    folder = os.path.dirname(os.path.abspath(csv_path))
    dimers = []
    with open(csv_path, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            symbols, xyz, k = read_xyz(os.path.join(folder, row["xyz"]))
            k = int(row["n_atoms_a"]) if row.get("n_atoms_a") else k
            dimers.append(Dimer(row["id"], symbols, xyz, k))
    return dimers


def s66_near_copies(dimer, s66, monomer_rms=MONOMER_RMS_ANGSTROM, contact=CONTACT_ANGSTROM):
    """[(S66 dimer's name, contact difference in Angstrom)] of the S66 dimers ``dimer`` is a
    near-copy of, best first. ``dimer`` and each of ``s66`` are ``Dimer`` objects."""
    hits = []
    for ref in s66:
        if sorted(ref.formulas) != sorted(dimer.formulas):
            continue
        best = None
        for cand in (dimer, dimer.swapped()):  # both monomer orders (homodimers: both count)
            if cand.formulas != ref.formulas:
                continue
            if not (_same_monomer(cand.sym_a, cand.xa, ref.sym_a, ref.xa, monomer_rms)
                    and _same_monomer(cand.sym_b, cand.xb, ref.sym_b, ref.xb, monomer_rms)):
                continue
            ca = _contacts(cand.sym_a, cand.xa, cand.sym_b, cand.xb)
            cr = _contacts(ref.sym_a, ref.xa, ref.sym_b, ref.xb)
            diff = max(abs(ca[key] - cr[key]) for key in ca)
            best = diff if best is None else min(best, diff)
        if best is not None and best <= contact:
            hits.append((ref.name, best))
    return sorted(hits, key=lambda h: h[1])


def load_s66(csv_path=os.path.join(REPO, "data", "s66", "dimers.csv")):
    """The S66 equilibrium dimers as [Dimer], named 'S66 #N'."""
    dimers = load_dimers(csv_path)
    for d in dimers:
        d.name = "S66 #" + d.name.split("-", 1)[1]
    return dimers


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--csv", default=os.path.join(HERE, "dimers.csv"),
                        help="builder CSV to check (default: the corpus)")
    parser.add_argument("--s66", default=os.path.join(REPO, "data", "s66", "dimers.csv"))
    args = parser.parse_args(argv)
    s66 = load_s66(args.s66)
    dimers = load_dimers(args.csv)
    flagged = 0
    for dimer in dimers:
        hits = s66_near_copies(dimer, s66)
        if hits:
            flagged += 1
            print(f"{dimer.name}\t" + "\t".join(f"{n}\t{d:.3f}" for n, d in hits))
    print(f"{flagged} of {len(dimers)} rows near an S66 dimer "
          f"(monomers within {MONOMER_RMS_ANGSTROM} A RMS, contacts within {CONTACT_ANGSTROM} A)")


if __name__ == "__main__":
    main()
