"""DeltaCoupling: a rotation-equivariant GNN that learns dV so that V0 + dV matches Vref.

Each sample is a molecular dimer (monomers A and B) read from a folder in the format of
docs/DATA_FORMAT.md: ``meta.xlsx`` (one row per dimer), two monomer PDBs and one NPZ with Mulliken
populations, dipole and quadrupole. The network (e3nn + PyTorch Geometric) sees the atoms plus one
"field node" per dimer carrying its multipoles, and predicts the correction dV to a cheap baseline
interaction energy V0; the prediction of the reference is V0 + dV.

Three ways to run it::

    python delta_coupling.py                        # trains on the bundled examples/s22x5 data
    python delta_coupling.py --root_dir DIR --epochs 300   # your own data (see README.md)
    pytest                                          # the test suite

Pressing Run in an IDE is the first line: every argument has a default.

The file reads top to bottom: constants and units, parsing, geometry helpers, datasets, model,
fast path, losses, training engine, plotting, main. docs/DESIGN.md describes the model and its
training and the decisions behind them (cited below as "decision N"), docs/DATA_FORMAT.md the
data.
"""
import argparse
import contextlib
import datetime
import errno
import hashlib
import json
import math
import os
import pickle
import platform
import random
import re
import shlex
import shutil
import signal
import sys
import time
import traceback
import warnings
import zipfile
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn as nn
from e3nn import o3
from e3nn.nn import FullyConnectedNet
from torch_geometric.data import Data
from torch_geometric.loader import DataLoader
from tqdm import tqdm

# One module, however it is started. `python delta_coupling.py` runs this file as __main__
# (__mp_main__ in a spawned worker); preprocess_and_cache.py, tools/ and benchmarks/ import
# `delta_coupling`, which would otherwise load a second copy, with its own OutputError (that
# main()'s handler does not catch) and its own constants. Registering this module under its
# name first makes every companion's import return this very module.
if __name__ in ("__main__", "__mp_main__"):
    sys.modules["delta_coupling"] = sys.modules[__name__]

try:  # optional fast neighbour search (docs/DESIGN.md, decision 3); the pure-torch one is exact
    import torch_cluster
except ImportError:  # pragma: no cover - depends on the environment
    torch_cluster = None

# ----------------------------------------------------------------------------- constants & units
torch.set_default_dtype(torch.float32)
if hasattr(torch, "set_float32_matmul_precision"):
    torch.set_float32_matmul_precision("high")

NM_TO_ANGSTROM = 10.0  # Angstrom per nm
INT_ANGSTROM_SCALE = 0.1  # internal length units per Angstrom (1 Angstrom -> 0.1)
DEBYE_TO_E_ANGSTROM = 0.20819434  # e*Angstrom per Debye
DEBYE_ANGSTROM_TO_E_ANGSTROM2 = DEBYE_TO_E_ANGSTROM  # e*Angstrom^2 per Debye*Angstrom
DEG_TO_RAD = math.pi / 180.0
MIN_INTERMONOMER_DISTANCE_ANGSTROM = 0.5  # closer atoms of A and B: the dimer is refused
# plausibility bounds of the numbers read from the data (docs/DATA_FORMAT.md, "Plausible
# values"): a value outside them is a unit mistake, a sentinel or a damaged file, refused by the
# data check before anything trains
MIN_ATOM_DISTANCE_ANGSTROM = 0.5  # two atoms of one monomer closer: a duplicated record (H-H 0.74)
MAX_ABS_COORDINATE_ANGSTROM = 1.0e4  # |x|, |y|, |z|: a PDB's 8-column field holds < 10000
MIN_SHELL_POPULATION = -0.5  # electrons; Mulliken shells may dip a little below 0 (diffuse bases)
MAX_SHELL_POPULATION = 20.0  # electrons: all of Ca's, the heaviest supported element
MAX_ABS_DIPOLE_DEBYE = 1.0e3  # Debye per component; an ion pair 20 Angstrom apart has ~100 D
MAX_ABS_QUADRUPOLE_DEBYE_ANGSTROM = 1.0e4  # Debye*Angstrom per component; benzene's is ~9
MAX_R_NM = 100.0  # nm: 1000 Angstrom, far beyond the cutoff; more is usually a length in pm
MAX_ABS_THETA_DEG = 360.0  # degrees: more than a full turn
MAX_ABS_ENERGY = 1.0e6  # |V0|, |Vref| in their own unit (kcal/mol, kJ/mol, meV and cm^-1 fit)
MAX_ABS_PR = 1.0e6  # |PR| in its own unit: it enters the readout unscaled

IRREPS_EDGE_SH = o3.Irreps("4x0e+4x1o+4x2e+4x3o")  # edge spherical harmonics, l <= 3
# e3nn returns IRREPS_EDGE_SH as four identical copies of each l; one copy of each:
IRREPS_EDGE_SH_SINGLE = o3.Irreps([(1, ir) for _, ir in IRREPS_EDGE_SH])  # 0e+1o+2e+3o (16)
IRREPS_U = o3.Irreps("4x0e")  # global scalars u = [R, theta, V0, PR]
IRREPS_FIELD = o3.Irreps("1x1o+1x2e")  # field node: dipole (l=1) + quadrupole (l=2)
IRREPS_NODE = o3.Irreps("8x0e+1x1o+1x2e")  # node state: scalars, dipole-like, quadrupole-like
NUM_NODE_SCALARS = IRREPS_NODE.count("0e")  # 8 scalar channels
NODE_DIM = IRREPS_NODE.dim  # 16 = 8 + 3 + 5
U_DIM = IRREPS_U.dim  # 4
MULLIKEN_DIM = 3  # s, p, d populations per atom
NODE_ATTR_DIM = 8  # width of the embedded Mulliken attributes ("8x0e")

CACHE_FORMAT_VERSION = 3  # bump when the cache layout changes (2: an index + memory-mapped shards;
# 3: each graph's closest A-B contact, contact_internal)
DEFAULT_CACHE_FILE = "cached_graphs.pt"  # the cache's index; its shards in cached_graphs_shards/
CACHE_SHARD_BYTES = 64 * 2 ** 20  # a cache shard is closed once its graphs' tensors reach this
# DimerDataset and the data check keep every row's parsed files in memory up to this many rows;
# a larger set is re-read from its files per access, so memory does not grow with the data
DIMER_PRELOAD_MAX = 20_000
DEFAULT_PHYSICAL_CUTOFF = 12.0  # Angstrom
DEFAULT_BATCH_SIZE = 5
DEFAULT_NUM_CONV_LAYERS = 6
DEFAULT_NUM_RBF = 50
DEFAULT_LR = 1e-3
DEFAULT_RADIAL_HIDDEN = 64  # hidden width of the MLP that maps RBF -> tensor-product weights
DEFAULT_MLP_HIDDEN = 64  # hidden width of the readout MLP over [h, u]
DEFAULT_JITTER_STD = 0.001  # internal units (= 0.01 Angstrom)
# --dv_switch contact: dV times a smooth switch of the closest A-B atom distance, 1 up to
# SWITCH_ON and exactly 0 from SWITCH_OFF on (docs/DESIGN.md, decision 25: chosen from what is
# left for dV to learn at each contact distance, benchmarks/residual_by_contact.txt)
DV_SWITCHES = ("off", "contact")
DEFAULT_DV_SWITCH = "off"  # the design's dV, unswitched
DEFAULT_SWITCH_ON_ANGSTROM = 5.0
DEFAULT_SWITCH_OFF_ANGSTROM = 9.0
# --schedule: how a run is trained and which epoch's weights it keeps (docs/DESIGN.md,
# decision 24; docs/RESULTS.md, "Training schedule"). Each sets the defaults of --epochs (the
# OneCycle length), --patience (stale epochs before early stopping) and --ema (0: off):
# "spec" is the design's (docs/DESIGN.md, section 8), stale epochs counted from the first;
# "anneal" a short OneCycle that anneals fully, stale epochs counted only once the learning
# rate is down to ANNEAL_COUNT_LR_FRACTION of its peak. Measured by grouped 5-fold CV on two
# data sets, anneal is as accurate as spec (within the spread between seeds) in less of the
# time (docs/RESULTS.md has the figures), not clearly better: spec stays the default of a run,
# anneal is the default of --cv (a fold's accuracy at less cost); an EMA of the weights measured
# no better
SCHEDULES = {"anneal": {"epochs": 300, "patience": 50, "ema": 0.0},
             "spec": {"epochs": 1500, "patience": 250, "ema": 0.0}}
DEFAULT_SCHEDULE = "spec"
CV_DEFAULT_SCHEDULE = "anneal"  # --cv without --schedule
ANNEAL_COUNT_LR_FRACTION = 0.1
MONITORS = ("mape", "mae")  # --monitor: the validation figure early stopping and the best
DEFAULT_MONITOR = "mape"  # checkpoint watch (MAPE in %, MAE in Vref units)
# --keep: the weights a finished run keeps (its final checkpoint: what --predict, an ensemble
# and a CV fold use). "best": the epoch of the best monitored validation figure (the design's);
# "final": the weights after the last epoch, fully annealed under --schedule anneal (chosen for
# the pretrained members by grouped CV: docs/RESULTS.md, "Which weights a member keeps")
KEEPS = ("best", "final")
DEFAULT_KEEP = "best"
DEFAULT_SEED = 42
DEFAULT_LOG_EVERY = 10  # epochs
ONECYCLE_PCT_START = 0.3
ONECYCLE_MIN_STEPS = 20
MAPE_EPS = 1e-8  # Vref units
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)  # train, val, test (n >= 10)
SPLIT_MIN_N_FRACTIONAL = 10
# --compile auto on a CPU, by platform (benchmarks/bench_training.py, 2 cores: inductor trains
# 1.28x and evaluates 1.33x as fast as eager after its compilation; aot_eager 0.94x;
# docs/PERFORMANCE.md)
CPU_AUTO_COMPILE = {"linux": "inductor"}
# ... for runs of at least this many epochs: compiling takes tens of seconds (docs/PERFORMANCE.md),
# an epoch of the bundled example gains about 0.13 s, so shorter runs are faster eager
CPU_COMPILE_MIN_EPOCHS = 500
DEFAULT_ROOT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "examples", "s22x5")
# the model shipped with the repository (data/corpus/README.md): --predict uses it for a folder
# without a model of its own
PRETRAINED_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrained",
                                "ensemble.json")
BEST_CHECKPOINT = "best_model_delta_learning.pt"
FINAL_CHECKPOINT = "final_model_delta_learning.pt"
METRICS_FILE = "metrics.json"  # in <root_dir>/models: the final metrics report
HISTORY_FILE = "history.json"  # in <root_dir>/models: one record per epoch
RUN_CONFIG_FILE = "run_config.json"  # in <root_dir>/models: what reproduces the run
LEARNING_CURVES_PLOT = "learning_curves.png"  # in <root_dir>/plots
PREDICTIONS_FILE = "predictions.csv"  # in the --predict root_dir
PREDICTION_METRICS_FILE = "predictions_metrics.json"  # next to it, when Vref is given
# the full traceback of a run's first failed batch: in <root_dir>/models, and for --predict
# next to predictions.csv
FAILED_BATCHES_LOG = "failed_batches.log"
PREDICTION_FAILED_BATCHES_LOG = "predictions_failed_batches.log"
# The baseline's level of theory, as tools/build_dataset.py records it in a data folder; a
# checkpoint carries its training folder's record, and --predict compares them on these keys
LEVEL_OF_THEORY_FILE = "level_of_theory.json"
LEVEL_OF_THEORY_KEYS = ("method", "basis", "density_fit", "auxbasis", "counterpoise",
                        "dispersion")  # must agree between a model and a folder
LEVEL_OF_THEORY_DEFAULTS = {"dispersion": "none"}  # keys records made before them lack
LOG_AXIS_MIN_RATIO = 10.0  # learning curves: a log y axis when max / min spans a decade
# columns of the metrics table: (key, header, format); MAPE in %, the others in Vref units
METRIC_COLUMNS = (("mape", "MAPE %", ".2f"), ("mae", "MAE", ".4f"), ("rmse", "RMSE", ".4f"),
                  ("max_abs", "max|err|", ".4f"))
PROGRESS_INTERVAL_NO_TTY = 30.0  # seconds between progress-bar redraws into a file or pipe
RESUME_CHECKPOINT = "resume_delta_learning.pt"  # the state after the last finished epoch
RESUME_FORMAT_VERSION = 1
# options a --resume may change: what the run computes stays the same function (compile and
# worker processes may change rounding and the order of random draws, nothing else)
RESUME_FREE_OPTIONS = ("resume", "root_dir", "cache_file_name", "rebuild_cache", "check_data",
                       "log_every", "num_workers", "device", "compile", "skip_failed_batches",
                       "quiet")
# options of one invocation that a --resume does not take over from the saved run
RESUME_NOT_INHERITED = ("resume", "rebuild_cache", "check_data", "device", "num_workers",
                        "compile", "predict", "checkpoint")
EXIT_INTERRUPTED = 130  # exit status after Ctrl-C (128 + SIGINT), as shells report it
# torchrun (docs/PERFORMANCE.md, "Scaling out"): a collective that waits longer than this fails, so a
# hung rank cannot keep the others waiting for ever (torchrun ends them at once when one dies)
DIST_TIMEOUT_MINUTES = 30
DIST_DATA_TIMEOUT_HOURS = 48  # how long the other ranks wait for rank 0's data check and cache
# ensembles (--ensemble K, --member k, --combine_ensemble): members in <root_dir>/models/member_k
ENSEMBLE_FILE = "ensemble.json"  # in <root_dir>/models: the members' checkpoints, tied together
ENSEMBLE_FORMAT = "DeltaCoupling ensemble"
ENSEMBLE_FORMAT_VERSION = 1
ENSEMBLE_METRICS_FILE = "ensemble_metrics.json"  # in <root_dir>/models: the ensemble's report
UNCERTAINTY_PLOT = "uncertainty.png"  # in <root_dir>/plots: |error| vs std, calibration curve
PREDICTION_UNCERTAINTY_PLOT = "predictions_uncertainty.png"  # --predict, next to its CSV
# options in which an ensemble's members may differ (how and where each was run); every other
# option, the model config, the data and the split must be the same
ENSEMBLE_FREE_OPTIONS = RESUME_FREE_OPTIONS + ("member", "ensemble", "combine_ensemble", "predict",
                                               "checkpoint")
# grouped cross-validation (--cv K): folds in <root_dir>/models/cv/fold_f
CV_METRICS_FILE = "cv_metrics.json"  # in <root_dir>/models
CV_PREDICTIONS_FILE = "cv_predictions.csv"  # in <root_dir>/models: out-of-fold predictions
CV_PLOT = "cv_predictions.png"  # in <root_dir>/plots

# Elements H..Ca (Z = 1..20), the built-in periodic table
ELEMENTS = ("H", "He", "Li", "Be", "B", "C", "N", "O", "F", "Ne",
            "Na", "Mg", "Al", "Si", "P", "S", "Cl", "Ar", "K", "Ca")
ELEMENT_TO_Z = {sym.upper(): z for z, sym in enumerate(ELEMENTS, start=1)}
NUM_ELEMENTS = len(ELEMENTS)
# every element symbol, only to recognise (and refuse by name) elements beyond Ca
ALL_ELEMENT_SYMBOLS = frozenset((
    "H He Li Be B C N O F Ne Na Mg Al Si P S Cl Ar K Ca Sc Ti V Cr Mn Fe Co Ni Cu Zn Ga Ge As "
    "Se Br Kr Rb Sr Y Zr Nb Mo Tc Ru Rh Pd Ag Cd In Sn Sb Te I Xe Cs Ba La Ce Pr Nd Pm Sm Eu Gd "
    "Tb Dy Ho Er Tm Yb Lu Hf Ta W Re Os Ir Pt Au Hg Tl Pb Bi Po At Rn Fr Ra Ac Th Pa U Np Pu Am "
    "Cm Bk Cf Es Fm Md No Lr Rf Db Sg Bh Hs Mt Ds Rg Cn Nh Fl Mc Lv Ts Og").upper().split())
# residues whose atom names follow the protein/nucleic convention: "CA" is C-alpha, "HE21" a
# hydrogen, "NE2" a nitrogen (standard and common modified amino acids, nucleotides, caps)
STANDARD_RESIDUES = frozenset(
    "ALA ARG ASN ASP CYS GLN GLU GLY HIS ILE LEU LYS MET PHE PRO SER THR TRP TYR VAL "
    "HID HIE HIP HSD HSE HSP CYX ASH GLH LYN ACE NME NH2 MSE SEP TPO PTR HYP MLY CSO PCA "
    "A C G U T DA DC DG DT DU RA RC RG RU".split())

META_REQUIRED_COLUMNS = ("pdb_a", "pdb_b", "npz", "R_nm", "theta_deg", "V0", "Vref", "PR")
META_COLUMN_UNITS = {"R_nm": "nm", "theta_deg": "degrees", "V0": "the unit of Vref",
                     "Vref": "the unit of V0", "PR": "any"}
META_FILE_COLUMNS = ("pdb_a", "pdb_b", "npz")  # + R_nm: what parse_dimer needs of a row
# the numeric columns: |value| <= bound (in the unit), and what to do about a value beyond it
_CHECK_ENERGY = ("check the cell and its unit (a placeholder such as 1e10, or a value of "
                 "another column?)")
META_NUMBER_BOUNDS = {
    "R_nm": (MAX_R_NM, " nm", "write the distance of the monomer centroids in nm (0.35 nm = "
                              "3.5 Angstrom)"),
    "theta_deg": (MAX_ABS_THETA_DEG, " degrees", "write the angle in degrees"),
    "V0": (MAX_ABS_ENERGY, "", _CHECK_ENERGY),
    "Vref": (MAX_ABS_ENERGY, "", _CHECK_ENERGY),
    "PR": (MAX_ABS_PR, "", "check the cell, or rescale PR to a moderate range"),
}
NPZ_KEYS = ("mulliken_spd", "dipole", "quadrupole")
QUADRUPOLE_SYMMETRY_RTOL = 1e-5  # max |Q - Q^T| / max(|Q|, 1 D*A) symmetrised as rounding


def dipole_debye_to_internal(dipole_debye):
    """Debye -> e*Angstrom (x 0.20819434) -> internal (x INT_ANGSTROM_SCALE). Shape kept."""
    return np.asarray(dipole_debye, dtype=np.float64) * DEBYE_TO_E_ANGSTROM * INT_ANGSTROM_SCALE


def quadrupole_debye_angstrom_to_internal(quad):
    """Debye*Angstrom -> e*Angstrom^2 (x 0.20819434) -> internal (x INT_ANGSTROM_SCALE**2)."""
    return (np.asarray(quad, dtype=np.float64) * DEBYE_ANGSTROM_TO_E_ANGSTROM2
            * INT_ANGSTROM_SCALE ** 2)


def quadrupole_to_l2(quad):
    """Traceless part of a symmetric 3x3 tensor as 5 real l=2 components in e3nn's basis.

    ``[Qxz, Qxy, (2Qyy - Qxx - Qzz) / (2 sqrt 3), Qyz, (Qzz - Qxx) / 2]`` (docs/DESIGN.md,
    decision 4). The trace drops out of every component, so only the traceless part is used.
    Works on (..., 3, 3).
    """
    q = np.asarray(quad, dtype=np.float64)
    return np.stack([
        q[..., 0, 2],
        q[..., 0, 1],
        (2.0 * q[..., 1, 1] - q[..., 0, 0] - q[..., 2, 2]) / (2.0 * math.sqrt(3.0)),
        q[..., 1, 2],
        (q[..., 2, 2] - q[..., 0, 0]) / 2.0,
    ], axis=-1)  # (..., 5)


# ----------------------------------------------------------------------------- parsing
def _element_from_atom_name(name4, res_name):
    """Guess the element symbol from the 4-character PDB atom-name field (columns 13-16).

    PDB convention: a one-letter element sits in column 14 (the field starts with a space or a
    digit, " CA " is C-alpha); a two-letter element starts in column 13 ("CL1 ", "MG  ").
    In standard residues names are always one-letter elements. A left-justified name whose
    first two letters form an element (HE21, NE2, CA) is read as two letters only when that is
    unambiguous: the first letter alone is no element (ZN, MG), the name is the residue name
    (an ion: "CA" in residue "CA"), the name is the bare symbol (FE), or a halogen (CL1, BR1).
    """
    stripped = name4.strip().upper()
    letters = stripped.lstrip("0123456789")
    letters = letters[:len(letters) - len(letters.lstrip("ABCDEFGHIJKLMNOPQRSTUVWXYZ"))]
    if not letters:
        return ""
    res = res_name.strip().upper()
    two = letters[:2]
    if stripped == two and two in ALL_ELEMENT_SYMBOLS and two not in ELEMENT_TO_Z:
        return two  # a bare symbol beyond Ca (SE in MSE, FE, ZN): refused by name, never guessed
    if name4[:1] == " " or name4[:1].isdigit() or res in STANDARD_RESIDUES:
        return letters[0]
    if len(two) == 2 and two in ALL_ELEMENT_SYMBOLS and (
            letters[0] not in ALL_ELEMENT_SYMBOLS or stripped in (res, two)
            or two in ("CL", "BR")):
        return two
    return letters[0]


def parse_pdb(path):
    """Read ATOM/HETATM records of a PDB file.

    Returns ``(z, pos)``: atomic numbers (N,) int64 and positions (N, 3) float64 in Angstrom.
    The element comes from columns 77-78 when present, else from the atom name (columns 13-16).
    Only the first MODEL is read, and of alternate locations (column 17) only ' ' and 'A'.
    Raises ``ValueError`` naming the file and line for an unparsable or unsupported record, and
    saying what to fix.
    """
    z, pos, line_nos = [], [], []
    try:
        fh = open(path, encoding="latin-1")  # every byte decodes: a binary file has no atoms
    except (PermissionError, IsADirectoryError) as exc:
        raise ValueError(f"{path} cannot be opened ({exc.strerror}); check that it is a "
                         f"readable file") from None
    with fh:
        for line_no, raw in enumerate(fh, start=1):
            line = raw.rstrip("\r\n")
            if line.startswith("ENDMDL"):
                break
            if not (line.startswith("ATOM") or line.startswith("HETATM")):
                continue
            if line[16:17] not in ("", " ", "A"):
                continue  # alternate location B, C, ...: the 'A' conformer is kept
            try:
                xyz = [float(line[30:38]), float(line[38:46]), float(line[46:54])]
            except ValueError:
                raise ValueError(
                    f"{path}, line {line_no}: cannot read x/y/z from columns 31-54 "
                    f"(truncated or misaligned record?): {line!r}; fix this record: x, y, z "
                    f"in Angstrom in columns 31-38, 39-46, 47-54") from None
            finite = all(map(math.isfinite, xyz))
            if not (finite and max(map(abs, xyz)) < MAX_ABS_COORDINATE_ANGSTROM):
                raise ValueError(
                    f"{path}, line {line_no}: x, y, z = {', '.join(map(str, xyz))} is not "
                    f"{'plausible' if finite else 'finite'} (|coordinate| < "
                    f"{MAX_ABS_COORDINATE_ANGSTROM:g} Angstrom); fix this record: x, y, z in "
                    f"Angstrom in columns 31-38, 39-46, 47-54")
            element = line[76:78].strip() if len(line) > 76 else ""
            if not element:
                element = _element_from_atom_name(line[12:16].ljust(4), line[17:20])
            key = element.upper()
            if key not in ELEMENT_TO_Z:
                source = "columns 77-78" if line[76:78].strip() else \
                    f"atom name {line[12:16].strip()!r} (no element in columns 77-78)"
                raise ValueError(
                    f"{path}, line {line_no}: element {element.capitalize()!r} from {source} is "
                    f"not supported (supported: {', '.join(ELEMENTS)}); if the element is "
                    f"another one, write it in columns 77-78 of this record")
            z.append(ELEMENT_TO_Z[key])
            pos.append(xyz)
            line_nos.append(line_no)
    if not z:
        raise ValueError(f"{path}: no ATOM/HETATM records found (empty or not a PDB file?); "
                         f"write the monomer's atoms as ATOM/HETATM records, or fix the path "
                         f"in meta.xlsx")
    pos = np.asarray(pos, dtype=np.float64)
    dist, i, j = closest_pair(pos)
    if dist < MIN_ATOM_DISTANCE_ANGSTROM:
        raise ValueError(f"{path}, lines {line_nos[i]} and {line_nos[j]}: two atoms {dist:.3f} "
                         f"Angstrom apart (< {MIN_ATOM_DISTANCE_ANGSTROM}): a duplicated record "
                         f"or a second alternate location?; keep one record per atom")
    return np.asarray(z, dtype=np.int64), pos


def closest_pair(pos_a, pos_b=None, chunk=512):
    """The closest two atoms: ``(distance, i, j)`` with i in ``pos_a`` (N, 3) and j in
    ``pos_b`` (M, 3), or i < j both in ``pos_a`` when ``pos_b`` is None; ``(inf, -1, -1)``
    without a pair. Rows go in chunks, so memory stays O(chunk * M)."""
    best = (math.inf, -1, -1)
    for start in range(0, len(pos_a), chunk):
        block = pos_a[start:start + chunk]  # (C, 3)
        offset = start if pos_b is None else 0  # within pos_a: the pairs (i, j > i) only
        other = pos_a[start:] if pos_b is None else pos_b  # (M', 3)
        dist2 = ((block[:, None, :] - other[None, :, :]) ** 2).sum(axis=-1)  # (C, M')
        if pos_b is None:
            dist2[np.tril_indices(len(block), m=dist2.shape[1])] = np.inf  # j <= i
        if dist2.size and math.sqrt(dist2.min()) < best[0]:
            i, j = np.unravel_index(np.argmin(dist2), dist2.shape)
            best = (math.sqrt(dist2[i, j]), start + int(i), offset + int(j))
    return best


def read_level_of_theory(root_dir):
    """The baseline's level of theory recorded in ``<root_dir>/level_of_theory.json`` (a dict
    with at least ``LEVEL_OF_THEORY_KEYS``; a key a record predates gets its default from
    ``LEVEL_OF_THEORY_DEFAULTS``), or None for a folder without the record."""
    path = os.path.join(root_dir, LEVEL_OF_THEORY_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            level = json.load(fh)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: unreadable level-of-theory record ({exc}); rewrite it or "
                         f"rebuild the folder with tools/build_dataset.py") from None
    missing = [k for k in LEVEL_OF_THEORY_KEYS if not isinstance(level, dict) or
               (k not in level and k not in LEVEL_OF_THEORY_DEFAULTS)]
    if missing:
        raise ValueError(f"{path}: the level-of-theory record lacks {', '.join(missing)}; "
                         f"rebuild the folder with tools/build_dataset.py")
    return {**LEVEL_OF_THEORY_DEFAULTS, **level}


def describe_level_of_theory(level):
    """One line: ``hf/def2-svp, density fitting (def2-universal-jkfit), no counterpoise``."""
    fit = f"density fitting ({level['auxbasis']})" if level["density_fit"] else "no density fit"
    cp = "counterpoise" if level["counterpoise"] else "no counterpoise"
    disp = level.get("dispersion", "none")
    return f"{level['method']}/{level['basis']}{'' if disp == 'none' else '-' + disp.upper()}, " \
           f"{fit}, {cp}"


def level_of_theory_mismatch(trained, folder):
    """The differences between a model's level of theory and a folder's, as text; '' when
    they agree. Both are records as ``read_level_of_theory`` returns them."""
    def value(level, k):  # a record made before key k existed had its default
        return level.get(k, LEVEL_OF_THEORY_DEFAULTS.get(k))

    return "; ".join(f"{k}: {value(trained, k)!r} for the model, {value(folder, k)!r} in the "
                     f"folder" for k in LEVEL_OF_THEORY_KEYS
                     if value(trained, k) != value(folder, k))


