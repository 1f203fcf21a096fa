"""Training schedules compared by grouped K-fold cross-validation, from recorded trajectories.

A schedule here is how a run of the same model and loss is trained and which epoch's weights
it keeps: the OneCycle length (``--epochs``), when early stopping may fire (``--patience``,
counted from the first epoch or only once the learning rate has come down), the validation
figure that picks the best epoch (``--monitor``), and whether that figure and the kept weights
are those of an exponential moving average of the weights (``--ema``).

Only the OneCycle length changes what is trained. So ``run`` trains each fold once per
OneCycle length and seed, through ``delta_coupling.train_one`` itself (the ``--cv`` fold run,
same split), and after every epoch also records, with the RNG state set aside so the training
is the one ``--cv`` would do: the validation MAPE and MAE and the test MAE and RMSE of the
trained weights and of each EMA decay's averaged weights, the learning rate, and the seconds
the run had taken without these extra passes. ``report`` then applies every selection and
early-stopping rule to the recorded epochs: each fold's kept epoch is the first with the
lowest monitored figure up to the epoch the rule stops at; its test MAE is that fold's figure,
and the wall time is the run's up to that epoch. A rule is only reported for a trajectory
that ran at least as long as the rule would have.

    python benchmarks/schedules.py run --root_dir /tmp/s22x5 --epochs 300 --patience 100000 \\
        --seed 42 --ema 0.99 0.999 --out benchmarks/schedules/s22x5_e300_s42.json --compile inductor
    python benchmarks/schedules.py report benchmarks/schedules/s22x5_*.json

``subset --out DIR A24 HBC6`` makes a second data set from the finished dimers of the corpus
(data/corpus/build).

The folds always come from ``--fold_seed`` (42), so runs of other seeds (other initial
weights and augmentations) train on the same folds: their spread is the seed noise.
Options after the known ones go to ``delta_coupling.py`` unchanged (e.g. ``--compile``).
"""
import argparse
import gzip
import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import delta_coupling as dc  # noqa: E402


# ----------------------------------------------------------------------------- run
def run(args, extra):
    # the design's early stopping (stale epochs from the first) on the trained weights' val
    # MAPE: with a large --patience the whole OneCycle is recorded
    argv = ["--root_dir", args.root_dir, "--cv", str(args.cv), "--schedule", "spec", "--ema", "0",
            "--epochs", str(args.epochs), "--patience", str(args.patience), "--seed",
            str(args.seed), "--quiet", *extra]
    cv_args, _ = dc.parse_main_args(argv)
    rows = dc.read_meta(args.root_dir)
    folds = dc.make_cv_folds(rows, args.cv, args.fold_seed)
    if args.only_fold is not None:
        return run_fold(args, cv_args, folds)
    dc.prepare_cache(cv_args, *dc.check_data_or_exit(cv_args))  # once, before the folds
    todo, procs, parts = list(range(args.cv)), [], []
    while todo or procs:
        while todo and len(procs) < args.parallel:
            f = todo.pop(0)
            cmd = [sys.executable, os.path.abspath(__file__), "run", "--only_fold", str(f)]
            cmd += sys.argv[2:]
            log = open(f"{args.out}.fold{f}.log", "w")
            procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log, f))
        time.sleep(2)
        for item in list(procs):
            proc, log, f = item
            if proc.poll() is not None:
                log.close()
                procs.remove(item)
                if proc.returncode:
                    raise SystemExit(f"fold {f} failed; see {log.name}")
    for f in range(args.cv):
        with open(f"{args.out}.fold{f}.json") as fh:
            parts.append(json.load(fh))
    record = {"root_dir": args.root_dir, "argv": argv, "fold_seed": args.fold_seed,
              "ema": args.ema, "commit": git_commit(), "folds": parts}
    dc.atomic_write_json(record, args.out)
    for f in range(args.cv):
        os.remove(f"{args.out}.fold{f}.json")
    print(f"wrote {args.out}")


class EMAs:
    """Several ``dc.WeightsEMA`` updated together (run_epoch's ``ema``)."""

    def __init__(self, model, decays):
        self.items = {f"ema{d:g}": dc.WeightsEMA(model, d) for d in decays}

    def update(self):
        for ema in self.items.values():
            ema.update()


