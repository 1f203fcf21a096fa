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
    args, extra = p.parse_known_args()

    best_mae = {}  # fold -> {"mae", "epoch", "state"}
    stopped_early = {}
    real_end_of_epoch = dc.end_of_epoch

    def end_of_epoch(run, model, optimizer, scheduler, scaler, state, train_result, val_result,
                     seconds):
        real_end_of_epoch(run, model, optimizer, scheduler, scaler, state, train_result,
                          val_result, seconds)
        best = best_mae.setdefault(run.args.fold, {"mae": math.inf})
        if val_result.mae < best["mae"]:  # TrainingProgress.update's rule
            best.update(mae=val_result.mae, epoch=state.epoch,
                        state={k: v.detach().clone() for k, v in model.state_dict().items()})
        if state.stopped and state.epoch < run.args.epochs:
            stopped_early[run.args.fold] = state.epoch

    dc.end_of_epoch = end_of_epoch
    argv = ["--root_dir", args.root_dir, "--cv", str(args.cv), "--monitor", "mape", *extra]
    print(f"=== python delta_coupling.py {' '.join(argv)}", flush=True)
    dc.main(argv)
    dc.end_of_epoch = real_end_of_epoch

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
