"""Write the S66 transfer test set's inputs (XYZ files + dimers.csv) from psi4's S66 database.

S66 (66 neutral dimers at their equilibrium geometries) is kept out of the pretrained model's
corpus, and every corpus dimer that duplicates one of them (data/corpus/README.md), so that it
measures how the model does on dimers it has never seen. A one-off step like
``data/corpus/make_corpus_inputs.py``, whose helpers it uses; its outputs are committed::

    git clone https://github.com/psi4/psi4 /tmp/psi4
    pip install qcelemental
    python data/s66/make_s66_inputs.py --psi4 /tmp/psi4
    python tools/build_dataset.py data/s66/dimers.csv --out data/s66/build --dispersion d4
    python delta_coupling.py --predict --root_dir data/s66/build     # the pretrained model
"""
import argparse
import csv
import importlib
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "corpus"))
from make_corpus_inputs import fragments, import_qcdb, write_xyz  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--psi4", required=True, help="a psi4 source tree (git clone)")
    parser.add_argument("--out", default=HERE, help="output folder (default: this folder)")
    args = parser.parse_args(argv)
    import_qcdb(args.psi4)
    db = importlib.import_module("S66")
    category = {**{r: "hydrogen-bonded" for r in db.HB}, **{r: "dispersion" for r in db.DD},
                **{r: "mixed" for r in db.MX}}
    rows = []
    for rxn in db.HRXN:
        key = f"{db.dbse}-{rxn}"
        (sa, xa, qa, ma), (sb, xb, qb, mb) = fragments(db.GEOS[f"{key}-dimer"])
        if qa or qb:
            raise ValueError(f"{key}: charged fragment ({qa}, {qb}); S66 has none")
        rel = os.path.join("inputs", f"{rxn}.xyz")
        write_xyz(os.path.join(args.out, rel), sa + sb, [*xa, *xb],
                  f"n_atoms_a={len(sa)} source=S66:{rxn}")
        rows.append({"id": f"S66-{rxn}", "xyz": rel, "n_atoms_a": len(sa),
                     "Vref": f"{db.BIND[key]:.4f}", "charge_a": 0, "charge_b": 0,
                     "spin_a": ma - 1, "spin_b": mb - 1, "group": category[rxn]})
    with open(os.path.join(args.out, "dimers.csv"), "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"{len(rows)} dimers written to {os.path.join(args.out, 'dimers.csv')}")


if __name__ == "__main__":
    main()
