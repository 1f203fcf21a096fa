"""Both --monitor choices of one K-fold cross-validation, from one set of training runs.

``--monitor`` only chooses which epoch's weights a run keeps (and when it stops early): the
training trajectory is the same for ``mape`` and ``mae`` (on a CPU it is bitwise the same), so
this script runs ``python delta_coupling.py --root_dir DIR --cv K --monitor mape`` once and,
epoch by epoch, also keeps the weights of the lowest validation MAE, by the same rule as
``--monitor mae`` (a new best when strictly lower). It then writes the ``--monitor mae``
cross-validation of the same folds into ``--mae_root`` (a copy of the data with those weights in
each fold's final checkpoint) and prints its report. If a fold stopped early on MAPE (possible
only when its best MAPE epoch is within the first ``epochs - patience`` epochs), the MAE run
would have trained on; the script says so, and that fold's MAE figures are then not those of
a ``--monitor mae`` run.

    python benchmarks/cv_monitor.py --root_dir /tmp/copy/s22x5 --mae_root /tmp/copy_mae/s22x5

``--parallel`` trains the folds in separate processes at the same time (each the same
``train_one`` run that ``--cv`` makes of that fold, its log in ``<root_dir>/fold_f.log``), for a
machine with more cores than one run uses; the reports are the same.
"""
import argparse
import math
import os
import shutil
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import delta_coupling as dc  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root_dir", required=True, help="data folder (a copy: outputs land there)")
    p.add_argument("--mae_root", required=True, help="new folder for the --monitor mae report")
    p.add_argument("--cv", type=int, default=5)
    p.add_argument("--parallel", action="store_true", help="one process per fold")
    p.add_argument("--only_fold", type=int, default=None, help=argparse.SUPPRESS)
    args, extra = p.parse_known_args()
    if args.parallel or args.only_fold is not None:
        return parallel(args, extra)

    best_mae, stopped_early = track_lowest_mae()
    argv = ["--root_dir", args.root_dir, "--cv", str(args.cv), "--monitor", "mape", *extra]
    print(f"=== python delta_coupling.py {' '.join(argv)}", flush=True)
    dc.main(argv)
    mae_report(args, extra, best_mae, stopped_early)


def parallel(args, extra):
    """``--parallel``: the cache first, then one process per fold (``--only_fold f``: train
    fold f as ``--cv`` would, keep its lowest-val-MAE weights in a file); then both reports."""
    import subprocess

    argv = ["--root_dir", args.root_dir, "--cv", str(args.cv), "--monitor", "mape", *extra]
    cv_args, _ = dc.parse_main_args(argv)
    rows = dc.read_meta(args.root_dir)
    folds = dc.make_cv_folds(rows, args.cv, cv_args.seed)
    mae_file = os.path.join(args.root_dir, "models", "cv", "fold_{}", "lowest_val_mae.pt")
    if args.only_fold is not None:
        f = args.only_fold
        best_mae, stopped_early = track_lowest_mae()
        device = dc.setup_distributed(cv_args.device)  # one process: the device alone
        dc.train_one(argparse.Namespace(**{**vars(cv_args), "fold": f}), device, None, folds[f])
        dc.atomic_torch_save({"best": best_mae[f], "stopped_early": stopped_early.get(f)},
                             mae_file.format(f))
        return
    dc.prepare_cache(cv_args, *dc.check_data_or_exit(cv_args))  # once, before the folds
    print(f"=== python delta_coupling.py {' '.join(argv)}, each fold in its own process",
          flush=True)
    procs = []
    for f in range(args.cv):
        log = open(os.path.join(args.root_dir, f"fold_{f}.log"), "w")
        procs.append((subprocess.Popen([sys.executable, os.path.abspath(__file__),
                                        "--root_dir", args.root_dir, "--mae_root",
                                        args.mae_root, "--cv", str(args.cv), "--only_fold",
                                        str(f), *extra], stdout=log, stderr=subprocess.STDOUT),
                      log))
    for proc, log in procs:
        if proc.wait() != 0:
            raise SystemExit(f"a fold failed; see {log.name}")
        log.close()
    for f in range(args.cv):
        with open(os.path.join(args.root_dir, f"fold_{f}.log")) as fh:
            print(f"--- fold {f}'s log\n{fh.read()}", flush=True)
    dc.cv_report(cv_args, rows, folds)
    saved = [torch.load(mae_file.format(f), weights_only=True) for f in range(args.cv)]
    mae_report(args, extra, {f: s["best"] for f, s in enumerate(saved)},
               {f: s["stopped_early"] for f, s in enumerate(saved) if s["stopped_early"]})


def track_lowest_mae():
    """Patch ``dc.end_of_epoch`` to also keep each fold's lowest-val-MAE weights, by the rule of
    ``--monitor mae``; returns the dicts it fills: ({fold: {"mae", "epoch", "state"}},
    {fold: epoch it stopped early at})."""
    best_mae, stopped_early = {}, {}
    real_end_of_epoch = dc.end_of_epoch

    def end_of_epoch(run, model, tools, state, train_result, val_result, seconds):
        real_end_of_epoch(run, model, tools, state, train_result, val_result, seconds)
        best = best_mae.setdefault(run.args.fold, {"mae": math.inf})
        if val_result.mae < best["mae"]:  # TrainingProgress.update's rule
            with tools.evaluated_weights():  # the weights validated (--ema: the average)
                best.update(mae=val_result.mae, epoch=state.epoch,
                            state={k: v.detach().clone() for k, v in model.state_dict().items()})
        if state.stopped and state.epoch < run.args.epochs:
            stopped_early[run.args.fold] = state.epoch

    dc.end_of_epoch = end_of_epoch
    return best_mae, stopped_early


def mae_report(args, extra, best_mae, stopped_early):
    """The --monitor mae cross-validation of the same folds, in ``args.mae_root``."""
    print(f"\n=== the same folds with --monitor mae (weights of each fold's lowest val MAE)",
          flush=True)
    if stopped_early:
        print(f"warning: folds {stopped_early} stopped early on MAPE; a --monitor mae run would "
              f"have trained on, so their MAE figures are not exact")
    shutil.copytree(args.root_dir, args.mae_root, ignore=shutil.ignore_patterns("plots"))
    mae_args, _ = dc.parse_main_args(["--root_dir", args.mae_root, "--cv", str(args.cv),
                                      "--monitor", "mae", *extra])
    rows = dc.read_meta(args.mae_root)
    folds = dc.make_cv_folds(rows, args.cv, mae_args.seed)
    for f in range(args.cv):
        path = os.path.join(args.mae_root, "models", "cv", f"fold_{f}", dc.FINAL_CHECKPOINT)
        final = torch.load(path, weights_only=True)
        final.update(model_state=best_mae[f]["state"], weights_from_epoch=best_mae[f]["epoch"],
                     best_monitor=best_mae[f]["mae"], monitor="val MAE",
                     config={**final["config"], "monitor": "mae"})
        dc.atomic_torch_save(final, path)
        print(f"fold {f}: best val MAE {best_mae[f]['mae']:.4f} at epoch {best_mae[f]['epoch']}")
    dc.cv_report(mae_args, rows, folds)


if __name__ == "__main__":
    main()
