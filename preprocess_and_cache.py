"""Build the graph cache of a data folder: ``<root_dir>/cached_graphs.pt`` and its shards.

The cache's layout is in docs/DATA_FORMAT.md, "The cache".

Usage::

    python preprocess_and_cache.py [--root_dir DIR] [--physical_cutoff 12.0]
                                   [--cache_file_name F] [--quiet]

``delta_coupling.main`` imports ``build_cache`` from here lazily when the cache is missing. The
build streams: rows are read and turned into graphs one at a time, and every
``CACHE_SHARD_BYTES`` of graphs go to disk as one shard (written atomically), so its memory does
not grow with the data. The index, ``cached_graphs.pt``, is written last::

    {"metadata": {format_version, physical_cutoff, internal_cutoff, int_angstrom_scale,
                  irreps_edge_sh, n_rows, data_sha256 (of meta.xlsx and every PDB/NPZ)},
     "ids": [ row id (str) ],
     "shards": [ {file, start, count, bytes, sha256} ]}

and each shard ``cached_graphs_shards/build-.../shard_KKKKK.pt``::

    {"metadata": (as above), "start": first row, "count": rows,
     "node_ptr": (count + 1,), "edge_ptr": (count + 1,), "fields": {field: concatenated tensor}}

The shards are written into ``cached_graphs_shards/building/``; when all are there, that folder
is renamed ``build-<data checksum>-<random>`` and the index, written last, points at it, so a
previous cache stays whole until the new one replaces it. An interrupted build continues where
it stopped: the shards already in ``building/`` for the same data and settings are kept.
Everything loads with ``torch.load(..., weights_only=True)``.
"""
import argparse
import glob
import os
import shutil
import sys

if __name__ in ("__main__", "__mp_main__"):  # one module however started (delta_coupling.py)
    sys.modules["preprocess_and_cache"] = sys.modules[__name__]

from delta_coupling import (CACHE_SHARD_BYTES, DEFAULT_CACHE_FILE, DEFAULT_PHYSICAL_CUTOFF,
                            DEFAULT_ROOT_DIR, EXIT_INTERRUPTED, INT_ANGSTROM_SCALE, OutputError,
                            atomic_torch_save, cache_metadata, cache_shard_dir, cache_shard_name,
                            data_check_report, file_sha256, load_tensors_file, log_line,
                            make_graph, make_output_folder, pack_graphs, parse_dimer,
                            positive_float, progress, read_meta, remove_output)


BUILDING_DIR = "building"  # the shards of a build in progress, in cached_graphs_shards/


def shard_entry(shard_dir, k, start, count):
    """The index's record of shard ``k``: file name, rows, size and SHA-256."""
    path = os.path.join(shard_dir, cache_shard_name(k))
    return {"file": cache_shard_name(k), "start": start, "count": count,
            "bytes": os.path.getsize(path), "sha256": file_sha256(path)}


def finished_shards(shard_dir, metadata):
    """The index records of the shards an interrupted build left for the same data and
    settings (``metadata``), consecutive from row 0; the first that does not fit ends them."""
    shards, start = [], 0
    while os.path.isfile(os.path.join(shard_dir, cache_shard_name(len(shards)))):
        path = os.path.join(shard_dir, cache_shard_name(len(shards)))
        try:
            store = load_tensors_file(path, "a cache shard")
        except ValueError:
            break
        if not (isinstance(store, dict) and store.get("metadata") == metadata
                and store.get("start") == start):
            break
        shards.append(shard_entry(shard_dir, len(shards), start, store["count"]))
        start += store["count"]
    return shards


