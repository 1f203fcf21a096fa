"""The pretrained model's accuracy per subset, from a --predict of the corpus itself.

    python delta_coupling.py --predict --root_dir data/corpus/build --checkpoint pretrained/ensemble.json
    python data/corpus/holdout_report.py [data/corpus/build/predictions.csv] [--split test]

The predictions CSV of the model's own training data has a ``split`` column (train, val or
test: whole groups, so a test curve was never trained on). For the rows of ``--split`` (test:
the grouped hold-out) this prints, per subset (the id's prefix) and in all, a markdown table of
MAE, RMSE and largest |error| in kcal/mol of V0 + dV and of V0 alone.

Any other folder's predictions work too, with ``--split all``: ``--match REGEX`` keeps the rows
whose id matches, ``--by group`` tabulates per group instead of per id prefix. The bundled
S22x5 rows that are not in the corpus (the two S66 duplicates' curves):

    python data/corpus/holdout_report.py S22X5_COPY/predictions.csv --split all --by group \
        --match "^(Uracil_dimer_stack|Benzene-water_complex)_"
"""
import argparse
import os
import re

import numpy as np
import pandas as pd

HERE = os.path.dirname(os.path.abspath(__file__))


def figures(errors):
    e = np.asarray(errors, dtype=float)
    return np.abs(e).mean(), np.sqrt((e ** 2).mean()), np.abs(e).max()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("csv", nargs="?", default=os.path.join(HERE, "build", "predictions.csv"))
    p.add_argument("--split", default="test", help="train, val, test or all")
    p.add_argument("--match", default=None, metavar="REGEX", help="only the ids matching it")
    p.add_argument("--by", default="subset", choices=("subset", "group"),
                   help="one line per subset (the id's prefix before '-') or per group")
    args = p.parse_args()
    table = pd.read_csv(args.csv)
    meta = pd.read_excel(os.path.join(os.path.dirname(os.path.abspath(args.csv)), "meta.xlsx"))
    if "group" not in meta:  # every row its own group
        meta = meta.assign(group=meta["id"])
    table = table.merge(meta[["id", "group"]], on="id", how="left")
    if args.split != "all":
        if "split" not in table or table["split"].isna().all():
            raise SystemExit(f"{args.csv} has no split column: predict the model's own training "
                             f"data (the corpus build folder) to get one")
        table = table[table["split"] == args.split]
    if args.match is not None:
        pattern = re.compile(args.match)
        table = table[[pattern.search(str(i)) is not None for i in table["id"]]]
    table = table.dropna(subset=["Vref", "Vref_pred"])
    if table.empty:
        raise SystemExit(f"{args.csv}: no row with Vref and a prediction is selected")
    table = table.assign(subset=table["id"].str.split("-").str[0] if args.by == "subset"
                         else table["group"].astype(str))
    print(f"| {args.by} ({args.split}) | dimers | groups | MAE V0+dV | RMSE | max | MAE V0 | RMSE | max |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    parts = [(name, part) for name, part in table.groupby("subset", sort=False)] + [("all", table)]
    for name, part in parts:
        model = figures(part["Vref_pred"] - part["Vref"])
        baseline = figures(part["V0"] - part["Vref"])
        groups = part["group"].nunique()
        print(f"| {name} | {len(part)} | {groups} | " + " | ".join(f"{v:.2f}" for v in model)
              + " | " + " | ".join(f"{v:.2f}" for v in baseline) + " |")


if __name__ == "__main__":
    main()
