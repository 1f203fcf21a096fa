"""S66 transfer of a model, side by side with what a chemist would run instead, on the S66
systems that have no near-copy in the training corpus.

    python delta_coupling.py --predict --root_dir data/s66/build \
        --checkpoint pretrained/ensemble.json
    python data/s66/transfer_report.py data/s66/build/predictions.csv [--out report.md]

For each S66 category (hydrogen-bonded, dispersion, mixed; ``group`` in ``dimers.csv``) and in
all, over the systems not in ``NEAR_COPIES``: the model's MAE, RMSE and largest |error|
(kcal/mol), and beside it the MAE of the baselines a user has without the model, HF alone and
HF + D4 (the builder's HF/def2-SVP interaction energy, ``V0_HF``, and that plus the D4
interaction dispersion energy, ``E_disp``: read from each dimer's ``energies.json`` when the
folder was built with ``--dispersion d4``, else computed here from the geometry with the
builder's own D4 function). With an ensemble's predictions (a ``Vref_std`` column), the
calibration: the share of dimers whose error is within 1 and 2 of the ensemble's std, and the
rank (Spearman) correlation of std and |error|.

``NEAR_COPIES``: the S66 systems the corpus holds in a nearby configuration (``data/corpus/
s66_overlap.py``: #1, #17, #24, #47) or as the same monomer pair in another configuration (#15,
#25, #48) (``data/corpus/README.md``, "S66 near-copies that stay in the corpus"). The report
refuses to run when ``data/corpus/s66_near_copies.csv`` names an S66 system outside that list:
the corpus has grown a new near-copy, and the list (and this test set) must be looked at again.
"""
import argparse
import json
import os
import sys

import numpy as np
import pandas as pd

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))
import build_dataset as builder  # noqa: E402

NEAR_COPIES = (1, 15, 17, 24, 25, 47, 48)  # S66 system numbers left out of the transfer figures
CATEGORIES = ("hydrogen-bonded", "dispersion", "mixed")


def check_near_copies(path):
    """Stop when the corpus's near-copy list names an S66 system outside ``NEAR_COPIES``."""
    table = pd.read_csv(path)
    found = {int(s) for s in table.loc[table["near_copy"] == 1, "s66"]}
    new = sorted(found - set(NEAR_COPIES))
    if new:
        sys.exit(f"error: {path} lists corpus near-copies of S66 systems {new}, which are not "
                 f"in NEAR_COPIES: look at them and extend the list before reporting transfer")


def baselines(folder, ids):
    """{id: (V0_HF, E_disp)} in kcal/mol from the builder's records in ``folder``."""
    params = None
    out = {}
    for dimer_id in ids:
        with open(os.path.join(folder, dimer_id, builder.FINISHED_FILE)) as fh:
            record = json.load(fh)
        if not all(k in record for k in builder.D4_KEYS):  # built without --dispersion d4
            params = params or builder.d4_parameters(record["level_of_theory"]["method"])
            symbols, pos, n_a = builder.pdb_dimer(os.path.join(folder, dimer_id, "A.pdb"),
                                                  os.path.join(folder, dimer_id, "B.pdb"))
            record.update(builder.d4_parts(symbols, pos, n_a, record.get("charge_a", 0),
                                           record.get("charge_b", 0), params))
        out[dimer_id] = (builder.interaction_kcal(record),
                         builder.interaction_kcal(record, builder.D4_KEYS))
    return out


def spearman(x, y):
    """Rank correlation (average ranks for ties)."""
    rx, ry = pd.Series(x).rank().to_numpy(), pd.Series(y).rank().to_numpy()
    return float(np.corrcoef(rx, ry)[0, 1])


