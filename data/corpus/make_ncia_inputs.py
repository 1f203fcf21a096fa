"""Append NCIAtlas dimers (D1200, D442x10) to the corpus inputs (XYZ files + dimers.csv).

A one-off preparation step like ``make_corpus_inputs.py``; its outputs are committed. The
NCIAtlas repository (J. Rezac et al., https://github.com/Honza-R/NCIAtlas) holds CCSD(T)/CBS
benchmark sets of neutral dimers as XYZ files whose comment line carries everything::

    charge=0 charge_a=0 charge_b=0 selection_a=1-6 selection_b=7-18 scaling=1.00
    benchmark_Eint=-2.253 benchmark_unit=kcal/mol group=HBCNO

(``selection_a``/``b``: 1-based atom ranges of the monomers; ``scaling``: the intermolecular
distance relative to equilibrium; ``benchmark_Eint``: the reference, negative = bound). No
multiplicity is given: the sets are closed-shell singlets (the Cuby dataset definitions say
multiplicity 1), checked here by the electron count. To reproduce::

    git clone --bare https://github.com/Honza-R/NCIAtlas /tmp/NCIAtlas.git
    python data/corpus/make_ncia_inputs.py /tmp/NCIAtlas.git

The committed inputs were made from NCIAtlas commit 9fa8296 (2024-01-09; tag v1.0.0 is older).
Cite J. Rezac, Phys. Chem. Chem. Phys. 24, 14780 (2022) (D1200 and D442x10). That commit has
no licence file; the author has since said (issue #5, January 2025) that he added CC-BY.

It reads the geometries with ``git show`` (a bare or an ordinary clone both work), writes
``inputs/D1200/<system>.xyz`` and ``inputs/D442x10/<system>_<scaling>.xyz`` and rewrites its own
rows of ``dimers.csv`` and ``excluded.csv`` (ids ``D1200-...``, ``D442x10-...``): where they
already are, or after the last row the first time; every other line stays byte-identical. So a
second run gives the same files. The rows are in build order, most value per CPU hour first:

1. D1200 dimers with an alkane or cycloalkane of 4 or more carbons (the alkane complexes are the
   pretrained model's weak spot: the corpus had almost none), smallest first;
2. the other D1200 dimers, smallest first;
3. the D442x10 curves (0.80-2.00 x R_eq, 10 points) of the systems in 1, then of the others,
   smallest system first, a curve's points together. Their 1.00 points are D1200's dimers
   (checked atom by atom) and are left out as duplicates.

``group`` is the system (``NCIA-1.06.52``), shared by a D1200 dimer and its D442x10 curve.
Left out, with the reason in ``excluded.csv``: charged or open-shell monomers, elements beyond
Ca (Br, I, Kr, Xe), the S66 near-copies (the listed ones below and any that
``s66_overlap.s66_near_copies`` finds), each with its whole D442x10 curve.
"""
import argparse
import csv
import io
import os
import re
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from make_corpus_inputs import ALLOWED_ELEMENTS, write_xyz  # noqa: E402
from s66_overlap import Dimer, load_s66, s66_near_copies  # noqa: E402

SETS = ("D1200", "D442x10")  # the NCIAtlas sets taken, as named in ids and folders
SOURCE_DIR = {name: f"geometries/NCIA_{name}" for name in SETS}
NAMES_TABLE = {name: f"tables/NCIA_{name}/NCIA_{name}_system_names.txt" for name in SETS}
BENCHMARK_TABLE = {name: f"tables/NCIA_{name}/NCIA_{name}_benchmark.txt" for name in SETS}
# S66 near-copies known beforehand (the S66 transfer set must stay unseen); more found by geometry
LISTED_S66_COPIES = ("1.06.02", "1.06.24", "1.06.36", "1.06.44", "1.06.49", "1.06.52",
                     "1.06.55", "1.06.56")
# monomer names (tables/*_system_names.txt) of the alkanes and cycloalkanes with >= 4 carbons
LARGE_ALKANES = ("butane", "isopentane", "neopentane", "pentane", "23dimethylbutane", "neohexane",
                 "hexane", "cyclopentane", "cyclohexane")
