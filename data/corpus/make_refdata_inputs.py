"""Append SSI aliphatic side-chain pairs and ADIM6 alkane dimers to the corpus inputs.

A one-off preparation step like ``make_corpus_inputs.py`` and ``make_ncia_inputs.py``; its
outputs are committed. Both sets are read from the ``refdata`` repository of A. Otero-de-la-Roza
and co-workers (here the fork https://github.com/Awallace3/refdata, commit 1dcda9d, 2026-02-18),
which holds benchmark geometries as XYZ files (comment line ``<charge> <multiplicity>``) and the
references in "din" files: blocks of ``coefficient``/``name`` line pairs ended by ``0`` and the
reference in kcal/mol, the energy of sum(coefficient x E(name)). To reproduce::

    git clone --bare https://github.com/Awallace3/refdata /tmp/refdata.git
    python data/corpus/make_refdata_inputs.py /tmp/refdata.git

Its LICENSE file is the GNU General Public License v3.0 (no per-file notices).

* **ADIM6** (GMTKN55; Grimme et al., J. Chem. Phys. 132, 154104 (2010); Goerigk et al., Phys.
  Chem. Chem. Phys. 19, 32184 (2017)): the n-alkane homodimers ethane to heptane (AD2-AD7),
  CCSD(T)/CBS estimates. Geometries ``30_collection-GMTKN55/adim6/adim6_AD<n>.xyz`` (the two
  monomers in turn, n atoms each; each is the free monomer ``adim6_AM<n>`` to 1e-5 Angstrom, so
  the reference is an interaction energy with no deformation term); reference
  ``10_din-GMTKN55/adim6.din``, 2 E(AM) - E(AD), so Vref = minus it; checked against
  ``10_din-GSCDB138/ADIM6.din``. AD5 (pentane dimer) is left out as a near-copy of S66 #34.
* **SSI** (side-chain side-chain interactions of the BioFragment Database; Burns et al., J.
  Chem. Phys. 147, 161727 (2017); Smith et al., J. Phys. Chem. Lett. 7, 2197 (2016)):
  DW-CCSD(T**)-F12/aug-cc-pVDZ with counterpoise (``ssi.din`` says DW-CCSD(T)-F12/aug-cc-pVDZ,
  CP), BFDb's "silver" level, the same as the corpus's BBI rows and below the CCSD(T)/CBS
  composites of the rest. Only the neutral aliphatic pairs are taken: both residues in
  ``ALIPHATIC`` (ALA, VAL, LEU, ILE, PRO: 611 of the 3,380 dimers; MET, with its sulfur, and
  the others are not). Geometries ``20_ssi/SSI-<name>-dimer.xyz``, the monomer split from
  ``SSI-<name>-monoA-unCP.xyz`` / ``-monoB-unCP.xyz`` (each is the dimer's first / last atoms,
  moved as a whole; checked), charges and multiplicities from the monomer files' comment lines
  (their sum checked against the dimer's); reference ``10_din/ssi.din``, E(dimer) - E(monoA) -
  E(monoB), taken as it is. The side chains are cut from protein structures and capped with
  hydrogens, most of them to ethane, propane or butane; 16 PRO fragments keep the backbone
  (C5H11NO).

Written: ``inputs/ADIM6/AD<n>.xyz`` and ``inputs/SSI/<name>.xyz`` (``<name>`` as
``001LEU-154LEU-1``: residue number and name of A and of B, and the contact's index); the rows of
``dimers.csv`` and ``excluded.csv`` with ids ``ADIM6-...`` and ``SSI-...`` are rewritten where
they are, or appended after the last row the first time; every other line stays byte-identical,
so a second run gives the same files. Row order: ADIM6, then SSI, smallest first within each.
``group``: one per dimer (``ADIM6-AD2``, ``SSI-001LEU-154LEU-1``), except ADIM6-AD3, in the
group of D1200's propane dimer (``SAME_SYSTEM_AS``), and SSI dimers whose
geometries are near-identical (sorted interatomic distances within ``SAME_GEOMETRY_RMS_ANGSTROM``
RMS), which share the first one's group. Left out, with the reason in ``excluded.csv``: charged
or open-shell monomers, elements beyond Ca, and the S66 near-copies (AD5, listed, and any that
``s66_overlap.s66_near_copies`` finds).
"""
import argparse
import os
import re
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from make_corpus_inputs import ALLOWED_ELEMENTS, distance_signature, formula  # noqa: E402
from make_ncia_inputs import ATOMIC_NUMBER, write_set_outputs  # noqa: E402
from s66_overlap import Dimer, load_s66, s66_near_copies  # noqa: E402

