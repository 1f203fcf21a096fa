"""Find corpus dimers that are near-copies of an S66x8 point (S66 is the transfer test set).

S66x8 is S66 with monomer B moved along the line between the monomers' centres of mass
(mass-weighted, ``ase.data.atomic_masses``) to ``S66X8_MULTIPLIERS`` = 0.90 ... 2.00 times the
equilibrium distance; the 8 points of each S66 dimer are generated here from the equilibrium
geometries in ``data/s66/inputs``. A corpus dimer is a near-copy of an S66 system when

* it is the same pair of monomers: the same element formula for both monomers and the same
  internal structure, the sorted intramolecular distances within ``MONOMER_RMS_ANGSTROM`` RMS.
  0.12 Angstrom: one molecule optimised at different levels (S22, NBC10, NCIAtlas, S66)
  agrees within 0.03; fragments cut from protein crystal structures deviate more: HSG's up to
  0.06, BBI's backbone fragments (N-methylacetamide-like, C3H7NO) up to 0.113 from S66's
  N-methylacetamide, mostly in the hydrogen positions (their heavy atoms alone agree within
  0.05), so 0.05 would keep only 11 of the 100 BBI pairs. The closest two different molecules
  with one formula in the corpus are 0.141 apart (2,3-dimethylbutane and neohexane, D1200),
  and no isomer of an S66 monomer comes within 0.31 (isopentane against neopentane).
* the monomers touch the same way as at one of the 8 points: the ``N_CONTACTS`` (5, fewer when
  the dimer has fewer A-B pairs) shortest intermolecular A-B distances, each compared with the
  distance of the same rank among the other dimer's A-B pairs of the same element pair (the
  2nd shortest C-H contact with the 2nd shortest C-H contact), agree within
  ``CONTACT_ANGSTROM``; both directions are checked (the corpus dimer's 5 shortest contacts
  against the S66 point, and the S66 point's against the corpus dimer), and the largest
  absolute difference is the "contact difference". 0.15 Angstrom: one complex optimised at
  different levels differs by 0.03-0.13 (A24 #2 and S22 #2 against S66 #1, S22 #5 against
  S66 #17, S22 #11 against #24, the listed NCIAtlas copies against theirs). Between 0.90 and
  1.10 the S66x8 points are 5% of a 3.5-5 Angstrom centre-of-mass distance apart (0.17-0.25),
  so a dimer between two of them is within about 0.09-0.13 of one; beyond 1.10 they are 15-50%
  apart, and a curve point between them can be missed (S22 #2 at 1.5 and 2.0 x R_eq).
  Ranked contacts per element pair tell a T-shaped benzene dimer (shortest contacts C-H near
  2.9 Angstrom) from a stacked one (C-C near 3.5), which the shortest contact per element pair
  alone did not. They do not resolve a sideways slide of two stacked rings: whatever the
  slide, some ring atoms lie about above others, so NBC10's parallel-displaced curves match
  S66 #24 (slid by 1.6 Angstrom) from slides of 0.4 to 3.0, and two points of the face-to-face
  sandwich curve do too; the rows flagged for S66 #24 are an upper bound.

Monomer order does not matter (A-B is compared with both A-B and B-A of the S66 dimer).
``make_corpus_inputs.py`` used a stricter test (0.02 Angstrom on every A-B distance of the
equilibrium dimers) that finds only exact duplicates; this one also finds the same complex
re-optimised at another level and points of a dissociation curve near an S66x8 point.

Run on its own, it checks every row of ``data/corpus/dimers.csv``, writes
``data/corpus/s66_near_copies.csv`` (per row: the closest S66 system with the same monomer pair,
the multiplier of its closest S66x8 point, the contact difference, the monomer RMS, and whether
it is a near-copy) and prints a summary per S66 system::

    python data/corpus/s66_overlap.py [--csv data/corpus/dimers.csv] [--s66 data/s66/dimers.csv]
                                      [--out data/corpus/s66_near_copies.csv]

``make_ncia_inputs.py`` imports ``s66_near_copies`` to drop such dimers. Needs numpy and ase.
"""
import argparse
import csv
import os
import re

import numpy as np
from ase.data import atomic_masses, atomic_numbers

from make_corpus_inputs import distance_signature, formula  # beside this file

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
S66X8_MULTIPLIERS = (0.90, 0.95, 1.00, 1.05, 1.10, 1.25, 1.50, 2.00)
MONOMER_RMS_ANGSTROM = 0.12
CONTACT_ANGSTROM = 0.15
N_CONTACTS = 5


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