def run_fold(args, cv_args, folds):
    f = args.only_fold
    torch.set_num_threads(args.threads)
    epochs, extra_seconds, emas, test_loaders = [], [0.0], {}, {}
    real_run_epoch, real_end_of_epoch = dc.run_epoch, dc.end_of_epoch

    def run_epoch(model, loader, device, optimizer=None, *a, **kw):
        if optimizer is not None and args.ema:
            if "all" not in emas:  # before the first step: the averages start at the init
                emas["all"] = EMAs(model, args.ema)
            kw["ema"] = emas["all"]
        return real_run_epoch(model, loader, device, optimizer, *a, **kw)

    def end_of_epoch(run, model, tools, state, train_result, val_result, seconds):
        real_end_of_epoch(run, model, tools, state, train_result, val_result, seconds)
        t0, extra_before = time.time(), extra_seconds[0]
        if "test" not in test_loaders:  # the fold's test rows, unaugmented, made once
            test_loaders["test"] = dc.DataLoader(
                torch.utils.data.Subset(run.eval_ds, run.split_idx["test"]), shuffle=False,
                **run.loader_kw)
        test_loader = test_loaders["test"]

        def figures(r):
            return {"mape": r.mape, "mae": r.mae, "rmse": r.rmse, "skipped": r.n_skipped}

        def evaluate(loader):
            with torch.no_grad():
                return figures(real_run_epoch(model, loader, run.device,
                                              amp_dtype=run.amp_dtype, **run.failed_batches))

        with torch.random.fork_rng():  # the training's random draws stay the --cv run's
            val = {"raw": figures(val_result)}
            test = {"raw": evaluate(test_loader)}
            for name, ema in (emas["all"].items.items() if emas else ()):
                with ema.applied():
                    val[name], test[name] = evaluate(run.val_loader), evaluate(test_loader)
        extra_seconds[0] += time.time() - t0
        epochs.append({"epoch": state.epoch, "lr": tools.optimizer.param_groups[0]["lr"],
                       "train_loss": train_result.loss, "seconds": seconds - extra_before,
                       "val": val, "test": test})

    dc.run_epoch, dc.end_of_epoch = run_epoch, end_of_epoch
    device = dc.setup_distributed(cv_args.device)
    t_start = time.time()
    summary = dc.train_one(argparse.Namespace(**{**vars(cv_args), "fold": f}), device, None,
                           folds[f])
    test = summary["final_metrics"]["test"]["model"]
    dc.atomic_write_json({"fold": f, "rule": folds[f][3], "n_train": len(folds[f][0]),
                          "n_val": len(folds[f][1]), "n_test": len(folds[f][2]),
                          "as_run": {"best_epoch": summary["best_epoch"], "test_mae": test["mae"],
                                     "test_rmse": test["rmse"],
                                     "last_epoch": len(summary["history"])},
                          "total_seconds": time.time() - t_start,
                          "extra_seconds": extra_seconds[0], "epochs": epochs},
                         f"{args.out}.fold{f}.json")


def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=os.path.dirname(os.path.abspath(__file__)),
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


# ----------------------------------------------------------------------------- report
def stop_epoch(epochs, monitor_series, patience, count_from):
    """(epoch, True) where early stopping fires (``TrainingProgress.update``'s rule: stale
    epochs after the best, counted only from epoch ``count_from`` on), else (last epoch,
    False)."""
    best, stale = math.inf, 0
    for rec, value in zip(epochs, monitor_series):
        if value < best:
            best, stale = value, 0
        elif rec["epoch"] >= count_from:
            stale += 1
        if stale >= patience:
            return rec["epoch"], True
    return epochs[-1]["epoch"], False


def lr_down_epoch(epochs, fraction):
    """The first epoch after the peak whose learning rate is at most ``fraction`` of it."""
    peak = max(range(len(epochs)), key=lambda i: epochs[i]["lr"])
    for rec in epochs[peak:]:
        if rec["lr"] <= fraction * epochs[peak]["lr"]:
            return rec["epoch"]
    return epochs[-1]["epoch"] + 1


def apply_rule(fold, weights, monitor, patience, count_from):
    """(kept epoch, its test MAE, its test RMSE, seconds to the stop, stop epoch), or None when
    the recorded trajectory ended before this rule would stop."""
    epochs = fold["epochs"]
    series = [e["val"][weights][monitor] for e in epochs]
    stop, fired = stop_epoch(epochs, series, patience, count_from)
    if not fired and stop < fold["planned_epochs"]:
        return None  # the recorded run stopped early; this rule would have gone on
    upto = [i for i, e in enumerate(epochs) if e["epoch"] <= stop]
    best = min(upto, key=lambda i: (series[i], i))
    t = epochs[best]["test"][weights]
    return epochs[best]["epoch"], t["mae"], t["rmse"], epochs[upto[-1]]["seconds"], stop


