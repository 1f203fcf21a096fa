"""How DeltaCoupling scales with the data set and the number of processes (a benchmark, not a test).

Synthetic sets repeat the rows of the bundled example (examples/s22x5) with their own ids and a
perturbed R_nm, at 1k, 10k and 100k dimers. For each size, in fresh processes:

- the cache build (``preprocess_and_cache.py``: the data check, then the build): wall time,
  size on disk and peak anonymous memory;
- a training process (``delta_coupling``'s own stages: data check, cache check, split,
  datasets, model): peak anonymous memory (RssAnon of /proc/self/status, sampled every 50 ms:
  the process's own memory, not the page cache of the memory-mapped shards) and the time per
  dimer of a training pass and of an evaluation pass over at most ``--batches`` batches;
- one process with 2 threads against ``torchrun --nproc_per_node=2`` with 1 thread each,
  training the same number of dimers per step (batch 2b in one process, b per rank).

Usage::

    python benchmarks/bench_scale.py                     # 1k, 10k, 100k (about an hour)
    python benchmarks/bench_scale.py --sizes 1000,10000  # without the 100k set

The sets are written under --work_dir (default /tmp; the 100k cache takes about 10 GB) and
deleted afterwards. The last line is ``rss_at_100k_mib X``.
"""
import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

MODEL_ARGS = ["--num_conv_layers", "6", "--num_rbf", "50", "--radial_hidden", "64",
              "--mlp_hidden", "64"]  # the defaults, written out


def status_kib(field):
    """A field of /proc/self/status in KiB (RssAnon, RssFile, VmHWM ...)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class PeakAnon:
    """The largest RssAnon of this process, sampled every 50 ms in a thread."""

    def __init__(self):
        self.peak = status_kib("RssAnon")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, status_kib("RssAnon"))

    def stop(self):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, status_kib("RssAnon"))
        return self.peak / 1024.0  # MiB


def make_set(root, n, seed=0):
    """``n`` dimers: the example's rows repeated with their own ids and R_nm x U(0.98, 1.10)."""
    import numpy as np
    import pandas as pd
    import delta_coupling as dc

    src = dc.DEFAULT_ROOT_DIR
    base = dc.read_meta(src)
    os.makedirs(root, exist_ok=True)
    for entry in os.listdir(src):  # the PDB/NPZ folders, linked
        if entry != "meta.xlsx" and not os.path.exists(os.path.join(root, entry)) \
                and os.path.isdir(os.path.join(src, entry)):
            os.symlink(os.path.join(src, entry), os.path.join(root, entry))
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        r = base[i % len(base)]
        rows.append({"id": f"{r['id']}_{i}", "pdb_a": r["pdb_a"], "pdb_b": r["pdb_b"],
                     "npz": r["npz"], "R_nm": r["R_nm"] * rng.uniform(0.98, 1.10),
                     "theta_deg": r["theta_deg"], "V0": r["V0"], "Vref": r["Vref"],
                     "PR": r["PR"]})
    pd.DataFrame(rows).to_excel(os.path.join(root, "meta.xlsx"), index=False)


def child_build(args):
    """Check and build the cache of --root_dir as preprocess_and_cache.py does."""
    import delta_coupling as dc
    from preprocess_and_cache import build_cache

    peak = PeakAnon()
    t0 = time.time()
    rows = []
    report, n_problems = dc.data_check_report(args.root_dir, rows=rows)
    assert n_problems == 0, report
    t_check = time.time() - t0
    path = build_cache(args.root_dir, rows=rows, fresh=True)
    shards = glob.glob(os.path.join(dc.cache_shard_dir(path), "*.pt"))
    size = sum(os.path.getsize(p) for p in shards + [path])
    return {"check_s": t_check, "build_s": time.time() - t0, "cache_mib": size / 2 ** 20,
            "shards": len(shards), "peak_anon_mib": peak.stop()}


def child_train(args):
    """The stages of a training run; training and evaluation passes of at most --batches."""
    import itertools
    import torch
    import delta_coupling as dc

    torch.set_num_threads(args.threads)
    peak = PeakAnon()
    t0 = time.time()
    argv = ["--root_dir", args.root_dir, "--compile", "off", "--quiet", "--epochs", "1",
            "--batch_size", str(args.batch_size), *MODEL_ARGS]
    run_args, _ = dc.parse_main_args(argv)
    dc.seed_everything(run_args.seed)
    device = dc.setup_distributed("cpu")
    run = dc.prepare_data(run_args, device)
    model = dc.build_model(run)
    optimizer = dc.make_training_tools(run, model).optimizer
    t_setup = time.time() - t0
    step_model = model
    if dc.DIST.active:
        step_model = torch.nn.parallel.DistributedDataParallel(model,
                                                               forward_sync_buffers=False)
        run.train_loader.sampler.set_epoch(1)
    batches = list(itertools.islice(iter(run.train_loader), 2))  # warm-up, not timed
    dc.run_epoch(step_model, batches, device, optimizer, skip_failed_batches=False)
    t1 = time.time()
    train = dc.run_epoch(step_model, itertools.islice(iter(run.train_loader), args.batches),
                         device, optimizer, skip_failed_batches=False)
    t_train = time.time() - t1
    t2 = time.time()
    with torch.no_grad():
        evaluation = dc.run_epoch(model, itertools.islice(iter(run.val_loader), args.batches),
                                  device, skip_failed_batches=False)
    t_eval = time.time() - t2
    out = {"setup_s": t_setup, "train_dimers": train.n_graphs,
           "train_ms_per_dimer": 1000 * t_train / train.n_graphs,
           "eval_dimers": evaluation.n_graphs,
           "eval_ms_per_dimer": 1000 * t_eval / evaluation.n_graphs,
           "train_dimers_per_s": train.n_graphs / t_train,
           "peak_anon_mib": peak.stop(), "rss_file_mib": status_kib("RssFile") / 1024.0,
           "world_size": dc.DIST.world_size}
    master = dc.DIST.master
    dc.teardown_distributed()
    return out if master else None


