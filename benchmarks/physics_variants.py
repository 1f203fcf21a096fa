"""The physics evidence: grouped cross-validation of the four variants HF / HF-D4 baseline x
dV switch off / on (docs/DESIGN.md, decision 25), on one data folder, for several seeds.

    python benchmarks/physics_variants.py prepare SRC OUT      # OUT/hf, OUT/hfd4, contacts.csv
    python benchmarks/physics_variants.py run OUT --seeds 42 43 --cv 5 --epochs 120
    python benchmarks/physics_variants.py report OUT [--by-subset]   # also writes OUT/report.txt
    python benchmarks/physics_variants.py selection OUT   # kept vs final weights: selection.txt

``prepare`` writes two meta.xlsx views of SRC's dimers (absolute paths to SRC's PDB and NPZ
files, nothing copied): ``hf`` with V0 = the SCF interaction energy and ``hfd4`` with V0 = that
+ E_disp (the DFT-D4 interaction dispersion energy: SRC's own ``E_disp`` where it was built with
``--dispersion d4``, else computed from the PDB geometry with the builder's function), each
with its level_of_theory.json, and ``contacts.csv`` (closest A-B distance and contact ratio,
the builder's PR definition, from the PDBs). SRC is a builder folder (its finished
``<id>/energies.json`` records are read, so a folder still being built works) or any folder
with meta.xlsx.

``run`` trains ``python delta_coupling.py --cv K --schedule anneal --epochs E --seed S`` for
every variant, switch and seed (``--dv_switch contact`` with the default distances), each in
its own folder ``OUT/runs/<variant>-<switch>[+<tag>]-s<seed>`` (a copy of the view's meta.xlsx), one
after the other with one torch thread; a finished run (its cv_metrics.json) is skipped, so the
same command continues. ``report`` reads every run's out-of-fold predictions: MAE per variant
(mean and spread over the seeds), per contact-ratio band and, with ``--by-subset``, per subset
(the id's prefix before its first '-').
"""
import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import torch
from torch_geometric.loader import DataLoader

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))
import delta_coupling as dc  # noqa: E402
import build_dataset as builder  # noqa: E402

VARIANTS = ("hf", "hfd4")
SWITCHES = ("off", "contact")
BANDS = ((0.0, 1.0, "contact ratio < 1.0"), (1.0, 1.5, "1.0-1.5"), (1.5, np.inf, "> 1.5"))


def source_rows(src):
    """Rows (dict: id, pdb_a, pdb_b, npz absolute, R_nm, theta_deg, V0_HF, E_disp or None,
    Vref, PR, group) of SRC's dimers."""
    records = sorted(glob.glob(os.path.join(src, "*", "energies.json")))
    rows = []
    if records:
        for path in records:
            with open(path) as fh:
                record = json.load(fh)
            meta = dict(record["meta"])
            e_disp = builder.interaction_kcal(record, builder.D4_KEYS) \
                if all(k in record for k in builder.D4_KEYS) else None
            meta.update(V0_HF=builder.interaction_kcal(record), E_disp=e_disp,
                        charge_a=record.get("charge_a", 0), charge_b=record.get("charge_b", 0))
            rows.append(meta)
    else:
        frame = pd.read_excel(os.path.join(src, "meta.xlsx"))
        for rec in frame.to_dict("records"):
            rec["V0_HF"] = rec.get("V0_HF", rec["V0"])
            rec["E_disp"] = rec.get("E_disp")
            rows.append(rec)
    for r in rows:
        for col in ("pdb_a", "pdb_b", "npz"):
            r[col] = os.path.abspath(os.path.join(src, r[col]))
        if r.get("group") is None or (isinstance(r.get("group"), float) and
                                      np.isnan(r["group"])):
            r["group"] = r["id"]
    return [r for r in rows if r.get("Vref") is not None and np.isfinite(r["Vref"])]


