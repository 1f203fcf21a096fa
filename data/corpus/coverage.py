"""What the corpus covers: the ground of the pretrained model's "Where to trust it".

    python data/corpus/coverage.py [data/corpus/build] [--out coverage.md]

Over the finished dimers of a built folder (``<id>/energies.json`` and the two PDBs), per subset
(the id's prefix before its first '-') and in all: dimers, elements, atoms per dimer, the
closest intermolecular A-B contact in Angstrom (range and the 5th, 50th and 95th percentiles)
and the reference energy Vref in kcal/mol (range); then, per element, how many dimers hold it
(and their share) and in which subsets. A model trained on the folder interpolates inside these
ranges; outside them its answer is an extrapolation.
"""
import argparse
import glob
import json
import os
import sys

import numpy as np
import pandas as pd

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))
import delta_coupling as dc  # noqa: E402
import build_dataset as builder  # noqa: E402


def dimer_rows(folder):
    """One dict per finished dimer: id, subset, elements, atoms, contact, Vref."""
    rows = []
    for path in sorted(glob.glob(os.path.join(folder, "*", "energies.json"))):
        with open(path) as fh:
            meta = json.load(fh)["meta"]
        symbols, pos, n_a = builder.pdb_dimer(os.path.join(folder, meta["pdb_a"]),
                                              os.path.join(folder, meta["pdb_b"]))
        rows.append({"id": meta["id"], "subset": str(meta["id"]).split("-")[0],
                     "elements": set(symbols), "atoms": len(symbols),
                     "contact": dc.closest_pair(pos[:n_a], pos[n_a:])[0], "Vref": meta["Vref"]})
    return pd.DataFrame(rows)


def element_order(symbols):
    return sorted(symbols, key=lambda s: dc.ELEMENT_TO_Z[s.upper()])


def coverage_table(table):
    lines = ["| subset | dimers | elements | atoms | closest contact, Angstrom: range "
             "(5th / 50th / 95th percentile) | Vref, kcal/mol |",
             "| --- | --- | --- | --- | --- | --- |"]
    parts = [(s, table[table["subset"] == s]) for s in sorted(table["subset"].unique())]
    for name, part in parts + [("all", table)]:
        elements = element_order(set().union(*part["elements"]))
        c = part["contact"].to_numpy()
        p5, p50, p95 = np.percentile(c, [5, 50, 95])
        lines.append(f"| {name} | {len(part)} | {' '.join(elements)} | {part['atoms'].min()}-"
                     f"{part['atoms'].max()} | {c.min():.2f}-{c.max():.2f} ({p5:.2f} / "
                     f"{p50:.2f} / {p95:.2f}) | {part['Vref'].min():.2f} to "
                     f"{part['Vref'].max():.2f} |")
    return "\n".join(lines)


def element_table(table):
    """Per element: the dimers that hold it (and their share), and in which subsets."""
    lines = ["| element | dimers with it | share | subsets |", "| --- | --- | --- | --- |"]
    for element in element_order(set().union(*table["elements"])):
        has = table["elements"].apply(lambda e: element in e)
        subsets = ", ".join(f"{s} {n}" for s, n in
                            table[has]["subset"].value_counts().sort_index().items())
        lines.append(f"| {element} | {int(has.sum())} | {has.mean():.1%} | {subsets} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", nargs="?", default=os.path.join(HERE, "build"))
    p.add_argument("--out", default=None, help="also write the table to this file")
    args = p.parse_args(argv)
    table = dimer_rows(args.folder)
    text = coverage_table(table) + "\n\n" + element_table(table)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