def _hash_file(digest, path):
    """Feed the bytes of ``path`` into ``digest`` in 1 MiB chunks; return it."""
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest


def file_sha256(path):
    """Hex SHA-256 of one file's bytes."""
    return _hash_file(hashlib.sha256(), path).hexdigest()


def data_sha256(root_dir, rows):
    """Hex SHA-256 over meta.xlsx and every PDB/NPZ it names (ties a cache to its data)."""
    digest = hashlib.sha256()
    paths = ["meta.xlsx"] + [r[col] for r in rows for col in META_FILE_COLUMNS]
    for rel in paths:
        digest.update(rel.encode() + b"\0")
        _hash_file(digest, os.path.join(root_dir, rel))
    return digest.hexdigest()


def _problem(problems, exc):
    """Raise ``exc``, or append its message to ``problems`` when that is a list (collect mode)."""
    if problems is None:
        raise exc
    problems.append(str(exc))


def _meta_cell(col, value, where):
    """One validated meta.xlsx cell: a stripped path or a finite float. Raises ``ValueError``."""
    if col in META_FILE_COLUMNS:
        if pd.isna(value) or not str(value).strip():
            raise ValueError(f"{where}: column {col} is empty; write the file's path relative "
                             f"to the data folder")
        return str(value).strip()
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {col} = {value!r} is not a number; write a number in "
                         f"column {col} (unit: {META_COLUMN_UNITS[col]})") from None
    if not math.isfinite(number):
        raise ValueError(f"{where}: {col} is {'empty' if pd.isna(value) else repr(value)}, not a "
                         f"finite number; write a number in column {col} "
                         f"(unit: {META_COLUMN_UNITS[col]})")
    if col == "R_nm" and number <= 0:
        raise ValueError(f"{where}: R_nm = {number} must be > 0; write the distance of the "
                         f"monomer centroids in nm")
    bound, unit, todo = META_NUMBER_BOUNDS[col]
    if abs(number) > bound:
        raise ValueError(f"{where}: {col} = {number:g} is not plausible (|{col}| <= {bound:g}"
                         f"{unit}, docs/DATA_FORMAT.md); {todo}")
    return number


def read_meta(root_dir, require_vref=True, *, problems=None):
    """Read ``<root_dir>/meta.xlsx`` into a list of row dicts, validated.

    Column names are matched case-insensitively; ``id`` defaults to the row number. Each dict
    carries ``row`` (the spreadsheet row number, header = 1) for error messages. The first
    problem raises ``ValueError``/``FileNotFoundError``; with a list ``problems`` every problem
    is appended to it instead, and every row is returned with the fields that passed (a field
    with a problem, or of a missing column, is left out). With ``require_vref=False``
    (prediction) the Vref column may be missing and its cells empty: such rows get
    ``Vref = NaN``.
    """
    path = os.path.join(root_dir, "meta.xlsx")
    if not os.path.isfile(path):
        _problem(problems, FileNotFoundError(
            f"{path} not found: a data folder needs a meta.xlsx (see the data format in "
            f"docs/DATA_FORMAT.md); check --root_dir"))
        return []
    try:
        # only an empty cell is missing: "NA", "n/a" or "NaN" stay text, reported as written
        frame = pd.read_excel(path, sheet_name=0, keep_default_na=False, na_values=[""])
    except (ValueError, OSError, KeyError, zipfile.BadZipFile) as exc:
        _problem(problems, ValueError(
            f"{path}: cannot be read as an .xlsx workbook ({exc}); save it as an Excel "
            f".xlsx workbook with the header in row 1"))
        return []
    lower = {str(c).strip().lower(): c for c in frame.columns}
    missing = [c for c in META_REQUIRED_COLUMNS
               if c.lower() not in lower and (require_vref or c != "Vref")]
    if missing:
        _problem(problems, ValueError(
            f"{path}: missing required column(s) {missing}; found {list(map(str, frame.columns))}"
            f"; add them to the header in row 1 (names are case-insensitive)"))
    if len(frame) == 0:
        _problem(problems, ValueError(f"{path}: no data rows; add one row per dimer below the "
                                      f"header"))
    rows, seen = [], {}
    for i, rec in enumerate(frame.to_dict("records")):
        sheet_row = i + 2  # header is spreadsheet row 1
        rid = rec[lower["id"]] if "id" in lower else sheet_row
        rid = str(sheet_row if pd.isna(rid) else rid)
        where = f"{path}, row {sheet_row} (id {rid})"
        row = {"id": rid, "row": sheet_row}
        for col in META_REQUIRED_COLUMNS:
            if col == "Vref" and not require_vref and (
                    col.lower() not in lower or pd.isna(rec[lower[col.lower()]])):
                row[col] = float("nan")  # no reference: predict only
                continue
            if col.lower() not in lower:
                continue  # reported above
            try:
                row[col] = _meta_cell(col, rec[lower[col.lower()]], where)
            except ValueError as exc:
                _problem(problems, exc)
        if "group" in lower and not pd.isna(rec[lower["group"]]):
            row["group"] = str(rec[lower["group"]])
        if rid in seen:
            _problem(problems, ValueError(f"{where}: duplicate id (also row {seen[rid]}); give "
                                          f"each row its own id"))
        seen.setdefault(rid, sheet_row)
        rows.append(row)
    return rows


def groups_of(rows):
    """{id: group} of the meta.xlsx ``rows`` that have a group."""
    return {r["id"]: r["group"] for r in rows if "group" in r}


def load_npz(path, n_atoms, where):
    """Load and check one dimer NPZ. Returns (mulliken (N,3), dipole (3,) D, quad (3,3) D*A).

    The quadrupole must be symmetric: an asymmetry up to ``QUADRUPOLE_SYMMETRY_RTOL`` of its
    largest component (or of 1 D*A, if larger), the rounding of a text export, is removed by
    symmetrising; a larger one is refused, because an asymmetric tensor means a wrong export or
    layout (e.g. six unique components read as a row-major 3x3) that symmetrising would hide.
    """
    fix = ("; re-export it with np.savez: mulliken_spd (N, 3), dipole (3,) in D, quadrupole "
           "(3, 3) in D*Angstrom (see docs/DATA_FORMAT.md)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{where}: NPZ file {path} not found; fix column npz or add "
                                f"the file")
    if not zipfile.is_zipfile(path):  # a .npy array, text, a pickle, a truncated download ...
        raise ValueError(f"{where}: {path} is not an NPZ archive{fix}")
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{where}: {path} cannot be read as an NPZ file ({exc}){fix}") from None
    with npz:
        missing = [key for key in NPZ_KEYS if key not in npz.files]
        if missing:
            raise ValueError(f"{where}: {path} has no key(s) {missing} (found {npz.files}){fix}")
        try:
            mulliken, dipole, quad = (np.asarray(npz[key], dtype=np.float64) for key in NPZ_KEYS)
        except (OSError, EOFError, ValueError, TypeError, zipfile.BadZipFile) as exc:
            raise ValueError(f"{where}: {path}: cannot read its arrays as numbers ({exc})"
                             f"{fix}") from None
    if mulliken.ndim != 2 or mulliken.shape[1] not in (2, 3):
        raise ValueError(f"{where}: {path}: mulliken_spd has shape {mulliken.shape}, "
                         f"expected (N, 3) or (N, 2){fix}")
    if mulliken.shape[0] != n_atoms:
        raise ValueError(f"{where}: {path}: mulliken_spd has {mulliken.shape[0]} rows but the "
                         f"two PDBs hold {n_atoms} atoms together (A's atoms first, then B's); "
                         f"check that pdb_a, pdb_b and npz belong to the same dimer{fix}")
    if mulliken.shape[1] == 2:  # no d column: d = 0
        mulliken = np.concatenate([mulliken, np.zeros((n_atoms, 1))], axis=1)
    if dipole.shape != (3,):
        raise ValueError(f"{where}: {path}: dipole has shape {dipole.shape}, expected (3,){fix}")
    if quad.shape != (3, 3):
        raise ValueError(f"{where}: {path}: quadrupole has shape {quad.shape}, expected (3, 3)"
                         f"{fix}")
    _check_npz_values(path, where, fix, mulliken, dipole, quad)
    asym = np.abs(quad - quad.T).max()
    scale = max(1.0, np.abs(quad).max())  # D*A
    if asym > QUADRUPOLE_SYMMETRY_RTOL * scale:
        raise ValueError(f"{where}: {path}: quadrupole is not symmetric (max |Q - Q^T| = "
                         f"{asym:.3g} D*A, {asym / scale:.2g} of its largest component; at most "
                         f"{QUADRUPOLE_SYMMETRY_RTOL:g} is taken as rounding): an asymmetric "
                         f"tensor means a wrong export or layout, which symmetrising would "
                         f"hide; write the full symmetric 3x3 Cartesian tensor{fix}")
    return mulliken, dipole, 0.5 * (quad + quad.T)


def _check_npz_values(path, where, fix, mulliken, dipole, quad):
    """Every NPZ number finite and within its plausible range (docs/DATA_FORMAT.md,
    "Plausible values"); raises ``ValueError`` naming the array entry."""
    checks = (("mulliken_spd", mulliken, MIN_SHELL_POPULATION, MAX_SHELL_POPULATION,
               "electrons", "populations of the atom's s, p, d shells in electrons"),
              ("dipole", dipole, -MAX_ABS_DIPOLE_DEBYE, MAX_ABS_DIPOLE_DEBYE, "D",
               "the dipole in Debye (not atomic units or C*m)"),
              ("quadrupole", quad, -MAX_ABS_QUADRUPOLE_DEBYE_ANGSTROM,
               MAX_ABS_QUADRUPOLE_DEBYE_ANGSTROM, "D*Angstrom",
               "the quadrupole in Debye*Angstrom (not atomic units)"))
    for key, arr, low, high, unit, todo in checks:
        finite = np.isfinite(arr)
        bad = ~finite | (np.where(finite, arr, 0.0) < low) | (np.where(finite, arr, 0.0) > high)
        if not bad.any():
            continue
        index = tuple(int(k) for k in np.argwhere(bad)[0])
        entry = f"{key}[{', '.join(map(str, index))}] = {arr[index]:g}"
        if key == "mulliken_spd":
            entry += f" (atom {index[0] + 1}, A's atoms first, {'spd'[index[1]]} shell)"
        if not finite[index]:
            raise ValueError(f"{where}: {path}: {key} contains NaN or Inf: {entry}{fix}")
        raise ValueError(f"{where}: {path}: {entry} {unit} is not plausible (between {low:g} "
                         f"and {high:g} {unit}, docs/DATA_FORMAT.md); write {todo}{fix}")


@dataclass
class ParsedDimer:
    """Everything read from one dimer's files, before any augmentation (physical units)."""
    row: dict  # the meta.xlsx row (id, row number, paths, R_nm, ...)
    z: np.ndarray  # (N,) atomic numbers, A's atoms first
    pos: np.ndarray  # (N, 3) Angstrom: A centred at 0, B centred at (0, 0, R)
    mulliken: np.ndarray  # (N, 3) electrons
    field: np.ndarray  # (8,) internal units: dipole (3) + traceless quadrupole l=2 (5)
    contact: float = math.inf  # Angstrom: the closest distance of an atom of A to one of B


def parse_dimer(root_dir, row):
    """Read the two PDBs and the NPZ of one meta.xlsx row and assemble the dimer geometry."""
    where = f"{os.path.join(root_dir, 'meta.xlsx')}, row {row['row']} (id {row['id']})"
    parts = []
    for col in ("pdb_a", "pdb_b"):
        path = os.path.join(root_dir, row[col])
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{where}: {col} file {path} not found; fix column {col} "
                                    f"or add the file")
        try:
            parts.append(parse_pdb(path))
        except ValueError as exc:
            raise ValueError(f"{where}: {col}: {exc}") from None
    (z_a, pos_a), (z_b, pos_b) = parts
    r_angstrom = row["R_nm"] * NM_TO_ANGSTROM
    pos_a = pos_a - pos_a.mean(axis=0)  # (N_A, 3) Angstrom, centred on A's centroid
    pos_b = pos_b - pos_b.mean(axis=0) + np.array([0.0, 0.0, r_angstrom])  # (N_B, 3)
    closest = closest_pair(pos_a, pos_b)[0]
    if closest < MIN_INTERMONOMER_DISTANCE_ANGSTROM:
        raise ValueError(f"{where}: atoms of A and B are {closest:.3f} Angstrom apart at "
                         f"R_nm = {row['R_nm']} (< {MIN_INTERMONOMER_DISTANCE_ANGSTROM}); "
                         f"check R_nm (nm, not Angstrom) and the orientations in the PDBs")
    n_atoms = len(z_a) + len(z_b)
    mulliken, dipole, quad = load_npz(os.path.join(root_dir, row["npz"]), n_atoms, where)
    field = np.concatenate([
        dipole_debye_to_internal(dipole),  # (3,) 1o
        quadrupole_to_l2(quadrupole_debye_angstrom_to_internal(quad)),  # (5,) 2e
    ])  # (8,)
    return ParsedDimer(row=row, z=np.concatenate([z_a, z_b]), pos=np.concatenate([pos_a, pos_b]),
                       mulliken=mulliken, field=field, contact=float(closest))


def check_dataset(root_dir, parsed=None, require_vref=True, rows=None):
    """Validate every row of a data folder with the rules used in training; raise nothing.

    Returns ``(n_rows, problems)``: the number of data rows in meta.xlsx and one message per
    problem found: meta.xlsx-level ones and every bad cell (``read_meta``), then for each row
    with usable paths and R_nm the first problem of its PDBs and NPZ (``parse_dimer``): every
    number unreadable, non-finite or beyond its plausible range (docs/DATA_FORMAT.md).
    ``parsed``: a list that receives the ``ParsedDimer`` of every row read without a problem,
    so that training does not read the files again; left empty for a folder of more than
    ``DIMER_PRELOAD_MAX`` rows (their files are read again when needed, memory stays bounded).
    ``require_vref=False``: as prediction reads meta.xlsx (``read_meta``). ``rows``: a list
    that receives every row of meta.xlsx.
    """
    problems = []
    meta_rows = read_meta(root_dir, require_vref, problems=problems)
    if rows is not None:
        rows.extend(meta_rows)
    keep = parsed is not None and len(meta_rows) <= DIMER_PRELOAD_MAX
    for row in meta_rows:
        if all(col in row for col in META_FILE_COLUMNS + ("R_nm",)):
            try:
                dimer = parse_dimer(root_dir, row)
            except (ValueError, FileNotFoundError) as exc:
                problems.append(str(exc))
                continue
            if keep:
                parsed.append(dimer)
    return len(meta_rows), problems


# ----------------------------------------------------------------------------- geometry helpers
def radius_graph(pos, cutoff, batch=None):
    """Directed edges (2, E) = [src, dst] between distinct atoms closer than ``cutoff``.

    Uses torch_cluster when importable (with a neighbour bound that can never truncate),
    else an exact pure-torch search over pairs within each graph (docs/DESIGN.md, decision 3).
    """
    n = pos.size(0)
    if batch is None:
        batch = torch.zeros(n, dtype=torch.long, device=pos.device)
    if torch_cluster is not None:
        return torch_cluster.radius_graph(pos, r=cutoff, batch=batch, loop=False,
                                          max_num_neighbors=max(n, 1))
    dist = torch.cdist(pos, pos, compute_mode="donot_use_mm_for_euclid_dist")  # (N, N)
    mask = (dist < cutoff) & (batch[:, None] == batch[None, :])
    mask.fill_diagonal_(False)
    dst, src = mask.nonzero(as_tuple=True)  # row-major: grouped by receiver
    return torch.stack([src, dst])  # (2, E)


def edge_vectors(pos, edge_index):
    """Edge vectors pos[src] - pos[dst] (E, 3); the one convention used everywhere."""
    return pos[edge_index[0]] - pos[edge_index[1]]


def _copy_index(irreps_copies, copy=0):
    """Column index (dim_single,) that picks copy ``copy`` of every l from tiled harmonics."""
    return torch.cat([torch.arange(s.start + copy * ir.dim, s.start + (copy + 1) * ir.dim)
                      for (_, ir), s in zip(irreps_copies, irreps_copies.slices())])


def _tile_index(irreps_copies):
    """Column index (dim,) that tiles single-copy harmonics into ``irreps_copies``'s layout."""
    starts = np.cumsum([0] + [ir.dim for _, ir in irreps_copies])
    return torch.cat([torch.arange(int(starts[k]), int(starts[k]) + ir.dim).repeat(mul)
                      for k, (mul, ir) in enumerate(irreps_copies)])


_SH_LS = [ir.l for _, ir in IRREPS_EDGE_SH_SINGLE]  # [0, 1, 2, 3]
_SH_TILE_INDEX = _tile_index(IRREPS_EDGE_SH)  # (64,) single-copy column of each tiled column


def edge_spherical_harmonics(edge_vec, tiled=True):
    """Spherical harmonics of edge vectors, component normalisation.

    ``tiled``: (E, 64) in the layout of ``4x0e+4x1o+4x2e+4x3o`` (what e3nn returns for those
    irreps: four copies of each l), else one copy of each l, (E, 16). Only tensors and ints
    reach e3nn here, so the call traces under ``torch.compile``.
    """
    sh = o3.spherical_harmonics(_SH_LS, edge_vec, normalize=True, normalization="component")
    return sh[:, _SH_TILE_INDEX.to(sh.device)] if tiled else sh


def atom_graph_fields(pos, cutoff, *, with_sh):
    """Radius-graph edges of ``pos`` with their lengths (and harmonics): the Data fields."""
    edge_index = radius_graph(pos, cutoff)  # (2, E)
    edge_vec = edge_vectors(pos, edge_index)  # (E, 3)
    fields = {"edge_index_atoms": edge_index,
              "edge_attr_atoms": edge_vec.norm(dim=-1, keepdim=True)}  # (E, 1)
    if with_sh:
        fields["edge_attr_sh"] = edge_spherical_harmonics(edge_vec)  # (E, 64)
    return fields


def random_rotation(dtype=None):
    """A uniformly random proper rotation (3, 3) from torch's global RNG."""
    return o3.rand_matrix(dtype=dtype or torch.get_default_dtype())


# l=2 components <-> row-major symmetric traceless 3x3, for the quadrupole's rotation matrix
_L2_FROM_CARTESIAN = torch.as_tensor(np.stack([
    quadrupole_to_l2(0.5 * (np.outer(e_i, e_j) + np.outer(e_j, e_i)))
    for e_i in np.eye(3) for e_j in np.eye(3)], axis=1))  # (5, 9) float64
_CARTESIAN_FROM_L2 = torch.linalg.pinv(_L2_FROM_CARTESIAN)  # (9, 5): the traceless preimage


def field_rotation_matrix(rot):
    """e3nn's D matrix (8, 8) of the field irreps ``1x1o+1x2e`` for a proper rotation (3, 3).

    Equal to ``IRREPS_FIELD.D_from_matrix(rot)`` (tested) without its Euler-angle detour, which
    costs milliseconds per call: the dipole rotates with ``rot`` itself (e3nn's l=1 order is
    x, y, z) and the quadrupole as ``rot Q rot^T`` read back in l=2 components.
    """
    r = rot.to(torch.float64)
    d2 = (_L2_FROM_CARTESIAN.to(r.device) @ torch.kron(r, r)
          @ _CARTESIAN_FROM_L2.to(r.device))  # (5, 5)
    return torch.block_diag(r, d2).to(rot.dtype)  # (8, 8)


def rotate_field_features(field_features, rot):
    """Rotate (..., 8) field features (1o dipole + 2e quadrupole) with e3nn's D matrix."""
    return field_features @ field_rotation_matrix(rot).to(field_features.dtype).T


# ----------------------------------------------------------------------------- datasets
def make_graph(parsed, internal_cutoff, rotation=None, jitter_std=0.0, with_sh=False):
    """Build the PyG ``Data`` of one dimer (docs/DATA_FORMAT.md), optionally rotated and jittered.

    Per-graph quantities are stored with a leading dimension of 1 so that a batch of B graphs
    has ``u`` (B, 4), ``field_node_features`` (B, 8), ``y`` (B,) ...
    """
    dtype = torch.get_default_dtype()
    row = parsed.row
    pos = torch.as_tensor(parsed.pos * INT_ANGSTROM_SCALE, dtype=dtype)  # (N, 3) internal
    field_feat = torch.as_tensor(parsed.field, dtype=dtype).unsqueeze(0)  # (1, 8) internal
    if rotation is not None:
        rot = rotation.to(dtype)
        pos = pos @ rot.T
        field_feat = rotate_field_features(field_feat, rot)
    if jitter_std > 0:
        pos = pos + jitter_std * torch.randn_like(pos)
    r_internal = row["R_nm"] * NM_TO_ANGSTROM * INT_ANGSTROM_SCALE
    data = Data(
        z_atoms=torch.as_tensor(parsed.z, dtype=torch.long),  # (N,)
        pos_atoms=pos,  # (N, 3) internal
        atomic_node_attr=torch.as_tensor(parsed.mulliken, dtype=dtype),  # (N, 3) electrons
        field_node_features=field_feat,  # (1, 8)
        u=torch.tensor([[r_internal, row["theta_deg"] * DEG_TO_RAD, row["V0"], row["PR"]]],
                       dtype=dtype),  # (1, 4)
        y=torch.tensor([row["Vref"] - row["V0"]], dtype=dtype),  # (1,) dV target
        y_true_vref=torch.tensor([row["Vref"]], dtype=dtype),  # (1,)
        R_internal_val=torch.tensor([r_internal], dtype=dtype),  # (1,)
        # closest A-B atom distance of the untouched geometry (rotation-invariant), internal
        contact_internal=torch.tensor([parsed.contact * INT_ANGSTROM_SCALE], dtype=dtype),
        row_number=torch.tensor([row["row"]], dtype=torch.long),  # (1,) spreadsheet row
        # (not "*_index": PyG would offset it by num_nodes when batching)
        num_nodes=len(parsed.z),
        **atom_graph_fields(pos, internal_cutoff, with_sh=with_sh),  # edges, lengths, SH
    )
    data.id = row["id"]
    return data


class DimerDataset(torch.utils.data.Dataset):
    """Raw files -> graphs (docs/DESIGN.md, section 3), fresh augmentation per item if ``augment``.

    Args:
        root_dir: data folder with meta.xlsx.
        physical_cutoff: radius-graph cutoff in Angstrom.
        augment: apply jitter (``jitter_std``, internal units) and one random whole-dimer
            rotation to positions and field features on every access.
        preload: parse every row's files in the constructor (all errors surface at once and
            files are read once); ``False`` re-reads the files on every access; ``None`` (the
            default): preload up to ``DIMER_PRELOAD_MAX`` rows, re-read a larger set.
        parsed: the rows' ``ParsedDimer`` in meta.xlsx order if already read (``check_dataset``
            of this folder); their rows are used and meta.xlsx is not read again.
        rows: the meta.xlsx rows if already read (and ``parsed`` not given).
    """

    def __init__(self, root_dir, physical_cutoff=DEFAULT_PHYSICAL_CUTOFF, augment=False,
                 jitter_std=DEFAULT_JITTER_STD, preload=None, parsed=None, rows=None):
        self.root_dir = root_dir
        if parsed is not None:
            rows = [p.row for p in parsed]
        self.rows = rows if rows is not None else read_meta(root_dir)
        self.internal_cutoff = physical_cutoff * INT_ANGSTROM_SCALE
        self.augment = augment
        self.jitter_std = jitter_std
        if preload is None:
            preload = len(self.rows) <= DIMER_PRELOAD_MAX
        if parsed is None and preload:
            parsed = [parse_dimer(root_dir, r) for r in self.rows]
        self.parsed = parsed

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, idx):
        parsed = self.parsed[idx] if self.parsed is not None else parse_dimer(self.root_dir,
                                                                              self.rows[idx])
        if self.augment:
            return make_graph(parsed, self.internal_cutoff, rotation=random_rotation(),
                              jitter_std=self.jitter_std)
        return make_graph(parsed, self.internal_cutoff)


def cache_metadata(root_dir, physical_cutoff, rows):
    """The metadata a cache must carry and match (docs/DESIGN.md, decision 9)."""
    return {
        "format_version": CACHE_FORMAT_VERSION,
        "physical_cutoff": float(physical_cutoff),
        "internal_cutoff": float(physical_cutoff * INT_ANGSTROM_SCALE),
        "int_angstrom_scale": INT_ANGSTROM_SCALE,
        "irreps_edge_sh": str(IRREPS_EDGE_SH),
        "n_rows": len(rows),
        "data_sha256": data_sha256(root_dir, rows),
    }


def check_cache_metadata(metadata, expected):
    """Return a list of human-readable mismatches between saved metadata (of a cache or a
    resume state) and ``expected``, that of the current data and settings."""
    problems = []
    for key in ("format_version", "internal_cutoff", "int_angstrom_scale", "irreps_edge_sh",
                "n_rows", "data_sha256"):
        have, want = metadata.get(key), expected[key]
        same = (math.isclose(have, want, rel_tol=1e-9) if isinstance(want, float)
                and isinstance(have, (int, float)) else have == want)
        if same:
            continue
        if key == "data_sha256" and have is not None:
            problems.append("data_sha256: meta.xlsx or one of the PDB/NPZ files it names has "
                            "changed since it was saved")
        else:
            problems.append(f"{key}: saved {have!r}, current data and settings need {want!r}")
    return problems


# A cache (docs/DATA_FORMAT.md, "The cache") is an index file, cached_graphs.pt (metadata,
# ids, shard list with sizes and SHA-256), and shards in cached_graphs_shards/: each a flat store
# of consecutive rows, every field concatenated with per-graph offsets, read memory-mapped, so a
# process holds file-backed pages the kernel can drop, never the whole set in its own memory.
CACHE_NODE_FIELDS = ("z_atoms", "pos_atoms", "atomic_node_attr")  # (N, ...) per graph
CACHE_EDGE_FIELDS = ("edge_attr_atoms", "edge_attr_sh")  # (E, ...); edge_index_atoms is (2, E)


def cache_shard_dir(cache_path):
    """The folder of a cache's shards: ``.../cached_graphs.pt`` -> ``.../cached_graphs_shards``."""
    return os.path.splitext(cache_path)[0] + "_shards"


def cache_shard_name(k):
    return f"shard_{k:05d}.pt"


def rebuild_cache_hint(root_dir, physical_cutoff, cache_file_name):
    """The sentence that tells how to rebuild a cache."""
    return (f"Rebuild it: python preprocess_and_cache.py --root_dir {shlex.quote(root_dir)} "
            f"--physical_cutoff {physical_cutoff} --cache_file_name "
            f"{shlex.quote(cache_file_name)}, or run again with --rebuild_cache")


def pack_graphs(graphs):
    """A flat store of graphs ({field: tensor} each): every field concatenated over the graphs
    (edge_index_atoms along its edge dimension, its indices kept per graph) with each graph's
    node and edge offsets, ``node_ptr`` and ``edge_ptr`` (n + 1,) int64."""
    def offsets(counts):
        return torch.cumsum(torch.tensor([0] + counts, dtype=torch.long), 0)  # (n + 1,)

    return {"node_ptr": offsets([g["z_atoms"].size(0) for g in graphs]),
            "edge_ptr": offsets([g["edge_index_atoms"].size(1) for g in graphs]),
            "fields": {key: torch.cat([g[key] for g in graphs],
                                      dim=1 if key == "edge_index_atoms" else 0)
                       for key in graphs[0]}}