def transfer_figures(predictions, folder, dimers_csv):
    """{category or "all": {n, mae, rmse, max, mae_hf, mae_hfd4}} (a category without rows
    left out) over the systems not in
    ``NEAR_COPIES``, "calibration" {n, within_1, within_2, mean_std, spearman} when the
    predictions have an ensemble's std, and "worst": the five largest errors."""
    pred = pd.read_csv(predictions)
    cats = pd.read_csv(dimers_csv).set_index("id")["group"]
    pred["number"] = pred["id"].str.replace("S66-", "", regex=False).astype(int)
    pred["category"] = cats.loc[pred["id"]].to_numpy()
    kept = pred[~pred["number"].isin(NEAR_COPIES)].copy()
    base = baselines(folder, kept["id"])
    kept["hf"] = [base[i][0] for i in kept["id"]]
    kept["hfd4"] = [base[i][0] + base[i][1] for i in kept["id"]]
    kept["error"] = kept["Vref_pred"] - kept["Vref"]
    out = {"n_all": len(pred)}
    for name in (*CATEGORIES, "all"):
        part = kept if name == "all" else kept[kept["category"] == name]
        if part.empty:
            continue
        e = part["error"].to_numpy()
        out[name] = {"n": len(part), "mae": float(np.abs(e).mean()),
                     "rmse": float(np.sqrt((e ** 2).mean())), "max": float(np.abs(e).max()),
                     "mae_hf": float((part["hf"] - part["Vref"]).abs().mean()),
                     "mae_hfd4": float((part["hfd4"] - part["Vref"]).abs().mean())}
    if "Vref_std" in kept.columns and kept["Vref_std"].notna().all():
        err, std = kept["error"].abs().to_numpy(), kept["Vref_std"].to_numpy()
        out["calibration"] = {"n": len(kept), "within_1": float(np.mean(err <= std)),
                              "within_2": float(np.mean(err <= 2 * std)),
                              "mean_std": float(std.mean()), "spearman": spearman(std, err)}
    worst = kept.reindex(kept["error"].abs().sort_values(ascending=False).index).head(5)
    out["worst"] = [(int(r.number), r.category, float(r.error)) for r in worst.itertuples()]
    return out


def format_report(figs, predictions):
    lines = [f"S66 transfer, {figs['all']['n']} of {figs['n_all']} systems (left out, "
             f"near-copies in the corpus: {', '.join(f'#{n}' for n in NEAR_COPIES)}); "
             f"kcal/mol; predictions {predictions}", "",
             "| S66 category | dimers | MAE model | RMSE | max | MAE HF | MAE HF + D4 |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name in (n for n in (*CATEGORIES, "all") if n in figs):
        f = figs[name]
        lines.append(f"| {name} | {f['n']} | {f['mae']:.2f} | {f['rmse']:.2f} | {f['max']:.2f} "
                     f"| {f['mae_hf']:.2f} | {f['mae_hfd4']:.2f} |")
    if "calibration" in figs:
        c = figs["calibration"]
        lines += ["", f"Ensemble calibration ({c['n']} dimers): |error| within 1 std "
                      f"{c['within_1']:.0%}, within 2 std {c['within_2']:.0%} (a normal error: "
                      f"68 %, 95 %); mean std {c['mean_std']:.2f}; rank correlation of std and "
                      f"|error| {c['spearman']:+.2f}"]
    lines += ["", "Largest errors: " + "; ".join(
        f"#{number} ({category}) {error:+.2f}" for number, category, error in figs["worst"])]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("predictions", nargs="?",
                   default=os.path.join(HERE, "build", "predictions.csv"))
    p.add_argument("--folder", default=os.path.join(HERE, "build"),
                   help="the built S66 folder (its <id>/energies.json records)")
    p.add_argument("--dimers", default=os.path.join(HERE, "dimers.csv"))
    p.add_argument("--near_copies", default=os.path.join(ROOT, "data", "corpus",
                                                          "s66_near_copies.csv"))
    p.add_argument("--out", default=None, help="also write the report to this file")
    args = p.parse_args(argv)
    check_near_copies(args.near_copies)
    text = format_report(transfer_figures(args.predictions, args.folder, args.dimers),
                         args.predictions)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