DUPLICATE_TOLERANCE_ANGSTROM = 1e-6  # a D442x10 1.00 point is D1200's dimer to this precision
ATOMIC_NUMBER = {s: z for z, s in enumerate(
    "H He Li Be B C N O F Ne Na Mg Al Si P S Cl Ar K Ca Sc Ti V Cr Mn Fe Co Ni Cu Zn Ga Ge As Se "
    "Br Kr Rb Sr Y Zr Nb Mo Tc Ru Rh Pd Ag Cd In Sn Sb Te I Xe".split(), start=1)}


def git_show(git_dir, path):
    return subprocess.run(["git", "--git-dir", git_dir, "show", f"HEAD:{path}"], check=True,
                          capture_output=True, text=True).stdout


def git_ls(git_dir, folder):
    out = subprocess.run(["git", "--git-dir", git_dir, "ls-tree", "--name-only", f"HEAD:{folder}"],
                         check=True, capture_output=True, text=True).stdout
    return sorted(name for name in out.split() if name.endswith(".xyz"))


def parse_selection(text):
    """1-based atom selection '1-6', '7' or '1-3,5' -> 0-based indices."""
    out = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out += range(int(lo) - 1, int(hi or lo))
    return out


def parse_ncia_xyz(text, where):
    """{symbols, xyz (n, 3), n_atoms_a, header {key: value}} of an NCIAtlas XYZ, A's atoms first."""
    lines = text.splitlines()
    n = int(lines[0].split()[0])
    header = dict(token.split("=", 1) for token in lines[1].split())
    symbols, xyz = [], []
    for line in lines[2:2 + n]:
        fields = line.split()
        symbols.append(fields[0].capitalize())
        xyz.append([float(v) for v in fields[1:4]])
    if len(symbols) != n:
        raise ValueError(f"{where}: {len(symbols)} atoms, header says {n}")
    sel_a, sel_b = parse_selection(header["selection_a"]), parse_selection(header["selection_b"])
    if sorted(sel_a + sel_b) != list(range(n)):
        raise ValueError(f"{where}: selections {header['selection_a']}, "
                         f"{header['selection_b']} do not split {n} atoms")
    if header.get("benchmark_unit") != "kcal/mol":
        raise ValueError(f"{where}: benchmark_unit {header.get('benchmark_unit')}")
    order = sel_a + sel_b  # monomer A's atoms first (in the files they already are)
    return {"symbols": [symbols[i] for i in order], "xyz": np.array(xyz)[order],
            "n_atoms_a": len(sel_a), "header": header}


def read_table(git_dir, path):
    """{system: second column} of a tab-separated NCIAtlas table (comment and header skipped)."""
    out = {}
    for line in git_show(git_dir, path).splitlines():
        fields = line.split("\t")
        if line.startswith("#") or len(fields) < 2 or fields[0] == "system":
            continue
        out[fields[0]] = fields[1]
    return out


def electrons(symbols, charge):
    return sum(ATOMIC_NUMBER[s] for s in symbols) - charge


def rewrite_block(path, lines, is_ours):
    """Replace the lines of ``path`` that ``is_ours(line)`` by ``lines`` (where the first of
    them was, else at the end); every other line is kept byte-identical, header included."""
    with open(path, newline="", encoding="utf-8") as fh:
        old = fh.read().splitlines(keepends=True)
    eol = "\r\n" if old[0].endswith("\r\n") else "\n"
    if not old[-1].endswith(("\n", "\r")):
        old[-1] += eol
    ours = [i for i, line in enumerate(old[1:], start=1) if is_ours(line)]
    at = ours[0] if ours else len(old)
    kept = [line for i, line in enumerate(old) if i not in set(ours)]
    at -= sum(i < at for i in ours)
    new = kept[:at] + [line + eol for line in lines] + kept[at:]
    with open(path, "w", newline="", encoding="utf-8") as fh:
        fh.write("".join(new))


def csv_lines(records, fields):
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writerows(records)
    return buf.getvalue().splitlines()