def unpack_graph(store, i):
    """Graph ``i`` of a ``pack_graphs`` store as {field: tensor}: views, nothing copied."""
    n0, n1 = store["node_ptr"][i:i + 2].tolist()
    e0, e1 = store["edge_ptr"][i:i + 2].tolist()
    out = {}
    for key, t in store["fields"].items():
        if key in CACHE_NODE_FIELDS:
            out[key] = t[n0:n1]
        elif key in CACHE_EDGE_FIELDS:
            out[key] = t[e0:e1]
        elif key == "edge_index_atoms":
            out[key] = t[:, e0:e1]
        else:  # one row per graph
            out[key] = t[i:i + 1]
    return out


def load_cache(cache_path):
    """Open a cache written by ``build_cache``: its index (tensors and plain types only); the
    shards are memory-mapped when first used. Returns a ``GraphCache``."""
    hint = "; delete it or run with --rebuild_cache"
    index = load_tensors_file(cache_path, "a DeltaCoupling cache", hint)
    if not isinstance(index, dict) or not isinstance(index.get("metadata"), dict):
        raise ValueError(f"{cache_path} is not a DeltaCoupling cache (no metadata){hint}")
    version = index["metadata"].get("format_version")
    if version != CACHE_FORMAT_VERSION:
        raise ValueError(f"{cache_path}: format_version: saved {version!r}, this code reads "
                         f"{CACHE_FORMAT_VERSION} (the cache layout changed){hint}")
    if not (isinstance(index.get("ids"), list) and isinstance(index.get("shards"), list)):
        raise ValueError(f"{cache_path} is not a DeltaCoupling cache (no ids and shards){hint}")
    return GraphCache(cache_path, index)


class GraphCache:
    """The graphs of a cache: the index in memory, each shard memory-mapped on first use.

    ``graph(i)`` returns row ``i``'s {field: tensor} as views into its shard's mapped file.
    ``verify()`` checks every shard's size and SHA-256 against the index. A missing or damaged
    shard raises ``ValueError`` naming it, with the command that rebuilds the cache.
    """

    def __init__(self, path, index):
        self.path = path
        self.metadata = index["metadata"]
        self.ids = index["ids"]
        self.shards = index["shards"]  # [{file, start, count, bytes, sha256}] in row order
        self._starts = np.array([s["start"] for s in self.shards], dtype=np.int64)
        self._open = {}  # shard number -> its mapped store

    def __len__(self):
        return len(self.ids)

    def __getstate__(self):  # a DataLoader worker started by spawn maps the shards itself
        return {**self.__dict__, "_open": {}}

    @property
    def rebuild_hint(self):
        root_dir, name = os.path.split(self.path)
        return rebuild_cache_hint(root_dir, self.metadata.get("physical_cutoff"), name)

    def shard_path(self, k):
        return os.path.join(cache_shard_dir(self.path), self.shards[k]["file"])

    def _refuse(self, k, problem):
        raise ValueError(f"cache shard {self.shard_path(k)} {problem}. {self.rebuild_hint}")

    def verify(self):
        """Check that the shards cover every row and each has its recorded size and SHA-256
        (reads every shard once: file pages, not this process's memory)."""
        if sum(s["count"] for s in self.shards) != len(self.ids):
            raise ValueError(f"{self.path}: its shards hold {sum(s['count'] for s in self.shards)}"
                             f" rows, its index {len(self.ids)}. {self.rebuild_hint}")
        for k, entry in enumerate(self.shards):
            path = self.shard_path(k)
            if not os.path.isfile(path):
                self._refuse(k, "is missing")
            size = os.path.getsize(path)
            if size != entry["bytes"]:
                self._refuse(k, f"has {size} bytes, the index recorded {entry['bytes']} "
                                f"(truncated or replaced)")
            if file_sha256(path) != entry["sha256"]:
                self._refuse(k, "is corrupt (its SHA-256 differs from the one in the index)")

    def shard(self, k):
        """Shard ``k``'s store, memory-mapped (``torch.load(mmap=True, weights_only=True)``)."""
        if k not in self._open:
            path = self.shard_path(k)
            if not os.path.isfile(path):
                self._refuse(k, "is missing")
            try:
                store = load_tensors_file(path, "a cache shard", mmap=True)
            except ValueError as exc:
                raise ValueError(f"cache shard {exc}. {self.rebuild_hint}") from None
            count = self.shards[k]["count"]
            if not (isinstance(store, dict) and store.get("count") == count
                    and store["node_ptr"].numel() == count + 1):
                self._refuse(k, "does not hold the rows the index records")
            self._open[k] = store
        return self._open[k]

    def graph(self, idx):
        k = int(np.searchsorted(self._starts, idx, side="right")) - 1
        return unpack_graph(self.shard(k), idx - self.shards[k]["start"])


class CachedDimerDataset(torch.utils.data.Dataset):
    """Graphs from a cache written by ``build_cache`` (docs/DESIGN.md, section 3).

    Args:
        cache: path of ``cached_graphs.pt`` or an opened ``GraphCache`` (shared between the
            train and evaluation datasets).
        rotate: rotate positions, field features and the stored ``edge_attr_sh`` by one random
            rotation per access (with e3nn's D matrices).
        jitter_std: Gaussian noise (internal units) on positions; the atom graph, distances and
            harmonics are then rebuilt at the cached cutoff.
    """

    def __init__(self, cache, rotate=False, jitter_std=0.0):
        self.cache = load_cache(cache) if isinstance(cache, (str, os.PathLike)) else cache
        self.metadata = self.cache.metadata
        self.internal_cutoff = float(self.metadata["internal_cutoff"])
        self.ids = self.cache.ids
        self.rotate = rotate
        self.jitter_std = jitter_std

    def __len__(self):
        return len(self.cache)

    def __getitem__(self, idx):
        fields = self.cache.graph(idx)
        if self.rotate:
            rot = random_rotation(fields["pos_atoms"].dtype)
            fields["pos_atoms"] = fields["pos_atoms"] @ rot.T
            fields["field_node_features"] = rotate_field_features(fields["field_node_features"],
                                                                  rot)
            if "edge_attr_sh" in fields and self.jitter_std <= 0:  # (jitter rebuilds them)
                # the harmonics of the rotated edges: D(rot) applied to the stored ones, without
                # e3nn's (64, 64) D_from_matrix, which costs milliseconds per item
                fields["edge_attr_sh"] = edge_spherical_harmonics(edge_vectors(
                    fields["pos_atoms"], fields["edge_index_atoms"])).to(fields["pos_atoms"].dtype)
        if self.jitter_std > 0:
            pos = fields["pos_atoms"] + self.jitter_std * torch.randn_like(fields["pos_atoms"])
            fields.update(pos_atoms=pos, **atom_graph_fields(pos, self.internal_cutoff,
                                                                 with_sh=True))
        data = Data(num_nodes=fields["z_atoms"].size(0), **fields)
        data.id = self.ids[idx]
        return data


# ----------------------------------------------------------------------------- model
# The network as docs/DESIGN.md, section 4 writes it, with e3nn's modules. By default the
# convolutions run through the dense kernels of the next section (the same function, faster);
# the model holds the switch, ``fast``, and the kernels built from its modules.
class RadialBesselBasisLayer(nn.Module):
    """phi_k(r) = sin(w_k r) / (w_k r) * 0.5 (1 + cos(pi r / cutoff)) for r <= cutoff, else 0.

    ``w_k = k pi / cutoff``, k = 1..num_rbf (docs/DESIGN.md, section 4.3). Input (E,) or (E, 1);
    output (E, num_rbf).
    """

    def __init__(self, num_rbf, cutoff):
        super().__init__()
        self.num_rbf = num_rbf
        self.cutoff = float(cutoff)
        self.register_buffer("omega", torch.arange(1, num_rbf + 1) * math.pi / self.cutoff)

    def forward(self, r):
        r = r.reshape(-1, 1)  # (E, 1)
        sinc = torch.sinc(self.omega * r / math.pi)  # (E, K): sin(w r) / (w r), 1 at r = 0
        envelope = 0.5 * (1.0 + torch.cos(math.pi * r / self.cutoff))  # (E, 1)
        return sinc * envelope * (r <= self.cutoff)  # (E, K)


def inverse_in_degree(edge_dst, num_nodes, dtype):
    """(N, 1): 1 / (number of edges into each node), 1 where none: scatter-sum -> scatter-mean."""
    count_dtype = torch.promote_types(dtype, torch.float32)  # exact counts under AMP
    count = torch.zeros(num_nodes, dtype=count_dtype, device=edge_dst.device).index_add_(
        0, edge_dst, torch.ones_like(edge_dst, dtype=count_dtype))
    return (1.0 / count.clamp(min=1)).unsqueeze(1)


def scatter_mean(edge_msg, edge_dst, inv_in_degree):
    """(E, C) messages -> (N, C): the mean over the edges into each node (decision 5).

    ``inv_in_degree`` (N, 1) from ``inverse_in_degree``. Sums in float32 or wider (exact under
    AMP); the result in the messages' dtype.
    """
    sum_dtype = torch.promote_types(edge_msg.dtype, torch.float32)
    total = edge_msg.new_zeros(inv_in_degree.size(0), edge_msg.size(1), dtype=sum_dtype)
    total = total.index_add_(0, edge_dst, edge_msg.to(sum_dtype))  # (N, C)
    return (total * inv_in_degree.to(sum_dtype)).to(edge_msg.dtype)


class PointsConvolutionIntegrated(nn.Module):
    """One equivariant message-passing block (docs/DESIGN.md, section 4.3).

    ``out = sc(x, attr) + tanh(alpha(agg, attr)) * lin2(agg, attr)`` with
    ``agg = scatter_mean_dst(tp(lin1(x, attr)[src], sh, w = fc(rbf(|r|))))``.
    With ``fast`` (the default) ``fast_kernels`` (a ``FastConvolution``) computes the same
    function over the same parameters; ``use_fast_path(False)`` runs the modules below.
    """

    def __init__(self, irreps_node_input, irreps_node_attr, irreps_edge_attr,
                 irreps_node_output, num_rbf, cutoff, radial_hidden=DEFAULT_RADIAL_HIDDEN):
        super().__init__()
        self.irreps_node_input = o3.Irreps(irreps_node_input)
        self.irreps_node_attr = o3.Irreps(irreps_node_attr)
        self.irreps_edge_attr = o3.Irreps(irreps_edge_attr)
        self.irreps_node_output = o3.Irreps(irreps_node_output)

        self.rbf = RadialBesselBasisLayer(num_rbf, cutoff)
        self.sc = o3.FullyConnectedTensorProduct(self.irreps_node_input, self.irreps_node_attr,
                                                 self.irreps_node_output)
        self.lin1 = o3.FullyConnectedTensorProduct(self.irreps_node_input, self.irreps_node_attr,
                                                   self.irreps_node_input)
        # one weighted 'uvu' path per input irrep x edge irrep whose product is an output irrep
        # (or the scalar 0e); the paths' outputs, sorted, are the message irreps irreps_mid
        irreps_mid, instructions = [], []
        for i, (mul, ir_in) in enumerate(self.irreps_node_input):
            for j, (_, ir_edge) in enumerate(self.irreps_edge_attr):
                for ir_out in ir_in * ir_edge:
                    if ir_out in self.irreps_node_output or ir_out == o3.Irrep("0e"):
                        instructions.append((i, j, len(irreps_mid), "uvu", True))
                        irreps_mid.append((mul, ir_out))
        irreps_mid = o3.Irreps(irreps_mid)
        irreps_mid, perm, _ = irreps_mid.sort()
        instructions = [(i, j, perm[k], mode, train) for i, j, k, mode, train in instructions]
        self.irreps_mid = irreps_mid
        self.tp = o3.TensorProduct(self.irreps_node_input, self.irreps_edge_attr, irreps_mid,
                                   instructions, internal_weights=False, shared_weights=False)
        self.fc = FullyConnectedNet([num_rbf, radial_hidden, self.tp.weight_numel],
                                    torch.nn.functional.silu)  # rbf -> per-edge tp weights
        self.lin2 = o3.FullyConnectedTensorProduct(irreps_mid, self.irreps_node_attr,
                                                   self.irreps_node_output)
        self.alpha = o3.FullyConnectedTensorProduct(irreps_mid, self.irreps_node_attr, "0e")

        self.fast_kernels = FastConvolution.for_layer(self)  # None: no fast path for these irreps
        self.fast = self.fast_kernels is not None

    def use_fast_path(self, enabled=True):
        """Dense kernels (True, the default) or e3nn's modules one by one (False)."""
        self.fast = enabled and self.fast_kernels is not None
        return self

    def forward(self, node_features, node_attr, edge_src, edge_dst, edge_sh, edge_length,
                edge_basis=None, inv_in_degree=None, **fast_inputs):
        """(N, in), (N, attr), (E,), (E,), harmonics (E, 64), lengths (E,) -> (N, out).

        ``edge_basis`` = ``self.rbf(edge_length)`` and ``inv_in_degree`` =
        ``inverse_in_degree(edge_dst, N)`` are computed here unless given (the model computes
        them once for all layers); ``fast_inputs`` go to the fast path's kernels.
        """
        basis = self.rbf(edge_length) if edge_basis is None else edge_basis  # (E, num_rbf)
        if inv_in_degree is None:
            inv_in_degree = inverse_in_degree(edge_dst, node_features.size(0),
                                              node_features.dtype)  # (N, 1)
        if self.fast:
            return self.fast_kernels(self, node_features, node_attr, edge_src, edge_dst, edge_sh,
                                     basis, inv_in_degree, **fast_inputs)
        edge_weights = self.fc(basis)  # (E, tp.weight_numel)
        node_self = self.sc(node_features, node_attr)  # (N, out)
        node_pre = self.lin1(node_features, node_attr)  # (N, in)
        edge_msg = self.tp(node_pre[edge_src], edge_sh, edge_weights)  # (E, mid)
        agg = scatter_mean(edge_msg, edge_dst, inv_in_degree)  # (N, mid)
        update = self.lin2(agg, node_attr)  # (N, out)
        gate_logit = self.alpha(agg, node_attr)  # (N, 1)
        return node_self + torch.tanh(gate_logit) * update  # (N, out)


def _warn_running_eager(what, exc):
    """One warning line: ``what``, running eager, and the first line of the compiler's error."""
    first_line = (str(exc).strip().splitlines() or [""])[0][:200]
    warnings.warn(f"{what}, running eager from now on: {type(exc).__name__}: {first_line}")


class DeltaCoupling(nn.Module):
    """Atoms + one field node per dimer -> dV (docs/DESIGN.md, section 4). ``forward(batch)``
    returns (B,).

    ``forward`` unpacks the PyG batch and calls ``forward_tensors`` (tensors only: the part
    ``compile_forward`` hands to ``torch.compile``). ``fast`` (the default) runs the
    convolutions through the dense kernels of the fast-path section; ``use_fast_path(False)``
    runs e3nn's modules one by one: the same function, kept for tests and the benchmark.
    """

    def __init__(self, num_conv_layers=DEFAULT_NUM_CONV_LAYERS, num_rbf=DEFAULT_NUM_RBF,
                 cutoff=DEFAULT_PHYSICAL_CUTOFF * INT_ANGSTROM_SCALE,
                 radial_hidden=DEFAULT_RADIAL_HIDDEN, mlp_hidden=DEFAULT_MLP_HIDDEN,
                 dv_switch=None):
        super().__init__()
        self.config = dict(num_conv_layers=num_conv_layers, num_rbf=num_rbf, cutoff=float(cutoff),
                           radial_hidden=radial_hidden, mlp_hidden=mlp_hidden)
        # dv_switch: None (the design's dV) or [on, off], internal units: dV times
        # contact_switch of each graph's closest A-B contact (a fixed function, no parameter)
        self.dv_switch = None if dv_switch is None else [float(v) for v in dv_switch]
        if self.dv_switch is not None:
            if not 0 <= self.dv_switch[0] < self.dv_switch[1]:
                raise ValueError(f"dv_switch {dv_switch}: needs 0 <= on < off")
            self.config["dv_switch"] = self.dv_switch  # absent when off: older configs load
        self.z_embedding = nn.Embedding(NUM_ELEMENTS + 1, NUM_NODE_SCALARS)  # Z -> 8x0e
        self.attr_embedding = nn.Sequential(  # Mulliken [s, p, d] -> 8x0e node attributes
            nn.Linear(MULLIKEN_DIM, NODE_ATTR_DIM), nn.SiLU(),
            nn.Linear(NODE_ATTR_DIM, NODE_ATTR_DIM))
        self.field_node_attr = nn.Parameter(torch.randn(NODE_ATTR_DIM))  # (8,) decision 6
        irreps_attr = o3.Irreps(f"{NODE_ATTR_DIM}x0e")
        self.convs = nn.ModuleList([
            PointsConvolutionIntegrated(IRREPS_NODE, irreps_attr, IRREPS_EDGE_SH, IRREPS_NODE,
                                        num_rbf, cutoff, radial_hidden)
            for _ in range(num_conv_layers)])
        self.readout = nn.Sequential(
            nn.Linear(NUM_NODE_SCALARS + U_DIM, mlp_hidden), nn.SiLU(),
            nn.Linear(mlp_hidden, mlp_hidden), nn.SiLU(),
            nn.Linear(mlp_hidden, 1))

        self.fast_path = FastPath(self.convs)  # what the dense kernels compute once per batch
        self.fast = True
        self._compiled = None  # torch.compile'd forward_tensors, see compile_forward()

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def use_fast_path(self, enabled=True):
        """Dense kernels (True, the default) or e3nn's modules one by one (False)."""
        self.fast = enabled
        for conv in self.convs:
            conv.use_fast_path(enabled)
        return self

    def compile_forward(self, backend, dynamic=True):
        """torch.compile ``forward_tensors`` (a PyG batch is not traceable); returns self."""
        self._compiled = torch.compile(self.forward_tensors, backend=backend, dynamic=dynamic)
        return self

    def uncompile_forward(self):
        self._compiled = None
        return self

    def forward(self, data):
        contact = getattr(data, "contact_internal", None)
        if self.dv_switch is not None and contact is None:
            raise ValueError("this model switches dV off by the closest A-B contact, and the "
                             "graphs lack it (contact_internal): rebuild the cache with this "
                             "version (--rebuild_cache)")
        inputs = (data.z_atoms, data.pos_atoms, data.batch, data.atomic_node_attr,
                  data.field_node_features, data.u, data.edge_index_atoms,
                  getattr(data, "edge_attr_sh", None), data.edge_attr_atoms, contact)
        if self._compiled is not None:
            try:
                return self._compiled(*inputs)
            except torch._dynamo.exc.BackendCompilerFailed as exc:
                # compiling for this input failed (before anything ran, e.g. a recompilation
                # for a new batch shape): the rest of the run is eager, the same function
                _warn_running_eager("torch.compile failed on this batch shape", exc)
                self._compiled = None
        return self.forward_tensors(*inputs)

    def forward_tensors(self, z, pos_atoms, batch_atoms, atomic_node_attr, field_feat, u,
                        edge_index_atoms, sh_atoms=None, edge_attr_atoms=None, contact=None):
        """z (N,), pos (N, 3), batch (N,), Mulliken (N, 3), field (B, 8), u (B, 4), edges (2, E),
        optional cached harmonics (E, 64) with lengths (E, 1), closest A-B contacts (B,)
        (internal; read with ``dv_switch``) -> dV (B,)."""
        num_graphs, num_atoms = u.size(0), z.size(0)
        dtype = pos_atoms.dtype

        # --- nodes (section 4.1): atoms first, then one field node per graph at its centroid
        atom_count = pos_atoms.new_zeros(num_graphs).index_add_(
            0, batch_atoms, torch.ones_like(batch_atoms, dtype=dtype))  # (B,)
        centroid = pos_atoms.new_zeros(num_graphs, 3).index_add_(0, batch_atoms, pos_atoms)
        centroid = centroid / atom_count.unsqueeze(1)  # (B, 3)
        pos_combined = torch.cat([pos_atoms, centroid])  # (N + B, 3)
        x_atoms = torch.cat([self.z_embedding(z),
                             pos_atoms.new_zeros(num_atoms, NODE_DIM - NUM_NODE_SCALARS)],
                            dim=1)  # (N, 16): 8x0e embedded, 1o and 2e zero
        x_field = torch.cat([pos_atoms.new_zeros(num_graphs, NUM_NODE_SCALARS), field_feat],
                            dim=1)  # (B, 16): scalars zero, 1o + 2e from the multipoles
        x = torch.cat([x_atoms, x_field])  # (N + B, 16)
        node_attr = torch.cat([self.attr_embedding(atomic_node_attr),
                               self.field_node_attr.expand(num_graphs, -1)])  # (N + B, 8)
        batch_combined = torch.cat([batch_atoms,
                                    torch.arange(num_graphs, device=z.device)])  # (N + B,)

        # --- edges (section 4.2): atom-atom from the data, atom <-> field built here
        atom_idx = torch.arange(num_atoms, device=z.device)
        field_idx = num_atoms + batch_atoms  # (N,) each atom's field node
        edge_index_af = torch.stack([torch.cat([atom_idx, field_idx]),
                                     torch.cat([field_idx, atom_idx])])  # (2, 2N)
        vec_af = edge_vectors(pos_combined, edge_index_af)  # (2N, 3)
        edge_index = torch.cat([edge_index_atoms, edge_index_af], dim=1)  # (2, E + 2N)
        # the dense kernels read one copy of the harmonics (16 columns; fast path section),
        # e3nn's modules the four tiled copies (64)
        single_copy = self.fast and self.fast_path.available
        if sh_atoms is None:  # harmonics and lengths of all edges at once
            edge_vec = torch.cat([edge_vectors(pos_atoms, edge_index_atoms), vec_af])  # (E+2N, 3)
            edge_sh = edge_spherical_harmonics(edge_vec, tiled=not single_copy)  # (E+2N, 16|64)
            edge_length = edge_vec.norm(dim=-1)  # (E + 2N,)
        else:  # the cache's atom-atom harmonics (E, 64) and lengths
            if single_copy:
                sh_atoms = sh_atoms.index_select(1, self.fast_path.sh_first_copy)  # (E, 16)
            edge_sh = torch.cat([sh_atoms, edge_spherical_harmonics(
                vec_af, tiled=not single_copy)])  # (E + 2N, 16 or 64)
            edge_length = torch.cat([edge_attr_atoms.reshape(-1), vec_af.norm(dim=-1)])
        edge_src, edge_dst = edge_index[0], edge_index[1]

        # --- convolutions (section 4.4), a residual add every two layers
        basis = self.convs[0].rbf(edge_length) if len(self.convs) else None  # same in every layer
        inv_in_degree = inverse_in_degree(edge_dst, x.size(0), x.dtype)  # (N + B, 1)
        per_layer = (self.fast_path.layer_inputs(edge_sh, basis) if self.fast
                     else [{} for _ in self.convs])  # what the dense kernels share
        residual = x
        for i, (conv, fast_inputs) in enumerate(zip(self.convs, per_layer)):
            x = conv(x, node_attr, edge_src, edge_dst, edge_sh, edge_length, basis,
                     inv_in_degree, **fast_inputs)  # (N + B, 16)
            if i % 2 == 1:
                x = x + residual
                residual = x

        # --- mean pooling per graph; the invariant scalars (8x0e) feed the readout
        scalars = x[:, :NUM_NODE_SCALARS]  # (N + B, 8)
        node_count = atom_count + 1.0  # (B,) atoms + the field node
        sum_dtype = torch.promote_types(scalars.dtype, torch.float32)  # exact sums under AMP
        h = scalars.new_zeros(num_graphs, NUM_NODE_SCALARS, dtype=sum_dtype).index_add_(
            0, batch_combined, scalars.to(sum_dtype))
        h = h / node_count.unsqueeze(1)  # (B, 8)
        dv = self.readout(torch.cat([h, u], dim=1)).squeeze(1)  # (B,) dV
        if self.dv_switch is None:
            return dv
        return dv * contact_switch(contact.reshape(-1), *self.dv_switch).to(dv.dtype)


def contact_switch(contact, on, off):
    """1 for ``contact <= on``, exactly 0 for ``contact >= off``, in between the smoothstep
    ``1 - 3t^2 + 2t^3`` of ``t = (contact - on) / (off - on)``: continuous with a continuous
    first derivative (0 at both ends). Any shape of tensor; ``on``, ``off`` in its unit."""
    t = ((contact - on) / (off - on)).clamp(0.0, 1.0)
    return 1.0 - t * t * (3.0 - 2.0 * t)


# ----------------------------------------------------------------------------- fast path
# The same function as the model's e3nn modules, in fewer and larger operations (decision 15).
# e3nn returns the edge harmonics as four identical copies of each l, so the four per-copy
# weights of an edge path multiply the same numbers: ``DenseEdgeTensorProduct`` computes the
# product on one copy with the copies' weights summed (in the radial MLP's last matrix),
# keeping e3nn's path normalisation. Every other e3nn product (sc, lin1, lin2, alpha) becomes
# one matrix product whose matrix is scattered from the products' own weights times e3nn's
# Wigner-3j coefficients and path weights (``tensor_product_terms``). No parameters live here:
# state dicts are those of the model section. The tests compare dV and gradients with
# ``use_fast_path(False)`` and check rotation invariance of this path in float64.
def fc_layer_matrix(layer):
    """The matrix an e3nn ``FullyConnectedNet`` layer multiplies by, its normalisation
    included, and the factor applied after its activation: ``(w, scale)``.

    A layer with an activation computes ``act(x @ w) * scale``, the last (linear) one ``x @ w``
    (scale 1); written as e3nn's ``_Layer.forward`` computes it, so the results are the same.
    """
    if layer.act is not None:
        return layer.weight / (layer.h_in * layer.var_in) ** 0.5, layer.var_out ** 0.5
    return layer.weight / (layer.h_in * layer.var_in / layer.var_out) ** 0.5, 1.0


def tensor_product_terms(tp):
    """Every nonzero term of an e3nn ``TensorProduct`` as flat index arrays (for dense kernels).

    e3nn computes ``out[c] = sum path_weight * w3j[m1, m2, m3] * w[j] * x1[a] * x2[b]`` over its
    instructions; this returns int64 tensors ``a, b, c, j`` and float64 ``coef`` (one entry per
    term, ``coef = path_weight * w3j``) for 'uvw' and 'uvu' instructions with weights. The dense
    kernels below are checked against e3nn's own forward in the tests.
    """
    terms, offset = [], 0
    slices_1, slices_2 = tp.irreps_in1.slices(), tp.irreps_in2.slices()
    slices_out = tp.irreps_out.slices()
    for ins in tp.instructions:
        if ins.connection_mode not in ("uvw", "uvu") or not ins.has_weight:
            raise NotImplementedError(f"dense kernel for mode {ins.connection_mode!r}")
        in1, in2, out = tp.irreps_in1[ins.i_in1], tp.irreps_in2[ins.i_in2], tp.irreps_out[ins.i_out]
        w3j = o3.wigner_3j(in1.ir.l, in2.ir.l, out.ir.l, dtype=torch.float64)  # (d1, d2, d3)
        m1, m2, m3 = (w3j.abs() > 1e-12).nonzero(as_tuple=True)
        value = ins.path_weight * w3j[m1, m2, m3]
        mul_w = out.mul if ins.connection_mode == "uvw" else 1
        u, v, w = torch.meshgrid(torch.arange(in1.mul), torch.arange(in2.mul),
                                 torch.arange(mul_w), indexing="ij")
        u, v, w = (t.reshape(-1, 1) for t in (u, v, w))  # (paths, 1) against (1, nnz)
        c_chan = w if ins.connection_mode == "uvw" else u
        terms.append(torch.broadcast_tensors(  # each (paths, nnz)
            slices_1[ins.i_in1].start + u * in1.ir.dim + m1,
            slices_2[ins.i_in2].start + v * in2.ir.dim + m2,
            slices_out[ins.i_out].start + c_chan * out.ir.dim + m3,
            offset + (u * in2.mul + v) * mul_w + w,
            value))
        offset += math.prod(ins.path_shape)
    return [torch.cat([t[k].reshape(-1) for t in terms]) for k in range(5)]