def _monomer_rms(sig_x, sig_y):
    """RMS difference (Angstrom) of two monomers' sorted intramolecular distances (same formula)."""
    return 0.0 if len(sig_x) == 0 else float(np.sqrt(np.mean((sig_x - sig_y) ** 2)))


def centre_of_mass(symbols, xyz):
    m = np.array([atomic_masses[atomic_numbers[s]] for s in symbols])
    return m @ xyz / m.sum()


class Dimer:
    """A dimer split into its monomers: symbols and positions (Angstrom) of A and of B.
    S66x8 points also carry ``s66`` (the S66 number) and ``multiplier``."""

    def __init__(self, name, symbols, xyz, n_atoms_a):
        self.name = name
        self.sym_a, self.sym_b = list(symbols[:n_atoms_a]), list(symbols[n_atoms_a:])
        self.xa, self.xb = np.asarray(xyz[:n_atoms_a]), np.asarray(xyz[n_atoms_a:])
        self.formulas = (formula(self.sym_a), formula(self.sym_b))
        self.s66 = self.multiplier = None
        self._cache = {}

    def swapped(self):
        out = Dimer(self.name, self.sym_b + self.sym_a, np.concatenate([self.xb, self.xa]),
                    len(self.sym_b))
        out.s66, out.multiplier = self.s66, self.multiplier
        return out

    def monomer_signatures(self):
        if "sig" not in self._cache:
            self._cache["sig"] = (distance_signature(self.xa), distance_signature(self.xb))
        return self._cache["sig"]

    def contacts(self):
        """({(element in A, element in B): sorted A-B distances}, [(element pair, rank within
        that pair)] of the N_CONTACTS shortest A-B distances)."""
        if "contacts" not in self._cache:
            d = np.linalg.norm(self.xa[:, None] - self.xb[None], axis=-1)
            ea, eb = np.array(self.sym_a), np.array(self.sym_b)
            by_pair = {(p, q): np.sort(d[np.ix_(ea == p, eb == q)].ravel())
                       for p in sorted(set(self.sym_a)) for q in sorted(set(self.sym_b))}
            flat = sorted((v, key) for key, values in by_pair.items() for v in values)
            shortest, rank = [], {}
            for _, key in flat[:min(N_CONTACTS, len(flat))]:
                shortest.append((key, rank.get(key, 0)))
                rank[key] = rank.get(key, 0) + 1
            self._cache["contacts"] = (by_pair, shortest)
        return self._cache["contacts"]


def contact_difference(x, y):
    """The largest |difference| (Angstrom) between the shortest A-B contacts of dimers ``x`` and
    ``y`` (same monomer formulas, same order): each of x's N_CONTACTS shortest contacts against
    y's contact of the same element pair and rank, and each of y's against x's."""
    (px, sx), (py, sy) = x.contacts(), y.contacts()
    return float(max(max(abs(px[k][r] - py[k][r]) for k, r in sx),
                     max(abs(px[k][r] - py[k][r]) for k, r in sy)))


def closest_points(dimer, s66, monomer_rms=MONOMER_RMS_ANGSTROM):
    """{S66 number: (contact difference, multiplier, monomer RMS)}: for each S66 system with the
    same pair of monomers as ``dimer`` (both formulas, intramolecular distances within
    ``monomer_rms`` RMS, either order), its S66x8 point closest in contacts."""
    out = {}
    orders = (dimer, dimer.swapped())
    for ref in s66:
        if sorted(ref.formulas) != sorted(dimer.formulas):
            continue
        for cand in orders:  # both monomer orders (homodimers: both count)
            if cand.formulas != ref.formulas:
                continue
            (ca, cb), (ra, rb) = cand.monomer_signatures(), ref.monomer_signatures()
            rms = max(_monomer_rms(ca, ra), _monomer_rms(cb, rb))
            if rms > monomer_rms:
                continue
            diff = contact_difference(cand, ref)
            key = ref.s66 if ref.s66 is not None else ref.name
            if key not in out or diff < out[key][0]:
                out[key] = (diff, ref.multiplier, rms)
    return out