def sample_groups(rows, fraction, seed):
    """The rows of a seeded random ``fraction`` of each subset's groups (the subset: the id's
    prefix before its first '-'; at least one group of each), so a representative part of a
    corpus keeps every source in proportion and never splits a group."""
    by_subset = {}
    for r in rows:
        by_subset.setdefault(str(r["id"]).split("-")[0], set()).add(str(r["group"]))
    rng = np.random.default_rng(seed)
    keep = set()
    for subset, groups in sorted(by_subset.items()):
        groups = sorted(groups)
        n = max(1, round(fraction * len(groups)))
        keep.update(groups[i] for i in rng.permutation(len(groups))[:n])
    return [r for r in rows if str(r["group"]) in keep]


def prepare(src, out, fraction=None, sample_seed=0):
    rows = source_rows(src)
    if fraction is not None:
        n_all = len(rows)
        rows = sample_groups(rows, fraction, sample_seed)
        print(f"representative part: {len(rows)} of {n_all} dimers ({fraction:g} of each "
              f"subset's groups, sample seed {sample_seed})")
    params = builder.d4_parameters("hf")
    contacts = []
    for r in rows:
        symbols, pos, n_a = builder.pdb_dimer(r["pdb_a"], r["pdb_b"])
        if r["E_disp"] is None or not np.isfinite(r["E_disp"]):  # from the PDB geometry
            disp = builder.d4_parts(symbols, pos, n_a, r.get("charge_a", 0),
                                    r.get("charge_b", 0), params)
            r["E_disp"] = builder.interaction_kcal(disp, builder.D4_KEYS)
        contacts.append({"id": r["id"], "closest_angstrom": dc.closest_pair(pos[:n_a],
                                                                            pos[n_a:])[0],
                         "contact_ratio": builder.contact_ratio(symbols, pos, n_a)})
    level = dc.read_level_of_theory(src) or {
        "method": "hf", "basis": "def2-svp", "density_fit": True,
        "auxbasis": "def2-universal-jkfit", "counterpoise": False}
    for variant in VARIANTS:
        folder = os.path.join(out, variant)
        os.makedirs(folder, exist_ok=True)
        frame = pd.DataFrame([{"id": r["id"], "pdb_a": r["pdb_a"], "pdb_b": r["pdb_b"],
                               "npz": r["npz"], "R_nm": r["R_nm"], "theta_deg": r["theta_deg"],
                               "V0": r["V0_HF"] + (r["E_disp"] if variant == "hfd4" else 0.0),
                               "Vref": r["Vref"], "PR": r["PR"], "group": r["group"]}
                              for r in rows])
        frame.to_excel(os.path.join(folder, "meta.xlsx"), index=False)
        record = {k: level[k] for k in dc.LEVEL_OF_THEORY_KEYS if k != "dispersion"}
        record["dispersion"] = "d4" if variant == "hfd4" else "none"
        dc.atomic_write_json(record, os.path.join(folder, dc.LEVEL_OF_THEORY_FILE))
    pd.DataFrame(contacts).to_csv(os.path.join(out, "contacts.csv"), index=False)
    print(f"{len(rows)} dimers of {src} -> {out}/hf, {out}/hfd4, {out}/contacts.csv")