def _scatter_terms(products, weight_index, coef, position, size):
    """Flat dense matrices (size,): each term ``coef * weight`` of the products' concatenated
    weights added at its ``position``."""
    weight = torch.cat([p.weight for p in products])  # (sum weight_numel,)
    values = weight[weight_index] * coef  # (terms,)
    return values.new_zeros(size).index_add_(0, position, values)


class DenseBilinear(nn.Module):
    """Several e3nn ``FullyConnectedTensorProduct(x, attr)`` of the same inputs as one matmul.

    The products keep their own ``weight`` parameters (state dicts are unchanged); each forward
    scatters them into one dense (dim_x * dim_attr, sum of dim_out) matrix, then
    ``out = (x outer attr) @ W`` and the result is split per product. The same function as
    calling the products one by one, in a few large ops instead of many small einsums.
    """

    def __init__(self, products, x_columns=None):
        """``x_columns`` (dim_x,): where each of the products' input columns sits in the ``x``
        given to forward (for an ``x`` whose columns come in another order)."""
        super().__init__()
        self.products = list(products)  # not registered twice: the owner holds the modules
        self.split = [p.irreps_out.dim for p in self.products]
        dim_2 = self.products[0].irreps_in2.dim
        n_out = sum(self.split)
        positions, weight_index, coefs, offset_c, offset_j = [], [], [], 0, 0
        for p in self.products:
            a, b, c, j, coef = tensor_product_terms(p)
            if x_columns is not None:
                a = x_columns[a]
            positions.append((a * dim_2 + b) * n_out + offset_c + c)
            weight_index.append(offset_j + j)
            coefs.append(coef)
            offset_c, offset_j = offset_c + p.irreps_out.dim, offset_j + p.weight_numel
        self.shape = (self.products[0].irreps_in1.dim * dim_2, n_out)
        self.register_buffer("position", torch.cat(positions), persistent=False)
        self.register_buffer("weight_index", torch.cat(weight_index), persistent=False)
        self.register_buffer("coef", torch.cat(coefs).to(torch.get_default_dtype()),
                             persistent=False)

    def dense_matrix(self):
        """The products' weights as one (dim_x * dim_attr, sum dim_out) matrix."""
        return _scatter_terms(self.products, self.weight_index, self.coef, self.position,
                              self.shape[0] * self.shape[1]).view(self.shape)

    def forward(self, x, attr, dense=None):
        """x (N, dim_x), attr (N, dim_attr) -> one (N, dim_out) per product. ``dense``: this
        module's ``dense_matrix()`` if already built (e.g. by ``DenseBilinearStack``)."""
        dense = self.dense_matrix() if dense is None else dense
        outer = (x.unsqueeze(2) * attr.unsqueeze(1)).reshape(x.size(0), -1)  # (N, dim_x * dim_attr)
        return (outer @ dense.to(outer.dtype)).split(self.split, dim=1)


class DenseBilinearStack(nn.Module):
    """``dense_matrix()`` of several ``DenseBilinear`` in one gather, multiply and scatter."""

    def __init__(self, modules):
        super().__init__()
        self.members = list(modules)  # held (and registered) by their owners
        self.sizes = [m.shape[0] * m.shape[1] for m in self.members]
        offsets = np.cumsum([0] + self.sizes)[:-1].tolist()
        w_offsets = np.cumsum([0] + [sum(p.weight_numel for p in m.products)
                                     for m in self.members])
        empty = [torch.zeros(0, dtype=torch.long)]  # no members: no terms
        self.register_buffer("position", torch.cat(
            [m.position + o for m, o in zip(self.members, offsets)] or empty), persistent=False)
        self.register_buffer("weight_index", torch.cat(
            [m.weight_index + int(o) for m, o in zip(self.members, w_offsets)] or empty),
            persistent=False)
        self.register_buffer("coef", torch.cat([m.coef for m in self.members] or
                                               [torch.zeros(0)]), persistent=False)

    def forward(self):
        flat = _scatter_terms([p for m in self.members for p in m.products], self.weight_index,
                              self.coef, self.position, sum(self.sizes))
        return [part.view(m.shape) for part, m in zip(flat.split(self.sizes), self.members)]