def build_cache(root_dir, physical_cutoff=DEFAULT_PHYSICAL_CUTOFF,
                cache_file_name=DEFAULT_CACHE_FILE, progress_bar=False, parsed=None, rows=None,
                fresh=False, shard_bytes=CACHE_SHARD_BYTES):
    """Build the cache of ``root_dir`` shard by shard; return the index's path.

    Each graph is the un-augmented ``DimerDataset`` graph with ``edge_attr_sh`` (E, 64) added.
    ``progress_bar``: show a tqdm bar over the dimers on stderr. ``parsed``: the rows'
    ``ParsedDimer`` if already read (as ``DimerDataset`` takes them); else ``rows`` (meta.xlsx's
    rows, read here when None) and each row's files are read as its graph is built.
    Shards of an interrupted build for the same data and settings are kept unless ``fresh``.
    """
    if parsed is not None:
        rows = [p.row for p in parsed]
    elif rows is None:
        rows = read_meta(root_dir)
    path = os.path.join(root_dir, cache_file_name)
    shards_root = cache_shard_dir(path)
    shard_dir = os.path.join(shards_root, BUILDING_DIR)  # the old cache stays whole meanwhile
    if fresh:
        shutil.rmtree(shard_dir, ignore_errors=True)
    make_output_folder(shard_dir)
    metadata = cache_metadata(root_dir, physical_cutoff, rows)
    shards = [] if fresh else finished_shards(shard_dir, metadata)
    keep = {s["file"] for s in shards}
    for stale in glob.glob(os.path.join(shard_dir, "shard_*.pt")) + \
            glob.glob(os.path.join(shard_dir, ".shard_*.tmp.*")):
        if os.path.basename(stale) not in keep:
            remove_output(stale)  # another build's shards, or temp files of a killed one
    start = sum(s["count"] for s in shards)
    if start:
        log_line(f"continuing the interrupted cache build at row {start + 1} of {len(rows)}")
    internal_cutoff = physical_cutoff * INT_ANGSTROM_SCALE
    pending, pending_bytes = [], 0
    for i in progress(range(start, len(rows)), not progress_bar, desc="building cache",
                      unit="dimer", initial=start, total=len(rows)):
        dimer = parsed[i] if parsed is not None else parse_dimer(root_dir, rows[i])
        data = make_graph(dimer, internal_cutoff, with_sh=True)
        graph = {key: data[key] for key in data.keys() if key not in ("id", "num_nodes")}
        pending.append(graph)
        pending_bytes += sum(t.numel() * t.element_size() for t in graph.values())
        if pending_bytes >= shard_bytes or i == len(rows) - 1:
            first = i + 1 - len(pending)
            atomic_torch_save({"metadata": metadata, "start": first, "count": len(pending),
                               **pack_graphs(pending)},
                              os.path.join(shard_dir, cache_shard_name(len(shards))))
            shards.append(shard_entry(shard_dir, len(shards), first, len(pending)))
            pending, pending_bytes = [], 0
    # the finished shards get a folder of their own, then the index switches to it at once:
    # whatever fails before, the previous cache (index and shards) is still whole
    done = f"build-{metadata['data_sha256'][:12]}-{os.urandom(4).hex()}"
    os.replace(shard_dir, os.path.join(shards_root, done))
    for entry in shards:
        entry["file"] = f"{done}/{entry['file']}"
    atomic_torch_save({"metadata": metadata, "ids": [r["id"] for r in rows], "shards": shards},
                      path)
    for old in os.listdir(shards_root):  # earlier builds' shards, no longer indexed
        if old != done:
            shutil.rmtree(os.path.join(shards_root, old), ignore_errors=True)
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--root_dir", default=DEFAULT_ROOT_DIR)
    parser.add_argument("--physical_cutoff", type=positive_float, default=DEFAULT_PHYSICAL_CUTOFF,
                        help="Angstrom")
    parser.add_argument("--cache_file_name", default=DEFAULT_CACHE_FILE)
    parser.add_argument("--fresh", action="store_true",
                        help="start over instead of keeping an interrupted build's shards")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args()
    parsed, meta_rows = [], []  # the check's parsed dimers (all of them unless a large set)
    report, n_problems = data_check_report(args.root_dir, parsed, rows=meta_rows)  # all at once
    if n_problems:  # as training stops on bad data: the whole report, exit status 2
        print(f"error: {report}", file=sys.stderr)
        sys.exit(2)
    try:
        path = build_cache(args.root_dir, args.physical_cutoff, args.cache_file_name,
                           progress_bar=not args.quiet, rows=meta_rows, fresh=args.fresh,
                           parsed=parsed if len(parsed) == len(meta_rows) else None)
    except KeyboardInterrupt:
        print("interrupted: the shards written so far are kept; run the same command again to "
              "continue the build", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except OutputError as exc:  # cannot write the cache: one line, the previous one is kept
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {path} and its shards in {cache_shard_dir(path)}")
