"""Training-speed benchmark of DeltaCoupling (README.md, Performance).

Measures, on the bundled example (or ``--root_dir``), each figure as the median of
``--repeats`` repetitions after ``--warmup`` unmeasured ones:

- cache build and cache load time;
- items/s of ``DimerDataset`` (augmentation on; files read once and also re-read every item)
  and of ``CachedDimerDataset`` (rotation + jitter);
- training throughput (graphs/s: data loading, forward, backward, optimizer and scheduler step
  over the training split of the default run, batch size 5) and evaluation throughput
  (validation + test split, cached graphs, no grad) for each mode:

  reference   the straightforward implementation: e3nn's modules one by one over the four
              tiled harmonic copies, a dataset that re-reads every file on every item, eager
  eager       the fast path (dense kernels over one harmonic copy, files read once), eager
  aot_eager, inductor   the fast path under ``torch.compile`` with that backend

  Modes run round-robin (one epoch each in turn) so that load on a shared machine hits all
  of them alike; ``speedup_vs_reference`` is a ratio measured side by side in this one run.
- peak resident memory after each mode (the process-wide peak, so it only grows) and, on
  CUDA, the peak allocated GPU memory of each mode;
- one full default epoch (train + val) and 1500 of them, projected (plus the first epoch's
  compilation, shown apart), for the mode
  ``python delta_coupling.py`` uses on this device (``--compile auto``).

The last line printed is ``speedup_vs_reference X.XX``: training graphs/s of the default mode
over the reference.

    python benchmarks/bench_training.py                      # 2 CPU cores: a few minutes
    python benchmarks/bench_training.py --json results.json --modes reference,eager
    python benchmarks/bench_training.py --device cuda --amp both
"""
import argparse
import atexit
import copy
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time

import torch
from torch_geometric.loader import DataLoader

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import delta_coupling as dc  # noqa: E402

SPEC_EPOCHS = dc.SCHEDULES["spec"]["epochs"]  # the design's run length, the projection's unit
from preprocess_and_cache import build_cache  # noqa: E402

ALL_MODES = ("reference", "eager", "aot_eager", "inductor")