class DenseEdgeTensorProduct(nn.Module):
    """An e3nn 'uvu' ``TensorProduct(x, sh, w)`` over tiled harmonics, computed on one copy.

    ``sh`` in the product's layout holds ``n`` identical copies of each l (e3nn's
    ``spherical_harmonics`` of ``"4x0e+4x1o+..."``), so for every output channel
    ``sum_v w[u, v] C(x[u], sh_v) = C(x[u], sh_0) * sum_v w[u, v]``: one product over a single
    copy with the copies' weights summed, keeping the tiled product's path normalisation (folded
    into the coefficients). The weights come from a linear last layer, so they are summed in
    that layer's matrix (``summed_weights``). Per input block i the coefficients of all its
    paths form one (16, d_i * k_i) matrix shared by its channels: ``T_i = sh_0 @ C_i`` then
    ``out_i = x_i @ T_i`` (a batched (mul_i, d_i) x (d_i, k_i) product per edge).
    The same parameters and the same function at a fraction of the cost. The output columns
    come grouped by input block: column ``columns[c]`` holds the product's column ``c``.
    """

    def __init__(self, tp, fc):
        super().__init__()
        copies = {mul for mul, _ in tp.irreps_in2}
        if (len(copies) != 1 or any(i.connection_mode != "uvu" or not i.has_weight
                                    for i in tp.instructions) or fc[-1].act is not None):
            raise NotImplementedError("needs weighted 'uvu' paths over equal copies of each l "
                                      "and a linear last radial layer")
        self.n_copies = copies.pop()
        single = o3.Irreps([(1, ir) for _, ir in tp.irreps_in2])
        self.dim_single = single.dim
        slices_out, slices_single = tp.irreps_out.slices(), single.slices()
        weight_offsets = np.cumsum([0] + [math.prod(i.path_shape) for i in tp.instructions])
        self.blocks = []  # (input slice, mul, dim, k) per input block with paths
        order, weight_col, coefs = [], [], []
        for i_in, ((mul, ir_in), s_in) in enumerate(zip(tp.irreps_in1, tp.irreps_in1.slices())):
            paths = [(k, ins) for k, ins in enumerate(tp.instructions) if ins.i_in1 == i_in]
            if not paths:
                continue
            dims_out = [tp.irreps_out[ins.i_out].ir.dim for _, ins in paths]
            coef = torch.zeros(single.dim, ir_in.dim, sum(dims_out), dtype=torch.float64)
            col = 0
            for (k, ins), d_out in zip(paths, dims_out):
                l_edge, l_out = tp.irreps_in2[ins.i_in2].ir.l, tp.irreps_out[ins.i_out].ir.l
                s_edge = slices_single[ins.i_in2]
                coef[s_edge, :, col:col + d_out] = ins.path_weight * o3.wigner_3j(
                    ir_in.l, l_edge, l_out, dtype=torch.float64).transpose(0, 1)
                col += d_out
            for u in range(mul):  # output columns (u, path, m) -> the product's layout
                for (k, ins), d_out in zip(paths, dims_out):
                    start = slices_out[ins.i_out].start + u * d_out
                    order.extend(range(start, start + d_out))
                    weight_col.extend([int(weight_offsets[k]) // self.n_copies + u] * d_out)
            coefs.append(coef.reshape(single.dim, -1))
            self.blocks.append((s_in, mul, ir_in.dim, sum(dims_out)))
        if sorted(order) != list(range(tp.irreps_out.dim)):
            raise NotImplementedError("every output column needs exactly one path")
        self.columns = torch.empty(len(order), dtype=torch.long)  # product col -> output col
        self.columns[torch.tensor(order)] = torch.arange(len(order))
        self.register_buffer("coef", torch.cat(coefs, dim=1).to(torch.get_default_dtype()),
                             persistent=False)  # (16, sum_i d_i * k_i)
        self.register_buffer("weight_col", torch.tensor(weight_col), persistent=False)
        self.split = [d * k for _, _, d, k in self.blocks]

    def summed_last_weight(self, fc):
        """The matrix of ``fc``'s last (linear) layer, summed over the copies: (h, numel / n)."""
        last = fc[len(fc) - 1]
        w, _ = fc_layer_matrix(last)  # (h, numel)
        return w.view(last.h_in, -1, self.n_copies).sum(-1)

    def summed_weights(self, fc, basis):
        """``fc(basis)`` with its output summed over the copies: (E, weight_numel / n)."""
        hidden = basis
        for k in range(len(fc) - 1):
            hidden = fc[k](hidden)
        return hidden @ self.summed_last_weight(fc)

    def forward(self, x, sh_single, summed):
        """x (E, dim_1), one copy of the harmonics (E, 16), summed weights -> (E, dim_out),
        columns grouped by input block (see ``columns``)."""
        num_edges = x.size(0)
        per_block = (sh_single @ self.coef.to(sh_single.dtype)).split(self.split, dim=1)
        outs = []
        for (s_in, mul, dim, k), t in zip(self.blocks, per_block):
            x_block = x[:, s_in].reshape(num_edges, mul, dim, 1)  # (E, mul, d, 1)
            prod = x_block * t.reshape(num_edges, 1, dim, k)  # (E, mul, d, k)
            outs.append((prod.sum(2) if dim > 1 else prod).reshape(num_edges, -1))  # (E, mul k)
        return torch.cat(outs, dim=1) * summed.index_select(1, self.weight_col)  # (E, dim_out)

class FastConvolution(nn.Module):
    """The dense kernels of one ``PointsConvolutionIntegrated``, over its parameters.

    ``node`` holds sc and lin1 (one matmul), ``edge`` the edge tensor product on one copy of
    the harmonics, ``mid`` lin2 and the gate alpha (one matmul, reading the messages in the
    column order ``edge`` writes them).
    """

    def __init__(self, conv):
        super().__init__()
        self.node = DenseBilinear([conv.sc, conv.lin1])
        self.edge = DenseEdgeTensorProduct(conv.tp, conv.fc)
        self.mid = DenseBilinear([conv.lin2, conv.alpha], x_columns=self.edge.columns)
        self.register_buffer("sh_first_copy", _copy_index(conv.irreps_edge_attr),
                             persistent=False)

    @classmethod
    def for_layer(cls, conv):
        """The kernels of ``conv``, or None where its edge irreps are not copies of one set."""
        try:
            return cls(conv)
        except NotImplementedError:
            return None

    def forward(self, conv, node_features, node_attr, edge_src, edge_dst, edge_sh, basis,
                inv_in_degree, edge_sh_single=None, summed_weights=None, dense_mats=(None, None)):
        """``conv``'s forward: (N, in), (N, attr), (E,), (E,), harmonics (E, 64), basis
        (E, num_rbf), (N, 1) -> (N, out). Computed here unless given (``FastPath``):
        ``edge_sh_single`` (E, 16), one copy of the harmonics; ``summed_weights`` =
        ``edge.summed_weights(conv.fc, basis)``; ``dense_mats`` = the ``dense_matrix()`` of
        ``node`` and ``mid``."""
        if edge_sh_single is None:
            edge_sh_single = edge_sh.index_select(1, self.sh_first_copy)  # (E, 16)
        if summed_weights is None:
            summed_weights = self.edge.summed_weights(conv.fc, basis)  # (E, numel / 4)
        node_self, node_pre = self.node(node_features, node_attr,
                                        dense_mats[0])  # (N, out), (N, in)
        edge_msg = self.edge(node_pre.index_select(0, edge_src), edge_sh_single,
                             summed_weights)  # (E, mid), columns in edge's order
        agg = scatter_mean(edge_msg, edge_dst, inv_in_degree)  # (N, mid)
        update, gate_logit = self.mid(agg, node_attr, dense_mats[1])  # (N, out), (N, 1)
        return node_self + torch.tanh(gate_logit) * update  # (N, out)


class FastPath(nn.Module):
    """What the dense kernels of all layers of a ``DeltaCoupling`` compute once per batch.

    One copy of the edge harmonics; every layer's radial MLP (they share their input, the
    basis) as one matmul and one batched matmul; every layer's bilinear matrices in one
    scatter (``DenseBilinearStack``).
    """

    def __init__(self, convs):
        super().__init__()
        self.convs = list(convs)  # held (and registered) by the model
        kernels = [conv.fast_kernels for conv in self.convs]
        self.available = bool(kernels) and all(k is not None for k in kernels)
        self.bilinear_stack = DenseBilinearStack(
            [m for k in kernels if self.available for m in (k.node, k.mid)])
        # every layer's radial MLP has two layers of one shape: they run stacked
        self.stack_radial = self.available and all(
            len(conv.fc) == 2 and conv.fc.hs == self.convs[0].fc.hs for conv in self.convs)
        self.register_buffer("sh_first_copy", _copy_index(IRREPS_EDGE_SH), persistent=False)

    def summed_radial_weights(self, basis):
        """Every layer's tensor-product weights summed over the harmonic copies, [(E, numel/4)].

        The layers' radial MLPs share their input, the basis (E, K): their first layers run as
        one matmul, their last layers (summed over the copies) as one batched matmul.
        """
        first = [fc_layer_matrix(conv.fc[0]) for conv in self.convs]
        w1 = torch.cat([w for w, _ in first], dim=1)  # (K, L*H)
        act = self.convs[0].fc[0].act
        hidden = act(basis @ w1) * first[0][1]  # (E, L*H)
        hidden = hidden.view(basis.size(0), len(first), -1).transpose(0, 1)  # (L, E, H)
        w2 = torch.stack([conv.fast_kernels.edge.summed_last_weight(conv.fc)
                          for conv in self.convs])  # (L, H, numel / 4)
        return torch.bmm(hidden, w2.to(hidden.dtype)).unbind(0)  # L x (E, numel / 4)

    def layer_inputs(self, edge_sh_single, basis):
        """Per layer, the keyword arguments of its ``FastConvolution``: one copy of the
        harmonics (E, 16) and the basis (E, K) -> [{edge_sh_single, summed_weights,
        dense_mats}]."""
        if not self.available:
            return [{} for _ in self.convs]
        layers = len(self.convs)
        radial = self.summed_radial_weights(basis) if self.stack_radial else [None] * layers
        mats = self.bilinear_stack()
        return [{"edge_sh_single": edge_sh_single, "summed_weights": radial[i],
                 "dense_mats": mats[2 * i:2 * i + 2]} for i in range(layers)]


# ----------------------------------------------------------------------------- losses & metrics
def distance_weighted_l1_on_vref_loss(pred_vref, true_vref, R):
    """Distance-weighted L1 in Vref space (docs/DESIGN.md, decision 1).

    ``loss = sum_i w_i |pred_i - true_i| / sum_i w_i`` with ``w_i = R_i / mean(R)`` over the
    batch (R: internal separation). Larger R weighs more; equal R gives plain L1. Under torchrun
    the batch of a step is the union of every rank's batch (``run_epoch``).
    """
    w = R / R.mean()  # (B,)
    return (w * (pred_vref - true_vref).abs()).sum() / w.sum()


def mape_loss_fn(pred, true, eps=MAPE_EPS):
    """Mean absolute percentage error in percent: 100 * mean(|pred - true| / (|true| + eps))."""
    return 100.0 * ((pred - true).abs() / (true.abs() + eps)).mean()


@dataclass
class EpochResult:
    """Aggregates of one pass over a loader, weighted by the graphs actually processed."""
    loss: float = float("nan")  # distance-weighted L1 (training) on Vref
    mape: float = float("nan")  # % on Vref (V0 + dV)
    mae: float = float("nan")  # Vref units
    rmse: float = float("nan")
    baseline_mape: float = float("nan")  # the same for V0 alone
    baseline_mae: float = float("nan")
    baseline_rmse: float = float("nan")
    n_graphs: int = 0
    n_batches: int = 0
    n_skipped: int = 0
    skipped: list = field(default_factory=list)  # (batch ids, reason) of skipped batches


class ErrorSums:
    """Running sums of one estimate's errors against Vref, batch by batch, in float64.

    ``figures()`` gives ``mape`` (%, the formula of ``mape_loss_fn``, docs/DESIGN.md,
    decision 2), ``mae``, ``rmse`` and ``max_abs`` (the largest |error|) in Vref units over
    every row added. The sums stay on the batches' device until ``figures()`` or
    ``all_reduce()`` reads them: one transfer per pass, not four per batch (on a GPU each is a
    synchronisation).
    """

    def __init__(self):
        self.n = 0
        self.pending = None  # (4,) float64: sum |e| / (|t| + eps), sum |e|, sum e^2, max |e|
        self.ape, self.ae, self.se, self.max_abs = 0.0, 0.0, 0.0, 0.0

    def add(self, est, true):
        """est, true: (n,) tensors in Vref units."""
        true = true.double()
        err = est.double() - true  # (n,)
        if not err.numel():
            return
        self.n += err.numel()
        abs_err = err.abs()
        batch = torch.stack([(abs_err / (true.abs() + MAPE_EPS)).sum(), abs_err.sum(),
                             err.pow(2).sum(), abs_err.max()])  # (4,)
        if self.pending is None:
            self.pending = batch
        else:
            self.pending = torch.cat([self.pending[:3] + batch[:3],
                                      torch.maximum(self.pending[3:], batch[3:])])

    def _collect(self):
        """Move the pending device sums into the float attributes."""
        if self.pending is not None:
            ape, ae, se, max_abs = self.pending.tolist()
            self.ape, self.ae, self.se = self.ape + ape, self.ae + ae, self.se + se
            self.max_abs, self.pending = max(self.max_abs, max_abs), None

    def figures(self):
        self._collect()
        n = self.n
        return {"mape": 100.0 * self.ape / n, "mae": self.ae / n, "rmse": math.sqrt(self.se / n),
                "max_abs": self.max_abs}

    def all_reduce(self):
        """Under torchrun: the sums over every rank's rows (the largest error over all), in
        place, so that the figures are those of the whole pass on every rank."""
        self._collect()
        n, self.ape, self.ae, self.se = all_reduce_floats([self.n, self.ape, self.ae, self.se])
        self.n = int(round(n))
        self.max_abs = all_reduce_floats([self.max_abs], op=dist.ReduceOp.MAX)[0]
        return self


def regression_metrics(pred, true, v0):
    """Figures of V0 + dV (``model``) and of V0 alone (``baseline``) against Vref.

    ``pred``, ``true``, ``v0``: (n,) arrays in Vref units, n >= 1. Returns ``{"n": n, "model":
    {...}, "baseline": {...}}``, each ``ErrorSums.figures()``: ``mape`` (%), ``mae``, ``rmse``
    and ``max_abs`` in Vref units.
    """
    true_t = torch.as_tensor(np.asarray(true, dtype=np.float64))  # (n,)
    if true_t.numel() == 0:
        raise ValueError("regression_metrics needs at least one row")
    figures = {"n": int(true_t.numel())}
    for name, values in (("model", pred), ("baseline", v0)):
        sums = ErrorSums()
        sums.add(torch.as_tensor(np.asarray(values, dtype=np.float64)), true_t)
        figures[name] = sums.figures()
    return figures


def metrics_report(predictions, group_of=None):
    """``regression_metrics`` per split, and per group within each split.

    ``predictions``: {split name: ``predict_rows`` dict}; rows without a Vref (NaN) are left
    out, and so is a split with none. ``group_of``: {id: group}; rows without a group belong to
    none. Returns {split: regression_metrics dict, plus ``"groups": {group: dict}`` when any
    row of the split has a group, plus ``"uncertainty"`` (``uncertainty_metrics``) when the
    dict has a ``std`` (an ensemble's)}.
    """
    group_of = group_of or {}
    report = {}
    for split, p in predictions.items():
        known = np.isfinite(p["true"])  # (n,)
        if not known.any():
            continue
        report[split] = regression_metrics(p["pred"][known], p["true"][known], p["v0"][known])
        groups = np.array([group_of.get(i) for i in p["id"]], dtype=object)  # (n,)
        per_group = {}
        for g in sorted({g for g in groups[known] if g is not None}):
            sel = known & (groups == g)  # (n,)
            per_group[g] = regression_metrics(p["pred"][sel], p["true"][sel], p["v0"][sel])
        if per_group:
            report[split]["groups"] = per_group
        if "std" in p:
            report[split]["uncertainty"] = uncertainty_metrics(
                p["pred"][known] - p["true"][known], p["std"][known])
    return report


def spearman_correlation(a, b):
    """Spearman's rank correlation of two (n,) arrays: Pearson's correlation of their ranks
    (ties get their mean rank, as pandas' ``rank`` gives them). NaN for fewer than 2 rows or
    when either array is constant."""
    rank_a = pd.Series(np.asarray(a, dtype=np.float64)).rank().to_numpy()  # (n,)
    rank_b = pd.Series(np.asarray(b, dtype=np.float64)).rank().to_numpy()  # (n,)
    if rank_a.size < 2 or rank_a.std() == 0 or rank_b.std() == 0:
        return float("nan")
    return float(np.corrcoef(rank_a, rank_b)[0, 1])


def interval_confidences(error, std):
    """For each row, the smallest confidence level p whose central interval of a Gaussian
    N(pred, std^2), ``pred +- z_p * std``, contains the reference: ``erf(|error| / (sqrt(2)
    std))``, in [0, 1]. A row with std = 0 needs p = 1 unless its error is 0 too (p = 0).
    ``error``, ``std``: (n,) arrays in Vref units."""
    error, std = np.abs(np.asarray(error, np.float64)), np.asarray(std, np.float64)  # (n,)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(error == 0, 0.0, error / std)  # (n,) |error| in units of std
    return torch.erf(torch.from_numpy(z / math.sqrt(2.0))).numpy()  # (n,)


def miscalibration_area(confidences):
    """Miscalibration area of an uncertainty estimate, in [0, 1/2].

    For every confidence level p in [0, 1], a calibrated Gaussian uncertainty puts a fraction
    p of the rows inside their central p-interval ``pred +- z_p * std`` (z_p = the Gaussian
    quantile of (1 + p) / 2); the observed fraction is F(p) = #{i: c_i <= p} / n, with
    ``c_i`` = ``interval_confidences``. The area is the integral over p from 0 to 1 of
    |F(p) - p|, computed exactly (F is a step function): 0 for a perfect calibration, near
    1/2 when every error is far outside its std (over-confident) or far inside it.
    """
    c = np.sort(np.asarray(confidences, dtype=np.float64))  # (n,)
    n = c.size
    if n == 0:
        return float("nan")
    edges = np.concatenate([[0.0], c, [1.0]])  # (n + 2,) F is constant between edges
    level = np.arange(n + 1) / n  # (n + 1,) F on [edges[j], edges[j + 1])

    def integral(p, q):  # integral from 0 to p of |q - t| dt
        return np.where(p <= q, q * p - p ** 2 / 2, q ** 2 / 2 + (p - q) ** 2 / 2)

    return float((integral(edges[1:], level) - integral(edges[:-1], level)).sum())


def calibration_curve(confidences, levels=101):
    """(expected fraction p (levels,), observed fraction F(p) (levels,)) on an even grid over
    [0, 1], F as in ``miscalibration_area``."""
    p = np.linspace(0.0, 1.0, levels)  # (levels,)
    c = np.asarray(confidences, dtype=np.float64)  # (n,)
    return p, (c[None, :] <= p[:, None]).mean(axis=1)


def uncertainty_metrics(error, std):
    """How well a per-row std (an ensemble's spread) tells the size of the error.

    ``error`` (prediction - Vref) and ``std``: (n,) arrays in Vref units. Returns ``n``,
    ``spearman`` (rank correlation of |error| and std: does a larger std mean a larger
    error?), ``within_1std`` and ``within_2std`` (fraction of rows with |error| <= 1 and 2 std;
    0.683 and 0.954 for a calibrated Gaussian), ``miscalibration_area`` (0 is calibrated) and
    ``mean_std``.
    """
    error, std = np.asarray(error, np.float64), np.asarray(std, np.float64)  # (n,)
    return {"n": int(error.size), "spearman": spearman_correlation(np.abs(error), std),
            "within_1std": float(np.mean(np.abs(error) <= std)),
            "within_2std": float(np.mean(np.abs(error) <= 2 * std)),
            "miscalibration_area": miscalibration_area(interval_confidences(error, std)),
            "mean_std": float(std.mean())}


def ensemble_rows(member_rows):
    """One ``predict_rows`` dict from K >= 2 members' dicts over the same loader: ``pred`` is
    the members' mean, ``std`` their sample standard deviation (ddof = 1), ``members`` the
    (K, n) predictions. A row missing in any member (a failed batch) is left out."""
    if len(member_rows) < 2:
        raise ValueError(f"an ensemble needs at least 2 members, got {len(member_rows)}")
    common = set.intersection(*(set(m["id"]) for m in member_rows))
    first = member_rows[0]
    keep = [k for k, i in enumerate(first["id"]) if i in common]
    ids = [first["id"][k] for k in keep]
    positions = [{i: k for k, i in enumerate(m["id"])} for m in member_rows]
    members = np.stack([m["pred"][[pos[i] for i in ids]]
                        for m, pos in zip(member_rows, positions)])  # (K, n)
    return {"id": ids, "pred": members.mean(axis=0), "std": members.std(axis=0, ddof=1),
            "true": first["true"][keep], "v0": first["v0"][keep], "members": members}


def format_metrics_table(report):
    """A ``metrics_report`` as one aligned text table: a line per split, indented per group."""
    lines = [x for split, m in report.items()
             for x in [(split, m)] + [(f"  {g}", gm) for g, gm in m.get("groups", {}).items()]]
    width = max([len("split")] + [len(name) for name, _ in lines])
    block = 10 * len(METRIC_COLUMNS)  # each figure right-aligned in 10 characters
    labels = "".join(f"{label:>10}" for _, label, _ in METRIC_COLUMNS)

    def figures(m):
        return "".join(f"{m[key]:>10{fmt}}" for key, _, fmt in METRIC_COLUMNS)

    out = [f"{'':<{width}} {'':>5} | {'V0 + dV (model)':^{block}} | "
           f"{'V0 alone (baseline)':^{block}}",
           f"{'split':<{width}} {'n':>5} | {labels} | {labels}"]
    out += [f"{name:<{width}} {m['n']:>5} | {figures(m['model'])} | {figures(m['baseline'])}"
            for name, m in lines]
    return "\n".join(line.rstrip() for line in out)


def format_uncertainty_table(report):
    """The ``uncertainty`` entries of a ``metrics_report`` as a text table ('' if none)."""
    lines = [(split, m["uncertainty"]) for split, m in report.items() if "uncertainty" in m]
    if not lines:
        return ""
    width = max([len("split")] + [len(name) for name, _ in lines])
    out = ["uncertainty (std of the ensemble's members) against |error|:",
           f"{'split':<{width}} {'n':>5} | {'spearman':>9} {'<=1 std':>8} {'<=2 std':>8} "
           f"{'miscal.':>8} {'mean std':>9}"]
    out += [f"{name:<{width}} {u['n']:>5} | {u['spearman']:>9.3f} {u['within_1std']:>8.3f} "
            f"{u['within_2std']:>8.3f} {u['miscalibration_area']:>8.3f} {u['mean_std']:>9.4f}"
            for name, u in lines]
    out.append(f"{'':<{width}} {'':>5} | (calibrated Gaussian: <=1 std 0.683, <=2 std 0.954, "
               f"miscal. 0)")
    return "\n".join(out)


# ----------------------------------------------------------------------------- training engine
# One pass over a loader (train or evaluate) and prediction. Under torchrun each rank runs the
# same code on its part of the rows; the sums behind every figure are all-reduced (DIST below).
@dataclass(frozen=True)
class DistEnv:
    """Where this process stands in a torchrun launch (docs/DESIGN.md, decision 18); the
    defaults describe a plain ``python delta_coupling.py``, which never touches a process
    group."""
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1  # processes on this node
    active: bool = False  # launched by torchrun: the process group is initialised
    device: torch.device = torch.device("cpu")  # where collectives' tensors live (nccl: cuda)
    data_group: object = None  # gloo group with a long timeout: waiting for rank 0's data stage
    owns_group: bool = False  # setup_distributed initialised the process group (and ends it)

    @property
    def master(self):
        """Rank 0: the one process that prints, draws progress bars and writes files."""
        return self.rank == 0


DIST = DistEnv()  # set once by setup_distributed() in main(); read by every print and write


def all_reduce_floats(values, op=dist.ReduceOp.SUM):
    """``values`` (floats) summed (or ``op``) over the ranks, in float64; as given in one
    process."""
    if not DIST.active:
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=DIST.device)
    dist.all_reduce(t, op=op)
    return t.tolist()


def all_gather_objects(obj):
    """[``obj`` of rank 0, of rank 1, ...]: picklable objects from every rank."""
    if not DIST.active:
        return [obj]
    out = [None] * DIST.world_size
    dist.all_gather_object(out, obj)
    return out


def rank_part(indices):
    """This rank's contiguous part of ``indices`` (all of them in one process): the parts of
    the ranks, in rank order, are ``indices`` again, none padded or dropped."""
    n, r, w = len(indices), DIST.rank, DIST.world_size
    return indices[r * n // w:(r + 1) * n // w]


def amp_settings(device):
    """(autocast dtype or None, use GradScaler) for a device (docs/DESIGN.md, decision 10)."""
    if device.type != "cuda":
        return None, False
    if torch.cuda.get_device_capability(device) >= (8, 0):
        return torch.bfloat16, False
    return torch.float16, True


class NonFiniteLossError(FloatingPointError):
    """The loss of a batch was NaN or Inf."""


class NonFiniteGradientError(FloatingPointError):
    """The loss of a batch was finite but a gradient was NaN or Inf (no step was taken)."""


class NonFinitePredictionError(FloatingPointError):
    """A prediction of a batch was NaN or Inf."""


class TooManyFailedBatchesError(RuntimeError):
    """Too many batches of a pass failed: the run stops instead of skipping on."""


class FailedBatches:
    """The failed-batch rule of training, evaluation and prediction, in one place
    (docs/DESIGN.md, decision 11).

    A batch fails when it raises one of ``ERRORS``: a NaN or Inf loss, gradient or prediction
    (the ``NonFinite*Error``s) or running out of GPU memory, what a batch of valid data can
    legitimately run into. Any other exception is a bug or a broken environment and propagates
    at once, never hidden as a skipped batch. ``record`` logs a failed batch (exception type and
    message, the batch's dimer ids) and counts it, or re-raises at once when ``skip`` is False;
    the first failed batch of a run also writes its full traceback to ``traceback_path`` (when
    given and not written yet: a run removes an older one at its start). ``check`` stops the
    pass with ``TooManyFailedBatchesError`` naming the first failed batch when more than half
    of its batches failed.
    """
    ERRORS = (FloatingPointError, torch.OutOfMemoryError)

    def __init__(self, skip=True, log=print, what="epoch", traceback_path=None):
        self.skip, self.log, self.what = skip, log, what  # what: the pass, in messages
        self.traceback_path = traceback_path
        self.n_batches = 0  # batches seen
        self.failed = []  # (batch ids, reason) of each failed batch
        self.first_error = None

    def record(self, data, exc):
        if not self.skip:
            raise exc
        self.first_error = self.first_error or exc
        ids = list(data.id)
        where = ""
        if self.traceback_path and DIST.master and not os.path.exists(self.traceback_path):
            atomic_write_text(
                f"the first failed batch of this run ({self.what}): dimer ids {ids}\n"
                + "".join(traceback.format_exception(exc)), self.traceback_path)
            where = f" (full traceback in {self.traceback_path})"
        traceback.clear_frames(exc.__traceback__)  # free the batch's tensors (GPU memory)
        self.note(ids, f"{type(exc).__name__}: {exc}", where)

    def note(self, ids, reason, where=""):
        self.failed.append((ids, reason))
        self.log(f"skipped batch ids {ids} in this {self.what}: {reason}{where}")

    def merge_ranks(self):
        """Under torchrun, for a pass whose rows are split between the ranks: every rank's
        batches and failures (rank 0 logs the others'), so all take the same decision."""
        gathered = all_gather_objects((self.n_batches, self.failed))
        for rank, (_, failed) in enumerate(gathered):
            for ids, reason in failed if rank != DIST.rank else []:
                self.log(f"skipped batch ids {ids} in this {self.what} on rank {rank}: {reason}")
        self.n_batches = sum(n for n, _ in gathered)
        self.failed = [f for _, failed in gathered for f in failed]

    def check(self):
        n_failed = len(self.failed)
        if 2 * n_failed > self.n_batches:
            first_ids, first_reason = self.failed[0]
            todo = "check these dimers (python delta_coupling.py --check_data)" + (
                " or lower --lr" if self.what == "epoch" else "")
            if self.traceback_path:
                todo += f"; the first traceback of this run is in {self.traceback_path}"
            raise TooManyFailedBatchesError(
                f"{n_failed} of {self.n_batches} batches of this {self.what} failed (more than "
                f"half); the first failed batch holds dimer ids {first_ids}: {first_reason}; "
                f"{todo}") from self.first_error


def _graph_u(data):
    """u as (B, 4); a flat (4B,) vector from an older loader is reshaped."""
    num_graphs = data.num_graphs
    if data.u.numel() != num_graphs * U_DIM:
        raise ValueError(f"batch u has {data.u.numel()} values for {num_graphs} graphs "
                         f"(expected {U_DIM} each); ids {data.id}")
    return data.u.reshape(num_graphs, U_DIM)


def predict_batch(model, data, amp_dtype=None):
    """Forward one batch: (predicted Vref = V0 + dV, V0), both (B,) in the data's dtype.

    Sets ``data.u`` to (B, 4) first; the model runs under autocast when ``amp_dtype`` is given.
    """
    data.u = _graph_u(data)
    with torch.autocast(data.u.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        dv = model(data)  # (B,)
    v0 = data.u[:, 2]  # (B,)
    return v0 + dv.to(v0.dtype), v0  # AMP output back to the data's dtype


def run_epoch(model, loader, device, optimizer=None, scheduler=None, scaler=None,
              amp_dtype=None, skip_failed_batches=True, log=print, traceback_path=None,
              ema=None):
    """One pass over ``loader``: trains when ``optimizer`` is given, else evaluates; a
    ``WeightsEMA`` given as ``ema`` is updated after every training step.

    Returns an ``EpochResult``. A batch that fails (its loss or a gradient is NaN/Inf, or the
    GPU runs out of memory) is logged with its ids and reason, counted and skipped when
    ``skip_failed_batches``, the first of a run with its traceback in ``traceback_path``; if
    more than half of the batches fail, ``TooManyFailedBatchesError`` names the first failed
    batch's ids and reason (``FailedBatches``). With ``skip_failed_batches=False`` errors
    propagate at once; any other exception always does.

    Under torchrun every rank passes over its own loader. Training (``model`` is then the
    DistributedDataParallel wrapper): a step is one step over the union of the ranks' batches,
    the one a single process takes over their concatenation (``exchange_step``); a batch that
    fails on one rank is skipped by all. Evaluation: the sums and failure counts are
    all-reduced, so every rank returns the figures of all the rows.
    """
    training = optimizer is not None
    model.train(training)
    failures = FailedBatches(skip=skip_failed_batches, log=log,
                             what="epoch" if training else "evaluation",
                             traceback_path=traceback_path)
    loss_sum, model_errors, baseline_errors = 0.0, ErrorSums(), ErrorSums()
    for data in loader:
        data = data.to(device)
        failures.n_batches += 1
        error, n_graphs = None, data.num_graphs
        try:
            with torch.set_grad_enabled(training):
                pred_vref, v0 = predict_batch(model, data, amp_dtype)  # (B,), (B,)
                true_vref = data.y_true_vref  # (B,)
                loss = distance_weighted_l1_on_vref_loss(pred_vref, true_vref,
                                                         data.R_internal_val)
                if not torch.isfinite(loss):
                    raise NonFiniteLossError(f"loss is {loss.item()}")
        except FailedBatches.ERRORS as exc:
            if not (training and DIST.active):
                failures.record(data, exc)
                continue
            if not failures.skip:
                raise
            error = exc
        if training and DIST.active:  # every rank takes this step, or none
            factor, n_graphs, failed = exchange_step(data, error)
            if failed:
                failures.first_error = failures.first_error or error
                failures.note([i for ids, _ in failed for i in ids], failed[0][1])
                continue
            loss = loss * factor
        try:
            if training:
                optimizer_step(loss, optimizer, scheduler, scaler)
                if ema is not None:
                    ema.update()
        except FailedBatches.ERRORS as exc:
            failures.record(data, exc)
            continue
        loss_sum += float(loss.detach()) / DIST.world_size * n_graphs if training else \
            float(loss.detach()) * n_graphs
        model_errors.add(pred_vref.detach(), true_vref)  # V0 + dV
        baseline_errors.add(v0, true_vref)  # V0 alone
    if DIST.active:
        if not training:
            failures.merge_ranks()
        model_errors.all_reduce()
        baseline_errors.all_reduce()
        loss_sum = all_reduce_floats([loss_sum])[0]
    failures.check()
    result = EpochResult(n_graphs=model_errors.n, n_batches=failures.n_batches,
                         n_skipped=len(failures.failed), skipped=failures.failed)
    if result.n_graphs:
        result.loss = loss_sum / result.n_graphs
        model_fig, baseline_fig = model_errors.figures(), baseline_errors.figures()
        result.mape, result.mae, result.rmse = (model_fig[k] for k in ("mape", "mae", "rmse"))
        result.baseline_mape, result.baseline_mae, result.baseline_rmse = (
            baseline_fig[k] for k in ("mape", "mae", "rmse"))
    return result


def exchange_step(data, error):
    """Under torchrun, before a training step, between all ranks: the sums of R and of the
    graphs over the union of their batches, and the parts that failed.

    Returns ``(factor, graphs, failed)``: ``factor`` = world size x (this batch's sum of R) /
    (the union's), which turns this rank's loss into its term of the union's distance-weighted
    loss, sum_i R_i |err_i| / sum_i R_i, times the world size that DDP's gradient average
    divides out again; ``graphs`` in the union; ``failed``, [(ids, reason)] of each rank whose
    part raised (all ranks then skip the step).
    """
    r_sum = float(data.R_internal_val.double().sum())
    total_r, n_graphs, n_failed = all_reduce_floats([r_sum, data.num_graphs, error is not None])
    failed = []
    if n_failed:
        parts = all_gather_objects(None if error is None else
                                   (list(data.id), f"{type(error).__name__}: {error}"))
        failed = [p for p in parts if p is not None]
    return DIST.world_size * r_sum / total_r, int(n_graphs), failed


def optimizer_step(loss, optimizer, scheduler=None, scaler=None):
    """Backward and one optimizer (and scheduler) step; through ``scaler`` when given.

    Without a scaler a NaN or Inf gradient raises ``NonFiniteGradientError`` before any
    parameter changes (the failed-batch rule counts it as a failed batch). With one (float16
    autocast) the scaler finds such gradients itself: it skips that step and lowers its scale,
    which is how it finds its scale, not a failure.
    """
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        try:
            scaler.step(optimizer)
        finally:  # a failed step must not leave the scaler mid-step
            scaler.update()
    else:
        loss.backward()
        grads = [p.grad for group in optimizer.param_groups for p in group["params"]
                 if p.grad is not None]
        largest = torch.nn.utils.get_total_norm(grads, norm_type=math.inf) if grads else None
        if largest is not None and not torch.isfinite(largest):  # max |grad|: NaN or Inf
            optimizer.zero_grad(set_to_none=True)
            raise NonFiniteGradientError(f"loss is {loss.item():.6g} but its gradient has NaN "
                                         f"or Inf (largest |gradient| {largest.item()})")
        optimizer.step()
    if scheduler is not None:
        scheduler.step()


class WeightsEMA:
    """An exponential moving average of a model's parameters, updated after every training
    step (``--ema DECAY``; MACE and most interatomic-potential codes evaluate such an average).

    The average after step n is ``a <- d a + (1 - d) w`` with ``d = min(decay, (1 + n) /
    (10 + n))``: the usual warm-up, so the first steps do not tie the average to the initial
    weights. ``applied()`` puts the average into the model for a block (validation, a
    checkpoint) and the trained weights back after it; training itself never sees it. Buffers
    are constants and are not averaged.
    """

    def __init__(self, model, decay):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay {decay} is not between 0 and 1")
        self.decay, self.n_updates = float(decay), 0
        self.params = list(model.parameters())
        self.average = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self):
        self.n_updates += 1
        decay = min(self.decay, (1.0 + self.n_updates) / (10.0 + self.n_updates))
        torch._foreach_lerp_(self.average, [p.detach() for p in self.params], 1.0 - decay)

    @contextlib.contextmanager
    def applied(self):
        """The averaged weights in the model inside the block, the trained ones after it."""
        with torch.no_grad():
            trained = [p.detach().clone() for p in self.params]
            torch._foreach_copy_([p.data for p in self.params], self.average)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_([p.data for p in self.params], trained)

    def state_dict(self):
        return {"decay": self.decay, "n_updates": self.n_updates,
                "average": [a.clone() for a in self.average]}

    def load_state_dict(self, state):
        if len(state["average"]) != len(self.average):
            raise ValueError(f"EMA state of {len(state['average'])} tensors for a model of "
                             f"{len(self.average)}")
        self.decay, self.n_updates = float(state["decay"]), int(state["n_updates"])
        with torch.no_grad():
            torch._foreach_copy_(self.average, [a.to(self.average[0].device)
                                                for a in state["average"]])


@torch.no_grad()
def predict_rows(model, loader, device, amp_dtype=None, skip_failed_batches=True, log=print,
                 traceback_path=None, what="prediction"):
    """Per-dimer predictions over a loader, in its order.

    Returns ``{"id": [str], "pred": V0 + dV, "true": Vref (NaN where unknown), "v0": V0}``,
    the arrays (n,) float64 numpy. A batch that fails (a NaN or Inf prediction, out of GPU
    memory) is logged and skipped as in ``run_epoch``, by the same rule (``FailedBatches``;
    more than half failing stops): its rows are absent. Under torchrun each rank predicts its
    loader and every rank returns the rows of all, in rank order.
    """
    model.eval()
    ids, preds, trues, v0s = [], [], [], []
    failures = FailedBatches(skip=skip_failed_batches, log=log, what=what,
                             traceback_path=traceback_path)
    for data in loader:
        data = data.to(device)
        failures.n_batches += 1
        try:
            pred_vref, v0 = predict_batch(model, data, amp_dtype)  # (B,), (B,)
            finite = torch.isfinite(pred_vref)  # (B,)
            if not finite.all():
                bad = [i for i, ok in zip(data.id, finite.tolist()) if not ok]
                raise NonFinitePredictionError(f"the prediction is NaN or Inf for dimer ids {bad}")
        except FailedBatches.ERRORS as exc:
            failures.record(data, exc)
            continue
        ids.extend(data.id)
        preds.append(pred_vref.double().cpu())
        trues.append(data.y_true_vref.double().cpu())
        v0s.append(v0.double().cpu())
    if DIST.active:
        failures.merge_ranks()
    failures.check()
    cat = (lambda xs: torch.cat(xs).numpy() if xs else np.zeros(0))
    rows = {"id": ids, "pred": cat(preds), "true": cat(trues), "v0": cat(v0s)}
    if not DIST.active:
        return rows
    parts = all_gather_objects(rows)
    return {"id": [i for p in parts for i in p["id"]],
            **{key: np.concatenate([p[key] for p in parts]) for key in ("pred", "true", "v0")}}


# ----------------------------------------------------------------------------- plotting
def _new_figure(figsize):
    """A matplotlib Figure on an Agg canvas; no pyplot, so the caller's backend is left alone."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def _save_figure(fig, save_path):
    """Write a figure as PNG atomically (temp + rename), creating the folder."""
    fig.tight_layout()
    with _atomic_target(save_path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")


def save_regression_plot(pred, true, v0, save_path=None, title="", std=None):
    """Scatter V0 + dV and V0 alone against the reference Vref, with the diagonal.

    ``pred``, ``true``, ``v0``: (n,) arrays in Vref units; the MAE of both is in the legend
    and the model's in the title. ``std`` (n,): an ensemble's spread, drawn as +-1 std error
    bars. Saves a PNG when ``save_path`` is given; returns the Figure.
    """
    fig = _new_figure((5.5, 5))
    ax = fig.add_subplot()
    if true.size:
        figures = regression_metrics(pred, true, v0)
        mae, b_mae = figures["model"]["mae"], figures["baseline"]["mae"]
        ax.scatter(true, v0, s=14, marker="x", color="tab:gray", alpha=0.8,
                   label=f"V0 alone (MAE {b_mae:.3f})")
        if std is None:
            ax.scatter(true, pred, s=14, color="tab:blue", alpha=0.8,
                       label=f"V0 + dV (MAE {mae:.3f})")
        else:
            ax.errorbar(true, pred, yerr=std, fmt="o", ms=3.5, color="tab:blue", alpha=0.8,
                        elinewidth=1, capsize=2, label=f"V0 + dV +- 1 std (MAE {mae:.3f})")
        lo = float(min(true.min(), pred.min(), v0.min()))
        hi = float(max(true.max(), pred.max(), v0.max()))
        ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="ideal")
        title = f"{title}  (MAE {mae:.3f}, V0 alone {b_mae:.3f})".strip()
        ax.legend(loc="best")
    ax.set_xlabel("Vref (reference)")
    ax.set_ylabel("predicted Vref")
    ax.set_title(title, fontsize=10)
    if save_path:
        _save_figure(fig, save_path)
    return fig


def plot_uncertainty(error, std, save_path, title=""):
    """Two panels: |error| against the ensemble's std (log axes, with |error| = 1 and 2 std),
    and the calibration curve (observed against expected fraction of rows inside their
    central Gaussian interval; ``miscalibration_area`` is the area between it and the
    diagonal). ``error``, ``std``: (n,) arrays in Vref units. Saves a PNG; returns the Figure.
    """
    error, std = np.abs(np.asarray(error, np.float64)), np.asarray(std, np.float64)  # (n,)
    u = uncertainty_metrics(error, std)
    fig = _new_figure((11, 4.8))
    ax = fig.add_subplot(1, 2, 1)
    ax.scatter(std, error, s=14, color="tab:blue", alpha=0.8)
    positive = np.concatenate([std[std > 0], error[error > 0]])
    if positive.size:
        lo, hi = positive.min() / 2, positive.max() * 2
        for factor, style in ((1, "k--"), (2, "k:")):
            ax.plot([lo, hi], [factor * lo, factor * hi], style, lw=1,
                    label=f"|error| = {factor} std")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.legend(loc="best", fontsize=8)
    ax.set_xlabel("ensemble std (Vref units)")
    ax.set_ylabel("|error| (Vref units)")
    ax.set_title(f"{title}  Spearman {u['spearman']:.2f}".strip(), fontsize=10)
    ax = fig.add_subplot(1, 2, 2)
    expected, observed = calibration_curve(interval_confidences(error, std))
    ax.plot(expected, observed, color="tab:blue", lw=1.5, label="observed")
    ax.fill_between(expected, expected, observed, color="tab:blue", alpha=0.2,
                    label=f"miscalibration area {u['miscalibration_area']:.3f}")
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="calibrated")
    ax.set_xlabel("expected fraction inside the Gaussian interval")
    ax.set_ylabel("observed fraction")
    ax.set_title(f"<= 1 std: {u['within_1std']:.2f} (0.68), <= 2 std: {u['within_2std']:.2f} "
                 f"(0.95); n = {u['n']}", fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    _save_figure(fig, save_path)
    return fig


def plot_regression(model, loader, device, save_path=None, title="", amp_dtype=None,
                    **failed_batches):
    """Predict over ``loader`` (``predict_rows``, which takes ``failed_batches``: the options
    of the failed-batch rule) and draw ``save_regression_plot`` (docs/DESIGN.md, section 7).
    Returns the ``predict_rows`` dict."""
    rows = predict_rows(model, loader, device, amp_dtype, **failed_batches)
    save_regression_plot(rows["pred"], rows["true"], rows["v0"], save_path, title)
    return rows


def plot_learning_curves(history, save_path, best_epoch=None):
    """Training loss, validation MAPE and validation MAE against epoch; a PNG.

    ``history``: one dict per epoch with ``epoch``, ``train_loss``, ``val_mape``, ``val_mae``
    (NaN or None where there is no validation set). A log y axis where every value is > 0 and
    they span at least a factor ``LOG_AXIS_MIN_RATIO``.
    """
    from matplotlib.ticker import MaxNLocator

    epochs = np.array([h["epoch"] for h in history])  # (n_epochs,)
    fig = _new_figure((13, 4))
    panels = (("train_loss", "training loss (weighted L1 on Vref)"), ("val_mape", "val MAPE %"),
              ("val_mae", "val MAE (Vref units)"))
    for k, (key, label) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), k + 1)
        values = np.array([np.nan if h[key] is None else h[key] for h in history], dtype=float)
        finite = values[np.isfinite(values)]
        ax.plot(epochs, values, lw=1.2)
        if finite.size and 0 < LOG_AXIS_MIN_RATIO * finite.min() <= finite.max():
            ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if best_epoch is not None and best_epoch > 0:
            ax.axvline(best_epoch, color="k", ls="--", lw=0.8, label=f"best (epoch {best_epoch})")
            ax.legend(loc="best", fontsize=8)
        ax.set_xlabel("epoch")
        ax.set_title(label, fontsize=10)
        if not finite.size:
            ax.text(0.5, 0.5, "no values (no validation set?)", ha="center",
                    transform=ax.transAxes)
    _save_figure(fig, save_path)
    return fig


# ----------------------------------------------------------------------------- main
# The run from the command line: main() calls the stages below in order (data, model,
# optimiser, training loop, final report); the resume and predict helpers follow them.


# --- splits
def split_sizes(n):
    """(n_train, n_val, n_test) for n items (docs/DESIGN.md, decision 8).

    n < 10: 1 -> (1, 0, 0); 2 -> (1, 1, 0); 3..9 -> (n - 2, 1, 1).
    n >= 10: 80/10/10 with val and test rounded and at least 1 each; train takes the rest.
    """
    if n < 1:
        raise ValueError(f"cannot split {n} items")
    if n < SPLIT_MIN_N_FRACTIONAL:
        return {1: (1, 0, 0), 2: (1, 1, 0)}.get(n, (n - 2, 1, 1))
    n_val = max(1, round(SPLIT_FRACTIONS[1] * n))
    n_test = max(1, round(SPLIT_FRACTIONS[2] * n))
    return n - n_val - n_test, n_val, n_test


def make_splits(rows, seed=DEFAULT_SEED):
    """Seeded train/val/test row indices (docs/DESIGN.md, decision 8).

    When rows carry a ``group`` (a row without one is a group of its own), whole groups are
    split by ``split_sizes`` of the group count, so one dimer's distance scan never straddles
    train and test. Returns (train, val, test, rule).
    """
    rng = np.random.default_rng(seed)
    if any(r.get("group") is not None for r in rows):
        groups = row_groups(rows)
        names = sorted(set(groups))
        order = [names[i] for i in rng.permutation(len(names))]
        n_tr, n_va, _ = split_sizes(len(names))
        which = {g: (0 if k < n_tr else 1 if k < n_tr + n_va else 2) for k, g in enumerate(order)}
        parts = [[i for i, g in enumerate(groups) if which[g] == s] for s in range(3)]
        rule = f"by group ({len(names)} groups: {n_tr}/{n_va}/{len(names) - n_tr - n_va})"
    else:
        perm = rng.permutation(len(rows)).tolist()
        n_tr, n_va, _ = split_sizes(len(rows))
        parts = [sorted(perm[:n_tr]), sorted(perm[n_tr:n_tr + n_va]), sorted(perm[n_tr + n_va:])]
        rule = "by row (80/10/10)" if len(rows) >= SPLIT_MIN_N_FRACTIONAL else "by row (tiny set)"
    return parts[0], parts[1], parts[2], rule


def row_groups(rows):
    """Each row's group label; a row without a ``group`` is a group of its own."""
    return [r.get("group", f"\0row {i}") for i, r in enumerate(rows)]


def make_cv_folds(rows, k, seed=DEFAULT_SEED):
    """Seeded K-fold cross-validation by group (by row when no row has a group).

    The groups are shuffled and dealt to the folds in turn, so the folds' group counts differ
    by at most one; fold f's test part is its groups' rows, and every row is in exactly one
    test part. The rest is split into train and validation by group (validation 1/9 of the
    groups, i.e. 10 % of the whole as in ``split_sizes``; at least 1 when 2 or more groups
    remain, none when only 1 remains), with a seeded shuffle of its own per fold.
    Returns a list of K (train, val, test, rule) like ``make_splits``.
    """
    groups = row_groups(rows)
    names = sorted(set(groups))
    if not 2 <= k <= len(names):
        raise ValueError(f"--cv {k}: needs 2 to {len(names)} folds for {len(names)} "
                         f"{'groups' if any('group' in r for r in rows) else 'rows'}")
    order = [names[i] for i in np.random.default_rng(seed).permutation(len(names))]
    fold_of = {g: position % k for position, g in enumerate(order)}
    val_share = SPLIT_FRACTIONS[1] / (SPLIT_FRACTIONS[0] + SPLIT_FRACTIONS[1])
    folds = []
    for f in range(k):
        rest = [g for g in order if fold_of[g] != f]
        rest = [rest[i] for i in np.random.default_rng([seed, f]).permutation(len(rest))]
        n_val = min(max(1, round(val_share * len(rest))), len(rest) - 1)
        val_groups = set(rest[:n_val])
        parts = ([i for i, g in enumerate(groups) if fold_of[g] != f and g not in val_groups],
                 [i for i, g in enumerate(groups) if g in val_groups],
                 [i for i, g in enumerate(groups) if fold_of[g] == f])
        rule = (f"fold {f} of {k} ({len(rest) - n_val}/{n_val}/{len(names) - len(rest)} "
                f"groups)")
        folds.append((*parts, rule))
    return folds


# --- files: written atomically, read as tensors and plain types only
class OutputError(OSError):
    """An output file or folder cannot be created or written. Its message is one line that
    names the path, the reason and what to do; main() prints it and exits with status 2."""


# what to do about an output that cannot be written, by errno
_OUTPUT_ADVICE = {
    errno.ENOSPC: "free disk space or write to another --root_dir",
    errno.EDQUOT: "free disk space or write to another --root_dir",
    errno.EACCES: "make the folder writable or use another --root_dir",
    errno.EPERM: "make the folder writable or use another --root_dir",
    errno.EROFS: "the file system is read-only: copy the data to a writable --root_dir",
    errno.EEXIST: "a file is in the way of the folder: move it away",
    errno.ENOTDIR: "a file is in the way of a folder on this path: move it away",
    errno.EISDIR: "a folder is in the way of the file: move it away",
}


def output_error(path, exc, what="write"):
    """The ``OutputError`` for ``exc`` (an ``OSError``) raised when writing ``path``:
    "cannot <what> <path>: <reason>; <what to do>", one line."""
    advice = _OUTPUT_ADVICE.get(exc.errno, "check the path and the disk")
    error = OutputError(f"cannot {what} {path}: {exc.strerror or exc}; {advice}")
    error.errno = exc.errno
    return error


def remove_output(path):
    """Remove an output file of an earlier run if it is there; an ``OutputError`` if it cannot
    be removed."""
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise output_error(path, exc, "remove the earlier") from None


def make_output_folder(folder):
    """``os.makedirs(folder, exist_ok=True)``, or an ``OutputError`` naming the folder."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise output_error(folder, exc, "create the folder") from None
    return folder


@contextlib.contextmanager
def _atomic_target(path):
    """Yield a temp path in ``path``'s folder; flushed to disk and renamed over ``path`` only
    if the block succeeds. A failure or crash mid-write leaves the previous ``path`` intact and
    removes the temp file; an ``OSError`` (disk full, no permission, a folder in the way)
    becomes an ``OutputError`` naming ``path``."""
    folder = make_output_folder(os.path.dirname(os.path.abspath(path)))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp.{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OutputError:
        raise
    except OSError as exc:
        raise output_error(path, exc) from None
    finally:
        with contextlib.suppress(OSError):  # not there after the rename, or never created
            os.remove(tmp)


def atomic_torch_save(obj, path):
    """torch.save to a temp file in the same folder, then rename: never a half-written file."""
    with _atomic_target(path) as tmp:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)


def atomic_write_text(text, path):
    """Write a text file atomically (temp + rename)."""
    with _atomic_target(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            fh.write(text)


def _json_ready(obj):
    """A copy with NaN/Inf floats as None and tuples as lists: strict JSON."""
    if isinstance(obj, dict):
        return {str(k): _json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_ready(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def atomic_write_json(obj, path):
    """Write plain Python data as strict JSON (NaN -> null), atomically."""
    atomic_write_text(json.dumps(_json_ready(obj), indent=1, allow_nan=False) + "\n", path)


def _load_error_detail(exc):
    """What torch's loader says is wrong, without its advice on how to load the file anyway
    (one line)."""
    advice = ("weights_only", "Weights only load failed", "Check the documentation",
              "Please file an issue", "add_safe_globals", "safe_globals")
    lines = [line.strip() for line in str(exc).splitlines()]
    return " ".join(line for line in lines if line and not any(a in line for a in advice))


def load_tensors_file(path, what, fix="", map_location="cpu", mmap=False):
    """``torch.load(path, weights_only=True)``: tensors and plain types only (docs/DESIGN.md,
    decision 9); with ``mmap`` the tensors are views of the mapped file, not copies. A file
    that cannot be read so raises ``ValueError``: "``path`` cannot be loaded as ``what``:
    why``fix``". A file holding other pickled objects is refused as such, never with advice to
    load it some other way: unpickling them could run code."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL (\S+)", str(exc))
        held = (f"a pickled Python object ({found.group(1)})" if found else
                f"pickled data other than tensors ({_load_error_detail(exc) or 'unreadable'})")
        raise ValueError(f"{path} cannot be loaded as {what}: it holds {held}, not only tensors "
                         f"and plain types; loading such a file could run code, so it is "
                         f"refused{fix}") from None
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        raise ValueError(f"{path} cannot be loaded as {what} ({_load_error_detail(exc)})"
                         f"{fix}") from None


def load_checkpoint(path, device="cpu"):
    """Load a checkpoint (plain types and tensors only) and rebuild its model.

    Raises ``ValueError`` naming the file when it is no DeltaCoupling checkpoint, when it was
    written with another length scale than ``INT_ANGSTROM_SCALE``, or when its model's cutoff
    is not the cutoff of the graphs it was trained on.
    """
    ckpt = load_tensors_file(path, "a DeltaCoupling checkpoint", map_location=device)
    if (not isinstance(ckpt, dict) or {"model_state", "model_config", "metadata"} - set(ckpt)
            or not isinstance(ckpt["metadata"], dict)):
        raise ValueError(f"{path} is not a DeltaCoupling checkpoint (no model_state, "
                         f"model_config and metadata); pass a {BEST_CHECKPOINT} or "
                         f"{FINAL_CHECKPOINT} written by training")
    scale = ckpt["metadata"].get("int_angstrom_scale")
    if not (isinstance(scale, (int, float)) and math.isclose(scale, INT_ANGSTROM_SCALE)):
        raise ValueError(f"{path} was trained with int_angstrom_scale = {scale!r} internal "
                         f"units per Angstrom, this code uses {INT_ANGSTROM_SCALE}: its graphs "
                         f"would be built at the wrong scale. Use the delta_coupling.py that "
                         f"trained it, or retrain")
    cutoff = ckpt["model_config"].get("cutoff")
    internal = ckpt["metadata"].get("internal_cutoff")
    if not (isinstance(cutoff, (int, float)) and isinstance(internal, (int, float))
            and math.isclose(cutoff, internal, rel_tol=1e-9)):
        raise ValueError(f"{path}: the model's cutoff ({cutoff!r} internal units) is not the "
                         f"cutoff of the graphs it was trained on ({internal!r}); the checkpoint "
                         f"is inconsistent, retrain")
    model = DeltaCoupling.from_config(ckpt["model_config"]).to(device)
    try:
        model.load_state_dict(ckpt["model_state"])
    except RuntimeError as exc:
        raise ValueError(f"{path}: the weights do not fit the stored model_config ({exc})") \
            from None
    return model, ckpt


# --- the environment of a run: seeds, versions, device, progress and messages
def seed_everything(seed):
    """Seed Python's, NumPy's and torch's (CPU and every CUDA device) random generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def package_versions():
    """Versions of Python and of the packages that shape a run's numbers: {name: str}."""
    import e3nn
    import matplotlib
    import torch_geometric
    import tqdm as tqdm_module

    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "torch_geometric": torch_geometric.__version__, "e3nn": e3nn.__version__,
                "numpy": np.__version__, "pandas": pd.__version__,
                "matplotlib": matplotlib.__version__, "tqdm": tqdm_module.__version__,
                "torch_cluster": getattr(torch_cluster, "__version__", None)}
    # plain str: torch.__version__ is a TorchVersion, which a weights_only load refuses
    return {name: None if v is None else str(v) for name, v in versions.items()}