def run(out, seeds, k, epochs, extra, single_split=False, only=None, tag=None):
    for seed in seeds:
        for variant in VARIANTS:
            for switch in SWITCHES:
                if only and f"{variant}-{switch}" not in only:
                    continue
                name = f"{variant}-{switch}{'+' + tag if tag else ''}-s{seed}"
                folder = os.path.join(out, "runs", name)
                done = os.path.join(folder, "predictions.csv") if single_split else \
                    os.path.join(folder, "models", dc.CV_METRICS_FILE)
                if os.path.exists(done):
                    print(f"{name}: done before")
                    continue
                os.makedirs(folder, exist_ok=True)
                for f in ("meta.xlsx", dc.LEVEL_OF_THEORY_FILE):
                    shutil.copy(os.path.join(out, variant, f), folder)
                script = os.path.join(ROOT, "delta_coupling.py")
                cmds = [[sys.executable, script, "--root_dir", folder, "--schedule", "anneal",
                         "--epochs", str(epochs), "--seed", str(seed), "--dv_switch", switch,
                         "--device", "cpu", "--compile", "off", "--quiet", *extra]]
                if single_split:  # the grouped 80/10/10 split; then every row predicted
                    cmds.append([sys.executable, script, "--predict", "--checkpoint",
                                 os.path.join(folder, "models", dc.FINAL_CHECKPOINT),
                                 "--root_dir", folder, "--device", "cpu", "--quiet"])
                else:
                    cmds[0][4:4] = ["--cv", str(k)]
                t0, rc = time.time(), 0
                with open(os.path.join(folder, "cv.log"), "w") as log:
                    for cmd in cmds:
                        log.write("# " + " ".join(cmd) + "\n")
                        log.flush()
                        rc = rc or subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT,
                                                   env={**os.environ, "OMP_NUM_THREADS": "1"})
                print(f"{name}: exit {rc}, {time.time() - t0:.0f} s", flush=True)


def report(out, by_subset):
    contacts = pd.read_csv(os.path.join(out, "contacts.csv")).set_index("id")
    tables = {}
    for run_dir in sorted(glob.glob(os.path.join(out, "runs", "*"))):
        name = os.path.basename(run_dir)
        variant, switch, seed = name.rsplit("-", 2)
        cv = os.path.join(run_dir, "models", dc.CV_PREDICTIONS_FILE)
        single = os.path.join(run_dir, "predictions.csv")
        if os.path.exists(cv):  # out of fold: every row
            t = pd.read_csv(cv).dropna(subset=["error"])
        elif os.path.exists(single):  # one split: its test rows alone
            t = pd.read_csv(single).dropna(subset=["error"])
            t = t[t["split"] == "test"]
        else:
            continue
        t["ratio"] = contacts.loc[t["id"], "contact_ratio"].to_numpy()
        t["subset"] = t["id"].astype(str).str.split("-").str[0]
        tables.setdefault((variant, switch), []).append((seed, t))
    lines = [f"# {out}: MAE (kcal/mol) out of fold (--cv) or on the test split (one split), "
             f"mean over seeds (min-max); V0 MAE beside",
             "variant | switch | seeds | n | all | " +
             " | ".join(label for _, _, label in BANDS) + " | V0 all"]
    lines.append(" | ".join(["---"] * (5 + len(BANDS))))
    subsets = sorted({s for runs in tables.values() for _, t in runs for s in t["subset"]})
    sub_lines = ["", "variant | switch | " + " | ".join(subsets),
                 " | ".join(["---"] * (2 + len(subsets)))]

    def fmt(values):
        values = [v for v in values if np.isfinite(v)]
        if not values:
            return "-"
        return f"{np.mean(values):.3f} ({min(values):.3f}-{max(values):.3f})" \
            if len(values) > 1 else f"{values[0]:.3f}"

    for (variant, switch), runs in sorted(tables.items()):
        n = len(runs[0][1])
        cells = [fmt([t["error"].abs().mean() for _, t in runs])]
        for lo, hi, _ in BANDS:
            cells.append(fmt([t["error"][(t["ratio"] >= lo) & (t["ratio"] < hi)].abs().mean()
                              for _, t in runs]))
        v0 = runs[0][1]
        lines.append(f"{variant} | {switch} | {','.join(s for s, _ in runs)} | {n} | "
                     + " | ".join(cells) + f" | {(v0['V0'] - v0['Vref']).abs().mean():.3f}")
        sub_lines.append(f"{variant} | {switch} | " + " | ".join(
            fmt([t["error"][t["subset"] == s].abs().mean() for _, t in runs])
            for s in subsets))
    counts = runs[0][1] if tables else None
    if counts is not None:
        lines.append("rows per band: " + ", ".join(
            f"{label} {int(((counts['ratio'] >= lo) & (counts['ratio'] < hi)).sum())}"
            for lo, hi, label in BANDS))
    text = "\n".join(lines + (sub_lines if by_subset else []))
    print(text)
    with open(os.path.join(out, "report.txt"), "w") as fh:
        fh.write(text + "\n")