SETS = ("ADIM6", "SSI")  # as named in ids and folders, in build order
ADIM6_DIR = "30_collection-GMTKN55/adim6"
ADIM6_DIN = "10_din-GMTKN55/adim6.din"
ADIM6_DIN_CHECK = "10_din-GSCDB138/ADIM6.din"  # the same references, more digits
ADIM6_SIZES = range(2, 8)  # AD2 (ethane dimer) ... AD7 (heptane dimer)
SSI_DIR = "20_ssi"
SSI_DIN = "10_din/ssi.din"
ALIPHATIC = ("ALA", "VAL", "LEU", "ILE", "PRO")  # residues whose side-chain pairs are taken
# S66 near-copies known beforehand (the S66 transfer set must stay unseen); more found by geometry
LISTED_S66_COPIES = {"ADIM6-AD5": "pentane dimer, close to S66 #34"}
MONOMER_SHIFT_TOLERANCE_ANGSTROM = 1e-6  # monoA/monoB files: the dimer's atoms moved as a whole
SAME_GEOMETRY_RMS_ANGSTROM = 0.02  # two SSI dimers this close (sorted distances) share a group
# ADIM6 dimers close to a corpus dimer of the same monomers share its group, so no split puts
# one in training and the other in test: AD3 (propane dimer) is 0.176 Angstrom (contact
# difference, s66_overlap's measure) from D1200's propane dimer 1.06.42
SAME_SYSTEM_AS = {"ADIM6-AD3": "NCIA-1.06.42"}


def git_show(git_dir, path):
    return subprocess.run(["git", "--git-dir", git_dir, "show", f"HEAD:{path}"], check=True,
                          capture_output=True, text=True).stdout


def git_show_many(git_dir, paths):
    """{path: text} of many files at HEAD in one ``git cat-file --batch``."""
    query = "".join(f"HEAD:{p}\n" for p in paths).encode()
    out = subprocess.run(["git", "--git-dir", git_dir, "cat-file", "--batch"], input=query,
                         check=True, capture_output=True).stdout
    texts, at = {}, 0
    for path in paths:
        eol = out.index(b"\n", at)
        header = out[at:eol].split()
        if len(header) != 3:
            raise ValueError(f"{path}: not in the repository ({out[at:eol].decode()})")
        size = int(header[2])
        texts[path] = out[eol + 1:eol + 1 + size].decode()
        at = eol + 1 + size + 1
    return texts


def git_ls(git_dir, folder):
    out = subprocess.run(["git", "--git-dir", git_dir, "ls-tree", "--name-only", f"HEAD:{folder}"],
                         check=True, capture_output=True, text=True).stdout
    return sorted(out.split())