def resolve_device(choice):
    """``auto`` -> cuda when available, else cpu; anything else as torch.device(choice)."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def describe_device(device):
    """The device as text, with the GPU's name on CUDA."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"{device} ({platform.processor() or platform.machine()})"


def progress(iterable, quiet, **kwargs):
    """A tqdm progress bar on stderr, off when ``quiet``. When stderr is no terminal (a log
    file, CI, some IDE consoles) it redraws every ``PROGRESS_INTERVAL_NO_TTY`` seconds only, so
    a log of a long run stays small."""
    interval = 0.1 if sys.stderr.isatty() else PROGRESS_INTERVAL_NO_TTY
    return tqdm(iterable, disable=quiet or not DIST.master, file=sys.stderr, dynamic_ncols=True,
                mininterval=interval, **kwargs)


def log_line(message):
    """Print a line to stdout without tearing a progress bar (tqdm.write); rank 0 only."""
    if DIST.master:
        tqdm.write(message, file=sys.stdout)


def _exit(message):
    """Stop main() with a message for the user (exit status 2). Under torchrun every rank
    meets the same problems (they see the same data), so rank 0 alone prints it."""
    if DIST.master:
        print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def setup_distributed(device_choice):
    """Join the process group when launched by torchrun (RANK in the environment): nccl with
    one GPU per local rank on CUDA, gloo on a CPU (docs/DESIGN.md, decision 18); sets ``DIST``
    once. A plain ``python delta_coupling.py`` initialises nothing; a process group that the
    caller has initialised is used as it is. Returns the device."""
    global DIST
    device = resolve_device(device_choice)
    if "RANK" not in os.environ:
        DIST = DistEnv()
        return device
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device.type == "cuda":
        if device.index is None:  # --device auto or cuda: this rank's own GPU
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    owns_group = not dist.is_initialized()
    if owns_group:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=DIST_TIMEOUT_MINUTES))
    data_group = dist.new_group(backend="gloo",
                                timeout=datetime.timedelta(hours=DIST_DATA_TIMEOUT_HOURS))
    DIST = DistEnv(rank=dist.get_rank(), local_rank=local_rank,
                   world_size=dist.get_world_size(),
                   local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", 1)), active=True,
                   device=device if device.type == "cuda" else torch.device("cpu"),
                   data_group=data_group, owns_group=owns_group)
    return device


def launched_by_torchrun():
    """True when torchrun started this process as one of several (RANK and WORLD_SIZE > 1)."""
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", 1)) > 1


def teardown_distributed():
    """Leave the process group setup_distributed initialised; ``DIST`` is a single process's
    again."""
    global DIST
    if DIST.owns_group and dist.is_initialized():
        dist.destroy_process_group()
    DIST = DistEnv()


def rank0_first(step):
    """Run ``step()`` on rank 0 while the other ranks wait; return its result on rank 0 and
    None on the others. When rank 0 stops (a data problem, --check_data, an error) every rank
    stops with its exit status, without a word of its own."""
    if not DIST.active:
        return step()
    outcome, result = ["error"], None
    try:
        if DIST.master:
            try:
                result = step()
                outcome = ["ok"]
            except SystemExit as exc:
                outcome = [exc.code]
                raise
    finally:
        dist.broadcast_object_list(outcome, src=0, group=DIST.data_group)
    if outcome[0] != "ok":
        raise SystemExit(2 if outcome[0] == "error" else outcome[0])
    return result


def broadcast_from_rank0(obj):
    """Rank 0's ``obj`` on every rank (as given in one process)."""
    if not DIST.active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=DIST.data_group)
    return box[0]


def parameters_sha256(model):
    """Hex SHA-256 of a model's state (names, shapes, bytes) in its order."""
    digest = hashlib.sha256()
    for name, t in model.state_dict().items():
        digest.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        digest.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy()
                      .tobytes())
    return digest.hexdigest()


# --- options, the data check, the cache and the compiler
def positive_int(text):
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def positive_float(text):
    """argparse type: a finite number > 0."""
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def ema_decay(text):
    """argparse type of --ema: 0 (off) or a decay in (0, 1)."""
    value = float(text)
    if not (value == 0.0 or 0.0 < value < 1.0):
        raise argparse.ArgumentTypeError(f"{text}: give 0 (off) or a decay between 0 and 1, "
                                         f"e.g. 0.99")
    return value


def describe_stale_counting(schedule, peak_lr=None):
    """When ``stale_epochs_count`` counts, in words: 'from the first epoch' (spec), or for
    anneal 'once the lr is down to 10% of its peak' (with ``peak_lr``: to that value)."""
    if schedule == "spec":
        return "from the first epoch"
    threshold = (f"{ANNEAL_COUNT_LR_FRACTION * peak_lr:.2g}" if peak_lr is not None
                 else f"{ANNEAL_COUNT_LR_FRACTION:.0%} of its peak")
    return f"once the lr is down to {threshold}"


def describe_schedule(name):
    """E.g. '300 epochs, patience 50 counted once the lr is down to 10% of its peak, no
    EMA'."""
    d = SCHEDULES[name]
    return (f"{d['epochs']} epochs, patience {d['patience']} counted "
            f"{describe_stale_counting(name)}, "
            + (f"EMA {d['ema']:g}" if d["ema"] else "no EMA"))


def apply_schedule(args):
    """Resolve --schedule (None: ``DEFAULT_SCHEDULE``, with --cv ``CV_DEFAULT_SCHEDULE``) and
    fill --epochs, --patience and --ema that were not given from its defaults."""
    if args.schedule is None:
        args.schedule = CV_DEFAULT_SCHEDULE if args.cv is not None else DEFAULT_SCHEDULE
    for key, value in SCHEDULES[args.schedule].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def build_arg_parser():
    p = argparse.ArgumentParser(
        description="Train DeltaCoupling: learn dV so that V0 + dV matches Vref; or, with "
                    "--predict, predict Vref for new dimers with a saved model.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--root_dir", default=DEFAULT_ROOT_DIR,
                   help="data folder with meta.xlsx (docs/DATA_FORMAT.md)")
    p.add_argument("--cache_file_name", default=DEFAULT_CACHE_FILE,
                   help="cache file inside root_dir")
    p.add_argument("--rebuild_cache", action="store_true", help="rebuild the cache first")
    p.add_argument("--schedule", default=None, choices=tuple(SCHEDULES),
                   help="training schedule: the defaults of --epochs, --patience and --ema and "
                        f"when early stopping counts; spec: the design's, "
                        f"{describe_schedule('spec')}; anneal: {describe_schedule('anneal')}; "
                        f"None: {DEFAULT_SCHEDULE}, with --cv {CV_DEFAULT_SCHEDULE} "
                        f"(docs/RESULTS.md, 'Training schedule')".replace("%", "%%"))
    p.add_argument("--epochs", type=positive_int, default=None,
                   help="training epochs, the OneCycle length; None: the schedule's")
    p.add_argument("--batch_size", type=positive_int, default=DEFAULT_BATCH_SIZE,
                   help="dimers per batch")
    p.add_argument("--physical_cutoff", type=positive_float, default=DEFAULT_PHYSICAL_CUTOFF,
                   help="radius-graph cutoff in Angstrom")
    p.add_argument("--num_conv_layers", type=positive_int, default=DEFAULT_NUM_CONV_LAYERS,
                   help="equivariant convolution blocks")
    p.add_argument("--num_rbf", type=positive_int, default=DEFAULT_NUM_RBF,
                   help="radial Bessel basis functions")
    p.add_argument("--radial_hidden", type=positive_int, default=DEFAULT_RADIAL_HIDDEN,
                   help="hidden width of the RBF -> tensor-product-weight MLP")
    p.add_argument("--mlp_hidden", type=positive_int, default=DEFAULT_MLP_HIDDEN,
                   help="hidden width of the readout MLP")
    p.add_argument("--dv_switch", default=DEFAULT_DV_SWITCH, choices=DV_SWITCHES,
                   help="contact: dV times a smooth switch of the closest A-B atom distance, "
                        "1 up to --switch_on, exactly 0 from --switch_off on (dV vanishes as "
                        "the monomers part); off: the design's dV")
    p.add_argument("--switch_on", type=positive_float, default=DEFAULT_SWITCH_ON_ANGSTROM,
                   help="Angstrom: with --dv_switch contact, dV is whole up to this contact")
    p.add_argument("--switch_off", type=positive_float, default=DEFAULT_SWITCH_OFF_ANGSTROM,
                   help="Angstrom: with --dv_switch contact, dV is 0 from this contact on "
                        "(at most --physical_cutoff)")
    p.add_argument("--lr", type=positive_float, default=DEFAULT_LR,
                   help="peak OneCycle learning rate")
    p.add_argument("--apply_augmentations", action=argparse.BooleanOptionalAction, default=True,
                   help="random rotation + jitter of training dimers")
    p.add_argument("--augment_cached_train", action=argparse.BooleanOptionalAction,
                   default=False, help="augment cached training graphs instead of re-reading")
    p.add_argument("--jitter_std", type=float, default=DEFAULT_JITTER_STD,
                   help="position noise, internal units (0.001 = 0.01 Angstrom)")
    p.add_argument("--patience", type=positive_int, default=None,
                   help="early-stopping patience on the monitored validation figure, epochs; "
                        "None: the schedule's")
    p.add_argument("--ema", type=ema_decay, default=None, metavar="DECAY",
                   help="validate and keep an exponential moving average of the weights, "
                        "updated every step with this decay; 0: off; None: the schedule's")
    p.add_argument("--monitor", default=DEFAULT_MONITOR, choices=MONITORS,
                   help="validation figure that early stopping and the best checkpoint watch "
                        "(MAPE in %%, MAE in Vref units)")
    p.add_argument("--keep", default=DEFAULT_KEEP, choices=KEEPS,
                   help="the weights the run keeps in its final checkpoint: best: the epoch of "
                        "the best --monitor figure; final: the last epoch's (with --schedule "
                        "anneal, fully annealed)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED,
                   help="seed of the split, the initial weights and the augmentation")
    p.add_argument("--log_every", type=positive_int, default=DEFAULT_LOG_EVERY,
                   help="print a progress line every this many epochs")
    p.add_argument("--num_workers", type=int, default=None,
                   help="DataLoader workers (default: 0 on CPU, 4 on CUDA)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--compile", default="auto", choices=["auto", "off", "inductor", "aot_eager"],
                   help="torch.compile backend; auto = inductor on CUDA (aot_eager on Windows) "
                        f"and on a Linux CPU with a C++ compiler for {CPU_COMPILE_MIN_EPOCHS} "
                        f"epochs or more, else off (eager)")
    p.add_argument("--skip_failed_batches", action=argparse.BooleanOptionalAction, default=True,
                   help="log, count and skip a batch that fails instead of stopping")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bars (the periodic log lines and the report stay)")
    p.add_argument("--predict", action="store_true",
                   help=f"predict Vref for every row of root_dir/meta.xlsx (Vref optional) with "
                        f"a saved model; writes root_dir/{PREDICTIONS_FILE}")
    p.add_argument("--checkpoint", default=None,
                   help=f"checkpoint or {ENSEMBLE_FILE} for --predict; None: root_dir/models/"
                        f"{ENSEMBLE_FILE}, else the newer of its {FINAL_CHECKPOINT} and "
                        f"{BEST_CHECKPOINT}, else the shipped pretrained model")
    p.add_argument("--check_data", action="store_true",
                   help="validate every row of the data folder, print every problem and exit "
                        "(1 if any) without training")
    p.add_argument("--ensemble", type=positive_int, default=None, metavar="K",
                   help="train K members (seeds seed, seed+1, ...; same split and options) in "
                        f"root_dir/models/member_k, tied together by models/{ENSEMBLE_FILE}; "
                        "--predict with it gives the members' mean and std")
    p.add_argument("--member", type=int, default=None, metavar="k",
                   help="train only member k (seed + k) of an ensemble, e.g. one job per "
                        "member; then --combine_ensemble")
    p.add_argument("--combine_ensemble", action="store_true",
                   help=f"tie the finished members in root_dir/models/member_*/ together "
                        f"(models/{ENSEMBLE_FILE}) and report the ensemble; refuses members "
                        f"trained with other options")
    p.add_argument("--cv", type=int, default=None, metavar="K",
                   help="K-fold cross-validation, folds by the group column (else by row); "
                        f"without --schedule each fold trains {CV_DEFAULT_SCHEDULE}")
    p.add_argument("--fold", type=int, default=None, help=argparse.SUPPRESS)  # set by --cv
    p.add_argument("--resume", default=None, metavar="PATH",
                   help=f"continue an interrupted run from its <root_dir>/models/"
                        f"{RESUME_CHECKPOINT}, with its saved options")
    return p


def data_check_report(root_dir, parsed=None, require_vref=True, rows=None):
    """Run ``check_dataset``: ("checked N rows of DIR: K problems" + one line each, K)."""
    n_rows, problems = check_dataset(root_dir, parsed, require_vref, rows)
    head = f"checked {n_rows} rows of {root_dir}: {len(problems)} problem" \
           f"{'' if len(problems) == 1 else 's'}"
    return "\n".join([head] + [f"  - {p}" for p in problems]), len(problems)


def check_data_or_exit(args):
    """``--check_data``: print the report, exit 1 if any problem, else 0 (nothing trained).

    Otherwise (before training or prediction) stop with status 2 and the full report if any
    problem, or return ``(rows, parsed)``: meta.xlsx's rows and every row's ``ParsedDimer``
    (the files, read once for training too), or None for a set larger than
    ``DIMER_PRELOAD_MAX`` rows. With ``--predict`` Vref may be missing (``check_dataset``'s
    ``require_vref``).
    """
    parsed, rows = [], []
    report, n_problems = data_check_report(args.root_dir, parsed, require_vref=not args.predict,
                                           rows=rows)
    if args.check_data:
        print(report)
        raise SystemExit(1 if n_problems else 0)
    if n_problems:
        _exit(f"{report}\nFix these and run again (python delta_coupling.py --check_data "
              f"--root_dir {shlex.quote(args.root_dir)} lists them without training).")
    return rows, (parsed if len(parsed) == len(rows) else None)


def prepare_cache(args, rows, parsed=None):
    """Find, build (from ``parsed`` dimers when given, else reading each row's files) or
    validate ``<root_dir>/<cache_file_name>`` and its shards; return the ``GraphCache``."""
    cache_path = os.path.join(args.root_dir, args.cache_file_name)
    expected = cache_metadata(args.root_dir, args.physical_cutoff, rows)
    if args.rebuild_cache or not os.path.exists(cache_path):
        try:
            from preprocess_and_cache import build_cache
        except ImportError as exc:
            _exit(f"cannot import build_cache from preprocess_and_cache.py ({exc}); keep "
                  f"preprocess_and_cache.py next to delta_coupling.py, or build {cache_path} "
                  f"yourself")
        log_line(f"building cache {cache_path} ...")
        build_cache(args.root_dir, args.physical_cutoff, cache_file_name=args.cache_file_name,
                    progress_bar=not args.quiet, parsed=parsed, rows=rows,
                    fresh=args.rebuild_cache)
    rebuild = rebuild_cache_hint(args.root_dir, args.physical_cutoff, args.cache_file_name)
    try:
        cache = load_cache(cache_path)
    except ValueError as exc:
        _exit(f"{exc}\n{rebuild}")
    problems = check_cache_metadata(cache.metadata, expected)
    if problems:
        _exit(f"cache {cache_path} does not match the current settings:\n  "
              + "\n  ".join(problems) + f"\n{rebuild}")
    try:
        cache.verify()
    except ValueError as exc:
        _exit(str(exc))
    return cache


def resolve_compile_backend(choice, device, epochs=None):
    """The torch.compile backend for ``--compile choice`` on ``device``; None means eager.

    ``auto`` (docs/DESIGN.md, decision 10): on CUDA inductor, aot_eager on Windows. On a CPU what
    ``benchmarks/bench_training.py`` measured faster than eager: inductor on Linux when a C++
    compiler is on PATH (``CPU_AUTO_COMPILE``) and the run has ``CPU_COMPILE_MIN_EPOCHS``
    epochs or more (``epochs`` None: a run long enough), else eager (aot_eager measured
    slower).
    """
    if choice == "auto":
        if device.type == "cuda":
            return "aot_eager" if sys.platform.startswith("win") else "inductor"
        short = epochs is not None and epochs < CPU_COMPILE_MIN_EPOCHS
        if short or not shutil.which(os.environ.get("CXX") or "g++"):
            return None
        return CPU_AUTO_COMPILE.get(sys.platform)
    if choice == "off":
        return None
    if choice in ("inductor", "aot_eager"):
        return choice
    raise ValueError(f"unknown --compile {choice!r}")


def try_compile(model, backend, train_probe, eval_probe=None, amp_dtype=None):
    """Compile ``model.forward_tensors`` with ``backend``; fall back to eager on failure.

    Compilation is lazy, so one training forward + backward on ``train_probe`` and one no-grad
    forward on ``eval_probe`` (batches like those of training and evaluation) run now: a
    compiler failure shows here, is reported in one warning line and the model runs eager
    (docs/DESIGN.md, decision 10). Returns True when the compiled forward is in use.
    """
    was_training = model.training
    try:
        model.compile_forward(backend)
        model.train()
        predict_batch(model, train_probe.clone(), amp_dtype)[0].sum().backward()
        model.eval()
        with torch.no_grad():
            predict_batch(model, (train_probe if eval_probe is None else eval_probe).clone(),
                          amp_dtype)
        return model._compiled is not None  # forward drops it when a compilation fails
    except Exception as exc:  # noqa: BLE001 - any compiler failure means: run eager (decision 10)
        _warn_running_eager(f"torch.compile({backend}) failed", exc)
        model.uncompile_forward()
        return False
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)


# --- the stages of main(): data, model, optimiser, training loop, final report
@dataclass
class TrainingRun:
    """What the stages of ``main`` share: the options, the device, the data and the files."""
    args: argparse.Namespace
    device: torch.device
    rows: list  # meta.xlsx rows
    cache: "GraphCache"  # the graph cache: metadata, ids, memory-mapped shards
    split_idx: dict  # {"train"/"val"/"test": row indices}
    rule: str  # how the split was made (make_splits)
    train_ds: torch.utils.data.Dataset
    eval_ds: torch.utils.data.Dataset  # the cached graphs, not augmented
    loader_kw: dict  # batch size and worker settings of every DataLoader
    train_loader: DataLoader
    val_loader: DataLoader
    amp_dtype: torch.dtype = None  # autocast dtype (CUDA only), None: full precision
    use_scaler: bool = False  # float16 autocast needs a GradScaler
    run_id: str = ""  # tells this run's files from another run's
    versions: dict = field(default_factory=dict)  # package_versions()
    resumed: bool = False  # continues a saved run (--resume)
    level_of_theory: dict = None  # the data folder's baseline level (read_level_of_theory)

    @property
    def subdir(self):
        """Where this run's files go inside models/ and plots/: '' for a single run,
        member_k for an ensemble's member, cv/fold_f for a cross-validation fold."""
        return run_subdir(self.args)

    @property
    def models_dir(self):
        return os.path.join(self.args.root_dir, "models", self.subdir).rstrip(os.sep)

    @property
    def plots_dir(self):
        return os.path.join(self.args.root_dir, "plots", self.subdir).rstrip(os.sep)

    @property
    def best_path(self):
        return os.path.join(self.models_dir, BEST_CHECKPOINT)

    @property
    def resume_path(self):
        return os.path.join(self.models_dir, RESUME_CHECKPOINT)

    @property
    def failed_batches(self):
        """The failed-batch rule's options of every pass (``run_epoch``, ``predict_rows``)."""
        return dict(skip_failed_batches=self.args.skip_failed_batches, log=log_line,
                    traceback_path=os.path.join(self.models_dir, FAILED_BATCHES_LOG))

    @property
    def metadata(self):
        return dict(self.cache.metadata)

    @property
    def split_ids(self):
        return {name: [self.rows[i]["id"] for i in idx] for name, idx in self.split_idx.items()}

    @property
    def monitor_name(self):
        """What early stopping watches: the validation figure of ``--monitor`` (MAPE or MAE),
        or without a validation set the training loss."""
        return f"val {self.args.monitor.upper()}" if len(self.split_idx["val"]) else "train loss"

    def checkpoint(self, model, epoch, val_mape, val_mae):
        """A best/final checkpoint: weights with everything that reloads them alone."""
        return {"model_state": model.state_dict(), "model_config": model.config,
                "config": dict(vars(self.args)), "metadata": self.metadata, "epoch": epoch,
                "val_mape": val_mape, "val_mae": val_mae, "split_ids": self.split_ids,
                "versions": self.versions, "run_id": self.run_id,
                "level_of_theory": self.level_of_theory}


@dataclass
class TrainingProgress:
    """The training loop's counters: what a resume state continues and the report reads."""
    epoch: int = 0  # the last finished epoch
    best: float = float("inf")  # the best monitored value so far
    best_epoch: int = -1
    stale: int = 0  # epochs since the best
    stopped: bool = False  # early stopping triggered
    history: list = field(default_factory=list)  # one record per epoch
    saved: tuple = None  # (path, epoch) of the latest resume state

    def update(self, value, patience, comparable=True, counting=True):
        """Early stopping's rule for the epoch ``self.epoch`` whose monitored figure is
        ``value``: a new best when lower than every earlier one and ``comparable`` (no failed
        batch, so over every dimer), else one more stale epoch when ``counting``
        (``stale_epochs_count``); stopped after ``patience`` stale epochs. Returns True on a
        new best."""
        improved = comparable and value < self.best
        if improved:
            self.best, self.best_epoch, self.stale = value, self.epoch, 0
        elif counting:
            self.stale += 1
        self.stopped = self.stale >= patience
        return improved


def run_subdir(args):
    """'' for a single run; member_k (an ensemble's member) or cv/fold_f (a CV fold)."""
    if args.member is not None:
        return f"member_{args.member}"
    if args.fold is not None:
        return os.path.join("cv", f"fold_{args.fold}")
    return ""


