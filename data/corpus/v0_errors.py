"""The baseline's error per subset against Vref, in kcal/mol: V0 = HF/def2-SVP alone and, for
the dimers that have the D4 term (built with ``--dispersion d4``), V0 = HF + D4.

    python data/corpus/v0_errors.py            # a markdown table of the finished dimers

Reads each finished dimer's ``build/<id>/energies.json`` and prints, per subset and in all, the
number of dimers built out of those in dimers.csv and, for HF and for HF + D4, the mean signed
error (V0 - Vref: positive when the baseline underbinds), the MAE, the RMSE and the largest
|error|.
"""
import csv
import json
import os

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
HARTREE_TO_KCAL_MOL = 627.5094740631


def main():
    with open(os.path.join(HERE, "dimers.csv"), newline="") as fh:
        listed = [row["id"] for row in csv.DictReader(fh)]
    subsets = list(dict.fromkeys(i.split("-")[0] for i in listed))
    errors = {s: {"hf": [], "d4": []} for s in subsets}
    for dimer_id in listed:
        path = os.path.join(HERE, "build", dimer_id, "energies.json")
        if os.path.isfile(path):
            with open(path) as fh:
                record = json.load(fh)
            vref = record["meta"]["Vref"]
            v0_hf = (record["E_AB"] - record["E_A"] - record["E_B"]) * HARTREE_TO_KCAL_MOL
            e = errors[dimer_id.split("-")[0]]
            e["hf"].append(v0_hf - vref)
            if "E_disp_AB" in record:
                disp = (record["E_disp_AB"] - record["E_disp_A"] - record["E_disp_B"]) * \
                    HARTREE_TO_KCAL_MOL
                e["d4"].append(v0_hf + disp - vref)

    def cells(e):
        e = np.array(e)
        if len(e) == 0:
            return " | | | "
        return (f"{e.mean():+.2f} | {np.abs(e).mean():.2f} | {np.sqrt((e ** 2).mean()):.2f} | "
                f"{np.abs(e).max():.2f}")

    print("| subset | built | HF: mean | MAE | RMSE | max abs | HF + D4: mean | MAE | RMSE | "
          "max abs |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in subsets + ["all"]:
        if name == "all":
            e = {k: sum((errors[s][k] for s in subsets), []) for k in ("hf", "d4")}
            n_listed = len(listed)
        else:
            e, n_listed = errors[name], sum(i.split("-")[0] == name for i in listed)
        print(f"| {name} | {len(e['hf'])} of {n_listed} | {cells(e['hf'])} | {cells(e['d4'])} |")


if __name__ == "__main__":
    main()