def parse_xyz(text, where):
    """(symbols, xyz (n, 3), charge, multiplicity) of a refdata XYZ ('<charge> <mult>' line 2)."""
    lines = text.splitlines()
    n = int(lines[0].split()[0])
    fields = lines[1].split()
    if len(fields) < 2 or not all(re.fullmatch(r"-?\d+", f) for f in fields[:2]):
        raise ValueError(f"{where}: comment line {lines[1]!r} is not '<charge> <multiplicity>'")
    symbols, xyz = [], []
    for line in lines[2:2 + n]:
        cols = line.split()
        symbols.append(cols[0].capitalize())
        xyz.append([float(v) for v in cols[1:4]])
    if len(symbols) != n or any(len(row) != 3 for row in xyz):
        raise ValueError(f"{where}: {len(symbols)} atoms, header says {n}")
    return symbols, np.array(xyz, dtype=float).reshape(-1, 3), int(fields[0]), int(fields[1])


def read_din(text, where):
    """[({name: coefficient}, reference kcal/mol)] of a din file, in order."""
    lines = [line.strip() for line in text.splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    blocks, terms, i = [], {}, 0
    while i < len(lines):
        coefficient = float(lines[i])
        if coefficient == 0:
            blocks.append((terms, float(lines[i + 1].split()[0])))
            terms, i = {}, i + 2
            continue
        terms[lines[i + 1]] = terms.get(lines[i + 1], 0) + coefficient
        i += 2
    if terms:
        raise ValueError(f"{where}: the last block has no reference")
    return blocks


def electrons(symbols, charge):
    return sum(ATOMIC_NUMBER[s] for s in symbols) - charge


def read_adim6(git_dir):
    """{name 'AD2': entry} of ADIM6, A's atoms first."""
    refs = {}
    for din, prefix in ((ADIM6_DIN, "adim6_"), (ADIM6_DIN_CHECK, "ADIM6_")):
        for terms, ref in read_din(git_show(git_dir, din), din):
            (monomer, c_m), (dimer, c_d) = sorted(terms.items(), key=lambda kv: -kv[1])
            n = dimer[len(prefix) + 2:]
            if (c_m, c_d) != (2, -1) or monomer != f"{prefix}AM{n}" or dimer != f"{prefix}AD{n}":
                raise ValueError(f"{din}: unexpected block {terms}")
            refs.setdefault(f"AD{n}", []).append(ref)
    entries = {}
    for n in ADIM6_SIZES:
        name = f"AD{n}"
        ref, check = refs[name]
        if abs(ref - check) > 5e-3:
            raise ValueError(f"ADIM6 {name}: {ADIM6_DIN} says {ref}, {ADIM6_DIN_CHECK} {check}")
        where = f"{ADIM6_DIR}/adim6_{name}.xyz"
        symbols, xyz, charge, mult = parse_xyz(git_show(git_dir, where), where)
        m_where = f"{ADIM6_DIR}/adim6_AM{n}.xyz"
        m_symbols, m_xyz, _, _ = parse_xyz(git_show(git_dir, m_where), m_where)
        k = len(symbols) // 2
        if formula(symbols[:k]) != f"C{n}H{2 * n + 2}" or symbols[:k] != symbols[k:]:
            raise ValueError(f"{where}: the halves are not two C{n}H{2 * n + 2}")
        monomer_sig = distance_signature(m_xyz)
        for part in (xyz[:k], xyz[k:]):  # each half is the free monomer (frozen monomers)
            if np.abs(distance_signature(part) - monomer_sig).max() > 1e-5:
                raise ValueError(f"{where}: a half differs from {m_where}")
        entries[name] = {"symbols": symbols, "xyz": xyz, "n_atoms_a": k, "Vref": -ref,
                         "charges": (0, 0), "mults": (mult, mult), "total_charge": charge,
                         "source": where[:-len(".xyz")]}
    return entries


def read_ssi(git_dir):
    """{name '001LEU-154LEU-1': entry} of the SSI dimers whose two residues are in ALIPHATIC,
    A's atoms first; and the number of SSI dimers in all."""
    refs = {}
    for terms, ref in read_din(git_show(git_dir, SSI_DIN), SSI_DIN):
        dimer = [n for n, c in terms.items() if c == 1]
        if len(dimer) != 1 or not dimer[0].endswith("-dimer"):
            raise ValueError(f"{SSI_DIN}: unexpected block {terms}")
        stem = dimer[0][:-len("-dimer")]
        if terms != {f"{stem}-dimer": 1, f"{stem}-monoA-unCP": -1, f"{stem}-monoB-unCP": -1}:
            raise ValueError(f"{SSI_DIN}: unexpected block {terms}")
        if stem in refs:
            raise ValueError(f"{SSI_DIN}: {stem} twice")
        refs[stem] = ref
    names = [f[:-len("-dimer.xyz")] for f in git_ls(git_dir, SSI_DIR) if f.endswith("-dimer.xyz")]
    if set(names) != set(refs):
        raise ValueError(f"{SSI_DIR} and {SSI_DIN} list different dimers")
    taken = []
    for stem in names:
        match = re.fullmatch(r"SSI-(\d{3})([A-Z]{3})-(\d{3})([A-Z]{3})-(\d+)", stem)
        if not match:
            raise ValueError(f"{SSI_DIR}/{stem}: unexpected file name")
        if match.group(2) in ALIPHATIC and match.group(4) in ALIPHATIC:
            taken.append(stem)
    paths = [f"{SSI_DIR}/{stem}-{part}.xyz" for stem in taken
             for part in ("dimer", "monoA-unCP", "monoB-unCP")]
    texts = git_show_many(git_dir, paths)
    entries = {}
    for stem in taken:
        where = f"{SSI_DIR}/{stem}-dimer.xyz"
        symbols, xyz, charge, mult = parse_xyz(texts[where], where)
        parts = [parse_xyz(texts[f"{SSI_DIR}/{stem}-{p}.xyz"], f"{stem}-{p}")
                 for p in ("monoA-unCP", "monoB-unCP")]
        k = len(parts[0][0])
        if symbols != parts[0][0] + parts[1][0]:
            raise ValueError(f"{where}: the atoms are not monoA's then monoB's")
        for (p_symbols, p_xyz, _, _), block in zip(parts, (xyz[:k], xyz[k:])):
            shift = block - p_xyz
            if np.abs(shift - shift.mean(axis=0)).max() > MONOMER_SHIFT_TOLERANCE_ANGSTROM:
                raise ValueError(f"{where}: a monomer file is not the dimer's atoms moved")
        if parts[0][2] + parts[1][2] != charge:
            raise ValueError(f"{where}: charge {charge}, monomers {parts[0][2]} + {parts[1][2]}")
        entries[stem[len("SSI-"):]] = {
            "symbols": symbols, "xyz": xyz, "n_atoms_a": k, "Vref": refs[stem],
            "charges": (parts[0][2], parts[1][2]), "mults": (parts[0][3], parts[1][3]),
            "total_charge": charge, "source": where[:-len(".xyz")]}
    return entries, len(names)


def exclusion(dimer_id, e, s66):
    """The reason a dimer is left out, or None."""
    k, symbols = e["n_atoms_a"], e["symbols"]
    (qa, qb), (ma, mb) = e["charges"], e["mults"]
    if dimer_id in LISTED_S66_COPIES:
        closest = s66_near_copies(Dimer(dimer_id, symbols, e["xyz"], k), s66, contact=np.inf)
        return (f"S66 near-copy (listed: {LISTED_S66_COPIES[dimer_id]})" + (
            f"; closest {closest[0][0]}, contact difference {closest[0][1]:.3f} A"
            if closest else ""))
    if qa != 0 or qb != 0 or e["total_charge"] != 0:
        return f"charged fragment (charges {qa}, {qb})"
    if not set(symbols) <= ALLOWED_ELEMENTS:
        return f"element beyond Ca: {sorted(set(symbols) - ALLOWED_ELEMENTS)}"
    if (ma, mb) != (1, 1) or electrons(symbols[:k], qa) % 2 or electrons(symbols[k:], qb) % 2:
        return f"open shell (multiplicities {ma}, {mb})"
    hits = s66_near_copies(Dimer(dimer_id, symbols, e["xyz"], k), s66)
    if hits:
        return f"near-copy of {hits[0][0]} (contact difference {hits[0][1]:.3f} A)"
    return None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("refdata", help="a refdata git directory (bare clone or .git)")
    parser.add_argument("--out", default=HERE, help="corpus folder (default: this script's folder)")
    parser.add_argument("--s66", default=os.path.join(HERE, "..", "s66", "dimers.csv"),
                        help="the S66 builder CSV whose dimers must stay unseen")
    args = parser.parse_args(argv)
    s66 = load_s66(args.s66)
    ssi, n_ssi = read_ssi(args.refdata)
    data = {"ADIM6": read_adim6(args.refdata), "SSI": ssi}

    rows, excluded = [], []
    for order, set_name in enumerate(SETS):
        for name, e in data[set_name].items():
            dimer_id = f"{set_name}-{name}"
            reason = exclusion(dimer_id, e, s66)
            if reason is not None:
                excluded.append({"id": dimer_id, "database": set_name, "reason": reason,
                                 "_key": (order, len(e["symbols"]), name)})
                continue
            rows.append({"id": dimer_id, "xyz": f"inputs/{set_name}/{name}.xyz",
                         "n_atoms_a": e["n_atoms_a"], "Vref": f"{e['Vref']:.4f}",
                         "charge_a": 0, "charge_b": 0, "spin_a": 0, "spin_b": 0,
                         "group": SAME_SYSTEM_AS.get(dimer_id, dimer_id), "_key": (order, len(e["symbols"]), name),
                         "_entry": e})
    rows.sort(key=lambda r: r["_key"])
    excluded.sort(key=lambda r: r["_key"])

    # SSI dimers with near-identical geometries share a group (the first one's, in row order)
    by_formulas = {}
    for r in rows:
        e = r["_entry"]
        if r["id"].startswith("SSI-"):
            k = e["n_atoms_a"]
            key = tuple(sorted((formula(e["symbols"][:k]), formula(e["symbols"][k:]))))
            by_formulas.setdefault(key, []).append(r)
    merged = []
    for members in by_formulas.values():
        sigs = [distance_signature(m["_entry"]["xyz"]) for m in members]
        for j, r in enumerate(members):
            for i in range(j):
                if (members[i]["group"] == members[i]["id"]
                        and np.sqrt(np.mean((sigs[i] - sigs[j]) ** 2))
                        < SAME_GEOMETRY_RMS_ANGSTROM):
                    r["group"] = members[i]["id"]
                    merged.append((r["id"], members[i]["id"]))
                    break

    write_set_outputs(args.out, SETS, rows, excluded,
                      lambda r: f"refdata:{r['_entry']['source']}")

    print(f"{len(rows)} dimers written, {len(excluded)} excluded "
          f"(SSI: {len(ssi)} aliphatic pairs of {n_ssi} dimers)")
    for set_name in SETS:
        mine = [r for r in rows if r["id"].startswith(set_name + "-")]
        sizes = [len(r["_entry"]["symbols"]) for r in mine]
        elements = sorted({s for r in mine for s in r["_entry"]["symbols"]},
                          key=ATOMIC_NUMBER.get)
        vref = [float(r["Vref"]) for r in mine]
        print(f"  {set_name:6s} {len(mine):4d} dimers, {min(sizes)}-{max(sizes)} atoms, "
              f"elements {' '.join(elements)}, Vref {min(vref):.3f} to {max(vref):.3f} kcal/mol")
    for x in excluded:
        print(f"  excluded {x['id']}: {x['reason']}")
    for dimer_id, group in merged:
        print(f"  {dimer_id} shares the group of {group} (near-identical geometry)")


if __name__ == "__main__":
    main()