def s66_near_copies(dimer, s66, monomer_rms=MONOMER_RMS_ANGSTROM, contact=CONTACT_ANGSTROM):
    """[(S66 system's name 'S66 #N', contact difference in Angstrom, S66x8 multiplier)] of the
    S66 systems ``dimer`` is a near-copy of, closest first. ``dimer`` is a ``Dimer``, ``s66``
    the list of ``load_s66()`` (the S66x8 points; equilibrium dimers alone also work).
    ``contact=np.inf`` gives every S66 system with the same pair of monomers."""
    hits = [(f"S66 #{key}" if isinstance(key, int) else key, diff, mult)
            for key, (diff, mult, _) in closest_points(dimer, s66, monomer_rms).items()
            if diff <= contact]
    return sorted(hits, key=lambda h: h[1])


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


def s66x8_points(eq, multipliers=S66X8_MULTIPLIERS):
    """The S66x8 points of an equilibrium ``Dimer``: B moved along the line between the centres
    of mass so that their distance is ``multiplier`` times the equilibrium one."""
    shift = centre_of_mass(eq.sym_b, eq.xb) - centre_of_mass(eq.sym_a, eq.xa)
    points = []
    for f in multipliers:
        p = Dimer(eq.name, eq.sym_a + eq.sym_b,
                  np.concatenate([eq.xa, eq.xb + (f - 1.0) * shift]), len(eq.sym_a))
        p.s66, p.multiplier = eq.s66, f
        points.append(p)
    return points


def load_s66(csv_path=os.path.join(REPO, "data", "s66", "dimers.csv"),
             multipliers=S66X8_MULTIPLIERS):
    """The S66x8 points as [Dimer] (8 per S66 dimer), each named 'S66 #N' with ``s66`` = N and
    ``multiplier``; ``multipliers=(1.0,)`` gives the equilibrium dimers only."""
    points = []
    for eq in load_dimers(csv_path):
        eq.s66 = int(eq.name.split("-", 1)[1])
        eq.name = f"S66 #{eq.s66}"
        points += s66x8_points(eq, multipliers)
    return points


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--csv", default=os.path.join(HERE, "dimers.csv"),
                        help="builder CSV to check (default: the corpus)")
    parser.add_argument("--s66", default=os.path.join(REPO, "data", "s66", "dimers.csv"))
    parser.add_argument("--out", default=os.path.join(HERE, "s66_near_copies.csv"),
                        help="the per-row result (default: data/corpus/s66_near_copies.csv)")
    args = parser.parse_args(argv)
    s66 = load_s66(args.s66)
    dimers = load_dimers(args.csv)
    rows, by_system, same_pair = [], {}, set()
    for dimer in dimers:
        closest = closest_points(dimer, s66)
        row = {"id": dimer.name, "s66": "", "multiplier": "", "contact_difference": "",
               "monomer_rms": "", "near_copy": 0}
        if closest:
            number, (diff, mult, rms) = min(closest.items(), key=lambda kv: kv[1][0])
            same_pair.add(dimer.name)
            row.update(s66=number, multiplier=f"{mult:.2f}", contact_difference=f"{diff:.3f}",
                       monomer_rms=f"{rms:.3f}", near_copy=int(diff <= CONTACT_ANGSTROM))
            for n, (d, m, _) in closest.items():
                if d <= CONTACT_ANGSTROM:
                    by_system.setdefault(n, []).append((dimer.name, m, d))
        rows.append(row)
    with open(args.out, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)

    flagged = [r for r in rows if r["near_copy"]]
    print(f"{len(flagged)} of {len(rows)} rows are near-copies of an S66x8 point "
          f"({len(by_system)} S66 systems; monomers within {MONOMER_RMS_ANGSTROM} A RMS, "
          f"the {N_CONTACTS} shortest contacts within {CONTACT_ANGSTROM} A); "
          f"{len(same_pair)} rows share a monomer pair with an S66 system; "
          f"written to {os.path.relpath(args.out)}")
    for number in sorted(by_system):
        hits = by_system[number]
        groups = {}
        for name, m, d in hits:
            stem = re.sub(r"(-[0-9.]+|_\d{3})$", "", name)
            groups.setdefault(stem, []).append((m, d))
        text = "; ".join(
            f"{stem} x{len(v)} (S66x8 {min(m for m, _ in v):.2f}-{max(m for m, _ in v):.2f}, "
            f"contact diff {min(d for _, d in v):.3f}-{max(d for _, d in v):.3f})"
            for stem, v in sorted(groups.items()))
        print(f"S66 #{number}: {len(hits)} rows: {text}")
    free = sorted(set(range(1, 67)) - set(by_system))
    print(f"S66 systems without a near-copy ({len(free)}): {' '.join(map(str, free))}")


if __name__ == "__main__":
    main()