def monitored_value(monitor, train_result, val_result, has_val):
    """The figure early stopping watches: the validation ``monitor`` ("mape" or "mae") of
    ``val_result``, or without a validation set the training loss."""
    if monitor not in MONITORS:
        raise ValueError(f"unknown monitor {monitor!r}; choose one of {MONITORS}")
    return getattr(val_result, monitor) if has_val else train_result.loss


def prepare_data(args, device, resume=None, split=None):
    """Stage 1, data: check every row, build or check the cache, split the rows (``split``, a
    (train, val, test, rule) of ``make_cv_folds``, replaces ``make_splits``), and make the
    datasets and loaders (docs/DESIGN.md, section 8).

    Under torchrun rank 0 checks the rows and builds or checks the cache while the others
    wait; then every rank opens the cache and makes the same split. The training rows are
    shared out by a ``DistributedSampler``, the validation rows in contiguous parts
    (``rank_part``: none padded or dropped).
    """
    amp_dtype, use_scaler = amp_settings(device)

    def check_and_cache():  # --check_data exits here; training stops on any problem
        rows, parsed = check_data_or_exit(args)  # meta.xlsx's rows, read once by the check
        return rows, parsed, prepare_cache(args, rows, parsed)

    rows, parsed, cache = rank0_first(check_and_cache) or (None, None, None)
    rows = broadcast_from_rank0(rows)
    if cache is None:  # another rank: rank 0 has checked the cache
        cache = load_cache(os.path.join(args.root_dir, args.cache_file_name))
    try:
        level = read_level_of_theory(args.root_dir)
    except ValueError as exc:
        _exit(str(exc))
    log_line(f"baseline level of theory: {describe_level_of_theory(level)}" if level else
             f"note: {args.root_dir} has no {LEVEL_OF_THEORY_FILE}; the model will not know the "
             f"level of theory of its V0 (tools/build_dataset.py writes the record)")
    train_idx, val_idx, test_idx, rule = split or make_splits(rows, args.seed)
    log_line(f"{len(rows)} dimers from {args.root_dir}; split {rule}: "
             f"train {len(train_idx)}, val {len(val_idx)}, test {len(test_idx)}")
    if DIST.world_size > max(len(train_idx), 1):
        _exit(f"{DIST.world_size} processes but only {len(train_idx)} training dimer"
              f"{'' if len(train_idx) == 1 else 's'}: every process needs at least one; start "
              f"fewer processes (torchrun --nproc_per_node) or add data")
    if args.apply_augmentations and not args.augment_cached_train:
        train_ds = DimerDataset(args.root_dir, args.physical_cutoff, augment=True,
                                jitter_std=args.jitter_std, parsed=parsed, rows=rows)
    else:
        aug = args.apply_augmentations
        train_ds = CachedDimerDataset(cache, rotate=aug, jitter_std=args.jitter_std if aug else 0)
    eval_ds = CachedDimerDataset(cache)
    num_workers = args.num_workers if args.num_workers is not None else (
        4 if device.type == "cuda" else 0)
    loader_kw = dict(batch_size=args.batch_size, num_workers=num_workers,
                     pin_memory=device.type == "cuda", persistent_workers=num_workers > 0)
    Subset = torch.utils.data.Subset
    train_part = Subset(train_ds, train_idx)
    if DIST.active:  # shuffled with seed + epoch (set_epoch), each rank its share
        sampler = torch.utils.data.distributed.DistributedSampler(
            train_part, num_replicas=DIST.world_size, rank=DIST.rank, shuffle=True,
            seed=args.seed)
        train_loader = DataLoader(train_part, sampler=sampler, **loader_kw)
    else:
        train_loader = DataLoader(train_part, shuffle=True, **loader_kw)
    return TrainingRun(
        args=args, device=device, rows=rows, cache=cache,
        split_idx={"train": train_idx, "val": val_idx, "test": test_idx}, rule=rule,
        train_ds=train_ds, eval_ds=eval_ds, loader_kw=loader_kw, train_loader=train_loader,
        val_loader=DataLoader(Subset(eval_ds, rank_part(val_idx)), shuffle=False, **loader_kw),
        amp_dtype=amp_dtype, use_scaler=use_scaler,
        run_id=broadcast_from_rank0((resume or {}).get("run_id") or os.urandom(8).hex()),
        versions=package_versions(), resumed=resume is not None, level_of_theory=level)


def dv_switch_of(args):
    """``DeltaCoupling``'s ``dv_switch`` from the options: None (``--dv_switch off``) or
    [on, off] in internal units; stops when the distances make no sense."""
    if args.dv_switch == "off":
        return None
    if not args.switch_on < args.switch_off <= args.physical_cutoff:
        _exit(f"--dv_switch contact needs --switch_on < --switch_off <= --physical_cutoff "
              f"(Angstrom), got {args.switch_on}, {args.switch_off} and "
              f"{args.physical_cutoff}: beyond the cutoff the graph splits and dV would jump "
              f"there")
    return [args.switch_on * INT_ANGSTROM_SCALE, args.switch_off * INT_ANGSTROM_SCALE]


def build_model(run):
    """Stage 2, model: a ``DeltaCoupling`` of the options' size at the cache's cutoff, compiled
    where that was measured to be faster (docs/DESIGN.md, decision 10)."""
    args, device = run.args, run.device
    model = DeltaCoupling(num_conv_layers=args.num_conv_layers, num_rbf=args.num_rbf,
                          cutoff=float(run.cache.metadata["internal_cutoff"]),
                          radial_hidden=args.radial_hidden, mlp_hidden=args.mlp_hidden,
                          dv_switch=dv_switch_of(args)).to(device)
    backend = resolve_compile_backend(args.compile, device, args.epochs)
    if backend is None:
        return model
    log_line(f"compiling the model with torch.compile({backend}) (--compile off skips this) ...")
    t_compile = time.time()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        # the probes draw no random numbers from the run: same seed, same run, compiled or not
        def first_batch(dataset):
            some = run.split_idx["train"] or run.split_idx["val"] or run.split_idx["test"]
            return next(iter(DataLoader(torch.utils.data.Subset(dataset, some),
                                        batch_size=args.batch_size))).to(device)
        compiled = try_compile(model, backend, first_batch(run.train_ds),
                               first_batch(run.eval_ds), run.amp_dtype)
    if compiled:
        log_line(f"compiled in {time.time() - t_compile:.0f} s")
    return model


def make_optimizer(model, lr, device):
    """Adam (docs/DESIGN.md, section 8); its fused kernel on CPU and CUDA (one op per step
    instead of dozens per parameter tensor: the same update rule, measurably faster for this
    many small tensors)."""
    return torch.optim.Adam(model.parameters(), lr=lr, fused=device.type in ("cpu", "cuda"))


@dataclass
class TrainingTools:
    """What steps the weights: the optimizer, its learning-rate schedule, the float16 scaler and
    the weights' moving average (the last three None when not used)."""
    optimizer: torch.optim.Optimizer
    scheduler: object = None  # OneCycleLR
    scaler: object = None  # torch.amp.GradScaler
    ema: WeightsEMA = None  # --ema DECAY > 0

    def evaluated_weights(self):
        """A block in which the model holds the weights that are validated and saved: the
        moving average with --ema, else the trained ones."""
        return self.ema.applied() if self.ema is not None else contextlib.nullcontext()


def make_training_tools(run, model):
    """Stage 3, optimiser: Adam, the OneCycle schedule over every batch of the run (none
    without training data; under torchrun the batches of one rank, its steps), for float16
    autocast a GradScaler, and with ``--ema`` the weights' moving average."""
    args = run.args
    optimizer = make_optimizer(model, args.lr, run.device)
    scheduler = None
    if len(run.split_idx["train"]):
        total_steps = max(ONECYCLE_MIN_STEPS, args.epochs * len(run.train_loader))
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr,
                                                        total_steps=total_steps,
                                                        pct_start=ONECYCLE_PCT_START)
    scaler = torch.amp.GradScaler("cuda") if run.use_scaler else None
    ema = WeightsEMA(model, args.ema) if args.ema else None
    return TrainingTools(optimizer, scheduler, scaler, ema)


def stale_epochs_count(args, lr):
    """Whether an epoch without improvement counts towards ``--patience``: always under
    ``--schedule spec``; under ``anneal`` once the learning rate ``lr`` is down to
    ``ANNEAL_COUNT_LR_FRACTION`` of its peak (``--lr``), so early stopping cannot cut the
    low-learning-rate end of the schedule short."""
    return args.schedule == "spec" or lr <= ANNEAL_COUNT_LR_FRACTION * args.lr


def write_run_files(run, model):
    """``split_ids.json`` and ``run_config.json``: the split and what reproduces the run
    (rank 0 writes them).

    Creates ``models/`` and ``plots/`` first, so a folder that cannot be created stops the run
    before its first epoch; a new run removes the failed-batch log of an earlier one.
    """
    if not DIST.master:
        return
    for folder in (run.models_dir, run.plots_dir):
        make_output_folder(folder)
    if not run.resumed:
        remove_output(run.failed_batches["traceback_path"])
    split = {"rule": run.rule, "seed": run.args.seed, **run.split_ids}
    atomic_write_json(split, os.path.join(run.models_dir, "split_ids.json"))
    atomic_write_json({"args": vars(run.args), "model_config": model.config,
                       "versions": run.versions, "platform": platform.platform(),
                       "device": describe_device(run.device), "world_size": DIST.world_size,
                       "data_sha256": run.cache.metadata["data_sha256"],
                       "level_of_theory": run.level_of_theory, "split": split},
                      os.path.join(run.models_dir, RUN_CONFIG_FILE))


def train(run, model, tools, resume=None):
    """Stage 4, training loop: an epoch of training and a validation pass per epoch (of the
    weights' moving average with ``--ema``); the best checkpoint on improvement, early stopping
    after ``patience`` stale epochs (``stale_epochs_count``), and the resume state after every
    epoch. Ctrl-C (or SIGTERM) exits with the command that resumes. Returns
    the ``TrainingProgress``.

    Under torchrun the training steps go through DistributedDataParallel around ``model`` (its
    gradients averaged over the ranks, so every rank's copy stays the same); each rank draws
    its own augmentations (seed + rank); validation runs on ``model`` itself, each rank its
    part, the figures all-reduced: every rank takes the same early-stopping decision.
    """
    args = run.args
    state = TrainingProgress()
    t_start = time.time()
    if resume is not None:  # after all setup: the restored RNG states continue the saved run
        state = restore_training_state(resume, model, tools, run)
        t_start -= state.history[-1]["seconds"] if state.history else 0.0  # the clock goes on
        log_line(f"resumed from {args.resume} after epoch {state.epoch}")
    elif DIST.active:
        seed_everything(args.seed + DIST.rank)  # the same weights, each rank its own draws
    log_line(f"schedule {args.schedule}: {args.epochs} epochs of OneCycle (peak lr {args.lr:g}), "
             f"early stopping after {args.patience} stale epochs counted "
             f"{describe_stale_counting(args.schedule, args.lr)}; "
             + (f"validating and keeping a moving average of the weights (--ema {args.ema:g})"
                if tools.ema is not None else "validating and keeping the trained weights"))
    step_model = model
    if DIST.active:
        step_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[run.device] if run.device.type == "cuda" else None,
            forward_sync_buffers=False)  # the buffers are constants
    bar = progress(range(state.epoch + 1, (state.epoch if state.stopped else args.epochs) + 1),
                   args.quiet, desc="training", unit="epoch", initial=state.epoch,
                   total=args.epochs)
    try:
        for epoch in bar:
            state.epoch = epoch
            if DIST.active:
                run.train_loader.sampler.set_epoch(state.epoch)
            train_result = run_epoch(step_model, run.train_loader, run.device, tools.optimizer,
                                     tools.scheduler, tools.scaler, run.amp_dtype,
                                     **run.failed_batches, ema=tools.ema)
            with torch.no_grad(), tools.evaluated_weights():
                val_result = (run_epoch(model, run.val_loader, run.device,
                                        amp_dtype=run.amp_dtype, **run.failed_batches)
                              if len(run.split_idx["val"]) else EpochResult())
            end_of_epoch(run, model, tools, state, train_result, val_result,
                         time.time() - t_start)
            bar.set_postfix_str(f"loss {train_result.loss:.4f}, val MAPE "
                                f"{val_result.mape:.2f}%, best {run.monitor_name} "
                                f"{state.best:.3f} (epoch {state.best_epoch})", refresh=False)
            if state.stopped:
                log_line(f"early stop at epoch {state.epoch}: no {run.monitor_name} improvement "
                         f"for {args.patience} epochs")
                break
    except KeyboardInterrupt:
        bar.close()
        exit_interrupted(state.saved)
    except TooManyFailedBatchesError as exc:
        bar.close()
        _exit(f"epoch {state.epoch}: {exc}")
    except OutputError as exc:
        bar.close()
        _exit(f"epoch {state.epoch}: {exc}" + (f" (the state after epoch {state.saved[1]} is in "
                                                f"{state.saved[0]})" if state.saved else ""))
    bar.close()
    return state


def end_of_epoch(run, model, tools, state, train_result, val_result, seconds):
    """Early stopping's bookkeeping after an epoch: the best checkpoint (of the evaluated
    weights) on improvement, the epoch's history record, the resume state and the periodic log
    line."""
    args = run.args
    lr = tools.optimizer.param_groups[0]["lr"]
    has_val = len(run.split_idx["val"]) > 0
    monitored = val_result if has_val else train_result
    monitor = monitored_value(args.monitor, train_result, val_result, has_val)
    if monitor < state.best and monitored.n_skipped:  # over fewer dimers: not comparable
        log_line(f"epoch {state.epoch}: {run.monitor_name} {monitor:.4g} is not taken as the "
                 f"best: {monitored.n_skipped} of its {monitored.n_batches} batches failed")
    improved = state.update(monitor, args.patience, comparable=not monitored.n_skipped,
                            counting=stale_epochs_count(args, lr))
    if improved and DIST.master:
        with tools.evaluated_weights():
            atomic_torch_save(run.checkpoint(model, state.epoch, val_result.mape,
                                             val_result.mae), run.best_path)
    state.history.append({"epoch": state.epoch, "train_loss": train_result.loss,
                          "val_mape": val_result.mape, "val_mae": val_result.mae, "lr": lr,
                          "seconds": seconds})
    resume_state = training_state(model, tools, state, run)
    if DIST.master:
        atomic_torch_save(resume_state, run.resume_path)
    state.saved = (run.resume_path, state.epoch)
    if (state.epoch == 1 or state.epoch % args.log_every == 0 or state.epoch == args.epochs
            or state.stopped):
        log_line(f"epoch {state.epoch:5d}  train loss {train_result.loss:9.4f}  val MAPE "
                 f"{val_result.mape:8.2f}%  MAE {val_result.mae:8.4f}  RMSE "
                 f"{val_result.rmse:8.4f}  best {run.monitor_name} {state.best:8.3f} (epoch "
                 f"{state.best_epoch})  lr {lr:.2e}  skipped "
                 f"{train_result.n_skipped + val_result.n_skipped}  {seconds:7.1f} s")


def reload_best_weights(run, model, state):
    """Load this run's best checkpoint into ``model``; stop if it is unreadable or another
    run's. A resumed run interrupted between the two saves of an epoch keeps the file's."""
    try:
        best = load_tensors_file(run.best_path, "a DeltaCoupling checkpoint",
                                 map_location=run.device)
    except ValueError as exc:
        _exit(f"{exc}; this run's best weights are lost, its last ones are in "
              f"{state.saved[0] if state.saved else 'no file'}")
    if best.get("run_id") != run.run_id:
        _exit(f"{run.best_path} was written by another run, not this one: its weights are not "
              f"this run's; run again with its own root_dir")
    if best["epoch"] != state.best_epoch:  # interrupted between the two saves, then resumed
        log_line(f"note: {run.best_path} holds epoch {best['epoch']} (the resume state "
                 f"recorded {state.best_epoch}); using it")
        state.best_epoch = best["epoch"]
    model.load_state_dict(best["model_state"])
    log_line(f"loaded best checkpoint (epoch {best['epoch']}) from {run.best_path}")


def check_ranks_agree(model):
    """Under torchrun: stop unless every rank holds bitwise the same weights (DDP keeps them
    so; a difference would mean the ranks trained apart). Logs each rank's SHA-256."""
    hashes = all_gather_objects(parameters_sha256(model))
    log_line(f"parameter sha256 of the {len(hashes)} ranks: {' '.join(hashes)}")
    if len(set(hashes)) != 1:
        _exit(f"the ranks' final weights differ ({', '.join(hashes)}): the processes did not "
              f"train one model; report this with the command that ran")


def final_report(run, model):
    """Evaluate the final model: one prediction pass per split feeds the metrics table (printed),
    ``models/metrics.json`` and, through ``plot_regression``, the val/test plots. Returns the
    metrics report."""
    predictions = {}
    for name, idx in run.split_idx.items():
        if not len(idx):
            continue
        loader = DataLoader(torch.utils.data.Subset(run.eval_ds, rank_part(idx)),
                            shuffle=False, **run.loader_kw)  # predict_rows joins the parts
        if name in ("val", "test"):
            path = os.path.join(run.plots_dir, f"{name}_final_delta_learning.png") \
                if DIST.master else None
            predictions[name] = plot_regression(
                model, loader, run.device, path, title=f"{name} set", amp_dtype=run.amp_dtype,
                what=f"{name} evaluation", **run.failed_batches)
        else:
            predictions[name] = predict_rows(model, loader, run.device, run.amp_dtype,
                                             what=f"{name} evaluation", **run.failed_batches)
    report = metrics_report(predictions, groups_of(run.rows))
    log_line(format_metrics_table(report))
    if DIST.master:
        atomic_write_json(report, os.path.join(run.models_dir, METRICS_FILE))
    return report


def finish(run, model, state):
    """Stage 5, final report: the best weights reloaded, the metrics report and plots, the
    history and learning curves, and the final checkpoint. Returns main's summary."""
    if DIST.active:
        dist.barrier()  # rank 0's last best checkpoint is on disk
    if run.args.keep == "final":
        kept_epoch = state.epoch
        log_line(f"keeping the final weights (epoch {state.epoch}; the best {run.monitor_name} "
                 f"was epoch {state.best_epoch}'s)")
    else:
        if state.best_epoch > 0:  # saved by this run (or by the run it resumes)
            reload_best_weights(run, model, state)  # may correct state.best_epoch
        kept_epoch = state.best_epoch
    try:
        final_metrics = final_report(run, model)
    except TooManyFailedBatchesError as exc:
        _exit(f"final evaluation: {exc}; the best weights are in {run.best_path}")
    if DIST.active:
        check_ranks_agree(model)
    if DIST.master:
        atomic_write_json(state.history, os.path.join(run.models_dir, HISTORY_FILE))
        plot_learning_curves(state.history, os.path.join(run.plots_dir, LEARNING_CURVES_PLOT),
                             state.best_epoch)
        val_model = final_metrics.get("val", {}).get("model", {})
        final = run.checkpoint(model, state.epoch, val_model.get("mape", float("nan")),
                               val_model.get("mae", float("nan")))
        final.update(weights_from_epoch=kept_epoch, last_epoch=state.epoch,
                     best_monitor=state.best, monitor=run.monitor_name,
                     final_metrics=final_metrics, history=state.history)
        final_path = os.path.join(run.models_dir, FINAL_CHECKPOINT)
        atomic_torch_save(final, final_path)
        log_line(f"saved {final_path}; metrics in {os.path.join(run.models_dir, METRICS_FILE)}"
                 f"; plots in {run.plots_dir}")
    return {"best_epoch": state.best_epoch, "best_monitor": state.best,
            "best_path": run.best_path, "split_ids": run.split_ids,
            "final_metrics": final_metrics, "history": state.history}


def train_one(args, device, resume=None, split=None):
    """One training run: the stages in order. ``resume``: a loaded resume state; ``split``: a
    fold of ``make_cv_folds`` instead of the seeded 80/10/10 split. An ensemble's member k is
    seeded with seed + k (its split still comes from seed). Returns ``finish``'s summary."""
    seed_everything(args.seed + (args.member or 0))
    run = prepare_data(args, device, resume, split)  # rows, cache, split, datasets, loaders
    model = build_model(run)  # DeltaCoupling, compiled where that is faster
    tools = make_training_tools(run, model)  # Adam, OneCycle, scaler, EMA
    write_run_files(run, model)  # models/ and plots/, split_ids.json, run_config.json
    state = train(run, model, tools, resume)  # the epochs
    return finish(run, model, state)  # best weights, metrics, plots, final checkpoint


# --- resume: the training state after every epoch, and continuing from it
def training_state(model, tools, state, run):
    """Everything a run needs to continue after ``state.epoch`` (tensors and plain types only).

    Model (the trained weights), optimizer, scheduler, scaler and moving-average states, the
    early-stopping counters, the torch, numpy and Python RNG states, the split, the config,
    the cache metadata and the per-epoch history (for the learning curves) and the run's id
    (stored in its best checkpoint too).
    Under torchrun (every rank calls it) also the world size and every rank's RNG states.
    """
    return {
        "format_version": RESUME_FORMAT_VERSION, "epoch": state.epoch, "best": state.best,
        "best_epoch": state.best_epoch, "stale": state.stale, "stopped": state.stopped,
        "model_state": model.state_dict(), "model_config": model.config,
        "optimizer_state": tools.optimizer.state_dict(),
        "scheduler_state": (tools.scheduler.state_dict() if tools.scheduler is not None
                            else None),
        "scaler_state": tools.scaler.state_dict() if tools.scaler is not None else None,
        "ema_state": tools.ema.state_dict() if tools.ema is not None else None,
        **rng_states(), "world_size": DIST.world_size,
        "rng_ranks": all_gather_objects(rng_states()) if DIST.active else [],
        "config": dict(vars(run.args)), "metadata": run.metadata, "split_ids": run.split_ids,
        "history": state.history, "run_id": run.run_id,
    }


def rng_states():
    """This process's torch (CPU and CUDA), NumPy and Python RNG states, as tensors and plain
    types."""
    np_state = np.random.get_state()  # ('MT19937', keys (624,) uint32, pos, has_gauss, gauss)
    py_state = random.getstate()  # (version, 625 ints, gauss_next)
    return {
        "rng_torch": torch.get_rng_state(),  # (5056,) uint8
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "rng_numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                      *map(int, np_state[2:4]), float(np_state[4])],
        "rng_python": [py_state[0], list(py_state[1]), py_state[2]]}