def report(paths, patiences, fractions):
    rows = []
    for path in paths:
        with (gzip.open(path, "rt") if path.endswith(".gz") else open(path)) as fh:
            rec = json.load(fh)
        planned = int(rec["argv"][rec["argv"].index("--epochs") + 1])
        run_patience = int(rec["argv"][rec["argv"].index("--patience") + 1])
        seed = int(rec["argv"][rec["argv"].index("--seed") + 1])
        for fold in rec["folds"]:
            fold["planned_epochs"] = planned
        data = os.path.basename(path).split("_")[0]  # s22x5_e300p100000_s42.json: s22x5
        weights = ["raw"] + [f"ema{d:g}" for d in rec["ema"] or []]
        stops = [("none", None, 1)]
        stops += [(f"p{p} from 1", p, 1) for p in sorted(set(patiences + [run_patience]))
                  if p < planned]
        for p in patiences:
            for frac in fractions:
                stops.append((f"p{p} after lr<={frac:g}", p, frac))
        for w in weights:
            for monitor in ("mape", "mae"):
                for name, patience, frac in stops:
                    results = []
                    for fold in rec["folds"]:
                        count_from = 1 if patience is None or frac == 1 else \
                            lr_down_epoch(fold["epochs"], frac)
                        r = apply_rule(fold, w, monitor, patience or 10 ** 9, count_from)
                        results.append(r)
                    if any(r is None for r in results):
                        continue
                    maes = [r[1] for r in results]
                    rows.append({"data": data, "epochs": planned, "seed": seed, "weights": w,
                                 "monitor": monitor, "stop": name,
                                 "mae_mean": float(np.mean(maes)),
                                 "mae_std": float(np.std(maes, ddof=1)),
                                 "rmse_mean": float(np.mean([r[2] for r in results])),
                                 "seconds": float(sum(r[3] for r in results)),
                                 "kept": [r[0] for r in results],
                                 "stopped": [r[4] for r in results]})
        for fold in rec["folds"]:  # the recorder reproduces the run's own choice
            r = apply_rule(fold, "raw", "mape", run_patience, 1)
            if r is not None and (r[0] != fold["as_run"]["best_epoch"] or
                                  not math.isclose(r[1], fold["as_run"]["test_mae"],
                                                   rel_tol=1e-4)):
                print(f"warning: {path} fold {fold['fold']}: the recorded epochs give epoch "
                      f"{r[0]} (test MAE {r[1]:.4f}); the run kept {fold['as_run']}")
    return rows


def print_table(rows):
    head = (f"{'data':8} {'epochs':>6} {'seed':>4} {'weights':9} {'monitor':7} {'stop':18} "
            f"{'MAE mean':>8} {'+-std':>6} {'RMSE':>6} {'CPU s':>7}  kept epochs")
    print(head)
    for r in rows:
        print(f"{r['data']:8} {r['epochs']:6d} {r['seed']:4d} {r['weights']:9} "
              f"{r['monitor']:7} {r['stop']:18} {r['mae_mean']:8.3f} {r['mae_std']:6.3f} "
              f"{r['rmse_mean']:6.3f} {r['seconds']:7.0f}  {r['kept']}")


# ----------------------------------------------------------------------------- subset
def subset(args):
    """A data folder of the finished corpus dimers whose ids start with one of the prefixes:
    links to their folders, their meta.xlsx rows (from energies.json) and the level record."""
    import shutil

    import pandas as pd

    os.makedirs(args.out)
    rows = []
    for name in sorted(os.listdir(args.build)):
        record = os.path.join(args.build, name, "energies.json")
        if name.split("-")[0] in args.prefixes and os.path.isfile(record):
            with open(record) as fh:
                rows.append(json.load(fh)["meta"])
            os.symlink(os.path.abspath(os.path.join(args.build, name)),
                       os.path.join(args.out, name))
    shutil.copy(os.path.join(args.build, dc.LEVEL_OF_THEORY_FILE), args.out)
    pd.DataFrame(rows).to_excel(os.path.join(args.out, "meta.xlsx"), index=False)
    print(f"{args.out}: {len(rows)} dimers of {', '.join(args.prefixes)}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("subset", help="a data folder of some finished corpus dimers")
    s.add_argument("--build", default=os.path.join(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), "data", "corpus", "build"))
    s.add_argument("--out", required=True)
    s.add_argument("prefixes", nargs="+", help="subsets, e.g. A24 HBC6")
    r = sub.add_parser("run", help="train the folds once, recording every epoch")
    r.add_argument("--root_dir", required=True, help="data folder (a copy: outputs land there)")
    r.add_argument("--out", required=True, help="JSON file of the recorded epochs")
    r.add_argument("--cv", type=int, default=5)
    r.add_argument("--epochs", type=int, required=True, help="OneCycle length")
    r.add_argument("--patience", type=int, required=True,
                   help="the run's own early stopping (from epoch 1, on val MAPE); a large "
                        "value records the whole schedule")
    r.add_argument("--seed", type=int, default=dc.DEFAULT_SEED, help="initial weights, draws")
    r.add_argument("--fold_seed", type=int, default=dc.DEFAULT_SEED, help="the folds")
    r.add_argument("--ema", type=float, nargs="*", default=[], help="EMA decays to record")
    r.add_argument("--parallel", type=int, default=2, help="fold processes at once")
    r.add_argument("--threads", type=int, default=1, help="torch threads per fold process")
    r.add_argument("--only_fold", type=int, default=None, help=argparse.SUPPRESS)
    q = sub.add_parser("report", help="every rule applied to recorded runs")
    q.add_argument("paths", nargs="+")
    q.add_argument("--patience", type=int, nargs="*", default=[50, 100, 250])
    q.add_argument("--lr_fraction", type=float, nargs="*", default=[0.5, 0.1])
    q.add_argument("--json", default=None, help="also write the table here")
    args, extra = p.parse_known_args()
    if args.command == "subset":
        return subset(args)
    if args.command == "run":
        return run(args, extra)
    rows = report(args.paths, args.patience, args.lr_fraction)
    print_table(rows)
    if args.json:
        dc.atomic_write_json(rows, args.json)


if __name__ == "__main__":
    main()