def run_child(mode, root, extra=(), torchrun=0, threads=2):
    """Run this script as a child (``mode``) in a fresh interpreter; return its JSON line."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": REPO}
    cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, "--root_dir", root,
           "--threads", str(threads), *extra]
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={torchrun}"] + cmd[1:]
    t0 = time.time()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    line = [x for x in done.stdout.splitlines() if x.startswith("{")][-1]
    return {**json.loads(line), "wall_s": time.time() - t0}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="1000,10000,100000")
    p.add_argument("--work_dir", default="/tmp")
    p.add_argument("--batches", type=int, default=100, help="batches per timed pass")
    p.add_argument("--batch_size", type=int, default=5)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of the build and training children (one per process "
                        "is the least disturbed by other jobs on shared cores)")
    p.add_argument("--keep", action="store_true", help="keep the synthetic sets")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--root_dir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        out = {"build": child_build, "train": child_train}[args.child](args)
        if out is not None:
            print(json.dumps(out), flush=True)
        return

    import torch
    print(f"DeltaCoupling scaling benchmark: torch {torch.__version__}, {os.cpu_count()} CPU "
          f"cores; load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())} "
          f"(other jobs share these cores)")
    sizes = [int(s) for s in args.sizes.split(",")]
    results = {}
    for n in sizes:
        root = os.path.join(args.work_dir, f"delta_coupling_scale_{n}")
        shutil.rmtree(root, ignore_errors=True)
        t0 = time.time()
        make_set(root, n)
        made = time.time() - t0
        build = run_child("build", root, threads=args.threads)
        train = run_child("train", root, ["--batches", str(args.batches),
                                          "--batch_size", str(args.batch_size)],
                          threads=args.threads)
        results[n] = {"make_s": made, "build": build, "train": train,
                      "load": os.getloadavg()[0]}
        print(f"  {n} dimers done: build {build['build_s']:.0f} s, train setup "
              f"{train['setup_s']:.0f} s, load average {os.getloadavg()[0]:.2f}", flush=True)
        if n == min(sizes):  # 1 process (2 threads) vs torchrun 2 x 1 thread, same dimers/step
            same = ["--batches", str(args.batches), "--batch_size", str(2 * args.batch_size)]
            results["ddp"] = {
                "one": run_child("train", root, same, threads=2),
                "one_1t": run_child("train", root, same, threads=1),
                "two": run_child("train", root, ["--batches", str(args.batches),
                                                 "--batch_size", str(args.batch_size)],
                                 torchrun=2, threads=1), "n": n}
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    print()
    print(f"{'dimers':>8} {'build s':>8} {'ms/dimer':>9} {'cache MiB':>10} {'KiB/dimer':>10} "
          f"{'build anon MiB':>15} {'train anon MiB':>15} {'setup s':>8} "
          f"{'train ms/dimer':>15} {'eval ms/dimer':>14} {'load':>5}")
    for n in sizes:
        b, t = results[n]["build"], results[n]["train"]
        print(f"{n:>8} {b['build_s']:>8.1f} {1000 * b['build_s'] / n:>9.2f} "
              f"{b['cache_mib']:>10.1f} {1024 * b['cache_mib'] / n:>10.1f} "
              f"{b['peak_anon_mib']:>15.0f} {t['peak_anon_mib']:>15.0f} {t['setup_s']:>8.1f} "
              f"{t['train_ms_per_dimer']:>15.2f} {t['eval_ms_per_dimer']:>14.2f} "
              f"{results[n]['load']:>5.2f}")
    if "ddp" in results:
        one, two = results["ddp"]["one"], results["ddp"]["two"]
        print(f"\n1 process x 2 threads (batch {2 * args.batch_size}) vs torchrun "
              f"--nproc_per_node=2 x 1 thread (batch {args.batch_size} per rank): the same "
              f"dimers per step, {results['ddp']['n']}-dimer set, at most {args.batches} "
              f"steps:")
        print(f"  1 process,  2 threads: {one['train_dimers_per_s']:.1f} dimers/s")
        print(f"  1 process,  1 thread : {results['ddp']['one_1t']['train_dimers_per_s']:.1f} "
              f"dimers/s")
        print(f"  2 processes, 1 thread each: {two['train_dimers_per_s']:.1f} dimers/s")
        for name, base in (("2 threads", one), ("1 thread", results["ddp"]["one_1t"])):
            ratio = two["train_dimers_per_s"] / base["train_dimers_per_s"]
            print(f"  ratio (2 processes / 1 process with {name}): {ratio:.2f}")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    big = max(sizes)
    print(f"rss_at_100k_mib {results[big]['train']['peak_anon_mib']:.0f}"
          if big == 100000 else f"rss_at_100k_mib nan (largest set {big})")


if __name__ == "__main__":
    main()