DIMER_FIELDS = ["id", "xyz", "n_atoms_a", "Vref", "charge_a", "charge_b", "spin_a", "spin_b",
                "group"]  # the columns of dimers.csv
EXCLUDED_FIELDS = ["id", "database", "reason"]  # the columns of excluded.csv


def write_set_outputs(out, sets, rows, excluded, source):
    """Write what a preparation script owns: one XYZ file per row in ``inputs/<set>/`` (its
    comment line ``n_atoms_a=... source=<source(row)>``; a set's files that no row names are
    removed), and the rows of ``sets`` in ``dimers.csv`` and ``excluded.csv`` (``rewrite_block``:
    every other line stays byte-identical). ``rows`` carry their ``_entry`` (symbols, xyz,
    n_atoms_a)."""
    for set_name in sets:  # the XYZ files: exactly one per row of the set
        folder = os.path.join(out, "inputs", set_name)
        wanted = {os.path.basename(r["xyz"]) for r in rows if r["id"].startswith(set_name + "-")}
        if os.path.isdir(folder):
            for fname in sorted(os.listdir(folder)):
                if fname.endswith(".xyz") and fname not in wanted:
                    os.remove(os.path.join(folder, fname))
    for r in rows:
        e = r["_entry"]
        write_xyz(os.path.join(out, r["xyz"]), e["symbols"], e["xyz"],
                  f"n_atoms_a={e['n_atoms_a']} source={source(r)}")

    def ours(line):
        return line.split(",", 1)[0].split("-", 1)[0] in sets

    rewrite_block(os.path.join(out, "dimers.csv"),
                  csv_lines([{f: r[f] for f in DIMER_FIELDS} for r in rows], DIMER_FIELDS), ours)
    rewrite_block(os.path.join(out, "excluded.csv"),
                  csv_lines([{f: x[f] for f in EXCLUDED_FIELDS} for x in excluded],
                            EXCLUDED_FIELDS), ours)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ncia", help="an NCIAtlas git directory (bare clone or .git)")
    parser.add_argument("--out", default=HERE, help="corpus folder (default: this script's folder)")
    parser.add_argument("--s66", default=os.path.join(HERE, "..", "s66", "dimers.csv"),
                        help="the S66 builder CSV whose dimers must stay unseen")
    args = parser.parse_args(argv)
    s66 = load_s66(args.s66)

    # read both sets: {set: {name: entry}}
    data = {}
    for set_name in SETS:
        names = read_table(args.ncia, NAMES_TABLE[set_name])
        bench = read_table(args.ncia, BENCHMARK_TABLE[set_name])
        entries = {}
        for fname in git_ls(args.ncia, SOURCE_DIR[set_name]):
            name = fname[:-len(".xyz")]
            if not re.fullmatch(r"\d+\.\d+\.\d+_\d{3}", name):
                raise ValueError(f"{set_name}/{fname}: unexpected file name")
            entry = parse_ncia_xyz(git_show(args.ncia, f"{SOURCE_DIR[set_name]}/{fname}"),
                                   f"{set_name}/{fname}")
            header = entry["header"]
            entry["system"], entry["point"] = name.split("_")
            entry["Vref"] = float(header["benchmark_Eint"])
            if name in bench and abs(float(bench[name]) - entry["Vref"]) > 5e-4:
                raise ValueError(f"{set_name}/{name}: benchmark_Eint {entry['Vref']} but the "
                                 f"table says {bench[name]}")
            if float(header["scaling"]) != int(entry["point"]) / 100:
                raise ValueError(f"{set_name}/{name}: scaling {header['scaling']}")
            entry["monomers"] = names[name].split(" ... ")
            entries[name] = entry
        data[set_name] = entries

    # systems to drop whole (D1200 dimer and D442x10 curve): the S66 near-copies
    drop_system = {}
    for name, e in data["D1200"].items():
        dimer = Dimer(name, e["symbols"], e["xyz"], e["n_atoms_a"])
        hits = s66_near_copies(dimer, s66)
        if hits:
            drop_system[e["system"]] = (f"near-copy of {hits[0][0]} (contact difference "
                                        f"{hits[0][1]:.3f} A)")
        if e["system"] in LISTED_S66_COPIES:
            closest = s66_near_copies(dimer, s66, contact=np.inf)  # the same monomer pair
            drop_system[e["system"]] = ("S66 near-copy (listed)" + (
                f"; closest {closest[0][0]}, contact difference {closest[0][1]:.3f} A"
                if closest else ""))

    rows, excluded = [], []
    for set_name in SETS:
        for name, e in sorted(data[set_name].items()):
            dimer_id = f"{set_name}-{name}"
            k, symbols, header = e["n_atoms_a"], e["symbols"], e["header"]
            qa, qb = int(header["charge_a"]), int(header["charge_b"])
            reason = None
            if set_name == "D442x10" and e["point"] == "100":
                twin = data["D1200"].get(name)
                if twin is None:
                    raise ValueError(f"{dimer_id}: no D1200 dimer {name}")
                same = (twin["symbols"] == symbols and twin["n_atoms_a"] == k
                        and np.abs(twin["xyz"] - e["xyz"]).max() <= DUPLICATE_TOLERANCE_ANGSTROM)
                if not same:
                    raise ValueError(f"{dimer_id}: the 1.00 point is not D1200's geometry")
                reason = f"duplicate of D1200-{name} (same geometry)"
            elif e["system"] in drop_system:
                reason = drop_system[e["system"]]
            elif qa != 0 or qb != 0 or int(header.get("charge", 0)) != 0:
                reason = f"charged fragment (charges {qa}, {qb})"
            elif not set(symbols) <= ALLOWED_ELEMENTS:
                reason = f"element beyond Ca: {sorted(set(symbols) - ALLOWED_ELEMENTS)}"
            elif electrons(symbols[:k], qa) % 2 or electrons(symbols[k:], qb) % 2:
                reason = "open shell (odd electron count)"
            if reason is not None:
                excluded.append({"id": dimer_id, "database": set_name, "reason": reason})
                continue
            alkane = any(m in LARGE_ALKANES for m in e["monomers"])
            rows.append({"id": dimer_id, "xyz": f"inputs/{set_name}/{name}.xyz", "n_atoms_a": k,
                         "Vref": f"{e['Vref']:.4f}", "charge_a": qa, "charge_b": qb,
                         "spin_a": 0, "spin_b": 0, "group": f"NCIA-{e['system']}",
                         "_key": (set_name == "D442x10", not alkane, len(symbols), e["system"],
                                  e["point"]),
                         "_entry": e})

    rows.sort(key=lambda r: r["_key"])
    write_set_outputs(args.out, SETS, rows, excluded, lambda r: (
        f"NCIAtlas:NCIA_{r['id'].split('-', 1)[0]}/{os.path.basename(r['xyz'])[:-4]}"))

    print(f"{len(rows)} dimers written, {len(excluded)} excluded")
    buckets = {}
    for r in rows:
        label = (("D442x10 curves, " if r["_key"][0] else "D1200, ")
                 + ("alkane >= C4" if not r["_key"][1] else "other"))
        buckets[label] = buckets.get(label, 0) + 1
    for label, n in buckets.items():
        print(f"  {label:28s} {n:5d}")
    reasons = {}
    for x in excluded:
        key = (x["database"], re.split(r"[:;(]| #| of D1200", x["reason"])[0].strip())
        reasons[key] = reasons.get(key, 0) + 1
    for (set_name, reason), n in sorted(reasons.items()):
        print(f"  excluded {set_name:8s} {n:5d}  {reason}")
    sizes = [len(r["_entry"]["symbols"]) for r in rows]
    elements = sorted({s for r in rows for s in r["_entry"]["symbols"]}, key=ATOMIC_NUMBER.get)
    print(f"  atoms per dimer {min(sizes)}-{max(sizes)}; elements {' '.join(elements)}")
    for system, reason in sorted(drop_system.items()):
        print(f"  dropped system {system}: {reason}")


if __name__ == "__main__":
    main()
