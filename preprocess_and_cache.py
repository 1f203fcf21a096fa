"""Build ``<root_dir>/cached_graphs.pt``: every dimer's graph plus edge harmonics.

The cache's layout is in docs/DATA_FORMAT.md, "The cache".

Usage::

    python preprocess_and_cache.py [--root_dir DIR] [--physical_cutoff 12.0]
                                   [--cache_file_name F] [--quiet]

``delta_coupling.main`` imports ``build_cache`` from here lazily when the cache is missing. The
cache holds only tensors and plain Python types (loadable with ``weights_only=True``) and is
written atomically (a crash mid-write leaves the previous file)::

    {"metadata": {format_version, physical_cutoff, internal_cutoff, int_angstrom_scale,
                  irreps_edge_sh, n_rows, data_sha256 (of meta.xlsx and every PDB/NPZ)},
     "graphs": [ {field name: tensor} per row, in meta.xlsx order ],
     "ids": [ row id (str) ]}
"""
import argparse
import os
import sys

from delta_coupling import (DEFAULT_CACHE_FILE, DEFAULT_PHYSICAL_CUTOFF, DEFAULT_ROOT_DIR,
                            EXIT_INTERRUPTED, DimerDataset, OutputError, atomic_torch_save,
                            cache_metadata, data_check_report, make_graph, parse_dimer,
                            positive_float, progress)


def build_cache(root_dir, physical_cutoff=DEFAULT_PHYSICAL_CUTOFF,
                cache_file_name=DEFAULT_CACHE_FILE, progress_bar=False, parsed=None):
    """Parse every row of ``root_dir/meta.xlsx`` and write the cache atomically; return its path.

    Each graph is the un-augmented ``DimerDataset`` graph with ``edge_attr_sh`` (E, 64) added.
    ``progress_bar``: show a tqdm bar over the dimers on stderr. ``parsed``: the rows'
    ``ParsedDimer`` if already read (as ``DimerDataset`` takes them).
    """
    dataset = DimerDataset(root_dir, physical_cutoff, augment=False, preload=False,
                           parsed=parsed)
    graphs, ids = [], []
    for i, row in enumerate(progress(dataset.rows, not progress_bar, desc="building cache",
                                     unit="dimer")):
        dimer = dataset.parsed[i] if dataset.parsed is not None else parse_dimer(root_dir, row)
        data = make_graph(dimer, dataset.internal_cutoff, with_sh=True)
        graphs.append({key: data[key] for key in data.keys() if key not in ("id", "num_nodes")})
        ids.append(row["id"])
    payload = {"metadata": cache_metadata(root_dir, physical_cutoff, dataset.rows),
               "graphs": graphs, "ids": ids}
    path = os.path.join(root_dir, cache_file_name)
    atomic_torch_save(payload, path)
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--root_dir", default=DEFAULT_ROOT_DIR)
    parser.add_argument("--physical_cutoff", type=positive_float, default=DEFAULT_PHYSICAL_CUTOFF,
                        help="Angstrom")
    parser.add_argument("--cache_file_name", default=DEFAULT_CACHE_FILE)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args()
    report, n_problems = data_check_report(args.root_dir)  # every problem at once, as training
    if n_problems:
        sys.exit(report)
    try:
        path = build_cache(args.root_dir, args.physical_cutoff, args.cache_file_name,
                           progress_bar=not args.quiet)
    except KeyboardInterrupt:
        print(f"interrupted: no cache written (a previous "
              f"{os.path.join(args.root_dir, args.cache_file_name)} is left as it was)",
              file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except OutputError as exc:  # cannot write the cache: one line, the previous one is kept
        sys.exit(f"error: {exc}")
    print(f"wrote {path}")
