"""Seconds per dimer of tools/build_dataset.py on S22 dimers, and what dominates.

    python benchmarks/bench_build_dataset.py [--threads 2] [--names Benzene_dimer_parallel_displaced ...]

Builds each named S22 dimer at 1.0 x its equilibrium separation into a temporary folder at the
default level (RHF/def2-SVP, density fitting), then with --no-density-fit and with
--counterpoise, and prints per dimer and level: wall seconds of the whole row, of the dimer SCF
and of the two monomer SCFs (from energies.json; the rest of a row is the Mulliken and multipole
properties, well under a second).
"""
import argparse
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "examples"))
import build_s22x5  # noqa: E402
from build_s22x5 import build_dataset  # noqa: E402

NAMES = ("Water_dimer", "Benzene_dimer_parallel_displaced", "Adenine-thymine_Watson-Crick_complex")
LEVELS = {"default (DF)": {}, "no density fit": {"density_fit": False},
          "counterpoise (DF)": {"counterpoise": True}}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--names", nargs="*", default=list(NAMES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--levels", nargs="*", default=list(LEVELS), choices=list(LEVELS))
    args = parser.parse_args(argv)
    print(f"threads {args.threads}, cpu_count {os.cpu_count()}")
    print("| dimer | atoms | level | row s | dimer SCF s | monomer SCFs s |")
    print("| --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as folder:
        csv_path = build_s22x5.write_input(folder, args.names, ["1.0"])
        for level in args.levels:
            out = os.path.join(folder, level.replace(" ", "_"))
            t0 = time.time()
            summary = build_dataset.build_dataset(csv_path, out, threads=args.threads,
                                                  quiet=True, log=lambda _: None,
                                                  **LEVELS[level])
            assert not summary.failed, summary.failed
            for rid in summary.done:
                with open(os.path.join(out, rid, build_dataset.FINISHED_FILE)) as fh:
                    e = json.load(fh)
                n_atoms = len(build_dataset.dc.parse_pdb(os.path.join(out, rid, "A.pdb"))[0]) \
                    + len(build_dataset.dc.parse_pdb(os.path.join(out, rid, "B.pdb"))[0])
                print(f"| {rid} | {n_atoms} | {level} | {e['seconds']:.1f} | "
                      f"{e['seconds_dimer']:.1f} | {e['seconds_monomers']:.1f} |", flush=True)
            print(f"(total {time.time() - t0:.0f} s for {level})", flush=True)


if __name__ == "__main__":
    main()