def kept_and_final(run_dir):
    """A CV run's out-of-fold predictions twice: with the weights each fold kept (the best
    epoch by the run's --monitor: the CV's own ``cv_predictions.csv``, and its kept epochs
    from ``cv_metrics.json``) and with each fold's weights after its last epoch (its resume
    state, written after every epoch: the fully annealed weights), predicted here on the
    fold's test rows. Returns {"kept": frame, "final": frame} (id, pred, true) and the kept
    epochs."""
    models = os.path.join(run_dir, "models")
    cv = pd.read_csv(os.path.join(models, dc.CV_PREDICTIONS_FILE))
    kept = cv.rename(columns={"Vref_pred": "pred", "Vref": "true"})[["id", "pred", "true"]]
    with open(os.path.join(models, dc.CV_METRICS_FILE)) as fh:
        epochs = [fold["best_epoch"] for fold in json.load(fh)["folds"]]
    dataset = dc.CachedDimerDataset(dc.load_cache(os.path.join(run_dir, dc.DEFAULT_CACHE_FILE)))
    index = {i: k for k, i in enumerate(dataset.ids)}
    final = []
    for fold_dir in sorted(glob.glob(os.path.join(models, "cv", "fold_*"))):
        model, ckpt = dc.load_checkpoint(os.path.join(fold_dir, dc.RESUME_CHECKPOINT))
        test = ckpt["split_ids"]["test"]
        loader = DataLoader(torch.utils.data.Subset(dataset, [index[i] for i in test]),
                            batch_size=dc.DEFAULT_BATCH_SIZE, shuffle=False)
        p = dc.predict_rows(model, loader, "cpu", None, False, print)
        final.append(pd.DataFrame({k: p[k] for k in ("id", "pred", "true")}))
    return {"kept": kept, "final": pd.concat(final, ignore_index=True)}, epochs


def selection(out, prefix):
    """Which weights a member should keep, by grouped CV: for the runs named ``prefix``
    (one variant and switch, several seeds, each with its own --monitor tag), the
    out-of-fold MAE with the kept weights (best epoch by the run's --monitor) and with the
    final weights, per seed and for the ensemble of the seeds (each row's out-of-fold
    predictions averaged over the seeds: every seed's folds are its own, so each prediction
    is still out of fold). Writes OUT/selection.txt."""
    runs = {}
    for run_dir in sorted(glob.glob(os.path.join(out, "runs", prefix + "*-s*"))):
        name = os.path.basename(run_dir)
        head, seed = name.rsplit("-s", 1)
        tag = head.split("+", 1)[1] if "+" in head else "mape"
        if not os.path.exists(os.path.join(run_dir, "models", dc.CV_METRICS_FILE)):
            continue
        frames, epochs = kept_and_final(run_dir)
        runs.setdefault(f"best epoch by val {tag.upper()}", []).append(
            (seed, frames["kept"], epochs))
        runs.setdefault(f"final weights (run monitored {tag.upper()})", []).append(
            (seed, frames["final"], None))
    lines = [f"# {out}, runs {prefix}*: out-of-fold MAE (kcal/mol) by the weights each fold "
             f"keeps; per seed, their mean, and the ensemble of the seeds",
             "weights | per seed | mean member | ensemble of the seeds | kept epochs "
             "(per fold, per seed)", "--- | --- | --- | --- | ---"]
    for rule, items in runs.items():
        maes = [(t["pred"] - t["true"]).abs().mean() for _, t, _ in items]
        joined = pd.concat([t.set_index("id")["pred"].rename(seed) for seed, t, _ in items],
                           axis=1).dropna()
        true = items[0][1].set_index("id")["true"].loc[joined.index]
        ens = (joined.mean(axis=1) - true).abs().mean()
        epochs = "; ".join(",".join(str(e) for e in ep) for _, _, ep in items if ep) or "last"
        lines.append(f"{rule} | " + ", ".join(f"s{seed} {m:.3f}" for (seed, _, _), m
                                              in zip(items, maes))
                     + f" | {np.mean(maes):.3f} | {ens:.3f} (n {len(joined)}) | {epochs}")
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(out, "selection.txt"), "w") as fh:
        fh.write(text + "\n")