def set_rng_states(saved):
    """Set the RNG states ``rng_states`` returned."""
    torch.set_rng_state(saved["rng_torch"])
    if torch.cuda.is_available() and len(saved["rng_cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(saved["rng_cuda"])
    name, keys, pos, has_gauss, gauss = saved["rng_numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = saved["rng_python"]
    random.setstate((version, tuple(internal), gauss_next))


def resume_command(path, world_size):
    """The command that continues a run of ``world_size`` processes from ``path``."""
    if world_size == 1 and not DIST.active:
        return f"python delta_coupling.py --resume {shlex.quote(path)}"
    nodes = max(1, world_size // DIST.local_world_size) if DIST.world_size == world_size else 1
    launch = (f"torchrun --nnodes={nodes} --nproc_per_node={world_size // nodes} (and the "
              f"rendezvous options of the first launch)" if nodes > 1
              else f"torchrun --nproc_per_node={world_size}")
    return f"{launch} delta_coupling.py --resume {shlex.quote(path)}"


def restore_training_state(saved, model, tools, run):
    """Check that ``saved`` (of ``training_state``) fits this run's data, split and model, then
    load it into the given objects and set the RNG states; return its ``TrainingProgress``.
    Call it after all other setup."""
    problems = check_cache_metadata(saved["metadata"], run.cache.metadata)
    if saved["split_ids"] != run.split_ids:
        problems.append("split: the train/val/test ids differ from the saved run's")
    if saved["model_config"] != model.config:
        problems.append(f"model_config: saved {saved['model_config']}, now {model.config}")
    saved_world = saved.get("world_size", 1)
    if saved_world != DIST.world_size:  # the data order and the RNG states belong to each rank
        problems.append(f"world_size: saved by {saved_world} process"
                        f"{'' if saved_world == 1 else 'es'}, this launch has "
                        f"{DIST.world_size}; a run resumes with its own number of processes: "
                        f"{resume_command(run.args.resume, saved_world)}")
    if problems:
        _exit("the resume state does not match this data and these settings:\n  "
              + "\n  ".join(problems)
              + "\nResume with the data and options of the saved run, or start a new run.")
    model.load_state_dict(saved["model_state"])
    tools.optimizer.load_state_dict(saved["optimizer_state"])
    for obj, key in ((tools.scheduler, "scheduler_state"), (tools.scaler, "scaler_state"),
                     (tools.ema, "ema_state")):
        if obj is not None and saved.get(key) is not None:
            obj.load_state_dict(saved[key])
    set_rng_states(saved["rng_ranks"][DIST.rank] if DIST.active else saved)
    return TrainingProgress(epoch=saved["epoch"], best=saved["best"],
                            best_epoch=saved["best_epoch"], stale=saved["stale"],
                            stopped=saved["stopped"], history=saved["history"],
                            saved=(run.args.resume, saved["epoch"]))


def parse_main_args(argv=None):
    """Parse ``argv``; with ``--resume PATH`` also load that state (weights_only).

    On resume the saved run's options are the defaults, and an option given in ``argv`` that
    would change the run (``--epochs``, ``--lr``, the model, ...) stops with a message: the
    OneCycle schedule, the split and the weights belong to the saved options.
    Returns ``(args, state or None)``.
    """
    parser = build_arg_parser()
    args = parser.parse_args(argv)
    if not args.resume:
        check_run_kind(args)
        return apply_schedule(args), None
    if not os.path.exists(args.resume):
        _exit(f"--resume {args.resume}: file not found; it is written to "
              f"<root_dir>/models/{RESUME_CHECKPOINT} after every finished epoch")
    try:
        state = load_tensors_file(args.resume, "a resume state",
                                  f"; use the {RESUME_CHECKPOINT} written by training")
    except ValueError as exc:
        _exit(f"--resume {exc}")
    if not isinstance(state, dict) or state.get("format_version") != RESUME_FORMAT_VERSION:
        _exit(f"--resume {args.resume} is not a resume state of this version; use the "
              f"{RESUME_CHECKPOINT} written by training (best/final checkpoints hold weights "
              f"only)")
    saved = state["config"]
    saved.setdefault("schedule", "spec")  # saved before --schedule and --ema: the design's
    saved.setdefault("ema", 0.0)
    saved.setdefault("keep", DEFAULT_KEEP)  # saved before --keep
    parser.set_defaults(**{k: v for k, v in saved.items()
                           if k in vars(args) and k not in RESUME_NOT_INHERITED})
    args = parser.parse_args(argv)
    changed = [f"--{k} {getattr(args, k)!r} (saved run: {saved[k]!r})" for k in saved
               if k not in RESUME_FREE_OPTIONS and getattr(args, k, None) != saved[k]]
    if changed:
        _exit(f"--resume continues the saved run with its own options; these differ: "
              f"{', '.join(changed)}. Leave them out to resume, or start a new run without "
              f"--resume")
    return apply_schedule(args), state


def option_given(argv, name):
    """The value of option ``name`` when ``argv`` gives it, else None (not its default)."""
    parser = build_arg_parser()
    parser.set_defaults(**{name: None})
    return getattr(parser.parse_args(argv), name)


def check_run_kind(args):
    """Refuse combinations of --ensemble, --member, --combine_ensemble and --cv that make no
    sense."""
    if args.cv is not None and (args.ensemble is not None or args.member is not None
                                or args.combine_ensemble):
        _exit("--cv trains single models per fold; it does not combine with --ensemble, "
              "--member or --combine_ensemble")
    if args.ensemble is not None and args.member is not None:
        _exit("--ensemble K trains all K members, --member k one of them: give one of the two")
    if args.ensemble is not None and args.ensemble < 2:
        _exit(f"--ensemble {args.ensemble}: an ensemble needs at least 2 members")
    if args.member is not None and args.member < 0:
        _exit(f"--member {args.member}: members are numbered 0, 1, ...")
    if args.fold is not None:
        _exit("--fold is set by --cv itself; run --cv K")


def exit_interrupted(saved):
    """After Ctrl-C or SIGTERM: say where the last finished epoch's state is and how to resume
    (rank 0 under torchrun; every rank exits); exit 130.

    ``saved`` is (path, epoch) of the latest resume state, or None before the first epoch.
    """
    with contextlib.suppress(ValueError):  # (not the main thread)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # torchrun stopping the others: say it
    if DIST.master and saved is None:
        print("interrupted before the first epoch finished: nothing to resume; run the same "
              "command again to start over", file=sys.stderr)
    elif DIST.master:
        print(f"interrupted; the state after epoch {saved[1]} is in {saved[0]}\n"
              f"continue with: {resume_command(saved[0], DIST.world_size)}", file=sys.stderr)
    raise SystemExit(EXIT_INTERRUPTED)


# --- predict: a saved model on new dimers
def predictions_table(rows, pred, split_of):
    """The ``predictions.csv`` frame: one line per meta.xlsx row, in its order.

    Columns id, V0, dV, Vref_pred (= V0 + dV; an ensemble's mean), Vref_std (an ensemble's
    std, only then), Vref, error (= Vref_pred - Vref), split (the
    checkpoint's split of the row when root_dir is its training data, else empty). Unknown
    values (no Vref, or a row whose batch failed) are NaN, written as empty cells.
    """
    pred_of = dict(zip(pred["id"], pred["pred"]))
    table = pd.DataFrame({"id": [r["id"] for r in rows], "V0": [r["V0"] for r in rows],
                          "Vref_pred": [pred_of.get(r["id"], np.nan) for r in rows],
                          "Vref": [r["Vref"] for r in rows]})
    table.insert(2, "dV", table["Vref_pred"] - table["V0"])
    if "std" in pred:  # an ensemble: the members' spread
        std_of = dict(zip(pred["id"], pred["std"]))
        table.insert(4, "Vref_std", [std_of.get(r["id"], np.nan) for r in rows])
    table["error"] = table["Vref_pred"] - table["Vref"]
    table["split"] = [split_of.get(r["id"], "") for r in rows]
    return table


def check_level_of_theory(trained, root_dir, checkpoint_path):
    """Stop when the model was trained on V0 of another level of theory than the folder's
    (a model trained on HF/def2-SVP V0 corrects nothing else; docs/DESIGN.md, decision 17);
    warn when either record is missing (folders and checkpoints made before it existed)."""
    try:
        folder = read_level_of_theory(root_dir)
    except ValueError as exc:
        _exit(str(exc))
    if trained is None or folder is None:
        which = (f"{checkpoint_path} does not record the level of theory it was trained on"
                 if trained is None else f"{root_dir} has no {LEVEL_OF_THEORY_FILE}")
        log_line(f"warning: {which}, so it cannot be checked; the predictions are only "
                 f"meaningful if V0 was computed at the level of the model's training data")
        return
    differ = level_of_theory_mismatch(trained, folder)
    if differ:
        _exit(f"{root_dir} was built at another level of theory than the model in "
              f"{checkpoint_path} was trained on ({differ}): the model corrects "
              f"{describe_level_of_theory(trained)} V0 only; rebuild the folder at that level "
              f"(tools/build_dataset.py --method/--basis/...) or train a model on this level")


def run_predict(args, argv=None):
    """``--predict``: Vref for every row of ``<root_dir>/meta.xlsx`` with a saved model alone.

    The checkpoint's stored config rebuilds the model and its cutoff builds the graphs (no
    cache is written). Writes ``<root_dir>/predictions.csv``; where Vref is given, prints the
    metrics table (all rows, each group, and train/val/test when root_dir is the checkpoint's
    own training data) and writes ``<root_dir>/predictions_metrics.json``.
    """
    rows, parsed = check_data_or_exit(args)  # every problem at once; --check_data exits here
    path = args.checkpoint or default_predict_checkpoint(args.root_dir)
    if not os.path.isfile(path):
        _exit(f"checkpoint {path} not found; pass --checkpoint PATH (a {BEST_CHECKPOINT} or "
              f"{FINAL_CHECKPOINT} written by training, or an {ENSEMBLE_FILE})")
    if path == PRETRAINED_MODEL and not args.checkpoint:
        log_line(f"{os.path.join(args.root_dir, 'models')} holds no model of its own: using "
                 f"the pretrained model {PRETRAINED_MODEL} (data/corpus/README.md; "
                 f"--checkpoint PATH for another)")
    device = resolve_device(args.device)
    try:
        models, ckpts = load_models(path, device)
    except ValueError as exc:
        _exit(str(exc))
    model, ckpt = models[0], ckpts[0]  # an ensemble's members share config, cutoff and split
    physical_cutoff = ckpt["metadata"]["internal_cutoff"] / INT_ANGSTROM_SCALE  # Angstrom
    cutoff_given = option_given(argv, "physical_cutoff")
    if cutoff_given is not None and not math.isclose(cutoff_given, physical_cutoff,
                                                      rel_tol=1e-9):
        _exit(f"--physical_cutoff {cutoff_given:g} Angstrom differs from the "
              f"{physical_cutoff:g} Angstrom the model in {path} was trained with; a model "
              f"works only at its own cutoff: leave --physical_cutoff out")
    check_level_of_theory(ckpt.get("level_of_theory"), args.root_dir, path)
    if parsed is not None:
        graphs = [make_graph(dimer, model.config["cutoff"])
                  for dimer in progress(parsed, args.quiet, desc="building graphs", unit="dimer")]
    else:  # a large set: each dimer's files are read again when its batch comes
        graphs = DimerDataset(args.root_dir, rows=rows, preload=False)
        graphs.internal_cutoff = model.config["cutoff"]  # the model's own cutoff, exactly
    what = f"an ensemble of {len(models)} members" if len(models) > 1 else "model"
    log_line(f"{len(rows)} dimers from {args.root_dir}; {what} from {path} "
             f"(cutoff {physical_cutoff:g} Angstrom)")
    loader = DataLoader(graphs, batch_size=args.batch_size, shuffle=False)
    failures_log = os.path.join(args.root_dir, PREDICTION_FAILED_BATCHES_LOG)
    remove_output(failures_log)  # an earlier prediction's
    try:
        pred = predict_models(models, loader, device, amp_settings(device)[0],
                              skip_failed_batches=args.skip_failed_batches, log=log_line,
                              traceback_path=failures_log)
    except TooManyFailedBatchesError as exc:
        _exit(f"prediction with {path}: {exc}")
    if len(pred["id"]) < len(rows):
        log_line(f"warning: {len(rows) - len(pred['id'])} of {len(rows)} dimers could not be "
                 f"predicted (see the skipped batches above); their cells are empty")
    same_data = data_sha256(args.root_dir, rows) == ckpt["metadata"].get("data_sha256")
    split_of = {i: name for name, ids in ckpt.get("split_ids", {}).items() for i in ids} \
        if same_data else {}
    csv_path = os.path.join(args.root_dir, PREDICTIONS_FILE)
    atomic_write_text(predictions_table(rows, pred, split_of).to_csv(index=False), csv_path)
    log_line(f"wrote {csv_path}")
    predictions = {"all": pred}
    for name in ("train", "val", "test"):
        keep = np.array([split_of.get(i) == name for i in pred["id"]], dtype=bool)
        if keep.any():
            predictions[name] = {"id": [i for i, k in zip(pred["id"], keep) if k],
                                 **{key: pred[key][keep] for key in ("pred", "true", "v0", "std")
                                    if key in pred}}
    report = metrics_report(predictions, groups_of(rows))
    if report:
        log_line(format_metrics_table(report))
        atomic_write_json(report, os.path.join(args.root_dir, PREDICTION_METRICS_FILE))
    if "uncertainty" in report.get("all", {}):
        log_line(format_uncertainty_table(report))
        known = np.isfinite(pred["true"])  # (n,)
        plot_uncertainty(pred["pred"][known] - pred["true"][known], pred["std"][known],
                         os.path.join(args.root_dir, PREDICTION_UNCERTAINTY_PLOT), "all rows")
    return {"predictions_path": csv_path, "metrics": report, "checkpoint": path}


def default_predict_checkpoint(root_dir):
    """``--predict`` without ``--checkpoint``: the folder's own model, ``<root_dir>/models/
    ensemble.json``, else the newer of ``final_model_delta_learning.pt`` (the weights a
    finished run kept, ``--keep``) and ``best_model_delta_learning.pt`` (the only one a run
    stopped before its end has brought up to date); when it has none, the shipped
    ``PRETRAINED_MODEL`` (if present; else the missing best checkpoint's path)."""
    models = os.path.join(root_dir, "models")
    ensemble = os.path.join(models, ENSEMBLE_FILE)
    if os.path.isfile(ensemble):
        return ensemble
    runs = [p for p in (os.path.join(models, FINAL_CHECKPOINT),
                        os.path.join(models, BEST_CHECKPOINT)) if os.path.isfile(p)]
    if runs:
        return max(runs, key=os.path.getmtime)  # on a tie the final checkpoint
    return PRETRAINED_MODEL if os.path.isfile(PRETRAINED_MODEL) else \
        os.path.join(models, BEST_CHECKPOINT)


def each_run(args, resume, key, count):
    """The runs k = 0..count-1 of an ensemble (``key`` "member") or a cross-validation ("fold"),
    as (k, the run's options, its resume state or None). A resumed run starts the loop at its
    own k (the runs before it are on disk) and only it gets the resume state. --rebuild_cache
    rebuilds the cache for the first run only; the others check and use that cache."""
    first = getattr(args, key) if resume is not None else 0
    for k in range(first, count):
        resumed = resume if k == first else None
        yield k, argparse.Namespace(**{**vars(args), key: k,
                                       "resume": args.resume if resumed else None,
                                       "rebuild_cache": args.rebuild_cache and k == first}), resumed


# --- ensembles: K members, each an ordinary checkpoint, tied together by ensemble.json
def run_ensemble(args, device, resume=None):
    """``--ensemble K``: members 0..K-1 one after the other, each exactly as ``--member k``
    trains it (seed + k, the same split and options, files in models/member_k), then
    ``combine_ensemble``. A resumed member continues; the members before it are on disk."""
    for k, member_args, resumed in each_run(args, resume, "member", args.ensemble):
        log_line(f"--- ensemble member {k} of {args.ensemble} (seed {args.seed + k})")
        train_one(member_args, device, resumed)
    return combine_ensemble(args, members=range(args.ensemble))


def ensemble_key(ckpt):
    """What an ensemble's members must share: the options except ``ENSEMBLE_FREE_OPTIONS``, the
    model config, the data's checksum, cutoff and level of theory, and the split."""
    return {"options": {k: v for k, v in ckpt["config"].items()
                        if k not in ENSEMBLE_FREE_OPTIONS},
            "model_config": ckpt["model_config"],
            "data": {**{k: ckpt["metadata"].get(k) for k in ("data_sha256", "internal_cutoff",
                                                             "int_angstrom_scale")},
                     "level_of_theory": ckpt.get("level_of_theory")},
            "split_ids": ckpt["split_ids"]}


def config_hash(key):
    """A short hex SHA-256 of plain data (``ensemble_key``), independent of key order."""
    text = json.dumps(_json_ready(key), sort_keys=True, allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def key_differences(key, ref):
    """The entries of two ``ensemble_key`` dicts that differ, as text."""
    out = [f"--{k} {key['options'].get(k)!r} (vs {ref['options'].get(k)!r})"
           for k in sorted(set(key["options"]) | set(ref["options"]))
           if key["options"].get(k) != ref["options"].get(k)]
    out += [f"model {k} {key['model_config'].get(k)!r} (vs {ref['model_config'].get(k)!r})"
            for k in sorted(set(key["model_config"]) | set(ref["model_config"]))
            if key["model_config"].get(k) != ref["model_config"].get(k)]
    out += [f"data {k} {key['data'][k]!r} (vs {ref['data'][k]!r})" for k in key["data"]
            if key["data"][k] != ref["data"][k]]
    if key["split_ids"] != ref["split_ids"]:
        out.append("the train/val/test split")
    return out


def combine_ensemble(args, members=None):
    """``--combine_ensemble`` (and the end of ``--ensemble K``): check that the finished
    members (``members``, default every models/member_k folder) were trained with the same
    options, model, data and split, write ``models/ensemble.json`` (each member's checkpoint
    path relative to it and its SHA-256, the members' config hash) and report the ensemble
    (``ensemble_report``). A member trained otherwise is refused with what differs."""
    models_dir = os.path.join(args.root_dir, "models")
    if members is None:
        members = sorted(int(name[len("member_"):]) for name in
                         (os.listdir(models_dir) if os.path.isdir(models_dir) else [])
                         if name.startswith("member_") and name[len("member_"):].isdigit())
    paths = [os.path.join(models_dir, f"member_{k}", FINAL_CHECKPOINT) for k in members]
    if len(paths) < 2:
        _exit(f"an ensemble needs at least 2 members; found {len(paths)} in {models_dir} "
              f"(train them with --member k, k = 0, 1, ...)")
    unfinished = [p for p in paths if not os.path.isfile(p)]
    if unfinished:
        _exit(f"these members have no final checkpoint (still training, or interrupted: "
              f"continue them with --resume): {', '.join(unfinished)}")
    device = resolve_device(args.device)
    models, ckpts = [], []
    for path in paths:
        try:
            model, ckpt = load_checkpoint(path, device)
        except ValueError as exc:
            _exit(str(exc))
        models.append(model)
        ckpts.append(ckpt)
    keys = [ensemble_key(c) for c in ckpts]
    refused = [f"member_{k} ({path}): {'; '.join(key_differences(key, keys[0]))}"
               for k, path, key in zip(members, paths, keys) if key != keys[0]]
    if refused:
        _exit(f"cannot combine: these members were trained with other options, model, data or "
              f"split than member_{members[0]}:\n  " + "\n  ".join(refused)
              + "\nRetrain them with the same options; only where and how they ran "
              "(--device, --compile, --num_workers, ...) may differ")
    ensemble = {"format": ENSEMBLE_FORMAT, "format_version": ENSEMBLE_FORMAT_VERSION,
                "config_hash": config_hash(keys[0]),
                "members": [{"member": k, "seed": c["config"]["seed"] + k,
                             "checkpoint": os.path.relpath(p, models_dir), "sha256": file_sha256(p)}
                            for k, p, c in zip(members, paths, ckpts)]}
    path = os.path.join(models_dir, ENSEMBLE_FILE)
    atomic_write_json(ensemble, path)
    log_line(f"wrote {path}: {len(paths)} members, config hash {ensemble['config_hash']}")
    return ensemble_report(args, path, (models, ckpts))  # checked and hashed just now


def load_ensemble(path, device="cpu"):
    """Load the members of an ``ensemble.json``: (models, checkpoints). Raises ``ValueError``
    naming the file when it is no ensemble file, a member's checkpoint changed since it was
    combined, or the members' config hash differs from the one recorded."""
    try:
        with open(path, encoding="utf-8") as fh:
            ensemble = json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} cannot be read as a DeltaCoupling ensemble ({exc})") from None
    if not (isinstance(ensemble, dict) and ensemble.get("format") == ENSEMBLE_FORMAT
            and ensemble.get("format_version") == ENSEMBLE_FORMAT_VERSION):
        raise ValueError(f"{path} is not a DeltaCoupling ensemble file of format version "
                         f"{ENSEMBLE_FORMAT_VERSION}; write one with --combine_ensemble")
    models, ckpts = [], []
    for member in ensemble["members"]:
        member_path = os.path.join(os.path.dirname(os.path.abspath(path)), member["checkpoint"])
        if not os.path.isfile(member_path) or file_sha256(member_path) != member["sha256"]:
            raise ValueError(f"{path}: member {member['member']}'s checkpoint {member_path} is "
                             f"missing or changed since the ensemble was combined; run "
                             f"--combine_ensemble again")
        model, ckpt = load_checkpoint(member_path, device)
        if config_hash(ensemble_key(ckpt)) != ensemble["config_hash"]:
            raise ValueError(f"{path}: member {member['member']} ({member_path}) does not match "
                             f"the ensemble's config hash; run --combine_ensemble again")
        models.append(model)
        ckpts.append(ckpt)
    return models, ckpts


def load_models(path, device="cpu"):
    """A checkpoint (one model) or an ``ensemble.json`` (its members): (models, checkpoints)."""
    if path.endswith(".json"):
        return load_ensemble(path, device)
    model, ckpt = load_checkpoint(path, device)
    return [model], [ckpt]


def predict_models(models, loader, device, amp_dtype=None, skip_failed_batches=True,
                   log=print, **kwargs):
    """``predict_rows`` of one model, or of an ensemble's members combined by
    ``ensemble_rows`` (with ``std``); ``kwargs`` go to ``predict_rows``."""
    rows = [predict_rows(model, loader, device, amp_dtype, skip_failed_batches, log, **kwargs)
            for model in models]
    return rows[0] if len(rows) == 1 else ensemble_rows(rows)


def ensemble_report(args, path, loaded=None):
    """The ensemble of ``path`` on its members' train/val/test split: the metrics table of the
    members' mean with the uncertainty report (printed and in ``models/ensemble_metrics.json``),
    val/test plots with +-1 std error bars and ``plots/uncertainty.png`` of the test split
    (validation if there is none). ``loaded``: its (models, checkpoints) on ``--device`` when
    the caller has them (``combine_ensemble``), else ``load_ensemble`` reads them. Returns
    {"ensemble_path", "metrics", "predictions"}."""
    device = resolve_device(args.device)
    try:
        models, ckpts = loaded or load_ensemble(path, device)
        payload = load_cache(os.path.join(args.root_dir, args.cache_file_name))
    except ValueError as exc:
        _exit(str(exc))
    problems = check_cache_metadata(payload.metadata, ckpts[0]["metadata"])
    if problems:
        _exit(f"the cache of {args.root_dir} is not the members' data: {'; '.join(problems)}")
    dataset = CachedDimerDataset(payload)
    index = {i: k for k, i in enumerate(dataset.ids)}
    predictions = {}
    for name, ids in ckpts[0]["split_ids"].items():
        if not ids:
            continue
        loader = DataLoader(torch.utils.data.Subset(dataset, [index[i] for i in ids]),
                            batch_size=args.batch_size, shuffle=False)
        try:
            predictions[name] = predict_models(models, loader, device, amp_settings(device)[0],
                                               args.skip_failed_batches, log_line)
        except TooManyFailedBatchesError as exc:
            _exit(f"ensemble prediction ({name}): {exc}")
    rows = read_meta(args.root_dir)
    report = metrics_report(predictions, groups_of(rows))
    log_line(f"ensemble of {len(models)} members (mean of their V0 + dV):\n"
             f"{format_metrics_table(report)}\n{format_uncertainty_table(report)}")
    models_dir, plots_dir = (os.path.join(args.root_dir, d) for d in ("models", "plots"))
    atomic_write_json({"members": len(models), **report},
                      os.path.join(models_dir, ENSEMBLE_METRICS_FILE))
    for name in ("val", "test"):
        if name in report:
            p = predictions[name]
            save_regression_plot(p["pred"], p["true"], p["v0"],
                                 os.path.join(plots_dir, f"{name}_ensemble.png"),
                                 f"{name} set, ensemble of {len(models)}", std=p["std"])
    held_out = "test" if "test" in report else "val" if "val" in report else None
    if held_out:
        p = predictions[held_out]
        plot_uncertainty(p["pred"] - p["true"], p["std"], os.path.join(plots_dir,
                         UNCERTAINTY_PLOT), f"{held_out} set")
    log_line(f"ensemble metrics in {os.path.join(models_dir, ENSEMBLE_METRICS_FILE)}; plots in "
             f"{plots_dir}")
    return {"ensemble_path": path, "metrics": report, "predictions": predictions}


# --- cross-validation: K folds by group, each a training run, then the out-of-fold report
def run_cv(args, device, resume=None):
    """``--cv K``: each fold of ``make_cv_folds`` trained as one run (files in
    models/cv/fold_f), then ``cv_report``. A resumed fold continues; the folds before it are
    on disk."""
    try:
        rows = read_meta(args.root_dir)
        folds = make_cv_folds(rows, args.cv, args.seed)
    except (ValueError, FileNotFoundError) as exc:
        _exit(str(exc))
    for f, fold_args, resumed in each_run(args, resume, "fold", args.cv):
        log_line(f"--- cross-validation {folds[f][3]}")
        train_one(fold_args, device, resumed, folds[f])
    return cv_report(argparse.Namespace(**{**vars(args), "fold": None}), rows, folds)


def cv_report(args, rows, folds):
    """Each fold's final model on its test part: per-fold test MAE and RMSE (model and V0
    alone), their mean and standard deviation (ddof = 1) across folds, and figures of the
    out-of-fold predictions of every row, per group. Prints them and writes
    ``models/cv_metrics.json``, ``models/cv_predictions.csv`` (one line per row: its fold and
    out-of-fold prediction) and ``plots/cv_predictions.png``. Returns the metrics dict."""
    device = resolve_device(args.device)
    try:
        dataset = CachedDimerDataset(load_cache(os.path.join(args.root_dir, args.cache_file_name)))
    except ValueError as exc:
        _exit(str(exc))
    index = {i: k for k, i in enumerate(dataset.ids)}
    group_of = groups_of(rows)
    fold_figures, parts = [], []
    for f, (train_idx, val_idx, test_idx, rule) in enumerate(folds):
        path = os.path.join(args.root_dir, "models", "cv", f"fold_{f}", FINAL_CHECKPOINT)
        try:
            model, ckpt = load_checkpoint(path, device)
        except (ValueError, FileNotFoundError) as exc:
            _exit(f"fold {f}: {exc}")
        test_ids = [rows[i]["id"] for i in test_idx]
        if ckpt["split_ids"]["test"] != test_ids:
            _exit(f"{path} was trained on another fold (other test rows); run the CV again")
        loader = DataLoader(torch.utils.data.Subset(dataset, [index[i] for i in test_ids]),
                            batch_size=args.batch_size, shuffle=False)
        try:
            p = predict_rows(model, loader, device, amp_settings(device)[0],
                             args.skip_failed_batches, log_line)
        except TooManyFailedBatchesError as exc:
            _exit(f"fold {f}'s test prediction with {path}: {exc}")
        figures = regression_metrics(p["pred"], p["true"], p["v0"])
        fold_figures.append({"fold": f, "rule": rule, "n_train": len(train_idx),
                             "n_val": len(val_idx), "n_test": len(test_idx),
                             "best_epoch": ckpt.get("weights_from_epoch"),
                             "test_groups": sorted({str(group_of.get(i, i)) for i in test_ids}),
                             "model": figures["model"], "baseline": figures["baseline"]})
        parts.append({**p, "fold": np.full(len(p["id"]), f)})
    oof = {key: np.concatenate([part[key] for part in parts])
           for key in ("pred", "true", "v0", "fold")}
    oof["id"] = [i for part in parts for i in part["id"]]
    summary = {stat: {who: {m: float(fn([ff[who][m] for ff in fold_figures]))
                            for m in ("mae", "rmse", "mape", "max_abs")}
                      for who in ("model", "baseline")}
               for stat, fn in (("mean", np.mean), ("std", lambda x: np.std(x, ddof=1)))}
    report = metrics_report({"out-of-fold": oof}, group_of)
    metrics = {"k": len(folds), "seed": args.seed, "epochs": args.epochs,
               "monitor": args.monitor, "folds": fold_figures, **summary,
               "out_of_fold": report["out-of-fold"]}
    models_dir, plots_dir = (os.path.join(args.root_dir, d) for d in ("models", "plots"))
    atomic_write_json(metrics, os.path.join(models_dir, CV_METRICS_FILE))
    fold_of = dict(zip(oof["id"], oof["fold"].tolist()))
    table = predictions_table(rows, oof, {}).drop(columns="split")
    table.insert(1, "fold", [fold_of.get(r["id"]) for r in rows])
    table.insert(1, "group", [r.get("group", "") for r in rows])
    atomic_write_text(table.to_csv(index=False), os.path.join(models_dir, CV_PREDICTIONS_FILE))
    save_regression_plot(oof["pred"], oof["true"], oof["v0"], os.path.join(plots_dir, CV_PLOT),
                         f"{len(folds)}-fold CV, out of fold")
    log_line(format_cv_table(metrics) + "\n" + format_metrics_table(report))
    log_line(f"cross-validation metrics in {os.path.join(models_dir, CV_METRICS_FILE)}, "
             f"out-of-fold predictions in {os.path.join(models_dir, CV_PREDICTIONS_FILE)}")
    return metrics


def format_cv_table(metrics):
    """Per-fold test MAE and RMSE of the model and of V0 alone, then their mean and std."""
    out = [f"{'fold':<6} {'n_test':>6} | {'MAE':>8} {'RMSE':>8} | {'V0 MAE':>8} {'V0 RMSE':>8}"
           f" | best epoch"]
    lines = [(str(ff["fold"]), str(ff["n_test"]), ff, str(ff["best_epoch"]))
             for ff in metrics["folds"]]
    lines += [(stat, "", metrics[stat], "") for stat in ("mean", "std")]
    for name, n, m, best in lines:
        out.append(f"{name:<6} {n:>6} | {m['model']['mae']:>8.4f} {m['model']['rmse']:>8.4f} | "
                   f"{m['baseline']['mae']:>8.4f} {m['baseline']['rmse']:>8.4f} | {best}")
    return "\n".join(line.rstrip(" |") for line in out)


def main(argv=None):
    """Train and evaluate (docs/DESIGN.md, section 8); with ``--predict``, predict. ``argv=None``
    reads sys.argv; every argument has a default. Under torchrun every rank runs it
    (docs/PERFORMANCE.md, "Scaling out")."""
    args, resume = parse_main_args(argv)
    if args.predict:
        if launched_by_torchrun():
            _exit("--predict runs in one process: python delta_coupling.py --predict ...")
        seed_everything(args.seed)
        try:
            return run_predict(args, argv)  # a checkpoint or an ensemble on new dimers
        except OutputError as exc:  # an output that cannot be written: one line
            _exit(str(exc))
    if launched_by_torchrun() and (args.cv is not None or args.ensemble is not None
                                   or args.combine_ensemble):
        _exit("--cv, --ensemble and --combine_ensemble run in one process; under torchrun "
              "train one ensemble member per job with --member k, then --combine_ensemble")
    if args.combine_ensemble:
        try:
            return combine_ensemble(args)  # members trained with --member k -> ensemble.json
        except OutputError as exc:
            _exit(str(exc))
    device = setup_distributed(args.device)  # torchrun: join the process group
    with sigterm_as_interrupt():
        try:
            if args.cv is not None:
                return run_cv(args, device, resume)  # train_one per fold, out-of-fold report
            if args.ensemble is not None:
                return run_ensemble(args, device, resume)  # train_one per member, combined
            return train_one(args, device, resume)  # data, model, optimiser, epochs, report
        except OutputError as exc:  # an output that cannot be written: one line, no traceback
            _exit(str(exc))
        finally:
            teardown_distributed()


@contextlib.contextmanager
def sigterm_as_interrupt():
    """SIGTERM (torchrun passing on a stop, SLURM's end of a job) ends the block as Ctrl-C
    does, with a KeyboardInterrupt: in training the last epoch's resume state stays and rank 0
    prints the command that continues; tools/build_dataset.py writes its meta.xlsx."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: leave SIGTERM alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # outside the epochs (those stop in main with the resume hint)
        if os.environ.get("RANK", "0") == "0":  # under torchrun rank 0 speaks for all
            print("interrupted; caches and checkpoints are written atomically, so no file is "
                  "left half-written", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None