def median_time(fn, repeats, warmup):
    """Median wall time (s) of ``fn()`` over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_rss_mib():
    """Peak resident memory of this process so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Mode:
    """One way to train: model path, training dataset and compile backend, with its own state."""

    def __init__(self, name, args, device, amp_dtype, cache, split, init_state):
        self.name, self.device, self.amp_dtype = name, device, amp_dtype
        train_idx, val_idx, test_idx = split
        reference = name == "reference"
        train_ds = dc.DimerDataset(args.root_dir, args.physical_cutoff, augment=True,
                                   preload=not reference)
        eval_ds = dc.CachedDimerDataset(cache)
        subset = torch.utils.data.Subset
        self.train_loader = DataLoader(subset(train_ds, train_idx), batch_size=args.batch_size,
                                       shuffle=True)
        self.val_loader = DataLoader(subset(eval_ds, val_idx), batch_size=args.batch_size)
        self.eval_loader = DataLoader(subset(eval_ds, val_idx + test_idx),
                                      batch_size=args.batch_size)
        self.n_train, self.n_val = len(train_idx), len(val_idx)
        self.n_eval = len(val_idx) + len(test_idx)
        self.model = dc.DeltaCoupling(cutoff=float(cache.metadata["internal_cutoff"]))
        self.model.load_state_dict(init_state)
        self.model.use_fast_path(not reference).to(device)
        if name in ("aot_eager", "inductor"):
            self.model.compile_forward(name)
        self.optimizer = (torch.optim.Adam(self.model.parameters(), lr=dc.DEFAULT_LR)
                          if reference else dc.make_optimizer(self.model, dc.DEFAULT_LR, device))
        self.scheduler = torch.optim.lr_scheduler.OneCycleLR(
            self.optimizer, max_lr=dc.DEFAULT_LR, pct_start=dc.ONECYCLE_PCT_START,
            total_steps=10_000)
        self.times = {"train": [], "eval": [], "val": []}
        self.first_epoch_s = None
        self.peak_cuda_mib = 0.0 if device.type == "cuda" else float("nan")

    def train_epoch(self):
        return dc.run_epoch(self.model, self.train_loader, self.device, self.optimizer,
                            self.scheduler, amp_dtype=self.amp_dtype, skip_failed_batches=False)

    def evaluate(self, loader):
        with torch.no_grad():
            return dc.run_epoch(self.model, loader, self.device, amp_dtype=self.amp_dtype,
                                skip_failed_batches=False)

    def round(self, measured):
        """One training epoch, one validation pass and one val+test pass, timed."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        for key, fn in (("train", self.train_epoch),
                        ("val", lambda: self.evaluate(self.val_loader)),
                        ("eval", lambda: self.evaluate(self.eval_loader))):
            sync(self.device)
            t0 = time.perf_counter()
            fn()
            sync(self.device)
            elapsed = time.perf_counter() - t0
            if measured:
                self.times[key].append(elapsed)
            elif self.first_epoch_s is None and key == "train":
                self.first_epoch_s = elapsed  # includes compilation
        if self.device.type == "cuda":
            self.peak_cuda_mib = max(self.peak_cuda_mib,
                                     torch.cuda.max_memory_allocated(self.device) / 2 ** 20)

    def summary(self):
        train_s = statistics.median(self.times["train"])
        val_s = statistics.median(self.times["val"]) if self.n_val else 0.0
        return {
            "train_graphs_per_s": self.n_train / train_s,
            "eval_graphs_per_s": self.n_eval / statistics.median(self.times["eval"]),
            "epoch_s": train_s + val_s,
            "first_epoch_s": self.first_epoch_s,
            "peak_rss_mib": peak_rss_mib(),
            "peak_cuda_mib": self.peak_cuda_mib,
        }


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--root_dir", default=dc.DEFAULT_ROOT_DIR)
    p.add_argument("--physical_cutoff", type=float, default=dc.DEFAULT_PHYSICAL_CUTOFF)
    p.add_argument("--batch_size", type=int, default=dc.DEFAULT_BATCH_SIZE)
    p.add_argument("--modes", default=",".join(ALL_MODES),
                   help=f"comma-separated, of {', '.join(ALL_MODES)}")
    p.add_argument("--repeats", type=dc.positive_int, default=5,
                   help="measured repetitions per figure")
    p.add_argument("--warmup", type=dc.positive_int, default=1,
                   help="unmeasured repetitions first (the first one compiles)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--amp", default="on", choices=["on", "off", "both"],
                   help="CUDA autocast (bf16/fp16 as training uses it); ignored on CPU")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=dc.DEFAULT_SEED)
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    return p.parse_args(argv)


def data_figures(args):
    """Cache build/load times and dataset items/s."""
    fig = {}
    tmp = tempfile.mkdtemp(dir=args.root_dir)  # the shards are mapped while the runs read them
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    name = os.path.join(os.path.basename(tmp), "bench_cache.pt")
    fig["cache_build_s"] = median_time(
        lambda: build_cache(args.root_dir, args.physical_cutoff, cache_file_name=name,
                            fresh=True), max(1, args.repeats // 2), 0)
    path = os.path.join(args.root_dir, name)
    fig["cache_load_s"] = median_time(lambda: dc.load_cache(path), args.repeats, 1)
    cache = dc.load_cache(path)
    for key, ds in (
            ("items_per_s_dimer_dataset", dc.DimerDataset(args.root_dir, args.physical_cutoff,
                                                          augment=True)),
            ("items_per_s_dimer_dataset_reread", dc.DimerDataset(
                args.root_dir, args.physical_cutoff, augment=True, preload=False)),
            ("items_per_s_cached_rotate_jitter", dc.CachedDimerDataset(
                cache, rotate=True, jitter_std=dc.DEFAULT_JITTER_STD))):
        fig[key] = len(ds) / median_time(lambda: [ds[i] for i in range(len(ds))],
                                         args.repeats, 1)
    return fig, cache


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    # the compiled modes share forward_tensors' code object: room for all their graphs
    torch._dynamo.config.recompile_limit = 64
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu")
                          if args.device == "auto" else args.device)
    torch.manual_seed(args.seed)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = set(modes) - set(ALL_MODES)
    if unknown:
        raise SystemExit(f"unknown mode(s) {sorted(unknown)}; choose from {ALL_MODES}")
    default_backend = dc.resolve_compile_backend(  # the default run's
        "auto", device, dc.SCHEDULES[dc.DEFAULT_SCHEDULE]["epochs"]) or "eager"
    if default_backend not in modes:
        modes.append(default_backend)
    if "reference" not in modes:
        modes.insert(0, "reference")

    print(f"DeltaCoupling benchmark: {args.root_dir} on {device} "
          f"({torch.get_num_threads()} threads), torch {torch.__version__}")
    figures, cache = data_figures(args)
    rows = dc.read_meta(args.root_dir)
    split = dc.make_splits(rows, args.seed)[:3]
    init_state = copy.deepcopy(dc.DeltaCoupling(
        cutoff=float(cache.metadata["internal_cutoff"])).state_dict())

    amp_choices = {"on": [True], "off": [False], "both": [True, False]}[args.amp]
    if device.type != "cuda":
        amp_choices = [False]
    runs = {}
    for use_amp in amp_choices:
        amp_dtype = dc.amp_settings(device)[0] if use_amp else None
        suffix = "+amp" if use_amp else ""
        live = []
        for name in modes:
            mode = Mode(name, args, device, amp_dtype, cache, split, init_state)
            if name in ("reference", "eager"):
                for _ in range(max(1, args.warmup)):
                    mode.round(measured=False)
                live.append(mode)
                continue
            try:  # compilation is lazy: it happens (and may fail) in the first round
                for _ in range(max(1, args.warmup)):
                    mode.round(measured=False)
                if mode.model._compiled is None:  # the model fell back to eager
                    raise RuntimeError("compilation failed; the model fell back to eager")
                live.append(mode)
            except Exception as exc:  # noqa: BLE001 - which backends work here is the question
                print(f"mode {name}{suffix}: unavailable ({type(exc).__name__}: "
                      f"{str(exc).splitlines()[0][:120] if str(exc) else ''})")
                runs[name + suffix] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        for _ in range(args.repeats):  # round-robin: every mode sees the same load
            for mode in live:
                mode.round(measured=True)
        for mode in live:
            runs[mode.name + suffix] = mode.summary()

    default_key = default_backend + ("+amp" if True in amp_choices else "")
    reference_key = "reference" + ("+amp" if True in amp_choices else "")
    ref, best = runs.get(reference_key, {}), runs.get(default_key, {})
    if "train_graphs_per_s" not in ref or "train_graphs_per_s" not in best:
        raise SystemExit(f"the reference or the default mode ({default_key}) did not run")
    speedup = best["train_graphs_per_s"] / ref["train_graphs_per_s"]

    width = max(len(k) for k in runs) + 2
    print()
    for key, value in figures.items():
        print(f"{key:34s} {value:10.3f}")
    print()
    print(f"{'mode':{width}s} {'train g/s':>10s} {'eval g/s':>10s} {'epoch s':>8s} "
          f"{f'{SPEC_EPOCHS} ep min':>11s} {'1st epoch s':>11s} {'peak RSS MiB':>12s} "
          f"{'peak CUDA MiB':>13s}  vs reference")
    for key, r in runs.items():
        if "error" in r:
            print(f"{key:{width}s} unavailable")
            continue
        print(f"{key:{width}s} {r['train_graphs_per_s']:10.1f} {r['eval_graphs_per_s']:10.1f} "
              f"{r['epoch_s']:8.3f} {r['epoch_s'] * SPEC_EPOCHS / 60:11.1f} "
              f"{r['first_epoch_s']:11.2f} {r['peak_rss_mib']:12.0f} {r['peak_cuda_mib']:13.0f}"
              f"  {r['train_graphs_per_s'] / ref['train_graphs_per_s']:5.2f}x")
    print(f"\ndefault mode ({default_key}): one epoch {best['epoch_s']:.3f} s, "
          f"{SPEC_EPOCHS} epochs "
          f"projected {best['epoch_s'] * SPEC_EPOCHS / 60:.1f} min")
    if args.json:
        result = {"device": str(device), "threads": torch.get_num_threads(),
                  "torch": torch.__version__, "platform": platform.platform(),
                  "root_dir": args.root_dir, "repeats": args.repeats, "warmup": args.warmup,
                  "data": figures, "modes": runs, "default_mode": default_key,
                  "speedup_vs_reference": speedup}
        if device.type == "cuda":
            result["gpu"] = torch.cuda.get_device_name(device)
        dc.atomic_write_json(result, args.json)  # strict JSON: NaN -> null
    print(f"speedup_vs_reference {speedup:.2f}")
    return speedup


if __name__ == "__main__":
    main()
