"""The baseline's error per subset: V0 (HF/def2-SVP, from build/) against Vref, in kcal/mol.

    python data/corpus/v0_errors.py            # a markdown table of the finished dimers

Reads each finished dimer's ``build/<id>/energies.json`` (its meta.xlsx row) and prints, per
subset and in all, the number of dimers built out of those in dimers.csv, the mean signed
error of V0 (V0 - Vref: positive when HF underbinds), its MAE, RMSE and largest |error|.
"""
import csv
import json
import os

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    with open(os.path.join(HERE, "dimers.csv"), newline="") as fh:
        listed = [row["id"] for row in csv.DictReader(fh)]
    subsets = list(dict.fromkeys(i.split("-")[0] for i in listed))
    errors = {s: [] for s in subsets}
    for dimer_id in listed:
        path = os.path.join(HERE, "build", dimer_id, "energies.json")
        if os.path.isfile(path):
            with open(path) as fh:
                meta = json.load(fh)["meta"]
            errors[dimer_id.split("-")[0]].append(meta["V0"] - meta["Vref"])
    print("| subset | built | V0 - Vref mean | MAE | RMSE | max abs |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in subsets + ["all"]:
        e = np.array(sum(errors.values(), []) if name == "all" else errors[name])
        n_listed = len(listed) if name == "all" else sum(i.split("-")[0] == name for i in listed)
        if len(e) == 0:
            print(f"| {name} | 0 of {n_listed} | | | | |")
            continue
        print(f"| {name} | {len(e)} of {n_listed} | {e.mean():+.2f} | {np.abs(e).mean():.2f} | "
              f"{np.sqrt((e ** 2).mean()):.2f} | {np.abs(e).max():.2f} |")


if __name__ == "__main__":
    main()