def collect(out, dest):
    """Copy what the report rests on into ``dest`` (a folder under benchmarks/): report.txt,
    contacts.csv, selection.txt and run.log where they exist and, per run, its predictions, its
    metrics and the log's commands and tables."""
    os.makedirs(dest, exist_ok=True)
    for name in ("report.txt", "contacts.csv", "selection.txt", "run.log"):
        if os.path.exists(os.path.join(out, name)):
            shutil.copy(os.path.join(out, name), dest)
    for run_dir in sorted(glob.glob(os.path.join(out, "runs", "*"))):
        name = os.path.basename(run_dir)
        target = os.path.join(dest, name)
        os.makedirs(target, exist_ok=True)
        for rel in (os.path.join("models", dc.CV_PREDICTIONS_FILE),
                    os.path.join("models", dc.CV_METRICS_FILE), "predictions.csv",
                    "predictions_metrics.json", os.path.join("models", dc.METRICS_FILE)):
            if os.path.exists(os.path.join(run_dir, rel)):
                shutil.copy(os.path.join(run_dir, rel), target)
        with open(os.path.join(run_dir, "cv.log")) as fh:  # commands, splits, final tables
            keep = [ln for ln in fh if not ln.startswith(("epoch ", "saved ", "loaded "))]
        with open(os.path.join(target, "log_summary.txt"), "w") as fh:
            fh.writelines(keep)
    print(f"copied {out} -> {dest}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("prepare")
    a.add_argument("src")
    a.add_argument("out")
    a.add_argument("--fraction", type=float, default=None,
                   help="keep a seeded random fraction of each subset's groups")
    a.add_argument("--sample-seed", type=int, default=0)
    b = sub.add_parser("run")
    b.add_argument("out")
    b.add_argument("--seeds", type=int, nargs="+", default=[42, 43])
    b.add_argument("--cv", type=int, default=5)
    b.add_argument("--epochs", type=int, default=120)
    b.add_argument("--single-split", action="store_true",
                   help="one grouped 80/10/10 split per seed instead of --cv (its test rows)")
    b.add_argument("--only", nargs="+", default=None, metavar="VARIANT-SWITCH",
                   help="only these combinations, e.g. hf-off hfd4-contact")
    b.add_argument("--tag", default=None,
                   help="runs named VARIANT-SWITCH+TAG-sSEED (a second set with other extra "
                        "options, e.g. --tag mae -- --monitor mae); reported as their own rows")
    c = sub.add_parser("report")
    c.add_argument("out")
    c.add_argument("--by-subset", action="store_true")
    e = sub.add_parser("selection")
    e.add_argument("out")
    e.add_argument("--prefix", default="hfd4-contact",
                   help="the runs to compare: VARIANT-SWITCH (with any +TAG), all seeds")
    d = sub.add_parser("collect")
    d.add_argument("out")
    d.add_argument("dest")
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []  # after "--": more delta_coupling.py options for run (argparse would take them
    if "--" in argv:  # for options of its own, or match an empty positional before them)
        argv, extra = argv[:argv.index("--")], argv[argv.index("--") + 1:]
    args = p.parse_args(argv)
    if args.cmd == "prepare":
        prepare(args.src, args.out, args.fraction, args.sample_seed)
    elif args.cmd == "selection":
        selection(args.out, args.prefix)
    elif args.cmd == "collect":
        collect(args.out, args.dest)
    elif args.cmd == "run":
        run(args.out, args.seeds, args.cv, args.epochs, extra, args.single_split,
            args.only, args.tag)
    else:
        report(args.out, args.by_subset)


if __name__ == "__main__":
    main()
