"""Tests for delta_coupling.py and preprocess_and_cache.py.

Tiny synthetic dimers are written in the format of docs/DATA_FORMAT.md by fixtures; exactness
checks run in float64 against independent references (e3nn's D matrices, hand-computed numbers).
Run with ``pytest`` (the whole suite takes a minute or two on 2 cores).
"""
import argparse
import builtins
import errno
import hashlib
import importlib.util
import json
import math
import os
import pickle
import shlex
import shutil
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from e3nn import o3
from torch_geometric.loader import DataLoader

import delta_coupling as dc
from preprocess_and_cache import build_cache

HERE = os.path.dirname(os.path.abspath(__file__))
S22X5_DIR = os.path.join(HERE, "examples", "s22x5")
S66_DIR = os.path.join(HERE, "data", "s66", "build")  # S66 at the pretrained model's level

# a water-like and an ammonia-like monomer (Angstrom), hand-typed
WATER = (["O", "H", "H"], [[0.0, 0.0, 0.0], [0.757, 0.586, 0.0], [-0.757, 0.586, 0.0]])
AMMONIA = (["N", "H", "H", "H"], [[0.0, 0.0, 0.1], [0.94, 0.0, -0.25], [-0.47, 0.81, -0.25],
                                  [-0.47, -0.81, -0.25]])


# ----------------------------------------------------------------------------- fixtures
# Seeded RNGs, eager models, float64 on request, tiny water-ammonia dimers in temp folders.
# main() runs pinned to the CPU and eager: on a machine with a GPU, --device auto would train
# under AMP with inductor, where exact comparisons cannot hold (the GPU has its own tests).
ON_CPU = ["--device", "cpu", "--compile", "off"]
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (torch.cuda.is_available())")


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)
    np.random.seed(0)


@pytest.fixture(autouse=True)
def eager_by_default(monkeypatch):
    """--compile auto compiles with inductor on a Linux CPU (tens of seconds per main() call);
    the tests run eager unless they ask for a backend."""
    monkeypatch.setattr(dc, "CPU_AUTO_COMPILE", {})


@pytest.fixture
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def pdb_text(symbols, pos, chain="A", with_element=True):
    lines = []
    for i, (sym, (x, y, z)) in enumerate(zip(symbols, pos), start=1):
        line = f"HETATM{i:5d} {sym + str(i):<4s} MOL {chain}   1    {x:8.3f}{y:8.3f}{z:8.3f}  1.00  0.00"
        if with_element:
            line += f"          {sym:>2s}"
        lines.append(line)
    return "\n".join(lines + ["END"]) + "\n"


def write_dimer_files(folder, pos_a, pos_b, mulliken, dipole, quadrupole):
    """One water-ammonia dimer's A.pdb, B.pdb and dimer.npz in ``folder``."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "A.pdb"), "w") as fh:
        fh.write(pdb_text(WATER[0], pos_a, "A"))
    with open(os.path.join(folder, "B.pdb"), "w") as fh:
        fh.write(pdb_text(AMMONIA[0], pos_b, "B"))
    np.savez(os.path.join(folder, "dimer.npz"), mulliken_spd=mulliken, dipole=dipole,
             quadrupole=quadrupole)


def write_dataset(root, n_rows, groups=False, seed=0):
    """Write ``n_rows`` random water-ammonia dimers (docs/DATA_FORMAT.md); return root."""
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    rows = []
    for i in range(n_rows):
        rot_a, rot_b = (o3.rand_matrix(dtype=torch.float64).numpy() for _ in range(2))
        pos_a = np.asarray(WATER[1]) @ rot_a.T
        pos_b = np.asarray(AMMONIA[1]) @ rot_b.T + rng.normal(size=3)  # absolute place: ignored
        q = rng.normal(size=(3, 3))
        write_dimer_files(os.path.join(root, f"d{i}"), pos_a, pos_b,
                          rng.uniform(0, 4, size=(7, 3)), rng.normal(size=3), q + q.T)
        r_nm = 0.28 + 0.05 * i / max(n_rows, 1)
        v0 = -3.0 + rng.normal()
        row = {"id": f"dimer{i}", "pdb_a": f"d{i}/A.pdb", "pdb_b": f"d{i}/B.pdb",
               "npz": f"d{i}/dimer.npz", "R_nm": r_nm, "theta_deg": rng.uniform(0, 90),
               "V0": v0, "Vref": v0 + rng.normal(scale=0.5), "PR": 1.0 + 0.1 * i}
        if groups:
            row["group"] = f"g{i // 3}"
        rows.append(row)
    pd.DataFrame(rows).to_excel(os.path.join(root, "meta.xlsx"), index=False)
    return root


@pytest.fixture
def tiny_root(tmp_path):
    return write_dataset(str(tmp_path / "data"), 4)


class Foreign:
    """A class a weights_only load must refuse to unpickle."""


def small_model(**kw):
    cfg = dict(num_conv_layers=2, num_rbf=8, cutoff=1.2, radial_hidden=16, mlp_hidden=16)
    cfg.update(kw)
    return dc.DeltaCoupling(**cfg)


def batch_of(graphs):
    return next(iter(DataLoader(graphs, batch_size=len(graphs))))


# ----------------------------------------------------------------------------- tolerances
# Two evaluations of one model that differ only in batching, process or thread count or
# summation order agree to a few rounding steps of the largest numbers they add up, not to a
# fraction of their difference: V0 + dV is a float32 sum of numbers of a few kcal/mol, so a
# dimer's error of 0.004 kcal/mol is exact only to about eps * |Vref|, and a relative tolerance
# on it (or on an MAE made of such errors) asks for digits float32 does not have. Such
# comparisons therefore use an absolute tolerance scaled to the operands' magnitude and dtype.
ROUNDING_STEPS = 64  # float32 rounding steps two evaluations of one network may differ by


def scaled_atol(*values, dtype=torch.float32, floor=0.0, steps=ROUNDING_STEPS):
    """``steps`` rounding steps of ``dtype`` at the largest |value| among ``values`` (arrays,
    tensors or numbers), or at ``floor`` when that is larger: the network's activations are of
    order 1, so a dV of 0.01 carries the rounding of numbers of 1 (``floor=1``)."""
    scale = max([floor] + [float(np.max(np.abs(np.array(v, dtype=np.float64)), initial=0.0))
                           for v in (torch.as_tensor(v).double().numpy() if
                                     isinstance(v, torch.Tensor) else v for v in values)])
    return steps * torch.finfo(dtype).eps * scale


def figure_tolerances(vref, *others, dtype=torch.float32):
    """{figure: absolute tolerance} for ``ErrorSums`` figures of two evaluations whose
    predictions each agree within ``scaled_atol`` of the Vref (and V0, ...) values: MAE, RMSE
    and max |error| move at most as much as the largest prediction does, MAPE (%) at most
    100 times that over the smallest |Vref|."""
    atol = scaled_atol(vref, *others, dtype=dtype)
    mape = 100.0 * atol / (float(np.min(np.abs(np.asarray(vref, dtype=np.float64)))) +
                           dc.MAPE_EPS)
    return {"mape": mape, "mae": atol, "rmse": atol, "max_abs": atol}


def meta_figure_tolerances(root, dtype=torch.float32):
    """``figure_tolerances`` for the dimers of the data folder ``root`` (its meta.xlsx)."""
    meta = pd.read_excel(os.path.join(root, "meta.xlsx"))
    return figure_tolerances(meta["Vref"].to_numpy(), meta["V0"].to_numpy(), dtype=dtype)


def assert_tensors_close(got, want, what=""):
    """Two float32 runs of the same steps (straight and resumed, one process and two): each
    tensor within ``scaled_atol`` of its own largest entry (weights of order 1, Adam's second
    moments of order 1e-6 each get their own scale); integer tensors exactly."""
    if not want.is_floating_point():
        assert torch.equal(got, want), what
        return
    torch.testing.assert_close(got, want, rtol=0, atol=scaled_atol(want), msg=what)


def assert_figures_close(got, want, tolerances, what=""):
    """Every figure of ``want`` (a dict such as ``ErrorSums.figures()``) in ``got``, each
    within its own absolute tolerance."""
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=0, abs=tolerances[key]), (what, key)


# ----------------------------------------------------------------------------- constants & units
# Unit conversions against hand-computed numbers; the multipoles transform as e3nn's irreps.
def test_unit_conversions_against_hand_computed_values():
    assert dc.INT_ANGSTROM_SCALE == 0.1
    # 1 D = 0.20819434 e*A -> x 0.1 internal
    np.testing.assert_allclose(dc.dipole_debye_to_internal([1.0, -2.0, 0.5]),
                               [0.020819434, -0.041638868, 0.010409717], rtol=1e-12)
    # 1 D*A = 0.20819434 e*A^2 -> x 0.01 internal
    np.testing.assert_allclose(dc.quadrupole_debye_angstrom_to_internal(np.eye(3) * 3.0),
                               np.eye(3) * 0.0062458302, rtol=1e-12)
    assert torch.get_default_dtype() == torch.float32
    assert str(dc.IRREPS_EDGE_SH) == "4x0e+4x1o+4x2e+4x3o"
    assert str(dc.IRREPS_U) == "4x0e"
    assert str(dc.IRREPS_FIELD) == "1x1o+1x2e"
    assert str(dc.IRREPS_NODE) == "8x0e+1x1o+1x2e"


def test_dipole_and_quadrupole_rotate_as_e3nn_irreps(float64):
    rng = np.random.default_rng(1)
    dip = rng.normal(size=3)
    q = rng.normal(size=(3, 3))
    quad = q + q.T  # symmetric, with a trace on purpose
    for _ in range(5):
        rot = o3.rand_matrix(dtype=torch.float64)
        r = rot.numpy()
        d1 = o3.Irrep(1, -1).D_from_matrix(rot).numpy()
        d2 = o3.Irrep(2, 1).D_from_matrix(rot).numpy()
        np.testing.assert_allclose(d1 @ dip, r @ dip, atol=1e-12)
        np.testing.assert_allclose(d2 @ dc.quadrupole_to_l2(quad),
                                   dc.quadrupole_to_l2(r @ quad @ r.T), atol=1e-12)
        # and the library's own rotation of the packed (8,) field features
        feat = torch.as_tensor(np.concatenate([dip, dc.quadrupole_to_l2(quad)]))
        rotated = dc.rotate_field_features(feat, rot).numpy()
        np.testing.assert_allclose(rotated[:3], r @ dip, atol=1e-12)
        np.testing.assert_allclose(rotated[3:], dc.quadrupole_to_l2(r @ quad @ r.T), atol=1e-12)
        torch.testing.assert_close(dc.field_rotation_matrix(rot),
                                   dc.IRREPS_FIELD.D_from_matrix(rot), atol=1e-12, rtol=0)
    # the trace does not enter: an isotropic tensor has no l=2 part
    np.testing.assert_allclose(dc.quadrupole_to_l2(np.eye(3) * 7.0), 0.0, atol=1e-15)


# ----------------------------------------------------------------------------- parsing
# PDB, meta.xlsx and NPZ reading; bad input is named by file, row, id, problem and fix.
def test_pdb_elements_from_columns_and_names(tmp_path):
    path = tmp_path / "mixed.pdb"
    records = [
        # element columns present: they win over the name
        "HETATM    1 X1   MOL A   1       0.000   0.000   0.000  1.00  0.00          CL",
        # no element columns: guess from the name field (columns 13-16)
        "ATOM      2  CA  ALA A   1       1.000   0.000   0.000  1.00  0.00",  # C-alpha
        "ATOM      3 CA   ALA A   1       2.000   0.000   0.000  1.00  0.00",  # left-just., protein
        "HETATM    4 CA    CA B   2       3.000   0.000   0.000  1.00  0.00",  # calcium ion
        "HETATM    5 CL1  LIG B   3       4.000   0.000   0.000  1.00  0.00",  # chlorine
        "HETATM    6 NA    NA B   4       5.000   0.000   0.000  1.00  0.00",  # sodium
        "HETATM    7 MG   MG  B   5       6.000   0.000   0.000  1.00  0.00",  # magnesium
        "ATOM      8 1HB  ALA A   1       7.000   0.000   0.000  1.00  0.00",  # hydrogen
        "ATOM      9  N   ALA A   1       8.000   0.000   0.000  1.00  0.00",  # nitrogen
        "HETATM   10 C12  LIG B   3       9.000   1.000  -2.500  1.00  0.00",  # carbon
        "HETATM   11 NE2  LIG B   3      10.000   1.000  -2.500  1.00  0.00",  # nitrogen
        "HETATM   12 HE21 LIG B   3      11.000   1.000  -2.500  1.00  0.00",  # hydrogen
        "HETATM   13 CA   MSE B   3      12.000   1.000  -2.500  1.00  0.00",  # C-alpha
        "HETATM   14 SI1  LIG B   3      13.000   1.000  -2.500  1.00  0.00",  # sulfur (S + I1)
        "REMARK not an atom",
    ]
    path.write_text("\n".join(records) + "\nEND\n")
    z, pos = dc.parse_pdb(str(path))
    assert z.tolist() == [17, 6, 6, 20, 17, 11, 12, 1, 7, 6, 7, 1, 6, 16]
    np.testing.assert_allclose(pos[9], [9.0, 1.0, -2.5])


@pytest.mark.parametrize("name, res, element", [
    ("BR1 ", "LIG", "Br"), ("FE  ", "HEM", "Fe"), ("ZN  ", "ZN ", "Zn"), ("SE  ", "MSE", "Se")])
def test_pdb_names_beyond_calcium_are_refused_not_guessed(tmp_path, name, res, element):
    path = tmp_path / "metal.pdb"
    path.write_text("HETATM    1 O1   MOL A   1       0.000   0.000   0.000  1.00  0.00\n"
                    f"HETATM    2 {name} {res} A   1       1.000   0.000   0.000  1.00  0.00\n")
    with pytest.raises(ValueError, match=rf"metal\.pdb, line 2: element '{element}' from atom "
                                         rf"name '{name.strip()}'.*not supported"):
        dc.parse_pdb(str(path))


def test_pdb_unknown_element_names_file_and_line(tmp_path):
    path = tmp_path / "iron.pdb"
    path.write_text(pdb_text(["O", "Fe"], [[0, 0, 0], [1, 0, 0]]))
    with pytest.raises(ValueError, match=r"iron\.pdb, line 2: element 'Fe' from columns 77-78"):
        dc.parse_pdb(str(path))


def test_unreadable_pdb_names_row_and_file(tmp_path, monkeypatch):
    root = write_dataset(str(tmp_path / "data"), 2)
    blocked = os.path.join(root, "d1", "A.pdb")
    real_open = open

    def guarded_open(path, *args, **kwargs):  # as a file without read permission
        if os.path.abspath(path) == blocked:
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(dc, "open", guarded_open, raising=False)
    n_rows, problems = dc.check_dataset(root)
    assert n_rows == 2 and len(problems) == 1
    for part in ("row 3 (id dimer1)", "pdb_a", blocked, "Permission denied", "readable file"):
        assert part in problems[0], (part, problems[0])


def test_pdb_reads_first_model_and_altloc_a_only(tmp_path):
    path = tmp_path / "models.pdb"
    def atom(serial, name, alt, x, element):  # columns as in the PDB format
        return (f"ATOM  {serial:5d} {name:<4s}{alt}HOH A   1    {x:8.3f}{0.0:8.3f}{0.0:8.3f}"
                f"  1.00  0.00          {element:>2s}\n")

    path.write_text("MODEL        1\n" + atom(1, " O", "A", 1.0, "O") + atom(2, " O", "B", 9.0, "O")
                    + atom(3, " H1", " ", 1.5, "H") + "ENDMDL\nMODEL        2\n"
                    + atom(1, " O", " ", 5.0, "O") + "ENDMDL\nEND\n")
    z, pos = dc.parse_pdb(str(path))
    assert z.tolist() == [8, 1]
    np.testing.assert_allclose(pos[:, 0], [1.0, 1.5])


def test_pdb_truncated_and_empty(tmp_path):
    trunc = tmp_path / "trunc.pdb"
    trunc.write_text("HETATM    1 O1   MOL A   1       0.000   0.0\n")
    with pytest.raises(ValueError, match=r"trunc\.pdb, line 1: cannot read x/y/z"):
        dc.parse_pdb(str(trunc))
    empty = tmp_path / "empty.pdb"
    empty.write_text("REMARK nothing\nEND\n")
    with pytest.raises(ValueError, match="no ATOM/HETATM records"):
        dc.parse_pdb(str(empty))


def test_meta_errors_name_file_row_and_problem(tmp_path):
    root = write_dataset(str(tmp_path / "bad"), 3)
    meta = pd.read_excel(os.path.join(root, "meta.xlsx"))
    meta["R_nm"] = meta["R_nm"].astype(object)
    meta.loc[1, "R_nm"] = "far"
    meta.to_excel(os.path.join(root, "meta.xlsx"), index=False)
    with pytest.raises(ValueError, match=r"meta\.xlsx, row 3 \(id dimer1\): R_nm = 'far' is not"):
        dc.read_meta(root)
    meta.drop(columns=["Vref"]).to_excel(os.path.join(root, "meta.xlsx"), index=False)
    with pytest.raises(ValueError, match=r"missing required column\(s\) \['Vref'\]"):
        dc.read_meta(root)


def test_npz_atom_count_mismatch_is_refused(tmp_path):
    root = write_dataset(str(tmp_path / "bad"), 2)
    np.savez(os.path.join(root, "d1", "dimer.npz"), mulliken_spd=np.ones((6, 3)),
             dipole=np.zeros(3), quadrupole=np.eye(3))
    with pytest.raises(ValueError, match=r"row 3 \(id dimer1\).*6 rows but the two PDBs hold 7"):
        dc.DimerDataset(root)


# Every case writes the 3-row fixture data set, breaks row 1 (spreadsheet row 3, id dimer1) or
# its files, and expects an error naming meta.xlsx, the row, the id, the broken file, the
# problem and what to do.
def set_cell(root, col, value, row=1):
    meta = pd.read_excel(os.path.join(root, "meta.xlsx"))
    meta[col] = meta[col].astype(object)
    meta.loc[row, col] = value
    meta.to_excel(os.path.join(root, "meta.xlsx"), index=False)


def rewrite_npz(root, drop=(), **arrays):
    """Rewrite d1/dimer.npz with some arrays replaced or dropped."""
    path = os.path.join(root, "d1", "dimer.npz")
    with np.load(path) as npz:
        kept = {k: npz[k] for k in npz.files if k not in drop}
    kept.update(arrays)
    np.savez(path, **kept)


def write_text(root, rel, text):
    with open(os.path.join(root, rel), "w") as fh:
        fh.write(text)


def truncate_second_line(root, rel):
    path = os.path.join(root, rel)
    with open(path) as fh:
        lines = fh.read().splitlines()
    lines[1] = lines[1][:40]
    write_text(root, rel, "\n".join(lines) + "\n")


def truncate_file(path):
    with open(path, "rb") as fh:
        data = fh.read()
    with open(path, "wb") as fh:
        fh.write(data[:len(data) // 2])


def asymmetric_quadrupole(root):
    q = np.diag([1.0, 2.0, -3.0])
    q[0, 1] = 0.5  # Q_yx stays 0: a layout error, not rounding
    rewrite_npz(root, quadrupole=q)


def set_coordinate(root, rel, line, text):
    """Write ``text`` (8 characters) into the x field (columns 31-38) of PDB line ``line``."""
    path = os.path.join(root, rel)
    with open(path) as fh:
        lines = fh.read().splitlines()
    lines[line - 1] = lines[line - 1][:30] + f"{text:>8s}" + lines[line - 1][38:]
    write_text(root, rel, "\n".join(lines) + "\n")


def duplicate_record(root, rel):
    """Repeat the first atom of a PDB as its last record (same position)."""
    path = os.path.join(root, rel)
    with open(path) as fh:
        lines = fh.read().splitlines()
    write_text(root, rel, "\n".join(lines[:-1] + [lines[0], lines[-1]]) + "\n")


def mulliken_entry(root, atom, shell, value):
    with np.load(os.path.join(root, "d1", "dimer.npz")) as npz:
        mulliken = npz["mulliken_spd"].copy()
    mulliken[atom, shell] = value
    rewrite_npz(root, mulliken_spd=mulliken)


def overlapping_monomers(root):
    """B = a copy of A, 0.01 Angstrom away: every atom sits on its twin."""
    shutil.copy(os.path.join(root, "d1", "A.pdb"), os.path.join(root, "d1", "B.pdb"))
    set_cell(root, "R_nm", 0.001)


ROW_CASES = [  # (name, break row 1, exception, file named, problem keyword, what to do)
    ("R_nm text", lambda r: set_cell(r, "R_nm", "far"), ValueError, "meta.xlsx",
     "R_nm = 'far' is not a number", "write a number in column R_nm (unit: nm)"),
    ("V0 empty", lambda r: set_cell(r, "V0", np.nan), ValueError, "meta.xlsx",
     "V0 is empty, not a finite number", "write a number in column V0"),
    ("Vref text", lambda r: set_cell(r, "Vref", "n/a"), ValueError, "meta.xlsx",
     "Vref = 'n/a' is not a number", "write a number in column Vref"),
    ("PR inf", lambda r: set_cell(r, "PR", "inf"), ValueError, "meta.xlsx",
     "PR is inf, not a finite number", "write a number in column PR"),
    ("PR nan", lambda r: set_cell(r, "PR", "NaN"), ValueError, "meta.xlsx",
     "PR is 'NaN', not a finite number", "write a number in column PR"),
    ("R_nm zero", lambda r: set_cell(r, "R_nm", 0.0), ValueError, "meta.xlsx",
     "R_nm = 0.0 must be > 0", "in nm"),
    ("R_nm negative", lambda r: set_cell(r, "R_nm", -0.3), ValueError, "meta.xlsx",
     "R_nm = -0.3 must be > 0", "in nm"),
    ("pdb_a empty", lambda r: set_cell(r, "pdb_a", np.nan), ValueError, "meta.xlsx",
     "column pdb_a is empty", "write the file's path"),
    ("duplicate id", lambda r: set_cell(r, "id", "dimer1", row=2), ValueError, "meta.xlsx",
     "duplicate id (also row 3)", "give each row its own id"),
    ("PDB missing", lambda r: os.remove(os.path.join(r, "d1", "A.pdb")), FileNotFoundError,
     "A.pdb", "pdb_a file", "fix column pdb_a or add the file"),
    ("NPZ missing", lambda r: os.remove(os.path.join(r, "d1", "dimer.npz")), FileNotFoundError,
     "dimer.npz", "NPZ file", "fix column npz or add the file"),
    ("PDB no atoms", lambda r: write_text(r, "d1/B.pdb", "REMARK nothing\nEND\n"), ValueError,
     "B.pdb", "no ATOM/HETATM records", "write the monomer's atoms"),
    ("PDB binary", lambda r: write_text(r, "d1/B.pdb", "\x00\xff\xfe PK"), ValueError,
     "B.pdb", "no ATOM/HETATM records", "fix the path"),
    ("PDB truncated", lambda r: truncate_second_line(r, "d1/A.pdb"), ValueError,
     "A.pdb, line 2", "cannot read x/y/z", "fix this record"),
    ("PDB element", lambda r: write_text(r, "d1/A.pdb", pdb_text(["O", "Fe", "H"], WATER[1])),
     ValueError, "A.pdb, line 2", "element 'Fe' from columns 77-78 is not supported",
     "write it in columns 77-78"),
    ("no mulliken", lambda r: rewrite_npz(r, drop=["mulliken_spd"]), ValueError, "dimer.npz",
     "no key(s) ['mulliken_spd']", "re-export"),
    ("no dipole", lambda r: rewrite_npz(r, drop=["dipole"]), ValueError, "dimer.npz",
     "no key(s) ['dipole']", "re-export"),
    ("no quadrupole", lambda r: rewrite_npz(r, drop=["quadrupole"]), ValueError, "dimer.npz",
     "no key(s) ['quadrupole']", "re-export"),
    ("mulliken shape", lambda r: rewrite_npz(r, mulliken_spd=np.ones((7, 4))), ValueError,
     "dimer.npz", "mulliken_spd has shape (7, 4)", "re-export"),
    ("dipole shape", lambda r: rewrite_npz(r, dipole=np.ones((1, 3))), ValueError, "dimer.npz",
     "dipole has shape (1, 3), expected (3,)", "re-export"),
    ("quadrupole shape", lambda r: rewrite_npz(r, quadrupole=np.ones(9)), ValueError,
     "dimer.npz", "quadrupole has shape (9,), expected (3, 3)", "re-export"),
    ("mulliken NaN", lambda r: rewrite_npz(r, mulliken_spd=np.full((7, 3), np.nan)), ValueError,
     "dimer.npz", "mulliken_spd contains NaN or Inf", "re-export"),
    ("dipole Inf", lambda r: rewrite_npz(r, dipole=np.array([0.0, np.inf, 1.0])), ValueError,
     "dimer.npz", "dipole contains NaN or Inf", "re-export"),
    ("quadrupole NaN", lambda r: rewrite_npz(r, quadrupole=np.full((3, 3), np.nan)),
     ValueError, "dimer.npz", "quadrupole contains NaN or Inf", "re-export"),
    ("quadrupole text", lambda r: rewrite_npz(r, quadrupole=np.array([["a"] * 3] * 3)),
     ValueError, "dimer.npz", "cannot read its arrays as numbers", "re-export"),
    ("atom count", lambda r: rewrite_npz(r, mulliken_spd=np.ones((6, 3))), ValueError,
     "dimer.npz", "6 rows but the two PDBs hold 7 atoms", "belong to the same dimer"),
    ("NPZ not a zip", lambda r: write_text(r, "d1/dimer.npz", "mulliken_spd 1 2 3"), ValueError,
     "dimer.npz", "is not an NPZ archive", "re-export it with np.savez"),
    ("NPZ is .npy", lambda r: np.save(os.path.join(r, "d1", "x.npy"), np.ones(3))
     or os.replace(os.path.join(r, "d1", "x.npy"), os.path.join(r, "d1", "dimer.npz")),
     ValueError, "dimer.npz", "is not an NPZ archive", "re-export"),
    ("NPZ truncated", lambda r: truncate_file(os.path.join(r, "d1", "dimer.npz")), ValueError,
     "dimer.npz", "is not an NPZ archive", "re-export"),
    ("NPZ pickled", lambda r: rewrite_npz(r, dipole=np.array([Foreign()] * 3, dtype=object)),
     ValueError, "dimer.npz", "cannot read its arrays as numbers (Object arrays cannot be "
     "loaded when allow_pickle=False)", "re-export"),
    ("quadrupole asymmetric", asymmetric_quadrupole, ValueError, "dimer.npz",
     "quadrupole is not symmetric (max |Q - Q^T| = 0.5 D*A",
     "an asymmetric tensor means a wrong export or layout"),
    ("overlap", overlapping_monomers, ValueError, "meta.xlsx",
     "atoms of A and B are 0.010 Angstrom apart at R_nm = 0.001 (< 0.5)",
     "check R_nm (nm, not Angstrom)"),
    # plausible values (docs/DATA_FORMAT.md): finite numbers within the named bounds
    ("PDB nan coordinate", lambda r: set_coordinate(r, "d1/A.pdb", 2, "nan"), ValueError,
     "A.pdb, line 2", "x, y, z = nan, ", "fix this record: x, y, z in Angstrom"),
    ("PDB inf coordinate", lambda r: set_coordinate(r, "d1/B.pdb", 3, "-inf"), ValueError,
     "B.pdb, line 3", "is not finite (|coordinate| < 10000 Angstrom)", "fix this record"),
    ("PDB huge coordinate", lambda r: set_coordinate(r, "d1/A.pdb", 1, "1.0e5"), ValueError,
     "A.pdb, line 1", "x, y, z = 100000.0, ", "is not plausible (|coordinate| < 10000"),
    ("PDB duplicated atom", lambda r: duplicate_record(r, "d1/B.pdb"), ValueError,
     "B.pdb, lines 1 and 5", "two atoms 0.000 Angstrom apart (< 0.5)",
     "keep one record per atom"),
    ("R_nm in pm", lambda r: set_cell(r, "R_nm", 290.0), ValueError, "meta.xlsx",
     "R_nm = 290 is not plausible (|R_nm| <= 100 nm", "write the distance of the monomer "
     "centroids in nm"),
    ("theta_deg huge", lambda r: set_cell(r, "theta_deg", 1000.0), ValueError, "meta.xlsx",
     "theta_deg = 1000 is not plausible (|theta_deg| <= 360 degrees", "in degrees"),
    ("V0 placeholder", lambda r: set_cell(r, "V0", 1e10), ValueError, "meta.xlsx",
     "V0 = 1e+10 is not plausible (|V0| <= 1e+06", "check the cell and its unit"),
    ("Vref huge", lambda r: set_cell(r, "Vref", -3e6), ValueError, "meta.xlsx",
     "Vref = -3e+06 is not plausible", "check the cell and its unit"),
    ("PR huge", lambda r: set_cell(r, "PR", 1e9), ValueError, "meta.xlsx",
     "PR = 1e+09 is not plausible (|PR| <= 1e+06", "rescale PR"),
    ("mulliken negative", lambda r: mulliken_entry(r, 4, 1, -2.0), ValueError, "dimer.npz",
     "mulliken_spd[4, 1] = -2 (atom 5, A's atoms first, p shell) electrons is not plausible "
     "(between -0.5 and 20 electrons", "write populations of the atom's s, p, d shells"),
    ("mulliken absurd", lambda r: mulliken_entry(r, 0, 2, 55.0), ValueError, "dimer.npz",
     "mulliken_spd[0, 2] = 55 (atom 1, A's atoms first, d shell)", "re-export"),
    ("mulliken one NaN", lambda r: mulliken_entry(r, 6, 0, np.nan), ValueError, "dimer.npz",
     "mulliken_spd contains NaN or Inf: mulliken_spd[6, 0] = nan (atom 7", "re-export"),
    ("dipole huge", lambda r: rewrite_npz(r, dipole=np.array([0.1, 2.5e4, 0.0])), ValueError,
     "dimer.npz", "dipole[1] = 25000 D is not plausible (between -1000 and 1000 D",
     "write the dipole in Debye"),
    ("quadrupole huge", lambda r: rewrite_npz(r, quadrupole=np.diag([1.0, 1.0, -2e5])),
     ValueError, "dimer.npz", "quadrupole[2, 2] = -200000 D*Angstrom is not plausible",
     "write the quadrupole in Debye*Angstrom"),
]


@pytest.mark.parametrize("name, breaker, exc_type, file_named, problem, todo", ROW_CASES,
                         ids=[c[0] for c in ROW_CASES])
def test_bad_row_names_file_row_id_problem_and_fix(tmp_path, name, breaker, exc_type,
                                                   file_named, problem, todo):
    root = write_dataset(str(tmp_path / "data"), 3)
    breaker(root)
    sheet_row = 4 if name == "duplicate id" else 3  # the repeat is reported on row 4
    with pytest.raises(exc_type) as exc:
        dc.DimerDataset(root)
    msg = str(exc.value)
    for part in (os.path.join(root, "meta.xlsx"), f"row {sheet_row} (id dimer1)", file_named,
                 problem, todo):
        assert part in msg, (part, msg)
    # the data check reports the same message, and nothing else
    n_rows, problems = dc.check_dataset(root)
    assert (n_rows, problems) == (3, [msg])


META_CASES = [  # (name, break meta.xlsx, exception, problem keyword, what to do)
    ("missing", lambda m: os.remove(m), FileNotFoundError, "not found", "check --root_dir"),
    ("not xlsx", lambda m: open(m, "w").write("id,R_nm\n"), ValueError,
     "cannot be read as an .xlsx workbook", "save it as an Excel .xlsx workbook"),
    ("empty", lambda m: pd.DataFrame(columns=list(dc.META_REQUIRED_COLUMNS)).to_excel(
        m, index=False), ValueError, "no data rows", "add one row per dimer"),
    ("no column", lambda m: pd.read_excel(m).drop(columns=["PR"]).to_excel(m, index=False),
     ValueError, "missing required column(s) ['PR']", "add them to the header"),
]


@pytest.mark.parametrize("name, breaker, exc_type, problem, todo", META_CASES,
                         ids=[c[0] for c in META_CASES])
def test_bad_meta_xlsx_names_file_problem_and_fix(tmp_path, name, breaker, exc_type, problem,
                                                  todo):
    root = write_dataset(str(tmp_path / "data"), 3)
    meta = os.path.join(root, "meta.xlsx")
    breaker(meta)
    with pytest.raises(exc_type) as exc:
        dc.read_meta(root)
    msg = str(exc.value)
    assert meta in msg and problem in msg and todo in msg, msg
    assert dc.check_dataset(root)[1][0] == msg


def test_quadrupole_rounding_is_symmetrised_but_a_layout_error_is_not(tmp_path):
    root = write_dataset(str(tmp_path / "data"), 2)
    q = np.array([[1.234567, 0.5, -0.25], [0.5000049, 2.0, 0.75], [-0.25, 0.75, -3.234567]])
    rewrite_npz(root, quadrupole=q)  # |Q - Q^T| = 4.9e-6 of max |Q| 3.23: rounding
    parsed = dc.DimerDataset(root).parsed[1]
    sym = 0.5 * (q + q.T)
    np.testing.assert_allclose(parsed.field[3:], dc.quadrupole_to_l2(
        dc.quadrupole_debye_angstrom_to_internal(sym)), rtol=1e-12)
    assert parsed.field[4] == pytest.approx(0.50000245 * 0.20819434 * 0.01, rel=1e-12)  # Qxy
    q[1, 0] = 0.5001  # 1e-4 D*A: beyond rounding of a 6-digit export
    rewrite_npz(root, quadrupole=q)
    with pytest.raises(ValueError, match=r"row 3 \(id dimer1\).*quadrupole is not symmetric"):
        dc.DimerDataset(root)


def test_check_dataset_reports_every_problem_and_every_row(tmp_path):
    root = write_dataset(str(tmp_path / "data"), 5)
    set_cell(root, "V0", "x", row=0)  # row 2: a cell ...
    set_cell(root, "Vref", np.nan, row=0)  # ... and another cell of the same row
    os.remove(os.path.join(root, "d1", "B.pdb"))  # row 3
    rewrite_npz(root, dipole=np.ones(4))  # row 3's NPZ too: after its missing PDB, not reported
    set_cell(root, "id", "dimer2", row=3)  # row 5 repeats row 4's id
    write_text(root, "d4/A.pdb", "END\n")  # row 6
    n_rows, problems = dc.check_dataset(root)
    assert n_rows == 5 and len(problems) == 5, problems
    want = ["row 2 (id dimer0): V0 = 'x' is not a number",
            "row 2 (id dimer0): Vref is empty",
            "row 5 (id dimer2): duplicate id (also row 4)",
            "row 3 (id dimer1): pdb_b file",
            "row 6 (id dimer4): pdb_a: "]
    for fragment, problem in zip(want, problems):
        assert fragment in problem, (fragment, problem)
    # row 2's files were still checked (and are fine): its cells alone are reported
    assert not [p for p in problems if "row 2" in p and ".pdb" in p]


def test_main_check_data_prints_every_problem_and_exits_nonzero(tmp_path, capsys):
    root = write_dataset(str(tmp_path / "data"), 4)
    with pytest.raises(SystemExit) as exc:
        dc.main(["--root_dir", root, "--check_data"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"checked 4 rows of {root}: 0 problems"
    set_cell(root, "R_nm", -1.0, row=0)
    rewrite_npz(root, mulliken_spd=np.ones((6, 3)))
    with pytest.raises(SystemExit) as exc:
        dc.main(["--root_dir", root, "--check_data"])
    assert exc.value.code == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"checked 4 rows of {root}: 2 problems"
    assert "row 2 (id dimer0): R_nm = -1.0 must be > 0" in out[1]
    assert "row 3 (id dimer1)" in out[2] and "6 rows but the two PDBs hold 7" in out[2]
    assert sorted(os.listdir(root)) == ["d0", "d1", "d2", "d3", "meta.xlsx"]  # nothing written
    # training refuses the same data with the same full report, before any cache or model
    with pytest.raises(SystemExit) as exc:
        dc.main(["--root_dir", root, "--epochs", "1"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "checked 4 rows" in err and "row 2 (id dimer0)" in err and "row 3 (id dimer1)" in err
    assert "--check_data" in err
    assert sorted(os.listdir(root)) == ["d0", "d1", "d2", "d3", "meta.xlsx"]


def test_non_finite_and_implausible_numbers_are_refused_by_check_training_and_prediction(
        tmp_path, capsys, trained_run):
    """A NaN coordinate and a placeholder V0: --check_data lists both with file, row, id and
    what to do; training and prediction refuse the data with the same report before anything
    runs or is written."""
    root = write_dataset(str(tmp_path / "data"), 4)
    set_coordinate(root, "d1/A.pdb", 2, "nan")
    set_cell(root, "V0", 1e10, row=3)
    files = sorted(os.listdir(root))

    def stopped(argv, code, stream):
        with pytest.raises(SystemExit) as exc:
            dc.main(argv)
        assert exc.value.code == code
        text = getattr(capsys.readouterr(), stream)
        assert f"checked 4 rows of {root}: 2 problems" in text, text
        assert (f"row 5 (id dimer3): V0 = 1e+10 is not plausible" in text
                and "check the cell and its unit" in text), text
        assert (f"row 3 (id dimer1): pdb_a: {os.path.join(root, 'd1', 'A.pdb')}, line 2: "
                f"x, y, z = nan, " in text and "fix this record" in text), text
        assert sorted(os.listdir(root)) == files  # no cache, model or prediction written

    stopped(["--root_dir", root, "--check_data"], 1, "out")
    stopped(["--root_dir", root, "--epochs", "1", *ON_CPU], 2, "err")
    best = trained_run["result"]["best_path"]
    stopped(["--predict", "--checkpoint", best, "--root_dir", root, *ON_CPU], 2, "err")
    meta = pd.read_excel(os.path.join(root, "meta.xlsx"))
    meta.drop(columns=["Vref"]).to_excel(os.path.join(root, "meta.xlsx"), index=False)
    stopped(["--predict", "--check_data", "--root_dir", root], 1, "out")  # no Vref needed


def test_plausibility_bounds_are_documented():
    """Every bound of the data check is in docs/DATA_FORMAT.md with its value."""
    with open(os.path.join(HERE, "docs", "DATA_FORMAT.md")) as fh:
        doc = fh.read()
    for name in ("MIN_ATOM_DISTANCE_ANGSTROM", "MIN_INTERMONOMER_DISTANCE_ANGSTROM",
                 "MAX_ABS_COORDINATE_ANGSTROM", "MIN_SHELL_POPULATION", "MAX_SHELL_POPULATION",
                 "MAX_ABS_DIPOLE_DEBYE", "MAX_ABS_QUADRUPOLE_DEBYE_ANGSTROM", "MAX_R_NM",
                 "MAX_ABS_THETA_DEG", "MAX_ABS_ENERGY", "MAX_ABS_PR"):
        assert f"`{name} = {getattr(dc, name):g}`" in doc, name


def test_bundled_s22x5_loads_and_matches_ase():
    ds = dc.DimerDataset(S22X5_DIR)
    assert len(ds) == 110
    for parsed in ds.parsed:
        npz = np.load(os.path.join(S22X5_DIR, parsed.row["npz"]))
        assert npz["mulliken_spd"].shape[0] == len(parsed.z)
    water = [p for p in ds.parsed if p.row["id"].startswith("Water_dimer_")]
    assert len(water) == 5
    for p in water:
        dip = np.load(os.path.join(S22X5_DIR, p.row["npz"]))["dipole"]
        assert 2.0 < np.linalg.norm(dip) < 3.5
    from ase.data import s22  # a test requirement (requirements.txt)
    checked = 0
    for p in ds.parsed:
        if p.row["PR"] != 1.0:
            continue
        d = s22.data[p.row["group"]]
        pos = np.asarray(d["positions 1.0"])
        n_a = d["dimer atoms"][0]
        r_ase = np.linalg.norm(pos[n_a:].mean(0) - pos[:n_a].mean(0)) / 10.0  # nm
        assert p.row["R_nm"] == pytest.approx(r_ase, abs=1e-6)
        checked += 1
    assert checked == 22


# ----------------------------------------------------------------------------- geometry helpers
# Edge harmonics as e3nn returns them; the radius graph vs brute force and torch-cluster.
def test_edge_harmonics_equal_e3nn_tiled_and_single_copy():
    vec = torch.randn(50, 3)
    tiled = o3.spherical_harmonics(dc.IRREPS_EDGE_SH, vec, normalize=True,
                                   normalization="component")  # (50, 64): four copies of each l
    torch.testing.assert_close(dc.edge_spherical_harmonics(vec), tiled, atol=1e-6, rtol=0)
    single = o3.spherical_harmonics(dc.IRREPS_EDGE_SH_SINGLE, vec, normalize=True,
                                    normalization="component")  # (50, 16)
    torch.testing.assert_close(dc.edge_spherical_harmonics(vec, tiled=False), single)
    for copy in range(4):  # each copy of the tiled layout is the single-copy set
        torch.testing.assert_close(tiled[:, dc._copy_index(dc.IRREPS_EDGE_SH, copy)], single)


def test_radius_graph_respects_cutoff_against_brute_force():
    pos = torch.rand(30, 3) * 2.0
    batch = torch.tensor([0] * 12 + [1] * 18)
    edges = dc.radius_graph(pos, 0.7, batch)
    got = {tuple(e) for e in edges.t().tolist()}
    want = {(j, i) for i in range(30) for j in range(30)
            if i != j and batch[i] == batch[j] and float((pos[i] - pos[j]).norm()) < 0.7}
    assert got == want and len(want) > 0


def test_radius_graph_torch_cluster_matches_pure_torch(monkeypatch):
    torch_cluster = pytest.importorskip("torch_cluster")
    pos = torch.rand(200, 3) * 3.0  # dense: many more than 32 neighbours each
    with_tc = {tuple(e) for e in dc.radius_graph(pos, 1.2).t().tolist()}
    monkeypatch.setattr(dc, "torch_cluster", None)
    pure = {tuple(e) for e in dc.radius_graph(pos, 1.2).t().tolist()}
    assert with_tc == pure and torch_cluster is not None


# ----------------------------------------------------------------------------- datasets
# Graph fields in internal units; cached augmentation stays consistent; the cache round trip.
def test_graph_fields_units_and_placement(tiny_root):
    ds = dc.DimerDataset(tiny_root, physical_cutoff=12.0)
    rows = pd.read_excel(os.path.join(tiny_root, "meta.xlsx"))
    g = ds[1]
    r_nm = rows.loc[1, "R_nm"]
    r_int = r_nm * 10.0 * 0.1  # nm -> Angstrom -> internal
    assert g.pos_atoms.shape == (7, 3) and g.z_atoms.tolist() == [8, 1, 1, 7, 1, 1, 1]
    np.testing.assert_allclose(g.pos_atoms[:3].mean(0).numpy(), 0.0, atol=1e-6)
    np.testing.assert_allclose(g.pos_atoms[3:].mean(0).numpy(), [0, 0, r_int], atol=1e-6)
    # O-H bond 0.9572 Angstrom (from the PDB, 3 decimals) -> about 0.0957 internal
    assert abs(float((g.pos_atoms[1] - g.pos_atoms[0]).norm()) - 0.09572) < 2e-4
    np.testing.assert_allclose(g.u.numpy(), [[r_int, math.radians(rows.loc[1, "theta_deg"]),
                                              rows.loc[1, "V0"], rows.loc[1, "PR"]]], rtol=1e-6)
    assert g.y.item() == pytest.approx(rows.loc[1, "Vref"] - rows.loc[1, "V0"], rel=1e-6)
    assert g.y_true_vref.item() == pytest.approx(rows.loc[1, "Vref"], rel=1e-6)
    assert g.R_internal_val.item() == pytest.approx(r_int, rel=1e-6)
    assert g.atomic_node_attr.shape == (7, 3) and g.field_node_features.shape == (1, 8)
    npz = np.load(os.path.join(tiny_root, "d1", "dimer.npz"))
    np.testing.assert_allclose(g.field_node_features[0, :3].numpy(),
                               npz["dipole"] * 0.20819434 * 0.1, rtol=1e-6)
    # every pair is closer than 12 Angstrom: the radius graph is complete, distances match
    assert g.edge_index_atoms.shape == (2, 7 * 6)
    src, dst = g.edge_index_atoms
    np.testing.assert_allclose(g.edge_attr_atoms[:, 0].numpy(),
                               (g.pos_atoms[src] - g.pos_atoms[dst]).norm(dim=1).numpy(),
                               rtol=1e-6)
    q = npz["quadrupole"]
    np.testing.assert_allclose(g.field_node_features[0, 3:].numpy(),
                               dc.quadrupole_to_l2(q * 0.20819434 * 0.01), rtol=1e-5, atol=1e-9)
    # batching keeps per-graph values in order (and does not offset per-graph integers)
    singles = [ds[0], ds[1], ds[2]]
    batch = batch_of(singles)
    assert batch.u.shape == (3, 4) and batch.field_node_features.shape == (3, 8)
    assert batch.y.shape == (3,)
    assert batch.row_number.tolist() == [2, 3, 4]  # spreadsheet rows
    for i, single in enumerate(singles):
        torch.testing.assert_close(batch.u[i], single.u[0])
        torch.testing.assert_close(batch.y[i], single.y[0])
    n0, n1 = singles[0].edge_index_atoms.size(1), singles[1].edge_index_atoms.size(1)
    torch.testing.assert_close(batch.edge_index_atoms[:, n0:n0 + n1],
                               singles[1].edge_index_atoms + singles[0].num_nodes)


def test_cached_rotation_rotates_stored_harmonics(tiny_root, float64, monkeypatch):
    build_cache(tiny_root, 12.0)
    cache = os.path.join(tiny_root, dc.DEFAULT_CACHE_FILE)
    plain = dc.CachedDimerDataset(cache)
    rotating = dc.CachedDimerDataset(cache, rotate=True)
    rots = [o3.rand_matrix(dtype=torch.float64) for _ in range(len(plain))]
    monkeypatch.setattr(dc, "random_rotation", lambda dtype=None: rots[i].to(dtype))
    for i in range(len(plain)):
        g = rotating[i]
        assert not torch.allclose(g.pos_atoms, plain[i].pos_atoms.to(g.pos_atoms.dtype))
        torch.testing.assert_close(g.pos_atoms, plain[i].pos_atoms.double() @ rots[i].T)
        # the stored harmonics turned by e3nn's own D matrix of the rotation
        d_sh = dc.IRREPS_EDGE_SH.D_from_matrix(rots[i])  # (64, 64)
        expect = plain[i].edge_attr_sh.double() @ d_sh.T
        torch.testing.assert_close(g.edge_attr_sh, expect.to(g.edge_attr_sh.dtype),
                                   rtol=1e-5, atol=1e-5)
        # the dipole turned with the atoms: its angle to the A->B axis is unchanged
        axis0 = plain[i].pos_atoms[3:].mean(0) - plain[i].pos_atoms[:3].mean(0)
        axis1 = g.pos_atoms[3:].mean(0) - g.pos_atoms[:3].mean(0)
        dip0, dip1 = plain[i].field_node_features[0, :3], g.field_node_features[0, :3]
        assert float(axis0 @ dip0) == pytest.approx(  # a dot product: to its factors' scale
            float(axis1 @ dip1), abs=scaled_atol(axis0.norm() * dip0.norm()))


def test_cached_jitter_rebuilds_consistent_graph(tiny_root):
    build_cache(tiny_root, 3.0)  # a small cutoff so that jitter can change the edge set
    cache = os.path.join(tiny_root, dc.DEFAULT_CACHE_FILE)
    plain = dc.CachedDimerDataset(cache)
    ds = dc.CachedDimerDataset(cache, jitter_std=0.02)
    assert ds.internal_cutoff == pytest.approx(0.3)
    changed = 0
    for _ in range(5):
        for i in range(len(ds)):
            g = ds[i]
            pos = g.pos_atoms
            assert not torch.allclose(pos, plain[i].pos_atoms)
            n = pos.size(0)
            want = {(a, b) for a in range(n) for b in range(n)
                    if a != b and float((pos[a] - pos[b]).norm()) < 0.3}  # brute force
            got = {tuple(e) for e in g.edge_index_atoms.t().tolist()}
            assert got == want
            changed += got != {tuple(e) for e in plain[i].edge_index_atoms.t().tolist()}
            vec = dc.edge_vectors(pos, g.edge_index_atoms)
            torch.testing.assert_close(g.edge_attr_atoms[:, 0], vec.norm(dim=1))
            torch.testing.assert_close(g.edge_attr_sh, dc.edge_spherical_harmonics(vec))
    assert changed > 0  # the jitter did move atoms across the cutoff at least once


def test_cache_round_trip_equals_dimer_dataset(tiny_root):
    path = build_cache(tiny_root, 12.0)
    index = torch.load(path, weights_only=True)  # plain types and tensors only
    meta = index["metadata"]
    assert meta["internal_cutoff"] == pytest.approx(1.2)
    assert meta["format_version"] == dc.CACHE_FORMAT_VERSION and meta["n_rows"] == 4
    assert meta["int_angstrom_scale"] == dc.INT_ANGSTROM_SCALE
    cached = dc.CachedDimerDataset(path)
    raw = dc.DimerDataset(tiny_root, 12.0)
    for i in range(4):
        c, r = cached[i], raw[i]
        assert c.id == r.id
        for key in r.keys():
            if key == "id":
                continue
            torch.testing.assert_close(c[key], r[key], rtol=0, atol=0)
        assert c.edge_attr_sh.shape == (r.edge_index_atoms.size(1), 64)
    assert not [f for f in os.listdir(tiny_root) if ".tmp" in f]  # atomic write left nothing


def mapped_from(tensor, path):
    """True when ``tensor``'s memory lies in a mapping of the file ``path`` (/proc/self/maps)."""
    ptr, real = tensor.untyped_storage().data_ptr(), os.path.realpath(path)
    with open("/proc/self/maps") as fh:
        for line in fh:
            fields = line.split()
            if len(fields) >= 6 and fields[5] == real:
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                if lo <= ptr < hi:
                    return True
    return False


def test_cache_shards_round_trip_memory_mapped(tiny_root):
    path = build_cache(tiny_root, 12.0, shard_bytes=1)  # one dimer per shard
    index = torch.load(path, weights_only=True)
    assert [(os.path.basename(s["file"]), s["start"], s["count"]) for s in index["shards"]] == \
        [(f"shard_{k:05d}.pt", k, 1) for k in range(4)]
    shard_dir = os.path.join(tiny_root, "cached_graphs_shards")
    for entry in index["shards"]:
        shard = os.path.join(shard_dir, entry["file"])
        assert entry["bytes"] == os.path.getsize(shard)
        assert entry["sha256"] == hashlib.sha256(open(shard, "rb").read()).hexdigest()
    path2 = build_cache(tiny_root, 12.0, cache_file_name="two.pt", shard_bytes=10 ** 9)
    assert len(torch.load(path2, weights_only=True)["shards"]) == 1  # all four in one shard
    raw = dc.DimerDataset(tiny_root, 12.0)
    for cache_path in (path, path2):
        cached = dc.CachedDimerDataset(cache_path)
        for i in range(4):
            c, r = cached[i], raw[i]
            assert c.id == r.id
            for key in r.keys():
                if key != "id":
                    torch.testing.assert_close(c[key], r[key], rtol=0, atol=0)
        shard_file = cached.cache.shard_path(len(cached.cache.shards) - 1)
        assert mapped_from(cached[3].edge_attr_sh, shard_file)  # a view of the mapped file
    assert not [f for f in os.listdir(shard_dir) if ".tmp" in f]


def test_interrupted_cache_build_continues_where_it_stopped(tiny_root, monkeypatch):
    import preprocess_and_cache
    real, built = dc.make_graph, []

    def make_graph(parsed, *args, **kwargs):
        if len(built) == 3 and not monkeypatch.resumed:
            raise KeyboardInterrupt  # Ctrl-C while building the 4th graph
        built.append(parsed.row["id"])
        return real(parsed, *args, **kwargs)

    monkeypatch.resumed = False
    monkeypatch.setattr(preprocess_and_cache, "make_graph", make_graph)
    with pytest.raises(KeyboardInterrupt):
        build_cache(tiny_root, 12.0, shard_bytes=1)
    assert not os.path.exists(os.path.join(tiny_root, dc.DEFAULT_CACHE_FILE))  # no index yet
    monkeypatch.resumed = True
    path = build_cache(tiny_root, 12.0, shard_bytes=1)
    assert built == ["dimer0", "dimer1", "dimer2", "dimer3"]  # rows 1-3 were not built again
    cache = dc.load_cache(path)
    cache.verify()
    raw = dc.DimerDataset(tiny_root, 12.0)
    torch.testing.assert_close(dc.CachedDimerDataset(cache)[3].pos_atoms, raw[3].pos_atoms)
    build_cache(tiny_root, 10.0, shard_bytes=1)  # other settings: nothing of the old is kept
    assert built[4:] == ["dimer0", "dimer1", "dimer2", "dimer3"]
    assert len(os.listdir(os.path.join(tiny_root, "cached_graphs_shards"))) == 1  # old removed


@pytest.mark.parametrize("damage", ["missing", "truncated", "corrupt"])
def test_a_missing_or_corrupt_shard_is_refused_by_name(tiny_root, capsys, damage):
    cache = dc.load_cache(build_cache(tiny_root, 12.0, shard_bytes=1))
    shard = cache.shard_path(2)  # cached_graphs_shards/build-.../shard_00002.pt
    if damage == "missing":
        os.remove(shard)
        problem = "is missing"
    elif damage == "truncated":
        truncate_file(shard)
        problem = f"has {os.path.getsize(shard)} bytes, the index recorded"
    else:
        data = bytearray(open(shard, "rb").read())
        data[len(data) // 2] ^= 0xFF  # one byte flipped, the size unchanged
        open(shard, "wb").write(bytes(data))
        problem = "is corrupt (its SHA-256 differs"
    with pytest.raises(SystemExit) as exc:
        dc.main(["--root_dir", tiny_root, "--epochs", "1"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"cache shard {shard} {problem}" in err, err
    assert (f"Rebuild it: python preprocess_and_cache.py --root_dir {tiny_root} "
            f"--physical_cutoff 12.0 --cache_file_name cached_graphs.pt") in err
    if damage != "corrupt":  # opened without the check: the reader names it too
        with pytest.raises(ValueError, match=f"cache shard {shard}.*Rebuild it"):
            dc.CachedDimerDataset(os.path.join(tiny_root, dc.DEFAULT_CACHE_FILE))[2]


def test_a_large_set_is_read_from_its_files_not_preloaded(tiny_root, monkeypatch):
    monkeypatch.setattr(dc, "DIMER_PRELOAD_MAX", 3)  # tiny_root's 4 rows count as large
    parsed, rows = [], []
    assert dc.check_dataset(tiny_root, parsed, rows=rows) == (4, [])
    assert parsed == [] and len(rows) == 4
    ds = dc.DimerDataset(tiny_root, 12.0, rows=rows)
    assert ds.parsed is None
    preloaded = dc.DimerDataset(tiny_root, 12.0, preload=True)
    for i in range(4):
        torch.testing.assert_close(ds[i].pos_atoms, preloaded[i].pos_atoms, rtol=0, atol=0)


def test_cache_with_pickled_objects_or_garbage_is_refused(tmp_path):
    path = str(tmp_path / "foreign.pt")
    torch.save({"metadata": Foreign(), "graphs": [], "ids": []}, path)
    with pytest.raises(ValueError, match="cannot be loaded as a DeltaCoupling cache"):
        dc.load_cache(path)
    with open(path, "wb") as fh:
        fh.write(b"not a torch file")
    with pytest.raises(ValueError, match="--rebuild_cache"):
        dc.load_cache(path)


# ----------------------------------------------------------------------------- model
# dV invariant under rotation, translation, permutation; the layer equivariant; the radial basis.
def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


# the tiny dimers' closest contacts (about 1.5-2.5 Angstrom) lie on this switch's ramp
RAMP_SWITCH = [0.1, 0.4]  # internal units: 1 to 4 Angstrom


@pytest.mark.parametrize("switch", [None, RAMP_SWITCH], ids=["unswitched", "dv_switch"])
def test_model_dv_is_invariant_under_rotation_translation_permutation(tiny_root, float64,
                                                                      switch):
    plain = dc.DimerDataset(tiny_root)
    rotated = dc.DimerDataset(tiny_root, augment=True, jitter_std=0.0)
    model = small_model(num_conv_layers=4, dv_switch=switch).double().eval()
    graphs = [plain[i] for i in range(len(plain))]
    ref_batch = batch_of(graphs)
    with torch.no_grad():
        ref = model(ref_batch)  # (B,)
        assert ref.dtype == torch.float64 and ref.shape == (4,)
        assert float(ref.std()) > 1e-6  # the model tells the dimers apart: not a constant
        rot_graphs = [rotated[i] for i in range(len(rotated))]
        assert not torch.allclose(rot_graphs[0].pos_atoms, graphs[0].pos_atoms)
        assert _rel(model(batch_of(rot_graphs)), ref) < 1e-9

        # translation of whole dimers
        moved = batch_of([g.clone() for g in graphs])
        moved.pos_atoms = moved.pos_atoms + torch.tensor([0.3, -1.7, 2.2], dtype=torch.float64)
        assert _rel(model(moved), ref) < 1e-9

        # permutation of the atom order inside each dimer
        perm_graphs = []
        for g in graphs:
            n = g.num_nodes
            perm = torch.randperm(n)
            inv = torch.empty_like(perm)
            inv[perm] = torch.arange(n)
            h = g.clone()
            h.z_atoms, h.pos_atoms = g.z_atoms[perm], g.pos_atoms[perm]
            h.atomic_node_attr = g.atomic_node_attr[perm]
            h.edge_index_atoms = inv[g.edge_index_atoms]
            perm_graphs.append(h)
        assert _rel(model(batch_of(perm_graphs)), ref) < 1e-9

        # negative control: rotating the atoms but not the multipoles must change dV
        wrong = batch_of([g.clone() for g in graphs])
        rot = o3.rand_matrix(dtype=torch.float64)
        wrong.pos_atoms = wrong.pos_atoms @ rot.T
        assert _rel(model(wrong), ref) > 1e-6


@pytest.mark.parametrize("switch", [None, RAMP_SWITCH], ids=["unswitched", "dv_switch"])
def test_model_dv_is_invariant_on_the_cached_rotation_path(tiny_root, float64, switch):
    build_cache(tiny_root, 12.0)  # built in float64 here
    cache = os.path.join(tiny_root, dc.DEFAULT_CACHE_FILE)
    plain = dc.CachedDimerDataset(cache)
    rotating = dc.CachedDimerDataset(cache, rotate=True)
    model = small_model(num_conv_layers=4, dv_switch=switch).double().eval()
    with torch.no_grad():
        ref = model(batch_of([plain[i] for i in range(4)]))
        rot = model(batch_of([rotating[i] for i in range(4)]))
    assert plain[0].edge_attr_sh.dtype == torch.float64
    assert _rel(rot, ref) < 1e-9


def test_contact_switch_is_one_then_smooth_then_exactly_zero(float64):
    on, off = 0.5, 0.9
    x = torch.linspace(0.0, 1.5, 3001)
    s = dc.contact_switch(x, on, off)
    assert torch.all(s[x <= on] == 1.0) and torch.all(s[x >= off] == 0.0)  # exactly
    assert torch.all(s[1:] <= s[:-1])  # monotone: never switches back on
    assert float(dc.contact_switch(torch.tensor(0.7), on, off)) == pytest.approx(0.5, abs=1e-15)
    # continuous first derivative: the slope is 0 at both ends, -1.5 / (off - on) midway
    # (smoothstep: s' = -6 t (1 - t) / (off - on)); autograd against that formula
    xs = torch.tensor([on, on + 1e-9, 0.7, off - 1e-9, off], requires_grad=True)
    (grad,) = torch.autograd.grad(dc.contact_switch(xs, on, off).sum(), xs)
    t = ((xs.detach() - on) / (off - on)).clamp(0, 1)
    torch.testing.assert_close(grad, -6 * t * (1 - t) / (off - on), rtol=0, atol=1e-7)
    assert abs(float(grad[1])) < 1e-7 and abs(float(grad[3])) < 1e-7


def test_dv_switch_scales_dv_by_the_switch_of_each_dimers_contact(tiny_root, float64):
    graphs = [g for g in dc.DimerDataset(tiny_root)]
    contact = torch.cat([g.contact_internal for g in graphs])  # (4,) internal
    closest = [dc.closest_pair(g.pos_atoms[:3].numpy(), g.pos_atoms[3:].numpy())[0]
               for g in graphs]  # water (3 atoms) first, then ammonia
    torch.testing.assert_close(contact, torch.tensor(closest), rtol=0, atol=1e-12)
    plain = small_model()
    on, off = float(contact.min()) + 1e-3, float(contact.max()) - 1e-3  # both kinds in range
    switched = small_model(dv_switch=[on, off])
    switched.load_state_dict(plain.state_dict())  # the same weights: no parameter added
    with torch.no_grad():
        dv, dv_s = plain.eval()(batch_of(graphs)), switched.eval()(batch_of(graphs))
    torch.testing.assert_close(dv_s, dv * dc.contact_switch(contact, on, off), rtol=1e-12,
                               atol=0)
    assert dv_s[contact.argmax()] == 0.0 and dv[contact.argmax()] != 0.0
    assert dv_s[contact.argmin()] == dv[contact.argmin()]
    assert switched.config["dv_switch"] == [on, off] and "dv_switch" not in plain.config
    loaded = dc.DeltaCoupling.from_config(switched.config)  # what a checkpoint rebuilds
    assert loaded.dv_switch == [on, off]
    missing = batch_of(graphs)
    del missing.contact_internal  # a graph of a cache from before the switch
    with pytest.raises(ValueError, match="rebuild the cache"):
        switched(missing)


def scan_dataset(root, separations):
    """One water-ammonia dimer pulled apart along z: a row per centroid separation (Angstrom);
    the field and populations are the same in every row, so only the geometry changes."""
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(5)
    rot_a, rot_b = (o3.rand_matrix(dtype=torch.float64).numpy() for _ in range(2))
    pos_a, pos_b = np.asarray(WATER[1]) @ rot_a.T, np.asarray(AMMONIA[1]) @ rot_b.T
    q = rng.normal(size=(3, 3))
    rows = []
    for i, r in enumerate(separations):
        write_dimer_files(os.path.join(root, f"s{i}"), pos_a, pos_b, np.full((7, 3), 1.0),
                          np.array([0.3, -0.2, 1.1]), q + q.T)
        rows.append({"id": f"R{i}", "pdb_a": f"s{i}/A.pdb", "pdb_b": f"s{i}/B.pdb",
                     "npz": f"s{i}/dimer.npz", "R_nm": r / 10, "theta_deg": 30.0,
                     "V0": -1.0 / r, "Vref": -1.2 / r, "PR": 1.0})
    pd.DataFrame(rows).to_excel(os.path.join(root, "meta.xlsx"), index=False)
    return root


def test_a_scan_past_the_switch_gives_zero_dv_and_no_jump_at_the_graph_cutoff(tmp_path):
    """Along a dissociation scan the unswitched model's dV does not vanish and still changes
    past the point where the 12 Angstrom graph splits into two monomers; the switched one is
    exactly 0 from --switch_off on (the defaults), on both sides of the split."""
    root = scan_dataset(str(tmp_path / "scan"), np.linspace(3.0, 20.0, 171))  # 0.1 A steps
    graphs = list(dc.DimerDataset(root, physical_cutoff=12.0))
    contact = torch.cat([g.contact_internal for g in graphs]) / dc.INT_ANGSTROM_SCALE  # A
    edges_ab = torch.tensor([int(((g.edge_index_atoms[0] < 3) & (g.edge_index_atoms[1] >= 3))
                                 .sum()) for g in graphs])  # A-B edges of each graph
    on, off = dc.DEFAULT_SWITCH_ON_ANGSTROM, dc.DEFAULT_SWITCH_OFF_ANGSTROM
    plain = dc.DeltaCoupling(num_conv_layers=2, num_rbf=8, radial_hidden=16, mlp_hidden=16)
    switched = dc.DeltaCoupling(num_conv_layers=2, num_rbf=8, radial_hidden=16, mlp_hidden=16,
                                dv_switch=[on * 0.1, off * 0.1])
    switched.load_state_dict(plain.state_dict())
    with torch.no_grad():
        dv, dv_s = plain.eval()(batch_of(graphs)), switched.eval()(batch_of(graphs))
    far = contact >= off
    assert far.sum() > 10 and torch.all(dv_s[far] == 0.0)  # exactly zero past the switch
    assert torch.all(dv[far] != 0.0)  # ... where the design's dV is not
    assert torch.all(dv_s[contact <= on] == dv[contact <= on])
    split = int(torch.nonzero(edges_ab == 0)[0])  # the first graph with no A-B edge
    assert 0 < split and edges_ab[split - 1] > 0 and contact[split - 1] > off
    # past the split the unswitched dV still drifts with the separation (the readout reads R
    # in u); the switched one is 0 on both sides of the split, so it cannot jump there
    beyond = dv[split:]
    assert float(beyond.max() - beyond.min()) > 0 and torch.all(dv_s[split - 1:] == 0.0)


def test_main_trains_and_predicts_with_dv_switch(tmp_path, capsys):
    root = write_dataset(str(tmp_path / "data"), 10)
    out = dc.main(["--root_dir", root, "--epochs", "1", "--quiet", *SMALL_RUN,
                   "--dv_switch", "contact", "--switch_on", "1.5", "--switch_off", "2.5"])
    model, ckpt = dc.load_checkpoint(out["best_path"])
    assert ckpt["model_config"]["dv_switch"] == pytest.approx([0.15, 0.25])
    assert model.dv_switch == pytest.approx([0.15, 0.25])
    copy = _copy_data(root, tmp_path / "copy")
    result = dc.main(["--predict", "--checkpoint", out["best_path"], "--root_dir", copy,
                      "--quiet", *ON_CPU])
    table = pd.read_csv(result["predictions_path"])
    assert np.isfinite(table["dV"]).all()
    with pytest.raises(SystemExit) as exc:
        dc.main(["--root_dir", root, "--epochs", "1", "--quiet", *SMALL_RUN,
                 "--dv_switch", "contact", "--switch_off", "15"])
    assert exc.value.code == 2
    assert "--switch_on < --switch_off <= --physical_cutoff" in capsys.readouterr().err


def test_model_accepts_cached_harmonics_and_matches_on_the_fly(tiny_root):
    build_cache(tiny_root, 12.0)
    cached = dc.CachedDimerDataset(os.path.join(tiny_root, dc.DEFAULT_CACHE_FILE))
    model = small_model().eval()
    with torch.no_grad():
        with_sh = model(batch_of([cached[i] for i in range(4)]))
        no_sh = [cached[i] for i in range(4)]
        for g in no_sh:
            del g.edge_attr_sh
        torch.testing.assert_close(model(batch_of(no_sh)), with_sh, rtol=0,
                                   atol=scaled_atol(with_sh, floor=1.0))


def test_bessel_basis_matches_formula_and_vanishes_beyond_cutoff(float64):
    cutoff, k = 1.2, 6
    layer = dc.RadialBesselBasisLayer(k, cutoff)
    r = torch.tensor([0.05, 0.3, 0.77, 1.19, 1.2, 1.3, 5.0])
    out = layer(r)
    assert out.shape == (7, k)
    for i, ri in enumerate(r.tolist()):
        for j in range(k):
            w = (j + 1) * math.pi / cutoff
            want = (math.sin(w * ri) / (w * ri) * 0.5 * (1 + math.cos(math.pi * ri / cutoff))
                    if ri <= cutoff else 0.0)
            assert float(out[i, j]) == pytest.approx(want, abs=1e-12)
    assert torch.all(out[-2:] == 0)
    assert torch.all(torch.isfinite(layer(torch.zeros(1))))  # sinc at r = 0 is 1, not NaN


def test_conv_layer_is_equivariant(float64):
    irreps_attr = o3.Irreps("8x0e")
    conv = dc.PointsConvolutionIntegrated(dc.IRREPS_NODE, irreps_attr, dc.IRREPS_EDGE_SH,
                                          dc.IRREPS_NODE, num_rbf=8, cutoff=1.2, radial_hidden=16)
    pos = torch.randn(6, 3) * 0.3
    edge_index = dc.radius_graph(pos, 1.2)
    x = dc.IRREPS_NODE.randn(6, -1)
    attr = torch.randn(6, 8)

    def run(x_in, pos_in):
        vec = dc.edge_vectors(pos_in, edge_index)
        return conv(x_in, attr, edge_index[0], edge_index[1], dc.edge_spherical_harmonics(vec),
                    vec.norm(dim=1))

    rot = o3.rand_matrix(dtype=torch.float64)
    d_node = dc.IRREPS_NODE.D_from_matrix(rot)
    torch.testing.assert_close(run(x @ d_node.T, pos @ rot.T), run(x, pos) @ d_node.T,
                               rtol=1e-9, atol=1e-10)


# ----------------------------------------------------------------------------- fast path
# The dense kernels compute e3nn's function: same dV and gradients, and under bf16 autocast.
@pytest.mark.parametrize("cached", [False, True])
def test_fast_path_computes_the_same_function_as_e3nn_modules(tiny_root, cached):
    """Dense kernels over one harmonic copy vs e3nn's modules one by one over the four tiled
    copies (the straightforward implementation): same dV within 1e-5 and the same gradients
    within 1e-4, float32, default configuration, with the same weights and inputs."""
    if cached:
        build_cache(tiny_root, 12.0)
        graphs = dc.CachedDimerDataset(os.path.join(tiny_root, dc.DEFAULT_CACHE_FILE),
                                       rotate=True)
    else:
        graphs = dc.DimerDataset(tiny_root, augment=True)
    batch = batch_of([graphs[i] for i in range(4)])
    batch.u = batch.u.reshape(-1, dc.U_DIM)
    model = dc.DeltaCoupling()
    assert all(conv.fast_kernels is not None for conv in model.convs)

    def run(fast):
        model.use_fast_path(fast).zero_grad()
        dv = model(batch)
        (dv * torch.arange(1.0, 5.0)).sum().backward()
        return dv.detach(), {n: p.grad for n, p in model.named_parameters()}

    dv_fast, grad_fast = run(True)
    dv_ref, grad_ref = run(False)
    assert dv_ref.abs().max() > 1e-3
    torch.testing.assert_close(dv_fast, dv_ref, atol=1e-5, rtol=0)
    assert grad_fast.keys() == grad_ref.keys()
    for name, g_ref in grad_ref.items():  # within 1e-4 of each gradient's own scale
        assert g_ref is not None and grad_fast[name] is not None, name
        scale = float(g_ref.abs().max())
        assert scale > 0, name  # every parameter, message path included, takes part
        assert float((grad_fast[name] - g_ref).abs().max()) <= 1e-4 * scale, name


@pytest.mark.parametrize("cached", [False, True])
def test_fast_path_runs_under_bf16_autocast(tiny_root, cached):
    """The AMP path of training on a GPU (bf16 autocast), here on the CPU: the dense kernels
    mix dtypes without errors, dV stays close to float32 and the gradients are finite."""
    if cached:
        build_cache(tiny_root, 12.0)
        graphs = dc.CachedDimerDataset(os.path.join(tiny_root, dc.DEFAULT_CACHE_FILE))
    else:
        graphs = dc.DimerDataset(tiny_root)
    batch = batch_of([graphs[i] for i in range(4)])
    model = dc.DeltaCoupling()
    pred32, _ = dc.predict_batch(model, batch.clone())
    pred16, _ = dc.predict_batch(model, batch.clone(), amp_dtype=torch.bfloat16)
    assert pred16.dtype == torch.float32  # back in the data's dtype
    torch.testing.assert_close(pred16.detach(), pred32.detach(), atol=1e-2, rtol=1e-2)
    pred16.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# ----------------------------------------------------------------------------- losses & metrics
# Losses and metrics against hand-computed values; the metrics table's layout.
def test_losses_zero_on_perfect_prediction_and_hand_example():
    true = torch.tensor([-1.0, -2.0, 0.5])
    r = torch.tensor([0.3, 0.3, 0.6])
    assert float(dc.distance_weighted_l1_on_vref_loss(true.clone(), true, r)) == 0.0
    assert float(dc.mape_loss_fn(true.clone(), true)) == 0.0
    pred = torch.tensor([-1.5, -2.0, 1.5])  # |err| = 0.5, 0, 1
    # w = R / mean(R) = [0.75, 0.75, 1.5]; sum w|e| = 0.375 + 1.5 = 1.875; sum w = 3
    assert float(dc.distance_weighted_l1_on_vref_loss(pred, true, r)) == pytest.approx(0.625)
    # equal R: plain L1
    assert float(dc.distance_weighted_l1_on_vref_loss(pred, true, torch.full((3,), 0.4))) == \
        pytest.approx(0.5)
    # MAPE = 100 * mean(0.5/1, 0/2, 1/0.5) = 100 * 2.5 / 3
    assert float(dc.mape_loss_fn(pred, true)) == pytest.approx(250.0 / 3, rel=1e-6)


def test_regression_metrics_and_table_against_hand_computed_values():
    pred = np.array([-1.5, -2.0, 1.5, 9.0])
    true = np.array([-1.0, -2.0, 0.5, np.nan])  # the last row has no Vref: left out
    v0 = np.array([-1.25, -3.0, 0.5, 7.0])
    m = dc.regression_metrics(pred[:3], true[:3], v0[:3])
    # model errors -0.5, 0, 1; baseline errors -0.25, -1, 0
    assert m["n"] == 3
    assert m["model"] == pytest.approx({"mape": 100 * (0.5 / 1 + 0 + 1 / 0.5) / 3, "mae": 0.5,
                                        "rmse": math.sqrt(1.25 / 3), "max_abs": 1.0}, rel=1e-6)
    assert m["baseline"] == pytest.approx({"mape": 100 * (0.25 / 1 + 1 / 2 + 0) / 3,
                                           "mae": 1.25 / 3, "rmse": math.sqrt(1.0625 / 3),
                                           "max_abs": 1.0}, rel=1e-6)
    report = dc.metrics_report({"test": {"id": ["a", "b", "c", "d"], "pred": pred, "true": true,
                                         "v0": v0},
                                "empty": {"id": ["d"], "pred": pred[3:], "true": true[3:],
                                          "v0": v0[3:]}},
                               {"a": "g1", "b": "g1", "c": "g2", "d": "g2"})
    assert list(report) == ["test"]  # a split without any Vref is omitted
    assert report["test"]["model"] == m["model"]
    g1, g2 = report["test"]["groups"]["g1"], report["test"]["groups"]["g2"]
    assert g1["n"] == 2 and g1["model"] == pytest.approx(
        {"mape": 25.0, "mae": 0.25, "rmse": math.sqrt(0.125), "max_abs": 0.5}, rel=1e-6)
    assert g1["baseline"] == pytest.approx(
        {"mape": 37.5, "mae": 0.625, "rmse": math.sqrt(1.0625 / 2), "max_abs": 1.0}, rel=1e-6)
    assert g2["n"] == 1 and g2["model"]["max_abs"] == 1.0 and g2["baseline"]["mae"] == 0.0
    table = dc.format_metrics_table(report).splitlines()
    assert "V0 + dV (model)" in table[0] and "V0 alone (baseline)" in table[0]
    assert table[1].split() == ["split", "n", "|", "MAPE", "%", "MAE", "RMSE", "max|err|", "|",
                                "MAPE", "%", "MAE", "RMSE", "max|err|"]
    assert table[2].split() == ["test", "3", "|", "83.33", "0.5000", "0.6455", "1.0000", "|",
                                "25.00", "0.4167", "0.5951", "1.0000"]
    assert table[3].split()[:3] == ["g1", "2", "|"] and table[3].startswith("  g1")
    assert table[4].split()[3] == "200.00"
    assert len({len(line) for line in table[1:]}) == 1  # aligned columns


def test_spearman_correlation_by_hand_with_and_without_ties():
    # ranks of b: [1, 3, 2, 4]; sum d^2 = 2; rho = 1 - 6 * 2 / (4 * (16 - 1)) = 0.8
    assert dc.spearman_correlation([1, 2, 3, 4], [10, 30, 20, 40]) == pytest.approx(0.8)
    # ties share their mean rank: ranks [1.5, 1.5, 3] and [1, 2, 3]; r = 1.5 / sqrt(1.5 * 2)
    assert dc.spearman_correlation([1, 1, 2], [5, 6, 7]) == pytest.approx(1.5 / math.sqrt(3))
    assert dc.spearman_correlation([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(dc.spearman_correlation([1, 1, 1], [1, 2, 3]))  # constant: undefined


def test_calibration_figures_of_a_calibrated_and_an_over_confident_ensemble():
    from statistics import NormalDist
    n = 1000
    std = np.linspace(0.1, 2.0, n)[::-1].copy()  # (n,) various stds
    # calibrated: the i-th row needs exactly the confidence (i - 0.5) / n, so the observed
    # fraction inside every Gaussian interval is the expected one up to the step of 1 / n
    z = np.array([NormalDist().inv_cdf((1 + (i - 0.5) / n) / 2) for i in range(1, n + 1)])
    error = z * std * np.where(np.arange(n) % 2, 1.0, -1.0)  # (n,) signs do not matter
    np.testing.assert_allclose(dc.interval_confidences(error, std),
                               (np.arange(1, n + 1) - 0.5) / n, atol=1e-9)
    u = dc.uncertainty_metrics(error, std)
    assert u["n"] == n
    assert u["within_1std"] == pytest.approx(0.683, abs=1e-3)  # erf(1 / sqrt 2) = 0.6827
    assert u["within_2std"] == pytest.approx(0.954, abs=1.5e-3)  # erf(2 / sqrt 2) = 0.9545
    # F is a staircase through the diagonal: each step leaves two triangles, area 1 / (4 n)
    assert u["miscalibration_area"] == pytest.approx(1 / (4 * n), rel=1e-6)
    expected, observed = dc.calibration_curve(dc.interval_confidences(error, std))
    assert np.abs(observed - expected).max() <= 1.0 / n + 1e-12
    # over-confident: every error is 3 std; all rows need c0 = erf(3 / sqrt 2) = 0.99730
    c0 = math.erf(3 / math.sqrt(2))
    u = dc.uncertainty_metrics(3 * std, std)
    assert (u["within_1std"], u["within_2std"]) == (0.0, 0.0)
    # F = 0 below c0 and 1 above: area = c0^2 / 2 + (1 - c0)^2 / 2
    assert u["miscalibration_area"] == pytest.approx(c0 ** 2 / 2 + (1 - c0) ** 2 / 2, rel=1e-9)
    assert u["spearman"] == pytest.approx(1.0)  # |error| grows with std: ranked perfectly
    # and an error of 0 with std 0 is inside every interval
    assert dc.interval_confidences([0.0, 1.0], [0.0, 0.0]).tolist() == [0.0, 1.0]


def test_two_members_mean_and_std_by_hand():
    one = {"id": ["a", "b", "c"], "pred": np.array([1.0, 2.0, 5.0]),
           "true": np.array([1.5, 2.0, np.nan]), "v0": np.array([0.0, 1.0, 2.0])}
    two = {**one, "pred": np.array([3.0, 2.0, 4.0])}
    ens = dc.ensemble_rows([one, two])
    assert ens["id"] == ["a", "b", "c"]
    np.testing.assert_allclose(ens["pred"], [2.0, 2.0, 4.5])
    # sample std (ddof 1) of two values: |a - b| / sqrt(2)
    np.testing.assert_allclose(ens["std"], [2 / math.sqrt(2), 0.0, 1 / math.sqrt(2)])
    np.testing.assert_array_equal(ens["members"], [[1.0, 2.0, 5.0], [3.0, 2.0, 4.0]])
    # a row that failed in one member (absent there) is left out; order follows the first
    partial = {"id": ["c", "a"], "pred": np.array([4.0, 3.0]), "true": one["true"][[2, 0]],
               "v0": one["v0"][[2, 0]]}
    ens = dc.ensemble_rows([one, partial])
    assert ens["id"] == ["a", "c"]
    np.testing.assert_allclose(ens["pred"], [2.0, 4.5])
    report = dc.metrics_report({"all": dc.ensemble_rows([one, two])})
    assert report["all"]["n"] == 2  # c has no Vref
    assert report["all"]["uncertainty"]["within_1std"] == 1.0  # errors 0.5 and 0 vs 1.41, 0
    with pytest.raises(ValueError, match="at least 2 members"):
        dc.ensemble_rows([one])


# ----------------------------------------------------------------------------- training engine
# run_epoch: failed batches skipped and counted, or stopping the run; metrics per graph; AMP.
class PoisonIds(torch.nn.Module):
    """The model, with dV = NaN for every batch that holds one of ``ids``."""

    def __init__(self, model, ids):
        super().__init__()
        self.inner, self.ids = model, set(ids)

    def forward(self, data):
        out = self.inner(data)
        return out * float("nan") if self.ids & set(data.id) else out


@pytest.mark.parametrize("bad_ids, n_skipped", [
    (["dimer2"], 1), (["dimer0", "dimer3"], 2)])  # one batch; exactly half: counted, goes on
def test_run_epoch_skips_and_counts_nonfinite_batches(tiny_root, bad_ids, n_skipped):
    loader = DataLoader(dc.DimerDataset(tiny_root), batch_size=1)
    model = small_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    logged = []
    res = dc.run_epoch(PoisonIds(model, bad_ids), loader, torch.device("cpu"), opt,
                       log=logged.append)
    assert (res.n_batches, res.n_skipped, res.n_graphs) == (4, n_skipped, 4 - n_skipped)
    assert [ids for ids, _ in res.skipped] == [[i] for i in bad_ids]
    assert len(logged) == n_skipped and "NonFiniteLossError" in logged[0]
    assert bad_ids[0] in logged[0]
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())  # no NaN step
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())  # trained
    with pytest.raises(dc.NonFiniteLossError):
        dc.run_epoch(PoisonIds(model, bad_ids), loader, torch.device("cpu"), opt,
                     skip_failed_batches=False)


@pytest.mark.parametrize("bad_ids", [["dimer1", "dimer2", "dimer3"],
                                     ["dimer0", "dimer1", "dimer2", "dimer3"]])
def test_run_epoch_stops_when_more_than_half_the_batches_fail(tiny_root, bad_ids):
    loader = DataLoader(dc.DimerDataset(tiny_root), batch_size=1)
    model = small_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with pytest.raises(dc.TooManyFailedBatchesError) as exc:
        dc.run_epoch(PoisonIds(model, bad_ids), loader, torch.device("cpu"), opt,
                     log=lambda msg: None)
    msg = str(exc.value)
    assert f"{len(bad_ids)} of 4 batches" in msg and "more than half" in msg
    assert f"dimer ids ['{bad_ids[0]}']: NonFiniteLossError: loss is nan" in msg
    with torch.no_grad():  # evaluation follows the same rule
        with pytest.raises(dc.TooManyFailedBatchesError, match=bad_ids[0]):
            dc.run_epoch(PoisonIds(model, bad_ids), loader, torch.device("cpu"),
                         log=lambda msg: None)


class PoisonGradient(PoisonIds):
    """The model, with a finite dV but a NaN gradient for every batch that holds one of
    ``ids`` (a hook on dV)."""

    def forward(self, data):
        out = self.inner(data)
        if self.ids & set(data.id):
            out.register_hook(lambda grad: grad * float("nan"))
        return out


class FailsWith(PoisonIds):
    """The model, raising ``error`` for every batch that holds one of ``ids``."""

    def __init__(self, model, ids, error):
        super().__init__(model, ids)
        self.error = error

    def forward(self, data):
        if self.ids & set(data.id):
            raise self.error
        return self.inner(data)


def test_a_nonfinite_gradient_of_a_finite_loss_is_skipped_without_a_step(tiny_root):
    """The batch whose gradient is NaN (its loss is finite) is counted and skipped like a NaN
    loss: the weights end as those of the same epoch without that batch."""
    items = [dc.DimerDataset(tiny_root)[i] for i in range(4)]
    model, plain = small_model(), small_model()
    plain.load_state_dict(model.state_dict())
    logged = []
    result = dc.run_epoch(PoisonGradient(model, ["dimer1"]), DataLoader(items, batch_size=1),
                          torch.device("cpu"), torch.optim.Adam(model.parameters(), lr=1e-2),
                          log=logged.append)
    assert (result.n_batches, result.n_skipped, result.n_graphs) == (4, 1, 3)
    assert result.skipped[0][0] == ["dimer1"] and math.isfinite(result.loss)
    assert "NonFiniteGradientError: loss is " in logged[0] and "but its gradient has NaN" in \
        logged[0]
    dc.run_epoch(plain, DataLoader(items[:1] + items[2:], batch_size=1), torch.device("cpu"),
                 torch.optim.Adam(plain.parameters(), lr=1e-2), skip_failed_batches=False)
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0)
    # one step alone: refused before the optimizer touches a weight
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    pred = dc.predict_batch(PoisonGradient(model, ["dimer1"]), batch_of(items[1:2]))[0]
    with pytest.raises(dc.NonFiniteGradientError):
        dc.optimizer_step(pred.abs().sum(), optimizer)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(p.grad is None for p in model.parameters())


def test_the_first_failed_batch_of_a_run_writes_its_traceback_once(tiny_root, tmp_path):
    loader = DataLoader(dc.DimerDataset(tiny_root), batch_size=1)
    model = small_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    log_path = str(tmp_path / "models" / dc.FAILED_BATCHES_LOG)
    logged = []
    dc.run_epoch(PoisonIds(model, ["dimer1", "dimer3"]), loader, torch.device("cpu"), optimizer,
                 log=logged.append, traceback_path=log_path)
    with open(log_path) as fh:
        text = fh.read()
    assert text.startswith("the first failed batch of this run (epoch): dimer ids ['dimer1']")
    assert "Traceback (most recent call last)" in text and "in run_epoch" in text
    assert "NonFiniteLossError: loss is nan" in text and "dimer3" not in text
    assert logged[0].endswith(f"(full traceback in {log_path})")
    assert "full traceback" not in logged[1]  # the second: its line only
    with torch.no_grad():  # a later pass of the same run leaves the first traceback
        dc.run_epoch(PoisonIds(model, ["dimer0"]), loader, torch.device("cpu"),
                     log=logged.append, traceback_path=log_path)
    with open(log_path) as fh:
        assert fh.read() == text


@pytest.mark.parametrize("bad_ids, stops", [(["dimer0", "dimer2"], False),
                                            (["dimer1", "dimer2", "dimer3"], True)])
def test_prediction_follows_the_same_failed_batch_rule(tiny_root, bad_ids, stops):
    """A NaN prediction fails its batch; more than half failing stops, as in training."""
    loader = DataLoader(dc.DimerDataset(tiny_root), batch_size=1)
    logged = []
    if stops:
        with pytest.raises(dc.TooManyFailedBatchesError) as exc:
            dc.predict_rows(PoisonIds(small_model(), bad_ids), loader, torch.device("cpu"),
                            log=logged.append)
        assert (f"3 of 4 batches of this prediction failed (more than half); the first failed "
                f"batch holds dimer ids ['dimer1']: NonFinitePredictionError") in str(exc.value)
        return
    rows = dc.predict_rows(PoisonIds(small_model(), bad_ids), loader, torch.device("cpu"),
                           log=logged.append)
    assert rows["id"] == ["dimer1", "dimer3"] and np.isfinite(rows["pred"]).all()
    assert len(logged) == 2 and "NonFinitePredictionError" in logged[0]


@pytest.mark.parametrize("error", [RuntimeError("mat1 and mat2 shapes cannot be multiplied"),
                                   RuntimeError("CUDA error: an illegal memory access"),
                                   ValueError("batch u has 3 values")])
def test_a_bug_in_one_batch_is_not_hidden_as_a_skipped_batch(tiny_root, error):
    """Only NaN/Inf and out-of-memory failures are skipped; a programming error propagates
    from training, evaluation and prediction even with skipping on."""
    loader = DataLoader(dc.DimerDataset(tiny_root), batch_size=1)
    model = FailsWith(small_model(), ["dimer2"], error)
    with pytest.raises(type(error), match=str(error)):
        dc.run_epoch(model, loader, torch.device("cpu"),
                     torch.optim.Adam(model.parameters(), lr=1e-3), log=lambda msg: None)
    with torch.no_grad(), pytest.raises(type(error)):
        dc.run_epoch(model, loader, torch.device("cpu"), log=lambda msg: None)
    with pytest.raises(type(error)):
        dc.predict_rows(model, loader, torch.device("cpu"), log=lambda msg: None)
    oom = FailsWith(small_model(), ["dimer2"], torch.OutOfMemoryError("CUDA out of memory"))
    result = dc.run_epoch(oom, loader, torch.device("cpu"),
                          torch.optim.Adam(oom.parameters(), lr=1e-3), log=lambda msg: None)
    assert result.n_skipped == 1 and "OutOfMemoryError" in result.skipped[0][1]


def test_a_failed_scaled_step_is_skipped_and_the_next_batches_train(tiny_root):
    """With a GradScaler (fp16 AMP) an optimizer step that raises skips its batch only: the
    other batches train exactly as a run without that batch and without scaling (SGD, whose
    update would show gradients left scaled by 65536)."""
    graphs = dc.DimerDataset(tiny_root)
    items = [graphs[i] for i in range(4)]
    model = small_model()
    plain = small_model()
    plain.load_state_dict(model.state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    real_step, calls = optimizer.step, []

    def step_failing_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("optimizer step failed: out of memory")
        return real_step(*args, **kwargs)

    optimizer.step = step_failing_once
    result = dc.run_epoch(model, DataLoader(items, batch_size=1), torch.device("cpu"),
                          optimizer, scaler=torch.amp.GradScaler("cpu"), log=lambda msg: None)
    assert (result.n_skipped, result.n_graphs, len(calls)) == (1, 3, 4)
    assert "optimizer step failed" in result.skipped[0][1]
    dc.run_epoch(plain, DataLoader(items[1:], batch_size=1), torch.device("cpu"),
                 torch.optim.SGD(plain.parameters(), lr=1e-3), skip_failed_batches=False)
    for p_scaled, p_plain in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(p_scaled, p_plain, rtol=1e-4, atol=1e-6)


def test_run_epoch_metrics_are_weighted_by_graphs(tiny_root):
    ds = dc.DimerDataset(tiny_root)
    model = small_model()
    res = dc.run_epoch(model, DataLoader(ds, batch_size=3), torch.device("cpu"),
                       skip_failed_batches=False)
    rows = dc.predict_rows(model, DataLoader(ds, batch_size=4), torch.device("cpu"))
    pred, true, v0 = rows["pred"], rows["true"], rows["v0"]
    assert res.n_graphs == 4
    # batches of 3 and of 4: the same predictions up to float32 rounding of |Vref|
    assert_figures_close({"mae": res.mae, "rmse": res.rmse, "mape": res.mape},
                         {"mae": float(np.abs(pred - true).mean()),
                          "rmse": float(np.sqrt(((pred - true) ** 2).mean())),
                          "mape": float(100 * np.mean(np.abs(pred - true) / np.abs(true)))},
                         figure_tolerances(true, v0, pred))
    assert res.baseline_mae == pytest.approx(float(np.abs(v0 - true).mean()),
                                             abs=scaled_atol(v0, true))


def test_amp_settings(monkeypatch):
    assert dc.amp_settings(torch.device("cpu")) == (None, False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert dc.amp_settings(torch.device("cuda")) == (torch.bfloat16, False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert dc.amp_settings(torch.device("cuda")) == (torch.float16, True)


# On a machine with a GPU: the AMP and compile paths a --device cuda run takes.
@needs_cuda
@pytest.mark.skipif(CUDA and not torch.cuda.is_bf16_supported(), reason="no bfloat16 on this GPU")
def test_cuda_bf16_training_step_is_finite_and_close_to_fp32(tiny_root):
    cuda = torch.device("cuda")
    items = [dc.DimerDataset(tiny_root)[i] for i in range(4)]
    batch = batch_of(items).to(cuda)
    model = small_model().to(cuda)

    def forward_backward(amp_dtype):
        model.zero_grad(set_to_none=True)
        pred, v0 = dc.predict_batch(model, batch.clone(), amp_dtype)  # (4,), (4,) float32
        loss = dc.distance_weighted_l1_on_vref_loss(pred, batch.y_true_vref, batch.R_internal_val)
        loss.backward()
        grad = torch.cat([p.grad.reshape(-1).float() for p in model.parameters()])
        return (pred - v0).detach(), loss.detach(), grad

    dv32, loss32, grad32 = forward_backward(None)
    dv16, loss16, grad16 = forward_backward(torch.bfloat16)
    assert torch.isfinite(dv16).all() and torch.isfinite(loss16) and torch.isfinite(grad16).all()
    # bfloat16 keeps about 3 significant digits: a few percent after a few layers
    scale = dv32.abs().max().item()
    torch.testing.assert_close(dv16, dv32, rtol=0.05, atol=0.05 * scale)
    assert loss16.item() == pytest.approx(loss32.item(), rel=0.05)
    assert torch.nn.functional.cosine_similarity(grad16, grad32, dim=0) > 0.9
    optimizer = dc.make_optimizer(model, 1e-3, cuda)  # and whole training steps
    result = dc.run_epoch(model, DataLoader(items, batch_size=2), cuda, optimizer,
                          amp_dtype=torch.bfloat16, skip_failed_batches=False)
    assert result.n_graphs == 4 and math.isfinite(result.loss)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@needs_cuda
def test_cuda_fp16_gradscaler_path_trains(tiny_root):
    """float16 autocast with a GradScaler (GPUs before compute capability 8.0): the scaler
    skips steps with Inf gradients while it finds its scale; steps are taken, weights finite."""
    cuda = torch.device("cuda")
    loader = DataLoader(dc.DimerDataset(tiny_root), batch_size=1)
    model = small_model().to(cuda)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = dc.make_optimizer(model, 1e-3, cuda)
    scaler = torch.amp.GradScaler("cuda")
    for _ in range(5):  # at most 5 x 4 steps: the scale halves on every step it skips
        result = dc.run_epoch(model, loader, cuda, optimizer, scaler=scaler,
                              amp_dtype=torch.float16, skip_failed_batches=False)
        assert result.n_graphs == 4 and math.isfinite(result.loss)
        if any(not torch.equal(b, p) for b, p in zip(before, model.parameters())):
            break
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert 0 < scaler.get_scale() <= 65536.0


@needs_cuda
def test_cuda_compile_runs_inductor_and_matches_eager(tiny_root):
    cuda = torch.device("cuda")
    batch = batch_of([dc.DimerDataset(tiny_root, augment=True)[i] for i in range(4)]).to(cuda)
    model = small_model().to(cuda)
    with torch.no_grad():
        dv_eager = dc.predict_batch(model.eval(), batch.clone())[0]
    assert dc.resolve_compile_backend("auto", cuda) in ("inductor", "aot_eager")
    assert dc.try_compile(model, dc.resolve_compile_backend("auto", cuda), batch)
    with torch.no_grad():
        dv_compiled = dc.predict_batch(model.eval(), batch.clone())[0]
    # float32 matmuls run as TF32 on the GPU (precision "high"): about 3 digits either way
    torch.testing.assert_close(dv_compiled, dv_eager, rtol=1e-2,
                               atol=1e-2 * dv_eager.abs().max().item())


# ----------------------------------------------------------------------------- main
# Splits, compile, cache checks, atomic files, resume, main() end to end, report, --predict.
# --- splits
@pytest.mark.parametrize("n", list(range(1, 13)) + [100])
def test_splits_disjoint_covering_sized(n):
    rows = [{"id": str(i)} for i in range(n)]
    train, val, test, _ = dc.make_splits(rows, seed=3)
    assert sorted(train + val + test) == list(range(n))
    assert not (set(train) & set(val) or set(train) & set(test) or set(val) & set(test))
    want = {1: (1, 0, 0), 2: (1, 1, 0), 10: (8, 1, 1), 11: (9, 1, 1), 12: (10, 1, 1),
            100: (80, 10, 10)}.get(n, (n - 2, 1, 1))
    assert (len(train), len(val), len(test)) == want
    assert dc.make_splits(rows, seed=3)[:3] == (train, val, test)  # seeded


def test_group_split_keeps_groups_together():
    rows = [{"id": str(i), "group": f"g{i // 5}"} for i in range(110)]  # like S22x5
    train, val, test, rule = dc.make_splits(rows, seed=42)
    assert "group" in rule
    for part_a, part_b in ((train, val), (train, test), (val, test)):
        assert not {rows[i]["group"] for i in part_a} & {rows[i]["group"] for i in part_b}
    assert (len(train), len(val), len(test)) == (90, 10, 10)
    # a partly filled group column: rows without a group are groups of their own
    rows[7] = {"id": "7"}
    train, val, test, _ = dc.make_splits(rows, seed=1)
    assert sorted(train + val + test) == list(range(110))
    for part_a, part_b in ((train, val), (train, test), (val, test)):
        assert not {rows[i].get("group") for i in part_a} & \
            {rows[i].get("group") for i in part_b} - {None}


@pytest.mark.parametrize("n_rows, groups, k", [(12, True, 3), (12, True, 4), (11, False, 5),
                                               (7, True, 3)])
def test_cv_folds_disjoint_by_group_and_cover_every_row_once(n_rows, groups, k):
    rows = [{"id": f"r{i}", **({"group": f"g{i // 3}"} if groups else {})}
            for i in range(n_rows)]
    folds = dc.make_cv_folds(rows, k, seed=3)
    assert len(folds) == k
    tests = [i for _, _, test, _ in folds for i in test]
    assert sorted(tests) == list(range(n_rows))  # every row in exactly one test part
    group = dc.row_groups(rows)
    n_groups = len(set(group))
    sizes = [len({group[i] for i in test}) for _, _, test, _ in folds]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == n_groups
    for train, val, test, rule in folds:
        assert sorted(train + val + test) == list(range(n_rows))  # a partition of the rows
        parts = [{group[i] for i in part} for part in (train, val, test)]
        assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
        assert train and (val or len(parts[0]) == 1)  # validation from the training part
        assert rule.startswith("fold ")
    assert dc.make_cv_folds(rows, k, seed=3) == folds  # seeded
    with pytest.raises(ValueError, match=f"needs 2 to {n_groups} folds"):
        dc.make_cv_folds(rows, n_groups + 1)


# --- compile
def test_compile_backend_choice(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(dc, "CPU_AUTO_COMPILE", {"linux": "inductor"})
    monkeypatch.setattr(dc.shutil, "which", lambda name: f"/usr/bin/{name}")
    for platform, on_cpu, on_cuda in (("linux", "inductor", "inductor"),
                                      ("win32", None, "aot_eager"), ("darwin", None, "inductor")):
        monkeypatch.setattr(dc.sys, "platform", platform)
        assert dc.resolve_compile_backend("auto", cpu) == on_cpu, platform
        assert dc.resolve_compile_backend("auto", cuda) == on_cuda, platform
    monkeypatch.setattr(dc.sys, "platform", "linux")
    assert dc.resolve_compile_backend("auto", cpu, dc.CPU_COMPILE_MIN_EPOCHS) == "inductor"
    assert dc.resolve_compile_backend("auto", cpu, dc.CPU_COMPILE_MIN_EPOCHS - 1) is None
    assert dc.resolve_compile_backend("auto", cuda, 10) == "inductor"  # short: still on a GPU
    monkeypatch.setattr(dc.shutil, "which", lambda name: None)  # no C++ compiler: eager
    assert dc.resolve_compile_backend("auto", cpu) is None
    assert dc.resolve_compile_backend("off", cuda) is None
    assert dc.resolve_compile_backend("aot_eager", cpu) == "aot_eager"
    with pytest.raises(ValueError, match="unknown --compile"):
        dc.resolve_compile_backend("fast", cpu)


SLOW = os.environ.get("DELTA_COUPLING_SLOW_TESTS") == "1"


@pytest.mark.parametrize("backend", [
    "aot_eager",
    pytest.param("inductor", marks=pytest.mark.skipif(
        not SLOW, reason="inductor compiles C++ (about a minute): DELTA_COUPLING_SLOW_TESTS=1"))])
def test_compiled_forward_matches_eager_and_falls_back_on_failure(tiny_root, backend):
    """try_compile's probe compiles forward_tensors; the compiled model gives eager's dV and
    gradients. A backend that fails leaves it eager."""
    graphs = dc.DimerDataset(tiny_root, augment=True)
    batch = batch_of([graphs[i] for i in range(4)])
    model = small_model()

    def run():
        model.zero_grad()
        dv = dc.predict_batch(model, batch.clone())[0]
        dv.sum().backward()
        return dv.detach(), [p.grad.clone() for p in model.parameters()]

    dv_eager, grad_eager = run()
    assert dc.try_compile(model, backend, batch)
    assert model._compiled is not None
    dv_comp, grad_comp = run()
    torch.testing.assert_close(dv_comp, dv_eager, atol=1e-5, rtol=1e-5)
    for g_c, g_e in zip(grad_comp, grad_eager):
        torch.testing.assert_close(g_c, g_e, atol=1e-4, rtol=1e-4)
    def recompile_fails(*inputs):  # as a recompilation for a new batch shape that fails
        raise torch._dynamo.exc.BackendCompilerFailed(recompile_fails,
                                                      AssertionError("codegen failed"), None)

    model._compiled = recompile_fails
    with pytest.warns(UserWarning, match="failed on this batch shape, running eager"):
        torch.testing.assert_close(run()[0], dv_eager, atol=1e-6, rtol=0)
    assert model._compiled is None
    with pytest.warns(UserWarning, match=r"torch.compile\(no_such_backend\) failed, running eager"):
        assert not dc.try_compile(model, "no_such_backend", batch)
    assert model._compiled is None
    torch.testing.assert_close(run()[0], dv_eager, atol=1e-6, rtol=0)


# --- the cache and atomic files
def test_main_refuses_cache_of_changed_data(tiny_root, capsys):
    build_cache(tiny_root, 12.0)
    with open(os.path.join(tiny_root, "d2", "B.pdb"), "a") as fh:
        fh.write("REMARK edited after the cache was built\n")
    with pytest.raises(SystemExit):
        dc.main(["--root_dir", tiny_root, "--epochs", "1", *ON_CPU])
    assert "data_sha256: meta.xlsx or one of the PDB/NPZ files" in capsys.readouterr().err


def test_main_exits_with_clear_message_on_cutoff_mismatch(tiny_root, capsys):
    build_cache(tiny_root, 10.0)
    with pytest.raises(SystemExit) as exc:
        dc.main(["--root_dir", tiny_root, "--epochs", "1", "--physical_cutoff", "12", *ON_CPU])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "internal_cutoff: saved 1.0, current data and settings need 1.2" in err
    assert "--rebuild_cache" in err


def test_main_explains_missing_cache_builder(tiny_root, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "preprocess_and_cache", None)  # import now fails
    with pytest.raises(SystemExit):
        dc.main(["--root_dir", tiny_root, "--epochs", "1", *ON_CPU])
    assert "cannot import build_cache from preprocess_and_cache.py" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["truncated", "foreign tensor", "pickled object", "cutoff",
                                  "scale", "format version", "no data checksum", "meta.xlsx",
                                  "pdb", "npz"])
def test_main_refuses_a_bad_cache_with_the_rebuild_command(tiny_root, capsys, name):
    cache = build_cache(tiny_root, 12.0)
    payload = torch.load(cache, weights_only=True)
    if name == "truncated":
        truncate_file(cache)
        problem = "cannot be loaded as a DeltaCoupling cache"
    elif name == "foreign tensor":
        torch.save(torch.zeros(3), cache)
        problem = "is not a DeltaCoupling cache"
    elif name == "pickled object":
        payload["metadata"]["note"] = Foreign()
        torch.save(payload, cache)
        problem = "cannot be loaded as a DeltaCoupling cache"
    elif name in ("cutoff", "scale", "format version", "no data checksum"):
        key, value, problem = {
            "cutoff": ("internal_cutoff", 1.0, "internal_cutoff: saved 1.0, current data and "
                                               "settings need 1.2"),
            "scale": ("int_angstrom_scale", 1.0, "int_angstrom_scale: saved 1.0, current data "
                                                 "and settings need 0.1"),
            "format version": ("format_version", 0, "format_version: saved 0, this code reads "
                                                    f"{dc.CACHE_FORMAT_VERSION}"),
            "no data checksum": ("data_sha256", None, "data_sha256: saved None")}[name]
        payload["metadata"][key] = value
        torch.save(payload, cache)
    elif name == "meta.xlsx":
        set_cell(tiny_root, "V0", -7.5, row=2)
        problem = "data_sha256: meta.xlsx or one of the PDB/NPZ files it names has changed"
    elif name == "pdb":
        with open(os.path.join(tiny_root, "d2", "A.pdb"), "a") as fh:
            fh.write("REMARK edited after the cache was built\n")
        problem = "data_sha256: meta.xlsx or one of the PDB/NPZ files it names has changed"
    else:
        rewrite_npz(tiny_root, dipole=np.array([0.1, 0.2, 0.3]))
        problem = "data_sha256: meta.xlsx or one of the PDB/NPZ files it names has changed"
    with pytest.raises(SystemExit) as exc:
        dc.main(["--root_dir", tiny_root, "--epochs", "1", *ON_CPU])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert cache in err and problem in err, err
    assert (f"Rebuild it: python preprocess_and_cache.py --root_dir {tiny_root} "
            f"--physical_cutoff 12.0 --cache_file_name cached_graphs.pt, or run again with "
            f"--rebuild_cache") in err
    assert not os.path.exists(os.path.join(tiny_root, "models"))  # nothing trained


def test_rebuild_cache_replaces_a_stale_cache(tiny_root):
    build_cache(tiny_root, 10.0)
    cache = dc.prepare_cache(dc.build_arg_parser().parse_args(
        ["--root_dir", tiny_root, "--rebuild_cache"]), dc.read_meta(tiny_root))
    assert cache.metadata["internal_cutoff"] == pytest.approx(1.2)
    assert torch.load(os.path.join(tiny_root, dc.DEFAULT_CACHE_FILE),
                      weights_only=True)["metadata"]["internal_cutoff"] == pytest.approx(1.2)


def test_atomic_save_failure_mid_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    dc.atomic_torch_save({"epoch": 1, "w": torch.arange(4.0)}, path)
    before = open(path, "rb").read()
    real_save = torch.save

    def crash_mid_write(obj, f):
        real_save(obj, f)
        f.truncate(10)  # half written ...
        raise OSError("disk full")  # ... then the failure

    monkeypatch.setattr(torch, "save", crash_mid_write)
    with pytest.raises(OSError, match="disk full"):
        dc.atomic_torch_save({"epoch": 2, "w": torch.zeros(4)}, path)
    undo_interrupt(monkeypatch)
    assert open(path, "rb").read() == before
    assert torch.load(path, weights_only=True)["epoch"] == 1
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temp file left behind
    dc.atomic_torch_save({"epoch": 3}, path)  # and a later save goes through
    assert torch.load(path, weights_only=True)["epoch"] == 3


def test_atomic_write_json_is_strict_and_leaves_no_temp_file(tmp_path):
    path = str(tmp_path / "out" / "h.json")
    dc.atomic_write_json([{"epoch": 1, "val_mape": float("nan"), "pair": (1, 2)}], path)
    with open(path) as fh:
        text = fh.read()
    assert "NaN" not in text and json.loads(text) == [{"epoch": 1, "val_mape": None,
                                                       "pair": [1, 2]}]
    assert os.listdir(tmp_path / "out") == ["h.json"]


# --- outputs that cannot be written: one line naming the path, exit 2, no earlier file lost
def disk_full_for(monkeypatch, name):
    """Simulate a full disk for the atomic write of the file ``name``: its temp file takes half
    of the first write, then the write fails with ENOSPC; every other file is written."""
    real_open = builtins.open

    class FullDisk:
        def __init__(self, fh):
            self.fh = fh

        def write(self, data):
            self.fh.write(data[:len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, attr):
            return getattr(self.fh, attr)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

    def open_(file, mode="r", *args, **kwargs):
        fh = real_open(file, mode, *args, **kwargs)
        if ("w" in mode and isinstance(file, (str, os.PathLike))
                and os.path.basename(file).startswith(f".{name}.tmp.")):
            return FullDisk(fh)
        return fh

    monkeypatch.setattr(builtins, "open", open_)


def snapshot(root):
    """{relative path: bytes} of every file under root."""
    files = {}
    for folder, _, names in os.walk(root):
        for name in names:
            with open(os.path.join(folder, name), "rb") as fh:
                files[os.path.relpath(os.path.join(folder, name), root)] = fh.read()
    return files


def one_line_error(capsys, argv):
    """Run main(argv): it must exit 2 with one error line (no traceback); return that line."""
    with pytest.raises(SystemExit) as exc:
        dc.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and lines[0] == err.strip().splitlines()[-1], err
    return lines[0]


def test_a_full_disk_at_fsync_keeps_the_old_file_and_leaves_no_temp_file(tmp_path,
                                                                         monkeypatch):
    path = str(tmp_path / "metrics.json")
    dc.atomic_write_json({"run": 1}, path)

    def fsync_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dc.os, "fsync", fsync_full)
    with pytest.raises(dc.OutputError) as exc:
        dc.atomic_write_json({"run": 2}, path)
    assert str(exc.value) == (f"cannot write {path}: No space left on device; free disk space "
                              f"or write to another --root_dir")
    assert os.listdir(tmp_path) == ["metrics.json"]
    with open(path) as fh:
        assert json.load(fh) == {"run": 1}


@pytest.mark.parametrize("target, extra, stage", [
    ("cached_graphs.pt", ["--rebuild_cache"], ""),
    (dc.BEST_CHECKPOINT, [], "epoch 1: "),
    (dc.RESUME_CHECKPOINT, [], "epoch 1: "),
    ("val_final_delta_learning.png", [], ""),
    (dc.FINAL_CHECKPOINT, [], ""),
])
def test_a_full_disk_stops_training_with_one_line_and_keeps_every_earlier_file(
        trained_run, tmp_path, monkeypatch, capsys, target, extra, stage):
    root = str(tmp_path / "again")
    shutil.copytree(trained_run["root"], root)  # data, cache, models and plots of a run
    before = snapshot(root)
    folder = {"cached_graphs.pt": "", "val_final_delta_learning.png": "plots"}.get(target,
                                                                                    "models")
    path = os.path.join(root, folder, target)
    assert path[len(root) + 1:] in before  # an earlier run's file, which must survive
    disk_full_for(monkeypatch, target)
    line = one_line_error(capsys, ["--root_dir", root, "--epochs", "1", *SMALL_MODEL_ARGS,
                                   *extra])
    assert line == (f"error: {stage}cannot write {path}: No space left on device; free disk "
                    f"space or write to another --root_dir")
    after = snapshot(root)
    assert after[path[len(root) + 1:]] == before[path[len(root) + 1:]]
    assert not [f for f in after if ".tmp." in f], list(after)


@pytest.mark.parametrize("case", ["models is a file", "plots is a file", "cache is a folder",
                                  "models not writable"])
def test_an_output_folder_that_cannot_be_made_stops_before_training(tiny_root, monkeypatch,
                                                                     capsys, case):
    models, plots = os.path.join(tiny_root, "models"), os.path.join(tiny_root, "plots")
    cache = os.path.join(tiny_root, dc.DEFAULT_CACHE_FILE)
    extra = []
    if case == "models is a file":
        write_text(tiny_root, "models", "not a folder")
        want = f"cannot create the folder {models}: File exists; a file is in the way"
    elif case == "plots is a file":
        write_text(tiny_root, "plots", "not a folder")
        want = f"cannot create the folder {plots}: File exists; a file is in the way"
    elif case == "cache is a folder":
        os.makedirs(cache)
        extra = ["--rebuild_cache"]
        want = f"cannot write {cache}: Is a directory; a folder is in the way of the file"
    else:  # root bypasses file permissions, so the refusal is simulated
        real_makedirs = os.makedirs

        def makedirs(name, *args, **kwargs):
            if os.path.abspath(name) == models:
                raise PermissionError(errno.EACCES, "Permission denied", name)
            return real_makedirs(name, *args, **kwargs)

        monkeypatch.setattr(dc.os, "makedirs", makedirs)
        want = f"cannot create the folder {models}: Permission denied; make the folder writable"
    line = one_line_error(capsys, ["--root_dir", tiny_root, "--epochs", "1", *SMALL_RUN,
                                   *extra])
    assert line.startswith(f"error: {want}"), line
    assert not os.path.exists(os.path.join(models, dc.RESUME_CHECKPOINT))  # no epoch ran


def test_predict_outputs_that_cannot_be_written(trained_run, tmp_path, monkeypatch, capsys):
    best = trained_run["result"]["best_path"]
    root = _copy_data(trained_run["root"], tmp_path / "data")
    csv = os.path.join(root, dc.PREDICTIONS_FILE)
    write_text(root, dc.PREDICTIONS_FILE, "an earlier prediction\n")
    disk_full_for(monkeypatch, dc.PREDICTIONS_FILE)
    argv = ["--predict", "--checkpoint", best, "--root_dir", root, "--quiet", *ON_CPU]
    assert one_line_error(capsys, argv) == (f"error: cannot write {csv}: No space left on "
                                            f"device; free disk space or write to another "
                                            f"--root_dir")
    with open(csv) as fh:
        assert fh.read() == "an earlier prediction\n"
    assert not [f for f in os.listdir(root) if ".tmp." in f]
    undo_interrupt(monkeypatch)  # the full disk
    os.remove(csv)
    os.makedirs(csv)
    assert one_line_error(capsys, argv).startswith(f"error: cannot write {csv}: Is a directory")


# --- files holding anything but tensors and plain types are refused, never run
class RunsACommand:
    """Unpickling this object runs a shell command that creates ``marker``: what a tampered
    checkpoint, cache or resume file could do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        code = f"open({self.marker!r}, 'w').close()"
        return os.system, (f"{shlex.quote(sys.executable)} -c {shlex.quote(code)}",)


@pytest.mark.parametrize("kind", ["a DeltaCoupling checkpoint", "a DeltaCoupling cache",
                                  "a resume state"])
def test_a_tampered_file_is_refused_without_running_it_or_advice_to_run_it(tiny_root, tmp_path,
                                                                           capsys, kind):
    proof = str(tmp_path / "the_payload_works")
    pickle.loads(pickle.dumps(RunsACommand(proof)))  # an ordinary unpickling runs it
    assert os.path.exists(proof)
    marker = str(tmp_path / "the_payload_ran")
    payload = RunsACommand(marker)
    if kind == "a DeltaCoupling checkpoint":
        path = str(tmp_path / "tampered.pt")
        torch.save({"model_state": {}, "model_config": {}, "metadata": {"note": payload}}, path)
        argv = ["--predict", "--checkpoint", path, "--root_dir", tiny_root, *ON_CPU]
    elif kind == "a DeltaCoupling cache":
        path = build_cache(tiny_root, 12.0)
        cache = torch.load(path, weights_only=True)
        cache["metadata"]["note"] = payload
        torch.save(cache, path)
        argv = ["--root_dir", tiny_root, "--epochs", "1", *ON_CPU]
    else:
        path = str(tmp_path / "resume.pt")
        torch.save({"format_version": dc.RESUME_FORMAT_VERSION, "config": payload}, path)
        argv = ["--resume", path, *ON_CPU]
    with pytest.raises(SystemExit) as exc:
        dc.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"{path} cannot be loaded as {kind}: it holds a pickled Python object (" in err, err
    assert ".system), not only tensors and plain types; loading such a file could run code, " \
           "so it is refused" in err, err
    assert "weights_only" not in err and "Traceback" not in err, err
    assert not os.path.exists(marker)


# --- interrupting and resuming
SMALL_RUN = [*ON_CPU, "--num_conv_layers", "2", "--num_rbf", "8", "--radial_hidden", "16",
             "--mlp_hidden", "16", "--batch_size", "2", "--no-skip_failed_batches"]


def undo_interrupt(monkeypatch):
    """Undo interrupt_at_epoch (and every other patch), then keep the tests eager again."""
    monkeypatch.undo()
    monkeypatch.setattr(dc, "CPU_AUTO_COMPILE", {})


def interrupt_at_epoch(monkeypatch, epoch):
    """Make the training ``run_epoch`` of ``epoch`` raise KeyboardInterrupt (Ctrl-C)."""
    real, calls = dc.run_epoch, []

    def run_epoch(model, loader, device, optimizer=None, *args, **kwargs):
        if optimizer is not None:
            calls.append(1)
            if len(calls) == epoch:
                raise KeyboardInterrupt
        return real(model, loader, device, optimizer, *args, **kwargs)

    monkeypatch.setattr(dc, "run_epoch", run_epoch)


@pytest.mark.parametrize("schedule", [["--schedule", "spec"], ["--schedule", "anneal"],
                                      ["--schedule", "anneal", "--ema", "0.9"]],
                         ids=["spec", "anneal", "anneal-ema"])
def test_ctrl_c_then_resume_reproduces_the_uninterrupted_run(schedule, tmp_path, monkeypatch,
                                                             capsys):
    straight = write_dataset(str(tmp_path / "straight"), 5)
    resumed = str(tmp_path / "resumed")
    shutil.copytree(straight, resumed)
    run = ["--epochs", "4", *schedule, *SMALL_RUN]
    dc.main(["--root_dir", straight, *run])

    interrupt_at_epoch(monkeypatch, 3)
    with pytest.raises(SystemExit) as exc:
        dc.main(["--root_dir", resumed, *run])
    assert exc.value.code == 130
    state_path = os.path.join(resumed, "models", dc.RESUME_CHECKPOINT)
    err = capsys.readouterr().err
    assert f"the state after epoch 2 is in {state_path}" in err
    assert f"continue with: python delta_coupling.py --resume {state_path}" in err
    state = torch.load(state_path, weights_only=True)
    assert state["epoch"] == 2 and state["config"]["epochs"] == 4
    assert not os.path.exists(os.path.join(resumed, "models", dc.FINAL_CHECKPOINT))
    undo_interrupt(monkeypatch)

    out = dc.main(["--resume", state_path, *ON_CPU])  # root_dir, epochs, model: saved
    assert "resumed from" in capsys.readouterr().out
    one = torch.load(os.path.join(straight, "models", dc.RESUME_CHECKPOINT), weights_only=True)
    two = torch.load(state_path, weights_only=True)
    assert one["epoch"] == two["epoch"] == 4
    assert (one["best"], one["best_epoch"], one["stale"]) == \
        (two["best"], two["best_epoch"], two["stale"])
    assert one["best_epoch"] == out["best_epoch"]
    for key, value in one["model_state"].items():
        assert_tensors_close(two["model_state"][key], value, key)
    for k, v in one["optimizer_state"]["state"].items():  # Adam moments and step count too
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert_tensors_close(two["optimizer_state"]["state"][k][name], v[name], name)
    assert one["scheduler_state"]["last_epoch"] == two["scheduler_state"]["last_epoch"] > 0
    assert (one["ema_state"] is None) == (two["ema_state"] is None) == ("--ema" not in schedule)
    if one["ema_state"] is not None:  # the weights' average goes on where it was
        assert one["ema_state"]["n_updates"] == two["ema_state"]["n_updates"] > 0
        for a, b in zip(one["ema_state"]["average"], two["ema_state"]["average"]):
            assert_tensors_close(b, a)
    assert torch.equal(one["rng_torch"], two["rng_torch"])  # the same augmentations were drawn
    final = [torch.load(os.path.join(r, "models", dc.FINAL_CHECKPOINT), weights_only=True)
             for r in (straight, resumed)]
    assert_figures_close(final[1]["final_metrics"]["val"]["model"],
                         final[0]["final_metrics"]["val"]["model"],
                         meta_figure_tolerances(straight))
    # the learning curves of the resumed run cover all four epochs, as the straight run's
    assert [h["epoch"] for h in final[1]["history"]] == [1, 2, 3, 4]
    losses = [h["train_loss"] for h in final[0]["history"]]  # weighted |error|s: Vref's scale
    assert [h["train_loss"] for h in final[1]["history"]] == \
        pytest.approx(losses, rel=0, abs=meta_figure_tolerances(straight)["mae"])
    # a parameter that moved between epochs 2 and 4: resuming did train
    assert any(not torch.allclose(state["model_state"][k], v)
               for k, v in two["model_state"].items() if v.is_floating_point())


def test_resume_takes_the_saved_options_but_not_one_off_ones(tmp_path):
    saved = vars(dc.build_arg_parser().parse_args(
        ["--root_dir", str(tmp_path), "--epochs", "7", "--rebuild_cache", "--device", "cuda:1",
         "--log_every", "3"]))
    path = str(tmp_path / "state.pt")
    torch.save({"format_version": dc.RESUME_FORMAT_VERSION, "config": saved}, path)
    args, _ = dc.parse_main_args(["--resume", path])
    assert (args.root_dir, args.epochs, args.log_every) == (str(tmp_path), 7, 3)
    assert not args.rebuild_cache and args.device == "auto"  # one-off choices of that call


@pytest.mark.parametrize("option, value", [("--log_every", "0"), ("--batch_size", "0"),
                                           ("--epochs", "-3"), ("--physical_cutoff", "0"),
                                           ("--lr", "nan")])
def test_non_positive_numbers_are_refused_by_the_parser(option, value, capsys):
    with pytest.raises(SystemExit) as exc:
        dc.build_arg_parser().parse_args([option, value])
    assert exc.value.code == 2
    assert f"argument {option}: {value} is not a positive" in capsys.readouterr().err


def test_resume_refuses_other_options_data_and_foreign_files(tmp_path, monkeypatch, capsys):
    root = write_dataset(str(tmp_path / "data"), 5)
    interrupt_at_epoch(monkeypatch, 2)
    with pytest.raises(SystemExit):
        dc.main(["--root_dir", root, "--epochs", "3", *SMALL_RUN])
    undo_interrupt(monkeypatch)
    state_path = os.path.join(root, "models", dc.RESUME_CHECKPOINT)
    capsys.readouterr()

    def refused(argv, *fragments):
        with pytest.raises(SystemExit) as exc:
            dc.main(argv)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and all(f in err for f in fragments), err

    refused(["--resume", state_path, "--epochs", "10"],
            "--epochs 10 (saved run: 3)", "Leave them out to resume")
    refused(["--resume", state_path, "--lr", "0.1"], "--lr 0.1 (saved run: 0.001)")
    refused(["--resume", str(tmp_path / "nope.pt")], "file not found")
    best = os.path.join(root, "models", dc.BEST_CHECKPOINT)
    refused(["--resume", best], "is not a resume state")
    pickled = str(tmp_path / "pickled.pt")
    torch.save({"format_version": 1, "config": Foreign()}, pickled)
    refused(["--resume", pickled], "cannot be loaded as a resume state")
    set_cell(root, "Vref", 1.25, row=0)  # the data changed since the state was saved
    refused(["--resume", state_path, "--rebuild_cache", *ON_CPU], "does not match this data",
            "data_sha256: meta.xlsx or one of the PDB/NPZ files")


def test_ctrl_c_in_the_first_epoch_says_nothing_to_resume(tmp_path, monkeypatch, capsys):
    root = write_dataset(str(tmp_path / "data"), 3)
    interrupt_at_epoch(monkeypatch, 1)
    with pytest.raises(SystemExit) as exc:
        dc.main(["--root_dir", root, "--epochs", "2", *SMALL_RUN])
    assert exc.value.code == 130
    assert "nothing to resume" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(root, "models", dc.RESUME_CHECKPOINT))


def test_main_stops_when_most_batches_are_nan(tmp_path, monkeypatch, capsys):
    root = write_dataset(str(tmp_path / "data"), 5)
    monkeypatch.setattr(dc, "distance_weighted_l1_on_vref_loss",
                        lambda pred, true, r: (pred - true).abs().mean() * float("nan"))
    with pytest.raises(SystemExit) as exc:
        dc.main(["--root_dir", root, "--epochs", "2", *SMALL_RUN[:-1]])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "epoch 1: 2 of 2 batches of this epoch failed" in err and "dimer ids ['dimer" in err


def test_a_validation_pass_with_a_failed_batch_never_becomes_the_best_epoch(tmp_path,
                                                                            monkeypatch, capsys):
    """Epoch 2's validation skipped a batch and scores a perfect MAPE over the dimers left: it
    covers fewer dimers than the other epochs, so it is not taken as the best."""
    root = write_dataset(str(tmp_path / "data"), 5)
    real, val_calls = dc.run_epoch, []

    def run_epoch(model, loader, device, optimizer=None, *args, **kwargs):
        result = real(model, loader, device, optimizer, *args, **kwargs)
        if optimizer is None:
            val_calls.append(1)
            if len(val_calls) == 2:
                result.mape, result.mae = 0.0, 0.0
                result.n_batches, result.n_skipped = result.n_batches + 1, 1
        return result

    monkeypatch.setattr(dc, "run_epoch", run_epoch)
    out = dc.main(["--root_dir", root, "--epochs", "3", *SMALL_RUN])
    assert out["history"][1]["val_mape"] == 0.0 and out["best_epoch"] in (1, 3)
    assert out["best_monitor"] > 0
    assert "epoch 2: val MAPE 0 is not taken as the best: 1 of its 2 batches failed" in \
        capsys.readouterr().out
    best = torch.load(out["best_path"], weights_only=True)
    assert best["epoch"] == out["best_epoch"] and best["val_mape"] == out["best_monitor"]


def test_main_writes_the_first_failed_batch_traceback_next_to_checkpoints_and_predictions(
        tmp_path, monkeypatch, capsys):
    root = write_dataset(str(tmp_path / "data"), 5)
    rows = dc.read_meta(root)
    bad = rows[dc.make_splits(rows, dc.DEFAULT_SEED)[0][0]]["id"]  # a training dimer
    real = dc.predict_batch

    def predict_batch(model, data, amp_dtype=None):  # NaN for the batch of ``bad``
        pred, v0 = real(model, data, amp_dtype)
        return (pred * float("nan") if bad in data.id else pred), v0

    monkeypatch.setattr(dc, "predict_batch", predict_batch)
    skipping = [*ON_CPU, "--num_conv_layers", "2", "--num_rbf", "8", "--radial_hidden", "16",
                "--mlp_hidden", "16", "--batch_size", "1"]
    out = dc.main(["--root_dir", root, "--epochs", "2", *skipping])  # 1 of 3 batches fails
    log = os.path.join(root, "models", dc.FAILED_BATCHES_LOG)
    with open(log) as fh:
        text = fh.read()
    assert text.startswith(f"the first failed batch of this run (epoch): dimer ids ['{bad}']")
    assert "Traceback (most recent call last)" in text and "NonFiniteLossError" in text
    stdout = capsys.readouterr().out
    assert (f"skipped batch ids ['{bad}'] in this epoch: NonFiniteLossError: loss is nan "
            f"(full traceback in {log})") in stdout
    assert stdout.count("full traceback in") == 1  # epoch 2 and the final report: ids only
    assert f"skipped batch ids ['{bad}'] in this train evaluation" in stdout
    assert out["final_metrics"]["train"]["n"] == 2
    # --predict: the same rule, its log next to predictions.csv
    result = dc.main(["--predict", "--checkpoint", out["best_path"], "--root_dir", root,
                      "--quiet", *skipping])
    predict_log = os.path.join(root, dc.PREDICTION_FAILED_BATCHES_LOG)
    with open(predict_log) as fh:
        assert "NonFinitePredictionError" in fh.read()
    table = pd.read_csv(result["predictions_path"], keep_default_na=False, na_values=[""])
    assert table["Vref_pred"].isna().tolist() == [i == bad for i in table["id"]]
    # a new run starts without the earlier run's log
    undo_interrupt(monkeypatch)
    dc.main(["--root_dir", root, "--epochs", "1", *skipping])
    assert not os.path.exists(log)


# --- end to end
def test_training_reads_each_dimer_once(tiny_root, monkeypatch):
    """The data check's parsed dimers (and its meta.xlsx rows) serve the cache build and the
    training dataset."""
    import preprocess_and_cache
    calls, meta_reads = [], []
    real, real_read_meta = dc.parse_dimer, dc.read_meta

    def counting(root_dir, row):
        calls.append(row["id"])
        return real(root_dir, row)

    def counting_read_meta(root_dir, *args, **kwargs):
        meta_reads.append(root_dir)
        return real_read_meta(root_dir, *args, **kwargs)

    monkeypatch.setattr(dc, "parse_dimer", counting)
    monkeypatch.setattr(preprocess_and_cache, "parse_dimer", counting)
    monkeypatch.setattr(dc, "read_meta", counting_read_meta)
    dc.main(["--root_dir", tiny_root, "--epochs", "1", "--quiet", *SMALL_RUN[:-1]])
    assert meta_reads == [tiny_root]  # meta.xlsx is read once, by the data check
    assert sorted(calls) == sorted(r["id"] for r in real_read_meta(tiny_root))


@needs_cuda
def test_cuda_main_trains_under_amp_and_its_checkpoint_predicts_on_the_cpu(tmp_path):
    root = write_dataset(str(tmp_path / "gpu"), 5)
    out = dc.main(["--root_dir", root, "--epochs", "2", "--device", "cuda", "--compile", "off",
                   *SMALL_RUN[len(ON_CPU):]])
    with open(os.path.join(root, "models", dc.RUN_CONFIG_FILE)) as fh:
        assert json.load(fh)["device"].startswith("cuda")
    assert out["best_epoch"] in (1, 2) and math.isfinite(out["best_monitor"])
    pred = dc.main(["--predict", "--checkpoint", out["best_path"], "--root_dir", root,
                    "--quiet", *ON_CPU])
    table = pd.read_csv(pred["predictions_path"])
    assert len(table) == 5 and table["Vref_pred"].notna().all()


def test_schedule_spec_gives_the_designs_arguments():
    args, _ = dc.parse_main_args(["--schedule", "spec"])
    assert (args.epochs, args.batch_size, args.physical_cutoff, args.num_conv_layers,
            args.num_rbf, args.lr, args.apply_augmentations, args.patience, args.ema) == \
        (1500, 5, 12.0, 6, 50, 1e-3, True, 250, 0.0)
    assert os.path.samefile(args.root_dir, S22X5_DIR)


def test_main_end_to_end_and_best_checkpoint_reproduces_val(tmp_path):
    root = write_dataset(str(tmp_path / "e2e"), 12, groups=False)
    out = dc.main(["--root_dir", root, "--epochs", "2", *ON_CPU, "--num_conv_layers", "2",
                   "--num_rbf", "8", "--radial_hidden", "16", "--mlp_hidden", "16",
                   "--batch_size", "4", "--no-skip_failed_batches"])
    for rel in ("models/best_model_delta_learning.pt", "models/final_model_delta_learning.pt",
                "plots/test_final_delta_learning.png", "plots/val_final_delta_learning.png",
                "cached_graphs.pt"):
        assert os.path.getsize(os.path.join(root, rel)) > 0, rel
    model, ckpt = dc.load_checkpoint(out["best_path"])
    assert ckpt["config"]["epochs"] == 2 and ckpt["metadata"]["internal_cutoff"] == pytest.approx(1.2)
    ids = dc.CachedDimerDataset(os.path.join(root, "cached_graphs.pt")).ids
    val_idx = [ids.index(i) for i in ckpt["split_ids"]["val"]]
    assert len(val_idx) == 1 and len(ckpt["split_ids"]["train"]) == 10
    ds = dc.CachedDimerDataset(os.path.join(root, "cached_graphs.pt"))
    res = dc.run_epoch(model, DataLoader(torch.utils.data.Subset(ds, val_idx), batch_size=4),
                       torch.device("cpu"), skip_failed_batches=False)
    tol = meta_figure_tolerances(root)
    assert res.mape == pytest.approx(ckpt["val_mape"], rel=0, abs=tol["mape"])
    final_model, final = dc.load_checkpoint(os.path.join(root, "models",
                                                         "final_model_delta_learning.pt"))
    assert final["weights_from_epoch"] == out["best_epoch"] and final["last_epoch"] == 2
    for key, value in model.state_dict().items():
        torch.testing.assert_close(final_model.state_dict()[key], value, rtol=0, atol=0)
    assert final["final_metrics"]["val"]["model"]["mape"] == pytest.approx(res.mape, rel=0,
                                                                             abs=tol["mape"])
    assert final["final_metrics"]["val"]["baseline"]["mae"] == pytest.approx(res.baseline_mae,
                                                                               rel=0,
                                                                               abs=tol["mae"])
    with open(os.path.join(root, "models", "split_ids.json")) as fh:
        assert json.load(fh)["val"] == ckpt["split_ids"]["val"]


# --- the final report, plots and --predict
SMALL_MODEL_ARGS = [*ON_CPU, "--num_conv_layers", "2", "--num_rbf", "8", "--radial_hidden", "16",
                    "--mlp_hidden", "16", "--batch_size", "4"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """One 2-epoch training on 12 grouped dimers, stdout/stderr captured (not terminals)."""
    import contextlib
    import io

    root = write_dataset(str(tmp_path_factory.mktemp("trained") / "data"), 12, groups=True)
    out, err = io.StringIO(), io.StringIO()
    torch.manual_seed(0)
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        result = dc.main(["--root_dir", root, "--epochs", "2", "--no-skip_failed_batches"]
                         + SMALL_MODEL_ARGS)
    return {"root": root, "result": result, "stdout": out.getvalue(), "stderr": err.getvalue()}


def test_main_writes_metrics_report_curves_history_and_run_config(trained_run):
    root, result = trained_run["root"], trained_run["result"]
    models = os.path.join(root, "models")
    from matplotlib.image import imread
    for name in ("learning_curves.png", "val_final_delta_learning.png",
                 "test_final_delta_learning.png"):
        assert imread(os.path.join(root, "plots", name)).shape[0] > 100, name
    with open(os.path.join(models, "metrics.json")) as fh:
        metrics = json.load(fh)
    assert set(metrics) == {"train", "val", "test"}
    assert (metrics["train"]["n"], metrics["val"]["n"], metrics["test"]["n"]) == (6, 3, 3)
    for split in metrics.values():
        for who in ("model", "baseline"):
            assert set(split[who]) == {"mape", "mae", "rmse", "max_abs"}
        assert len(split["groups"]) == split["n"] // 3  # groups of three rows
    # independent check: the val figures from run_epoch over the cached val graphs
    model, ckpt = dc.load_checkpoint(result["best_path"])
    ds = dc.CachedDimerDataset(os.path.join(root, "cached_graphs.pt"))
    val_idx = [ds.ids.index(i) for i in ckpt["split_ids"]["val"]]
    res = dc.run_epoch(model, DataLoader(torch.utils.data.Subset(ds, val_idx), batch_size=2),
                       torch.device("cpu"), skip_failed_batches=False)
    tol = meta_figure_tolerances(root)
    assert metrics["val"]["model"]["mae"] == pytest.approx(res.mae, rel=0, abs=tol["mae"])
    assert metrics["val"]["baseline"]["rmse"] == pytest.approx(res.baseline_rmse, rel=0,
                                                               abs=tol["rmse"])
    # history: one record per epoch, in the final checkpoint too
    with open(os.path.join(models, "history.json")) as fh:
        history = json.load(fh)
    assert [h["epoch"] for h in history] == [1, 2]
    assert set(history[0]) == {"epoch", "train_loss", "val_mape", "val_mae", "lr", "seconds"}
    final = torch.load(os.path.join(models, "final_model_delta_learning.pt"), weights_only=True)
    assert final["history"][1]["val_mape"] == pytest.approx(history[1]["val_mape"])
    assert min(h["val_mape"] for h in history) == pytest.approx(ckpt["val_mape"])
    # reproducibility record
    with open(os.path.join(models, "run_config.json")) as fh:
        run = json.load(fh)
    with open(os.path.join(models, "split_ids.json")) as fh:
        split = json.load(fh)
    assert run["args"]["seed"] == 42 and run["args"]["epochs"] == 2
    assert run["model_config"] == ckpt["model_config"]
    assert run["versions"]["torch"] == str(torch.__version__) == ckpt["versions"]["torch"]
    assert {"python", "torch_geometric", "e3nn", "numpy", "pandas", "matplotlib"} <= \
        set(run["versions"])
    assert run["split"] == split and run["split"]["test"] == ckpt["split_ids"]["test"]
    assert run["data_sha256"] == ds.metadata["data_sha256"] and run["device"].startswith("cpu")


def test_progress_bar_and_log_lines_when_output_is_no_terminal(trained_run):
    err, out = trained_run["stderr"], trained_run["stdout"]
    assert "building cache: 100%" in err and "training: 100%" in err and "2/2" in err
    assert "best val MAPE" in err  # the bar's postfix
    assert "%|" not in out  # the bar stays on stderr
    assert "epoch     1  train loss" in out and "epoch     2  train loss" in out
    assert "V0 + dV (model)" in out and "\ntest " in out


def _copy_data(root, dest):
    """The data files of ``root`` (no models, plots or cache) in a new folder."""
    import shutil
    shutil.copytree(root, dest, ignore=shutil.ignore_patterns("models", "plots", "*.pt"))
    return str(dest)


def test_predict_csv_equals_a_direct_forward_pass(trained_run, tmp_path, capsys):
    best = trained_run["result"]["best_path"]
    root = _copy_data(trained_run["root"], tmp_path / "same")
    out = dc.main(["--predict", "--checkpoint", best, "--root_dir", root, "--quiet", *ON_CPU])
    assert "building graphs" not in capsys.readouterr().err  # --quiet: no bar
    table = pd.read_csv(out["predictions_path"], keep_default_na=False, na_values=[""])
    assert list(table.columns) == ["id", "V0", "dV", "Vref_pred", "Vref", "error", "split"]
    model, ckpt = dc.load_checkpoint(best)
    ds = dc.DimerDataset(root, ckpt["metadata"]["physical_cutoff"])
    with torch.no_grad():
        dv = model.eval()(batch_of([ds[i] for i in range(len(ds))])).double().numpy()  # (12,)
    meta = pd.read_excel(os.path.join(root, "meta.xlsx"))
    assert table["id"].tolist() == meta["id"].tolist()
    # batches of 5 against one of 12: float32 rounding of the activations (dV) and of V0 + dV
    np.testing.assert_allclose(table["dV"], dv, rtol=0, atol=scaled_atol(dv, floor=1.0))
    atol = scaled_atol(meta["V0"], meta["Vref"], dv, floor=1.0)
    np.testing.assert_allclose(table["Vref_pred"], meta["V0"] + dv, rtol=0, atol=atol)
    np.testing.assert_allclose(table["error"], meta["V0"] + dv - meta["Vref"], rtol=0, atol=atol)
    # the same data as training: each row carries its split, and the report has them all
    split_of = {i: s for s, ids in ckpt["split_ids"].items() for i in ids}
    assert table["split"].tolist() == [split_of[i] for i in table["id"]]
    with open(os.path.join(root, "predictions_metrics.json")) as fh:
        report = json.load(fh)
    assert set(report) == {"all", "train", "val", "test"} and report["all"]["n"] == 12
    assert report["all"]["model"]["mae"] == pytest.approx(table["error"].abs().mean(), rel=1e-6)
    assert report["all"]["groups"]["g0"]["n"] == 3
    with open(os.path.join(trained_run["root"], "models", "metrics.json")) as fh:
        trained = json.load(fh)
    assert_figures_close(report["test"]["model"], trained["test"]["model"],
                         meta_figure_tolerances(root), "test")


def test_predict_without_vref(trained_run, tmp_path):
    best = trained_run["result"]["best_path"]
    root = write_dataset(str(tmp_path / "new"), 3, seed=7)  # other dimers: no split column
    meta = pd.read_excel(os.path.join(root, "meta.xlsx"))
    meta.loc[1, "Vref"] = np.nan  # an empty cell
    meta.to_excel(os.path.join(root, "meta.xlsx"), index=False)
    with pytest.raises(ValueError, match=r"row 3 \(id dimer1\): Vref is empty, not a finite"):
        dc.read_meta(root)  # training still needs every Vref
    out = dc.main(["--predict", "--checkpoint", best, "--root_dir", root, "--quiet", *ON_CPU])
    table = pd.read_csv(out["predictions_path"], keep_default_na=False, na_values=[""])
    assert table["Vref"].isna().tolist() == [False, True, False]
    assert table["error"].isna().tolist() == [False, True, False]
    assert table["split"].isna().all() and out["metrics"]["all"]["n"] == 2
    meta.drop(columns=["Vref"]).to_excel(os.path.join(root, "meta.xlsx"), index=False)
    os.remove(os.path.join(root, "predictions_metrics.json"))
    out = dc.main(["--predict", "--checkpoint", best, "--root_dir", root, "--quiet", *ON_CPU])
    table = pd.read_csv(out["predictions_path"], keep_default_na=False, na_values=[""])
    assert table["Vref"].isna().all() and table["Vref_pred"].notna().all()
    np.testing.assert_allclose(table["Vref_pred"] - table["V0"], table["dV"], atol=1e-12)
    assert out["metrics"] == {} and not os.path.exists(os.path.join(root,
                                                                    "predictions_metrics.json"))


def test_predict_falls_back_to_the_pretrained_model_only_without_a_model_of_its_own(
        trained_run, tmp_path, monkeypatch, capsys):
    shipped = trained_run["result"]["best_path"]  # stands in for pretrained/ensemble.json
    monkeypatch.setattr(dc, "PRETRAINED_MODEL", shipped)
    root = write_dataset(str(tmp_path / "new"), 3, seed=7)  # no models/ folder
    out = dc.main(["--predict", "--root_dir", root, "--quiet", *ON_CPU])
    assert out["checkpoint"] == shipped
    assert "holds no model of its own: using the pretrained model" in capsys.readouterr().out
    assert pd.read_csv(out["predictions_path"])["Vref_pred"].notna().all()
    own = str(tmp_path / "own")  # with its own models/
    shutil.copytree(trained_run["root"], own)
    out = dc.main(["--predict", "--root_dir", own, "--quiet", *ON_CPU])
    assert out["checkpoint"] == os.path.join(own, "models", dc.FINAL_CHECKPOINT)  # kept weights
    assert "pretrained" not in capsys.readouterr().out
    best = os.path.join(own, "models", dc.BEST_CHECKPOINT)  # a later run, stopped before its end
    later = os.stat(os.path.join(own, "models", dc.FINAL_CHECKPOINT)).st_mtime_ns + 10**9
    os.utime(best, ns=(later, later))
    assert dc.default_predict_checkpoint(own) == best
    monkeypatch.setattr(dc, "PRETRAINED_MODEL", str(tmp_path / "not_shipped.json"))
    with pytest.raises(SystemExit) as exc:  # neither: the folder's missing checkpoint is named
        dc.main(["--predict", "--root_dir", root, "--quiet", *ON_CPU])
    assert os.path.join(root, "models", dc.BEST_CHECKPOINT) in capsys.readouterr().err


def test_the_shipped_pretrained_model_loads_weights_only_and_predicts_s66(tmp_path, capsys):
    pretrained = os.path.dirname(dc.PRETRAINED_MODEL)
    with open(dc.PRETRAINED_MODEL) as f:
        ensemble = json.load(f)
    assert len(ensemble["members"]) >= 4
    for member in ensemble["members"]:  # tensors and plain types only, as --predict loads it
        path = os.path.join(pretrained, member["checkpoint"])
        ckpt = torch.load(path, weights_only=True)
        # HF/def2-SVP, DF, no CP, plus D4: what data/s66/build and the README's builder line give
        assert {k: ckpt["level_of_theory"][k] for k in LEVEL} == LEVEL
        assert ckpt["level_of_theory"]["dispersion"] == "d4"
        assert dc.file_sha256(path) == member["sha256"]
    root = str(tmp_path / "s66")  # a copy: --predict writes its CSV into the folder
    shutil.copytree(S66_DIR, root, ignore=shutil.ignore_patterns(
        "models", "plots", "cached_graphs*", "predictions*"))
    out = dc.main(["--predict", "--root_dir", root, "--quiet", *ON_CPU])
    assert out["checkpoint"] == dc.PRETRAINED_MODEL
    assert "using the pretrained model" in capsys.readouterr().out
    table = pd.read_csv(out["predictions_path"])
    assert len(table) == len(pd.read_excel(os.path.join(root, "meta.xlsx"))) == 66
    assert np.isfinite(table[["dV", "Vref_pred", "Vref_std"]].to_numpy()).all()
    assert (table["Vref_std"] > 0).all()  # the members differ
    assert table["split"].isna().all()  # not the model's own training folder
    # the model corrects V0 towards Vref: closer on average than V0 alone (HF + D4 here)
    assert (table["Vref_pred"] - table["Vref"]).abs().mean() < \
        (table["V0"] - table["Vref"]).abs().mean()


LEVEL = {"method": "hf", "basis": "def2-svp", "density_fit": True,
         "auxbasis": "def2-universal-jkfit", "counterpoise": False, "program": "pyscf"}


def test_level_of_theory_travels_from_folder_to_checkpoint_and_predict_checks_it(
        trained_run, tmp_path, capsys):
    root = write_dataset(str(tmp_path / "data"), 8, seed=3)
    with open(os.path.join(root, "level_of_theory.json"), "w") as fh:
        json.dump(LEVEL, fh)
    out = dc.main(["--root_dir", root, "--epochs", "1", "--quiet", "--device", "cpu",
                   *SMALL_MODEL_ARGS])
    assert "baseline level of theory: hf/def2-svp, density fitting" in capsys.readouterr().out
    ckpt = torch.load(out["best_path"], weights_only=True)
    # the record round-trips into the checkpoint; one made before the dispersion key reads
    # as a folder without a dispersion term
    assert ckpt["level_of_theory"] == {**LEVEL, "dispersion": "none"}
    with open(os.path.join(root, "models", "run_config.json")) as fh:
        assert json.load(fh)["level_of_theory"] == {**LEVEL, "dispersion": "none"}

    def predict_on(level, checkpoint=out["best_path"]):
        folder = write_dataset(str(tmp_path / f"new{len(os.listdir(tmp_path))}"), 3, seed=9)
        if level is not None:
            with open(os.path.join(folder, "level_of_theory.json"), "w") as fh:
                json.dump(level, fh)
        result = dc.main(["--predict", "--checkpoint", checkpoint, "--root_dir", folder,
                          "--quiet", "--device", "cpu"])
        captured = capsys.readouterr()
        return result, captured.out + captured.err

    result, text = predict_on(dict(LEVEL, program_version="other"))  # same level: no word
    assert os.path.isfile(result["predictions_path"]) and "warning" not in text
    with pytest.raises(SystemExit) as stop:
        predict_on(dict(LEVEL, basis="sto-3g", counterpoise=True))
    text = capsys.readouterr().err
    assert stop.value.code == 2
    assert "basis: 'def2-svp' for the model, 'sto-3g' in the folder" in text
    assert "counterpoise: False for the model, True in the folder" in text
    assert "corrects hf/def2-svp, density fitting" in text
    with pytest.raises(SystemExit) as stop:  # HF V0 for the model, HF + D4 in the folder
        predict_on(dict(LEVEL, dispersion="d4"))
    assert stop.value.code == 2
    assert "dispersion: 'none' for the model, 'd4' in the folder" in capsys.readouterr().err
    d4_root = write_dataset(str(tmp_path / "d4"), 8, seed=4)  # and the reverse
    with open(os.path.join(d4_root, "level_of_theory.json"), "w") as fh:
        json.dump(dict(LEVEL, dispersion="d4"), fh)
    d4 = dc.main(["--root_dir", d4_root, "--epochs", "1", "--quiet", "--device", "cpu",
                  *SMALL_MODEL_ARGS])
    with pytest.raises(SystemExit) as stop:
        predict_on(LEVEL, checkpoint=d4["best_path"])
    assert stop.value.code == 2
    text = capsys.readouterr().err
    assert "dispersion: 'd4' for the model, 'none' in the folder" in text
    assert "corrects hf/def2-svp-D4, density fitting" in text
    result, text = predict_on(None)  # an older folder: a warning, not a refusal
    assert os.path.isfile(result["predictions_path"])
    assert "has no level_of_theory.json, so it cannot be checked" in text
    result, text = predict_on(LEVEL, checkpoint=trained_run["result"]["best_path"])
    assert os.path.isfile(result["predictions_path"])  # an older checkpoint: a warning too
    assert "does not record the level of theory it was trained on" in text


def test_read_level_of_theory_names_a_broken_record(tmp_path):
    assert dc.read_level_of_theory(str(tmp_path)) is None
    path = tmp_path / "level_of_theory.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match=r"level_of_theory.json: unreadable level-of-theory"):
        dc.read_level_of_theory(str(tmp_path))
    path.write_text(json.dumps({"method": "hf", "basis": "def2-svp"}))
    with pytest.raises(ValueError, match=r"lacks density_fit, auxbasis, counterpoise"):
        dc.read_level_of_theory(str(tmp_path))


def test_predict_refuses_foreign_or_tampered_checkpoints(trained_run, tmp_path, capsys):
    best = trained_run["result"]["best_path"]
    root = trained_run["root"]
    ckpt = torch.load(best, weights_only=True)

    def refused(path, *extra):
        with pytest.raises(SystemExit) as exc:
            dc.main(["--predict", "--checkpoint", str(path), "--root_dir", root, "--quiet",
                     *ON_CPU, *extra])
        assert exc.value.code == 2
        return capsys.readouterr().err

    bad_scale = tmp_path / "scale.pt"
    torch.save({**ckpt, "metadata": {**ckpt["metadata"], "int_angstrom_scale": 1.0}}, bad_scale)
    assert "int_angstrom_scale = 1.0" in refused(bad_scale)
    bad_cutoff = tmp_path / "cutoff.pt"
    torch.save({**ckpt, "model_config": {**ckpt["model_config"], "cutoff": 1.0}}, bad_cutoff)
    assert "model's cutoff (1.0 internal units) is not the cutoff" in refused(bad_cutoff)
    assert "differs from the 12 Angstrom" in refused(best, "--physical_cutoff", "10")
    assert "is not a DeltaCoupling checkpoint" in refused(os.path.join(root, "cached_graphs.pt"))
    assert "cannot be loaded as a DeltaCoupling checkpoint" in refused(__file__)
    assert "not found" in refused(tmp_path / "missing.pt")


# --- training schedules: OneCycle length, when early stopping counts, the weights' average
def test_schedule_fills_only_the_options_not_given(capsys):
    for name, defaults in dc.SCHEDULES.items():
        args, _ = dc.parse_main_args(["--schedule", name])
        assert {k: getattr(args, k) for k in defaults} == defaults
        args, _ = dc.parse_main_args(["--schedule", name, "--epochs", "7", "--patience", "3",
                                      "--ema", "0.5"])
        assert (args.epochs, args.patience, args.ema) == (7, 3, 0.5)
    args, _ = dc.parse_main_args([])  # the design's: anneal was not clearly better (README)
    assert args.schedule == dc.DEFAULT_SCHEDULE == "spec" and args.ema == 0.0
    for bad in ("1", "1.5", "-0.1", "nan"):
        with pytest.raises(SystemExit) as exc:
            dc.parse_main_args(["--ema", bad])
        assert exc.value.code == 2 and "give 0 (off) or a decay" in capsys.readouterr().err


def test_weights_ema_by_hand():
    layer = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        layer.weight.fill_(1.0)
    ema = dc.WeightsEMA(layer, 0.9)
    expected = 1.0
    for n, w in enumerate([3.0, 5.0, -1.0, 2.0], start=1):
        with torch.no_grad():
            layer.weight.fill_(w)
        ema.update()
        d = min(0.9, (1 + n) / (10 + n))  # warm-up: 2/11, 3/12, 4/13, then 0.9 from n = 8 on
        expected = d * expected + (1 - d) * w
    assert ema.average[0].item() == pytest.approx(expected, rel=1e-6)
    with ema.applied():
        assert layer.weight.item() == pytest.approx(expected, rel=1e-6)
    assert layer.weight.item() == 2.0  # the trained weight is back
    copy = dc.WeightsEMA(layer, 0.5)
    copy.load_state_dict(ema.state_dict())
    assert (copy.decay, copy.n_updates) == (0.9, 4)
    assert torch.equal(copy.average[0], ema.average[0])
    with pytest.raises(ValueError, match="not between 0 and 1"):
        dc.WeightsEMA(layer, 1.0)


def test_stale_epochs_count_per_schedule():
    spec = argparse.Namespace(schedule="spec", lr=1e-3)
    anneal = argparse.Namespace(schedule="anneal", lr=1e-3)
    assert dc.stale_epochs_count(spec, 1e-3) and dc.stale_epochs_count(spec, 1e-6)
    assert not dc.stale_epochs_count(anneal, 1e-3)
    assert not dc.stale_epochs_count(anneal, 1.01e-4)
    assert dc.stale_epochs_count(anneal, 1e-4) and dc.stale_epochs_count(anneal, 1e-6)
    state = dc.TrainingProgress()
    for state.epoch, (value, counting) in enumerate([(1.0, False), (2.0, False), (3.0, True),
                                                     (4.0, True)], start=1):
        state.update(value, patience=2, counting=counting)
    assert (state.best_epoch, state.stale, state.stopped) == (1, 2, True)


def worsening_validation(monkeypatch):
    """Make every validation pass report a worse MAPE and MAE than the one before it, so the
    first epoch stays the best and every later one is stale."""
    real, calls = dc.run_epoch, []

    def run_epoch(model, loader, device, optimizer=None, *args, **kwargs):
        result = real(model, loader, device, optimizer, *args, **kwargs)
        if optimizer is None and len(calls) < 1000:
            calls.append(1)
            result.mape, result.mae = 10.0 * len(calls), 1.0 * len(calls)
        return result

    monkeypatch.setattr(dc, "run_epoch", run_epoch)


@pytest.mark.parametrize("schedule", ["spec", "anneal"])
def test_learning_rate_trace_and_early_stopping_of_each_schedule(schedule, tmp_path,
                                                                 monkeypatch):
    root = write_dataset(str(tmp_path / "data"), 10)  # 8 training dimers: 4 steps per epoch
    worsening_validation(monkeypatch)
    epochs, patience, lr = 20, 2, 2e-3
    out = dc.main(["--root_dir", root, "--schedule", schedule, "--epochs", str(epochs),
                   "--patience", str(patience), "--lr", str(lr), "--quiet", *SMALL_RUN])
    history = out["history"]
    # the independent reference: torch's OneCycleLR over every batch of the whole schedule
    reference = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    one_cycle = torch.optim.lr_scheduler.OneCycleLR(reference, max_lr=lr,
                                                    total_steps=epochs * 4,
                                                    pct_start=dc.ONECYCLE_PCT_START)
    trace = []
    for _ in range(epochs):
        for _ in range(4):
            reference.step()
            one_cycle.step()
        trace.append(reference.param_groups[0]["lr"])
    assert [h["lr"] for h in history] == pytest.approx(trace[:len(history)], rel=1e-9)
    assert out["best_epoch"] == 1
    if schedule == "spec":  # stale epochs from the first: epochs 2 and 3, stopped at 3
        assert len(history) == 1 + patience
    else:  # stale epochs only once the lr is down to a tenth of the peak
        first_low = next(i for i, v in enumerate(trace, start=1) if v <= 0.1 * lr)
        assert first_low > 1 + patience
        assert len(history) == min(epochs, first_low + patience - 1)


def test_ema_weights_are_validated_checkpointed_and_resumed(tmp_path):
    root = write_dataset(str(tmp_path / "data"), 10)
    out = dc.main(["--root_dir", root, "--ema", "0.9", "--epochs", "1", "--quiet", *SMALL_RUN])
    models = os.path.join(root, "models")
    state = torch.load(os.path.join(models, dc.RESUME_CHECKPOINT), weights_only=True)
    best = torch.load(out["best_path"], weights_only=True)
    assert best["config"]["ema"] == 0.9 and state["ema_state"]["n_updates"] == 4
    names = [n for n, _ in dc.DeltaCoupling(**state["model_config"]).named_parameters()]
    assert len(names) == len(state["ema_state"]["average"])
    moved = 0
    for name, average in zip(names, state["ema_state"]["average"]):
        assert torch.equal(best["model_state"][name], average)  # the checkpoint: the average
        moved += not torch.equal(state["model_state"][name], average)  # resume: trained ones
    assert moved > 0
    # the validation figure of the epoch is the average's: the checkpoint reproduces it
    model, _ = dc.load_checkpoint(out["best_path"])
    ds = dc.CachedDimerDataset(os.path.join(root, dc.DEFAULT_CACHE_FILE))
    val = [ds.ids.index(i) for i in best["split_ids"]["val"]]
    res = dc.run_epoch(model, DataLoader(torch.utils.data.Subset(ds, val), batch_size=2),
                       torch.device("cpu"), skip_failed_batches=False)
    assert res.mae == pytest.approx(out["history"][0]["val_mae"], rel=0,
                                    abs=meta_figure_tolerances(root)["mae"])
    assert state["history"][0]["val_mae"] == out["history"][0]["val_mae"]


# --- model selection, ensembles and cross-validation
def test_monitor_chooses_the_best_epoch_by_mae_or_mape():
    # a constructed validation history where the two figures disagree
    history = [(40.0, 0.90), (12.0, 0.80), (30.0, 0.30), (25.0, 0.35), (11.0, 0.60)]
    best = {}
    for monitor in dc.MONITORS:
        state = dc.TrainingProgress()
        for state.epoch, (mape, mae) in enumerate(history, start=1):
            value = dc.monitored_value(monitor, dc.EpochResult(loss=9.0),
                                       dc.EpochResult(mape=mape, mae=mae), has_val=True)
            state.update(value, patience=100)
        best[monitor] = (state.best_epoch, state.best, state.stale)
    assert best == {"mape": (5, 11.0, 0), "mae": (3, 0.30, 2)}
    # without a validation set the training loss is watched, and patience stops the run
    state = dc.TrainingProgress()
    for state.epoch, loss in enumerate([3.0, 2.0, 2.5, 2.4], start=1):
        state.update(dc.monitored_value("mae", dc.EpochResult(loss=loss), dc.EpochResult(),
                                        has_val=False), patience=2)
    assert (state.best_epoch, state.stopped) == (2, True)
    with pytest.raises(ValueError, match="unknown monitor"):
        dc.monitored_value("rmse", dc.EpochResult(), dc.EpochResult(), True)
    assert dc.build_arg_parser().parse_args([]).monitor == "mape"


def test_cv_epochs_are_the_schedules_and_refused_combinations(capsys):
    args = dc.parse_main_args(["--cv", "5"])[0]  # a fold's accuracy at a third of the cost
    assert (args.schedule, args.epochs) == (dc.CV_DEFAULT_SCHEDULE, 300) == ("anneal", 300)
    assert dc.parse_main_args(["--cv", "5", "--schedule", "spec"])[0].epochs == 1500
    assert dc.parse_main_args(["--cv", "5", "--epochs", "70"])[0].epochs == 70
    args = dc.parse_main_args(["--ensemble", "3"])[0]
    assert (args.schedule, args.epochs) == (dc.DEFAULT_SCHEDULE, 1500) == ("spec", 1500)
    for argv, message in ((["--cv", "3", "--ensemble", "2"], "does not combine"),
                          (["--ensemble", "3", "--member", "1"], "give one of the two"),
                          (["--ensemble", "1"], "at least 2 members"),
                          (["--member", "-1"], "numbered 0, 1"),
                          (["--fold", "1"], "set by --cv")):
        with pytest.raises(SystemExit) as exc:
            dc.parse_main_args(argv)
        assert exc.value.code == 2 and message in capsys.readouterr().err, argv


TINY_RUN = ["--epochs", "3", "--patience", "50", "--quiet", *SMALL_MODEL_ARGS,
            "--no-skip_failed_batches"]


@pytest.fixture(scope="module")
def ensemble_runs(tmp_path_factory):
    """The same 2-member ensemble twice, on copies of 12 grouped dimers, selected by val MAE:
    once with --ensemble 2, once as --member 0 and --member 1 (separate runs) combined."""
    base = tmp_path_factory.mktemp("ensemble")
    together = write_dataset(str(base / "together"), 12, groups=True)
    apart = _copy_data(together, base / "apart")
    out_together = dc.main(["--root_dir", together, "--ensemble", "2", "--monitor", "mae",
                            *TINY_RUN])
    for k in ("0", "1"):
        dc.main(["--root_dir", apart, "--member", k, "--monitor", "mae", *TINY_RUN])
    out_apart = dc.main(["--root_dir", apart, "--combine_ensemble", *SMALL_MODEL_ARGS])
    return {"together": together, "apart": apart, "out_together": out_together,
            "out_apart": out_apart}


def _member_checkpoint(root, k):
    return os.path.join(root, "models", f"member_{k}", dc.FINAL_CHECKPOINT)


def test_members_trained_apart_and_combined_equal_the_ensemble(ensemble_runs):
    together, apart = ensemble_runs["together"], ensemble_runs["apart"]
    states = []
    for k in (0, 1):
        one = torch.load(_member_checkpoint(together, k), weights_only=True)
        two = torch.load(_member_checkpoint(apart, k), weights_only=True)
        assert one["config"]["seed"] == two["config"]["seed"] == 42  # the split's seed
        assert one["split_ids"] == two["split_ids"]
        for key, value in one["model_state"].items():
            torch.testing.assert_close(two["model_state"][key], value, rtol=0, atol=0)
        states.append(one["model_state"])
    # the members differ from each other (seed 42 and 43)
    assert any(not torch.equal(states[0][k], states[1][k]) for k in states[0]
               if states[0][k].is_floating_point())
    files = []
    for root in (together, apart):
        with open(os.path.join(root, "models", dc.ENSEMBLE_FILE)) as fh:
            ensemble = json.load(fh)
        assert [m["member"] for m in ensemble["members"]] == [0, 1]
        assert [m["seed"] for m in ensemble["members"]] == [42, 43]
        assert ensemble["members"][1]["checkpoint"] == os.path.join("member_1",
                                                                    dc.FINAL_CHECKPOINT)
        with open(os.path.join(root, "models", dc.ENSEMBLE_METRICS_FILE)) as fh:
            files.append((ensemble["config_hash"], json.load(fh)))
    assert files[0] == files[1]
    metrics = files[0][1]
    assert metrics["members"] == 2 and set(metrics["test"]["uncertainty"]) >= {
        "spearman", "within_1std", "within_2std", "miscalibration_area"}
    for name in ("uncertainty.png", "test_ensemble.png", "val_ensemble.png"):
        assert os.path.getsize(os.path.join(together, "plots", name)) > 0, name
    # the ensemble's test figures: the members' mean and sample std, from their own predictions
    preds = ensemble_runs["out_together"]["predictions"]["test"]
    ds = dc.CachedDimerDataset(os.path.join(together, "cached_graphs.pt"))
    ids = preds["id"]
    graphs = batch_of([ds[ds.ids.index(i)] for i in ids])
    members = []
    for k in (0, 1):
        model, _ = dc.load_checkpoint(_member_checkpoint(together, k))
        with torch.no_grad():
            members.append(dc.predict_batch(model.eval(), graphs.clone())[0].double().numpy())
    atol = scaled_atol(*members, floor=1.0)  # each member's batching against one batch
    np.testing.assert_allclose(preds["pred"], (members[0] + members[1]) / 2, rtol=0, atol=atol)
    np.testing.assert_allclose(preds["std"], np.abs(members[0] - members[1]) / math.sqrt(2),
                               rtol=0, atol=atol)


def test_an_interrupted_ensemble_resumes_its_member_then_the_rest(ensemble_runs, tmp_path,
                                                                 monkeypatch, capsys):
    root = _copy_data(ensemble_runs["together"], tmp_path / "interrupted")
    interrupt_at_epoch(monkeypatch, 5)  # member 0 trains 3 epochs: this is member 1's second
    with pytest.raises(SystemExit) as exc:
        dc.main(["--root_dir", root, "--ensemble", "2", "--monitor", "mae", *TINY_RUN])
    assert exc.value.code == 130
    state_path = os.path.join(root, "models", "member_1", dc.RESUME_CHECKPOINT)
    assert f"--resume {state_path}" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(root, "models", dc.ENSEMBLE_FILE))
    undo_interrupt(monkeypatch)
    dc.main(["--resume", state_path])
    with open(os.path.join(root, "models", dc.ENSEMBLE_FILE)) as fh:
        assert [m["member"] for m in json.load(fh)["members"]] == [0, 1]
    for k in (0, 1):
        one = torch.load(_member_checkpoint(ensemble_runs["together"], k), weights_only=True)
        two = torch.load(_member_checkpoint(root, k), weights_only=True)
        assert [h["epoch"] for h in two["history"]] == [1, 2, 3]
        for key, value in one["model_state"].items():
            assert_tensors_close(two["model_state"][key], value, key)


def test_keep_final_keeps_the_last_epochs_weights_and_best_the_best_epochs(tmp_path,
                                                                           monkeypatch):
    """Epoch 1 is made the best (the monitored figure rises every epoch), so the two rules
    keep different weights: --keep best epoch 1's (its best checkpoint), --keep final epoch
    3's (the resume state after the last epoch)."""
    root = write_dataset(str(tmp_path / "data"), 12, groups=True)
    figures = iter(range(1, 100))
    monkeypatch.setattr(dc, "monitored_value", lambda *args: float(next(figures)))
    kept = {}
    for keep in ("best", "final"):
        folder = _copy_data(root, tmp_path / keep)
        dc.main(["--root_dir", folder, "--keep", keep, *TINY_RUN])
        models = os.path.join(folder, "models")
        final = torch.load(os.path.join(models, dc.FINAL_CHECKPOINT), weights_only=True)
        source = dc.BEST_CHECKPOINT if keep == "best" else dc.RESUME_CHECKPOINT
        reference = torch.load(os.path.join(models, source), weights_only=True)
        assert (final["weights_from_epoch"], final["last_epoch"]) == \
            ({"best": 1, "final": 3}[keep], 3)
        assert final["config"]["keep"] == keep
        for key, value in reference["model_state"].items():
            torch.testing.assert_close(final["model_state"][key], value, rtol=0, atol=0)
        kept[keep] = final["model_state"]
    assert any(not torch.equal(kept["best"][k], kept["final"][k]) for k in kept["best"])


def test_monitor_mae_picks_the_epoch_of_the_lowest_val_mae(ensemble_runs):
    for k in (0, 1):
        final = torch.load(_member_checkpoint(ensemble_runs["together"], k), weights_only=True)
        maes = [h["val_mae"] for h in final["history"]]
        mapes = [h["val_mape"] for h in final["history"]]
        assert final["weights_from_epoch"] == int(np.argmin(maes)) + 1
        assert final["monitor"] == "val MAE" and final["best_monitor"] == min(maes)
        assert final["config"]["monitor"] == "mae"
        assert len(set(mapes)) == 3  # the history is a real one


def test_predict_with_an_ensemble_writes_mean_std_and_uncertainty(ensemble_runs, tmp_path):
    together = ensemble_runs["together"]
    root = _copy_data(together, tmp_path / "new")
    single = []
    for k in (0, 1):
        out = dc.main(["--predict", "--checkpoint", _member_checkpoint(together, k),
                       "--root_dir", root, "--quiet", *ON_CPU])
        single.append(pd.read_csv(out["predictions_path"]))
        assert "Vref_std" not in single[-1].columns  # a single checkpoint: as before
    # ensemble.json by --checkpoint; without it, <root_dir>/models/ensemble.json is the default
    for argv in (["--checkpoint", os.path.join(together, "models", dc.ENSEMBLE_FILE),
                  "--root_dir", root], ["--root_dir", together]):
        out = dc.main(["--predict", "--quiet", *ON_CPU, *argv])
        table = pd.read_csv(out["predictions_path"])
        assert list(table.columns) == ["id", "V0", "dV", "Vref_pred", "Vref_std", "Vref",
                                       "error", "split"]
        both = np.stack([single[0]["Vref_pred"], single[1]["Vref_pred"]])  # (2, 12)
        np.testing.assert_allclose(table["Vref_pred"], both.mean(axis=0), atol=1e-9)
        np.testing.assert_allclose(table["Vref_std"], both.std(axis=0, ddof=1), atol=1e-9)
        u = out["metrics"]["all"]["uncertainty"]
        err, std = table["error"].abs(), table["Vref_std"]
        assert u["within_1std"] == pytest.approx(float((err <= std).mean()))
        assert u["within_2std"] == pytest.approx(float((err <= 2 * std).mean()))
        assert out["metrics"]["test"]["uncertainty"]["n"] == 3  # the training data's own split
        assert os.path.getsize(os.path.join(argv[-1], "predictions_uncertainty.png")) > 0


def test_combining_refuses_members_trained_otherwise(ensemble_runs, tmp_path, capsys):
    root = str(tmp_path / "mixed")
    shutil.copytree(ensemble_runs["apart"], root)
    dc.main(["--root_dir", root, "--member", "2", *TINY_RUN, "--num_rbf", "6"])  # other size
    with pytest.raises(SystemExit) as exc:
        dc.main(["--root_dir", root, "--combine_ensemble", "--quiet", *ON_CPU])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "cannot combine" in err and "member_2" in err
    assert "--num_rbf 6 (vs 8)" in err and "model num_rbf 6 (vs 8)" in err
    assert "--monitor 'mape' (vs 'mae')" in err  # trained without --monitor mae too
    # an unfinished member (no final checkpoint) is refused too
    os.remove(_member_checkpoint(root, 2))
    with pytest.raises(SystemExit):
        dc.main(["--root_dir", root, "--combine_ensemble", "--quiet", *ON_CPU])
    assert "no final checkpoint" in capsys.readouterr().err
    # a member changed after combining: the ensemble file refuses it
    shutil.rmtree(os.path.join(root, "models", "member_2"))
    torch.save(torch.load(_member_checkpoint(ensemble_runs["apart"], 0), weights_only=True),
               _member_checkpoint(root, 1))
    with pytest.raises(ValueError, match="missing or changed since the ensemble was combined"):
        dc.load_ensemble(os.path.join(root, "models", dc.ENSEMBLE_FILE))


def test_cv_trains_k_folds_and_writes_out_of_fold_predictions(tmp_path, monkeypatch, capsys):
    root = write_dataset(str(tmp_path / "cv"), 12, groups=True)
    out = dc.main(["--root_dir", root, "--cv", "3", *TINY_RUN])
    table = pd.read_csv(os.path.join(root, "models", dc.CV_PREDICTIONS_FILE))
    meta = pd.read_excel(os.path.join(root, "meta.xlsx"))
    assert table["id"].tolist() == meta["id"].tolist()  # every row once, in meta.xlsx's order
    assert table["Vref_pred"].notna().all() and set(table["fold"]) == {0, 1, 2}
    assert (table.groupby("group")["fold"].nunique() == 1).all()  # a group in one fold
    with open(os.path.join(root, "models", dc.CV_METRICS_FILE)) as fh:
        metrics = json.load(fh)
    assert metrics["k"] == 3 and metrics["epochs"] == 3 and len(metrics["folds"]) == 3
    for f, fold in enumerate(metrics["folds"]):
        rows = table[table["fold"] == f]
        assert fold["n_test"] == len(rows)
        ckpt = torch.load(os.path.join(root, "models", "cv", f"fold_{f}", dc.FINAL_CHECKPOINT),
                          weights_only=True)
        assert ckpt["split_ids"]["test"] == rows["id"].tolist()
        assert not set(rows["id"]) & set(ckpt["split_ids"]["train"] + ckpt["split_ids"]["val"])
        assert ckpt["split_ids"]["val"]  # each fold validates on part of its training groups
        # (the metrics use the graphs' float32 Vref, the CSV meta.xlsx's float64 one: they
        # agree to float32 rounding of |Vref|, not to a fraction of a small MAE)
        tol = figure_tolerances(rows["Vref"], rows["V0"])
        assert fold["model"]["mae"] == pytest.approx(rows["error"].abs().mean(), rel=0,
                                                     abs=tol["mae"])
        assert fold["baseline"]["rmse"] == pytest.approx(
            math.sqrt(((rows["V0"] - rows["Vref"]) ** 2).mean()), rel=0, abs=tol["rmse"])
        # the out-of-fold predictions are the fold's own final test report
        assert_figures_close(fold["model"], ckpt["final_metrics"]["test"]["model"], tol, f)
    maes = [fold["model"]["mae"] for fold in metrics["folds"]]
    assert metrics["mean"]["model"]["mae"] == pytest.approx(np.mean(maes))
    assert metrics["std"]["model"]["mae"] == pytest.approx(np.std(maes, ddof=1))
    assert metrics["out_of_fold"]["n"] == 12 and set(metrics["out_of_fold"]["groups"]) == \
        {"g0", "g1", "g2", "g3"}
    assert json.loads(json.dumps(dc._json_ready(out))) == metrics  # returned as written
    assert os.path.getsize(os.path.join(root, "plots", dc.CV_PLOT)) > 0
    # a fold whose test rows cannot be predicted stops the report with a message, no traceback
    def failing(*args, **kwargs):
        raise dc.TooManyFailedBatchesError("2 of 2 batches failed; first: ids ['g0_0']")

    monkeypatch.setattr(dc, "predict_rows", failing)
    args, _ = dc.parse_main_args(["--root_dir", root, "--cv", "3", *TINY_RUN])
    with pytest.raises(SystemExit) as exc:
        dc.cv_report(args, dc.read_meta(root), dc.make_cv_folds(dc.read_meta(root), 3))
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "fold 0's test prediction with" in err and "g0_0" in err


# --- install
def test_install_instructions_name_the_pinned_torch_and_its_cpu_wheel():
    """README and requirements.txt give the command that installs the CPU wheel of exactly the
    pinned torch, and that wheel's version (2.13.0+cpu) satisfies the pin, so the
    ``pip install -r requirements.txt`` after it keeps it."""
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    def requirement_file(name):  # its text and requirements; "-r FILE" lines are includes
        with open(os.path.join(HERE, name)) as fh:
            text = fh.read()
        lines = [line.split("#")[0].strip() for line in text.splitlines()]
        return text, [Requirement(line) for line in lines  # every other line parses
                      if line and not line.startswith("-r ")]

    requirements, _ = requirement_file("requirements.txt")  # all: runtime, builder, tests
    assert "-r requirements-core.txt" in requirements.splitlines()
    core, pins = requirement_file("requirements-core.txt")  # what training and prediction need
    assert not {"pyscf", "ase", "dftd4", "pytest"} & {r.name for r in pins}
    torch_pin = next(r for r in pins if r.name == "torch")
    (spec,) = torch_pin.specifier
    assert spec.operator == "=="
    cpu_wheel = (f"pip install torch=={spec.version} --index-url "
                 f"https://download.pytorch.org/whl/cpu")
    with open(os.path.join(HERE, "README.md")) as fh:
        readme = fh.read()
    for text in (readme, requirements, core):
        assert cpu_wheel in text and "pip install -r requirements.txt" in text
    assert SpecifierSet(f"=={spec.version}").contains(f"{spec.version}+cpu")


# ============================================================================= your own dimers
# tools/build_dataset.py specified: a CSV of dimer geometries (+ Vref) becomes a data folder that
# delta_coupling.py trains and predicts on; PySCF with a minimal basis keeps these fast.
@pytest.fixture(scope="module")
def builder():
    """The builder module (skips only when PySCF or ASE is not installed)."""
    pytest.importorskip("pyscf")
    pytest.importorskip("ase")
    sys.path.insert(0, os.path.join(HERE, "tools"))
    import build_dataset
    return build_dataset


MINIMAL = ["--basis", "sto-3g", "--threads", "1", "--quiet"]  # a water dimer in about 1 s
WATER_B_SHIFT = np.array([0.3, 3.2, -0.2])  # Angstrom: B = WATER + shift, head to tail along y
# (A's H atoms point at B's O; 3 decimals, so a PDB holds the positions exactly)


def water_dimer(shift=WATER_B_SHIFT):
    """(symbols, pos (6, 3) Angstrom) of a water dimer, A's atoms first."""
    symbols, pos = WATER
    pos = np.asarray(pos, float)
    return symbols + symbols, np.concatenate([pos, pos + shift])


def write_xyz(path, symbols, pos, comment=""):
    lines = [str(len(symbols)), comment] + [f"{s} {x:.3f} {y:.3f} {z:.3f}"
                                            for s, (x, y, z) in zip(symbols, pos)]
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")


def write_csv(path, rows):
    pd.DataFrame(rows).to_csv(path, index=False)
    return str(path)


def water_csv(folder, shifts_y=(3.2, 3.8, 5.0), vref=(-5.0, -3.0, -1.0)):
    """A CSV of water dimers at several separations (one XYZ each, n_atoms_a column)."""
    rows = []
    for i, dy in enumerate(shifts_y):
        symbols, pos = water_dimer(WATER_B_SHIFT + [0.0, dy - WATER_B_SHIFT[1], 0.0])
        write_xyz(folder / f"w{i}.xyz", symbols, pos)
        rows.append({"id": f"w{i}", "xyz": f"w{i}.xyz", "n_atoms_a": 3,
                     **({"Vref": vref[i]} if vref else {})})
    return write_csv(folder / "dimers.csv", rows)


def meta_of(out):
    return pd.read_excel(os.path.join(out, "meta.xlsx")).set_index("id")


def npz_of(out, rid):
    with np.load(os.path.join(out, rid, "dimer.npz")) as npz:
        return {key: npz[key] for key in npz.files}


def energies_of(out, rid):
    with open(os.path.join(out, rid, "energies.json")) as fh:
        return json.load(fh)


@pytest.fixture(scope="module")
def water_built(builder, tmp_path_factory):
    """Three water dimers with Vref, built at HF/STO-3G without counterpoise."""
    folder = tmp_path_factory.mktemp("water_in")
    csv_path = water_csv(folder)
    out = str(tmp_path_factory.mktemp("water_out") / "data")
    assert builder.main([csv_path, "--out", out, *MINIMAL]) == 0
    return {"csv": csv_path, "out": out, "folder": folder}


def test_builder_output_trains_predicts_and_follows_the_frame(builder, water_built, tmp_path):
    from ase.data import vdw_radii, atomic_numbers
    out = water_built["out"]
    with pytest.raises(SystemExit) as exc:
        dc.main(["--root_dir", out, "--check_data"])
    assert exc.value.code == 0
    meta = meta_of(out)
    assert list(meta.index) == ["w0", "w1", "w2"] and meta["Vref"].tolist() == [-5.0, -3.0, -1.0]
    assert builder.read_level_of_theory(out) == {
        "method": "hf", "basis": "sto-3g", "density_fit": True,
        "auxbasis": "def2-universal-jkfit", "counterpoise": False, "program": "pyscf",
        "program_version": builder.read_level_of_theory(out)["program_version"],
        "builder_version": builder.BUILDER_VERSION, "dispersion": "none"}
    symbols, pos = water_dimer()
    c_a, c_b = pos[:3].mean(0), pos[3:].mean(0)
    z_a, pos_a = dc.parse_pdb(os.path.join(out, "w0", "A.pdb"))
    z_b, pos_b = dc.parse_pdb(os.path.join(out, "w0", "B.pdb"))
    assert z_a.tolist() == [8, 1, 1] and z_b.tolist() == [8, 1, 1]
    np.testing.assert_allclose(pos_a.mean(0), 0.0, atol=1e-3)  # A's centroid at the origin
    np.testing.assert_allclose(pos_b.mean(0), [0, 0, np.linalg.norm(c_b - c_a)], atol=1e-3)
    assert meta.loc["w0", "R_nm"] == pytest.approx(np.linalg.norm(c_b - c_a) / 10, abs=1e-12)
    # the frame is a rigid motion: every A-B distance as in the input
    np.testing.assert_allclose(np.linalg.norm(pos_a[:, None] - pos_b[None], axis=-1),
                               np.linalg.norm(pos[:3, None] - pos[None, 3:], axis=-1), atol=3e-3)
    radii = np.array([vdw_radii[atomic_numbers[s]] for s in symbols])  # ASE's table
    ratio = min(np.linalg.norm(pos[i] - pos[j]) / (radii[i] + radii[j])
                for i in range(3) for j in range(3, 6))
    assert meta.loc["w0", "PR"] == pytest.approx(ratio, abs=1e-9)  # PR: the contact ratio
    # B is A translated: parallel principal axes (arccos near 1 amplifies rounding to ~1e-6)
    assert meta.loc["w0", "theta_deg"] == pytest.approx(0.0, abs=1e-5)
    npz = npz_of(out, "w0")
    assert npz["mulliken_spd"].shape == (6, 3) and npz["mulliken_spd"].sum() == pytest.approx(20)
    assert np.trace(npz["quadrupole"]) == pytest.approx(0.0, abs=1e-9)
    e = energies_of(out, "w0")
    assert meta.loc["w0", "V0"] == pytest.approx((e["E_AB"] - e["E_A"] - e["E_B"]) * 627.5094740631)
    assert meta["V0"].is_monotonic_increasing and meta.loc["w0", "V0"] < 0  # weaker when apart

    result = dc.main(["--root_dir", out, "--epochs", "2", "--device", "cpu", "--compile", "off",
                      "--quiet", *SMALL_RUN])
    assert os.path.isfile(result["best_path"])
    # a prediction folder: the same geometries, no Vref
    predict_in = tmp_path / "in"
    predict_in.mkdir()
    predict_out = str(tmp_path / "predict")
    assert builder.main([water_csv(predict_in, vref=None), "--out", predict_out, *MINIMAL]) == 0
    assert "Vref" not in pd.read_excel(os.path.join(predict_out, "meta.xlsx")).columns
    out_pred = dc.main(["--predict", "--checkpoint", result["best_path"], "--root_dir",
                        predict_out, "--quiet", *ON_CPU])
    table = pd.read_csv(out_pred["predictions_path"])
    assert len(table) == 3 and np.isfinite(table["Vref_pred"]).all()
    np.testing.assert_allclose(table["V0"], meta["V0"].to_numpy(), atol=1e-9)


def test_builder_frame_rotation_is_proper_for_every_direction(builder):
    """B's centroid straight below A's (NCIAtlas has such dimers) or nearly so: the Rodrigues
    formula divides by 1 + cos, which is 0 there; the frame must stay a proper rotation."""
    rng = np.random.default_rng(0)
    directions = list(rng.normal(size=(50, 3))) + [
        [0, 0, 1], [0, 0, -1], [1e-9, 0, -1], [0, -1e-13, -2], [3e-17, 0, -1], [1, 0, 0],
        [0, 1e-9, 1], [1, 1, -1e-12]]
    for d in directions:
        r = builder.rotation_to_z(d)
        unit = np.asarray(d, float) / np.linalg.norm(d)
        np.testing.assert_allclose(r @ r.T, np.eye(3), rtol=0, atol=1e-12, err_msg=str(d))
        assert np.linalg.det(r) == pytest.approx(1.0, abs=1e-12), d
        np.testing.assert_allclose(r @ unit, [0, 0, 1], rtol=0, atol=1e-12, err_msg=str(d))


def d4_interaction_by_pairs(symbols, pos, n_a):
    """E_D4(AB) - E_D4(A) - E_D4(B) in kcal/mol from dftd4's own per-pair energies (additive
    and three-body parts summed over every pair), with the parameters dftd4 loads itself for
    HF: independent of the builder's parameter table and of its total-energy call."""
    from dftd4.interface import DampingParam, DispersionModel
    numbers = np.array([dc.ELEMENT_TO_Z[s.upper()] for s in symbols])

    def energy(sl):
        model = DispersionModel(numbers[sl], np.asarray(pos)[sl] / 0.52917721092)
        pairs = model.get_pairwise_dispersion(DampingParam(method="hf", atm=True))
        return float(pairs["additive pairwise energy"].sum() +
                     pairs["non-additive pairwise energy"].sum())

    return (energy(slice(None)) - energy(slice(0, n_a)) - energy(slice(n_a, None))) * \
        627.5094740631


def test_dispersion_d4_adds_the_d4_interaction_energy_without_repeating_an_scf(
        builder, water_built, tmp_path, monkeypatch, capsys):
    pytest.importorskip("dftd4")
    plain = meta_of(water_built["out"])
    out = str(tmp_path / "d4")
    shutil.copytree(water_built["out"], out)
    with open(os.path.join(out, "w0", "energies.json")) as fh:
        scf_before = json.load(fh)

    def no_scf(*args, **kwargs):
        raise AssertionError("an SCF was run")

    monkeypatch.setattr(builder, "compute_dimer", no_scf)
    assert builder.main([water_built["csv"], "--out", out, "--dispersion", "d4", *MINIMAL]) == 0
    assert "adding the d4 dispersion term" in capsys.readouterr().out
    d4 = meta_of(out)
    for dimer in builder.read_input_csv(water_built["csv"]):  # the geometry the SCF had
        rid = dimer.id
        want = d4_interaction_by_pairs(dimer.symbols, dimer.pos, dimer.n_a)
        assert d4.loc[rid, "E_disp"] == pytest.approx(want, rel=1e-9, abs=1e-12), rid
        assert d4.loc[rid, "V0_HF"] == pytest.approx(plain.loc[rid, "V0"], rel=0, abs=1e-12)
        assert d4.loc[rid, "V0"] == pytest.approx(d4.loc[rid, "V0_HF"] + d4.loc[rid, "E_disp"],
                                                  rel=0, abs=1e-12)
    # dispersion binds, and more so at contact (w0) than 5 Angstrom apart (w2)
    assert d4.loc["w0", "E_disp"] < d4.loc["w2", "E_disp"] < 0
    with open(os.path.join(out, "w0", "energies.json")) as fh:
        after = json.load(fh)
    assert {k: after[k] for k in ("E_AB", "E_A", "E_B", "seconds")} == \
        {k: scf_before[k] for k in ("E_AB", "E_A", "E_B", "seconds")}
    level = builder.read_level_of_theory(out)
    assert level["dispersion"] == "d4" and level["dispersion_parameters"] == \
        builder.d4_parameters("hf") and level["dispersion_parameters"]["s9"] == 1.0
    with pytest.raises(SystemExit) as exc:  # the folder trains as it is
        dc.main(["--root_dir", out, "--check_data"])
    assert exc.value.code == 0
    # one folder, one level: without --dispersion d4 it is another level, refused
    assert builder.main([water_built["csv"], "--out", out, *MINIMAL]) == 2
    assert "dispersion: 'd4' in the folder, 'none' asked" in capsys.readouterr().err
    # a folder built with the term from the start gets the same numbers
    monkeypatch.undo()
    fresh = str(tmp_path / "fresh")
    assert builder.main([water_built["csv"], "--out", fresh, "--dispersion", "d4",
                         *MINIMAL]) == 0
    np.testing.assert_allclose(meta_of(fresh)["E_disp"], d4["E_disp"], rtol=1e-12, atol=0)


def test_corpus_coverage_element_table_counts_dimers_per_element_and_subset(builder):
    """data/corpus/coverage.py's per-element table on four hand-made dimers: the count, share
    and subsets of the dimers holding each element, in atomic-number order."""
    spec = importlib.util.spec_from_file_location(
        "coverage", os.path.join(HERE, "data", "corpus", "coverage.py"))
    coverage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(coverage)
    table = pd.DataFrame({"subset": ["X", "X", "Y", "Y"],
                          "elements": [{"H", "O"}, {"H", "C"}, {"H", "C", "S"}, {"Ar"}]})
    lines = coverage.element_table(table).splitlines()[2:]
    assert lines == ["| H | 3 | 75.0% | X 2, Y 1 |", "| C | 2 | 50.0% | X 1, Y 1 |",
                     "| O | 1 | 25.0% | X 1 |", "| S | 1 | 25.0% | Y 1 |",
                     "| Ar | 1 | 25.0% | Y 1 |"]


def test_s66_transfer_report_leaves_out_near_copies_and_compares_with_hf_and_hf_d4(
        builder, water_built, tmp_path):
    """data/s66/transfer_report.py on three built water dimers named as S66 systems: S66-1
    (a near-copy, with a wild prediction) is left out; the figures of the other two are the
    hand-computed ones, HF + D4 with dftd4's own pair energies."""
    pytest.importorskip("dftd4")
    spec = importlib.util.spec_from_file_location(
        "transfer_report", os.path.join(HERE, "data", "s66", "transfer_report.py"))
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    folder = tmp_path / "s66"
    names = {"w0": "S66-1", "w1": "S66-2", "w2": "S66-30"}
    for w, name in names.items():
        shutil.copytree(os.path.join(water_built["out"], w), folder / name)
    meta = meta_of(water_built["out"])
    cats = {"S66-1": "hydrogen-bonded", "S66-2": "hydrogen-bonded", "S66-30": "dispersion"}
    write_csv(tmp_path / "dimers.csv", [{"id": n, "group": c} for n, c in cats.items()])
    pred = {"S66-1": 100.0, "S66-2": meta.loc["w1", "Vref"] + 0.3,
            "S66-30": meta.loc["w2", "Vref"] - 0.1}
    std = {"S66-1": 0.01, "S66-2": 0.2, "S66-30": 0.15}  # |error| 0.3: within 2 std; 0.1: 1
    write_csv(tmp_path / "pred.csv", [{"id": n, "Vref_pred": pred[n], "Vref_std": std[n],
                                       "Vref": meta.loc[w, "Vref"]} for w, n in names.items()])
    figs = report.transfer_figures(str(tmp_path / "pred.csv"), str(folder),
                                   str(tmp_path / "dimers.csv"))
    assert figs["n_all"] == 3 and figs["all"]["n"] == 2
    assert figs["all"]["mae"] == pytest.approx(0.2) and figs["all"]["max"] == pytest.approx(0.3)
    assert figs["hydrogen-bonded"]["mae"] == pytest.approx(0.3)
    hf = {w: meta.loc[w, "V0"] - meta.loc[w, "Vref"] for w in ("w1", "w2")}
    d4 = {}  # a folder built without D4: the report computes it from the PDBs' geometry
    for w in ("w1", "w2"):
        (z_a, pos_a), (z_b, pos_b) = (dc.parse_pdb(os.path.join(water_built["out"], w, f))
                                      for f in ("A.pdb", "B.pdb"))
        d4[w] = d4_interaction_by_pairs([dc.ELEMENTS[z - 1] for z in [*z_a, *z_b]],
                                        np.concatenate([pos_a, pos_b]), len(z_a))
    assert figs["all"]["mae_hf"] == pytest.approx((abs(hf["w1"]) + abs(hf["w2"])) / 2, abs=1e-9)
    assert figs["dispersion"]["mae_hfd4"] == pytest.approx(abs(hf["w2"] + d4["w2"]), abs=1e-9)
    assert figs["calibration"]["within_1"] == 0.5 and figs["calibration"]["within_2"] == 1.0
    assert figs["calibration"]["spearman"] == pytest.approx(1.0)  # larger std, larger error
    scipy_stats = pytest.importorskip("scipy.stats")
    x, y = np.random.default_rng(0).normal(size=(2, 40))
    y[:5] = y[5]  # with ties
    assert report.spearman(x, y) == pytest.approx(scipy_stats.spearmanr(x, y)[0], abs=1e-12)
    assert [w[0] for w in figs["worst"]] == [2, 30]
    near = tmp_path / "near.csv"
    write_csv(near, [{"id": "X-1", "s66": 1, "near_copy": 1}, {"id": "X-2", "s66": 9,
                                                                "near_copy": 0}])
    report.check_near_copies(str(near))  # S66 #1 is listed; #9 is the same pair, not near
    write_csv(near, [{"id": "X-3", "s66": 9, "near_copy": 1}])
    with pytest.raises(SystemExit, match=r"near-copies of S66 systems \[9\]"):
        report.check_near_copies(str(near))


def test_dispersion_d4_refuses_a_method_without_parameters(builder, water_built, tmp_path,
                                                           capsys):
    pytest.importorskip("dftd4")
    assert builder.main([water_built["csv"], "--out", str(tmp_path / "x"), "--dispersion", "d4",
                         "--method", "lda", *MINIMAL]) == 2
    assert "dftd4 has no bj-eeq-atm parameters for --method 'lda'" in capsys.readouterr().err


def test_counterpoise_makes_the_interaction_less_attractive(builder, water_built, tmp_path):
    out = str(tmp_path / "cp")
    assert builder.main([water_built["csv"], "--out", out, "--counterpoise", *MINIMAL]) == 0
    cp, plain = meta_of(out), meta_of(water_built["out"])
    # BSSE over-binds and counterpoise removes it: large in STO-3G at contact. At 5 Angstrom
    # it is below the density-fitting error (~1e-4 kcal/mol: the ghosts' fitting functions)
    bsse = cp["V0"] - plain["V0"]  # kcal/mol
    assert bsse["w0"] > bsse["w1"] > 0.01  # less attractive, and more so at contact
    assert cp.loc["w2", "V0"] == pytest.approx(plain.loc["w2", "V0"], abs=1e-3)
    e_cp, e_plain = energies_of(out, "w0"), energies_of(water_built["out"], "w0")
    assert e_cp["E_AB"] == pytest.approx(e_plain["E_AB"], rel=0,  # the dimer is the same,
                                         abs=10 * builder.SCF_CONV_TOL)  # to SCF convergence
    assert e_cp["E_A"] < e_plain["E_A"] and e_cp["E_B"] < e_plain["E_B"]  # more basis: lower
    assert builder.read_level_of_theory(out)["counterpoise"] is True


def test_the_input_layouts_give_identical_folders(builder, tmp_path):
    symbols, pos = water_dimer()
    write_xyz(tmp_path / "d.xyz", symbols, pos)
    write_xyz(tmp_path / "e.xyz", symbols, pos, comment="n_atoms_a=3 source=hand")
    write_xyz(tmp_path / "a.xyz", symbols[:3], pos[:3])
    (tmp_path / "b.pdb").write_text(pdb_text(symbols[3:], pos[3:], chain="B"))
    layouts = {"column": [{"id": "w", "xyz": "d.xyz", "n_atoms_a": 3, "Vref": -4.0}],
               "comment": [{"id": "w", "xyz": "e.xyz", "Vref": -4.0}],
               "two_files": [{"id": "w", "geom_a": "a.xyz", "geom_b": "b.pdb", "Vref": -4.0}]}
    outs = {}
    for name, rows in layouts.items():
        outs[name] = str(tmp_path / name)
        assert builder.main([write_csv(tmp_path / f"{name}.csv", rows), "--out", outs[name],
                             *MINIMAL]) == 0
    ref_meta, ref_npz = meta_of(outs["column"]), npz_of(outs["column"], "w")
    for name in ("comment", "two_files"):
        meta = meta_of(outs[name])
        assert list(meta.columns) == list(ref_meta.columns)
        for col in ("R_nm", "theta_deg", "V0", "Vref", "PR"):
            assert meta.loc["w", col] == pytest.approx(ref_meta.loc["w", col], abs=1e-9), col
        for key, arr in npz_of(outs[name], "w").items():
            np.testing.assert_allclose(arr, ref_npz[key], atol=1e-9, err_msg=key)
        for pdb in ("A.pdb", "B.pdb"):
            with open(os.path.join(outs[name], "w", pdb)) as a, \
                    open(os.path.join(outs["column"], "w", pdb)) as b:
                assert a.read() == b.read()


def test_charged_open_shell_and_impossible_dimers(builder, tmp_path, capsys):
    symbols, pos = WATER
    pos = np.asarray(pos, float)
    write_xyz(tmp_path / "water.xyz", symbols, pos)
    write_xyz(tmp_path / "na.xyz", ["Na"], [[0.0, -2.3, 0.0]])  # Na+ facing water's O
    write_xyz(tmp_path / "oh.xyz", ["O", "H"], [[0.0, 0.0, 3.0], [0.0, 0.0, 3.97]])
    write_xyz(tmp_path / "clash.xyz", ["Na"], [[0.1, 0.1, 0.0]])  # on top of water's O
    rows = [{"id": "na", "geom_a": "water.xyz", "geom_b": "na.xyz", "charge_b": 1, "Vref": -20},
            {"id": "oh", "geom_a": "water.xyz", "geom_b": "oh.xyz", "spin_b": 1, "Vref": -2},
            {"id": "oh_singlet", "geom_a": "water.xyz", "geom_b": "oh.xyz", "Vref": -2},
            {"id": "clash", "geom_a": "water.xyz", "geom_b": "clash.xyz", "charge_b": 1,
             "Vref": 1}]
    out = str(tmp_path / "out")
    assert builder.main([write_csv(tmp_path / "ions.csv", rows), "--out", out, *MINIMAL]) == 1
    text = capsys.readouterr().out
    assert "2 dimers done (2 computed now), 2 failed" in text
    with open(os.path.join(out, "failed.json")) as fh:
        failed = json.load(fh)
    assert sorted(failed) == ["clash", "oh_singlet"]
    assert failed["oh_singlet"].startswith("impossible charge/spin: monomer B has 9 electrons")
    assert failed["clash"].startswith("overlapping monomers: atoms of A and B are 0.141 Angstrom")
    meta = meta_of(out)
    assert list(meta.index) == ["na", "oh"]  # the finished rows only
    with pytest.raises(SystemExit) as exc:
        dc.main(["--root_dir", out, "--check_data"])
    assert exc.value.code == 0
    na = npz_of(out, "na")["mulliken_spd"]
    assert na.sum() == pytest.approx(10 + 10) and na[3].sum() == pytest.approx(10, abs=0.5)
    assert meta.loc["na", "V0"] < -10 and meta.loc["na", "theta_deg"] == 0.0  # ion-dipole
    assert [name.removeprefix("DF") for name in energies_of(out, "na")["scf"]] == ["RHF"] * 3
    assert npz_of(out, "oh")["mulliken_spd"].sum() == pytest.approx(10 + 9)
    assert [name.removeprefix("DF") for name in energies_of(out, "oh")["scf"]] == [
        "UHF", "RHF", "UHF"]  # open shell: unrestricted (the dimer has spin 0 + 1)


def test_resume_after_a_failure_recomputes_nothing_that_finished(builder, tmp_path,
                                                                 monkeypatch, capsys):
    csv_path = water_csv(tmp_path)
    out = str(tmp_path / "out")
    real, calls = builder.compute_dimer, []

    def failing_once(dimer, level):
        calls.append(dimer.id)
        if dimer.id == "w1":
            raise builder.DimerFailure("SCF not converged: simulated")
        return real(dimer, level)

    monkeypatch.setattr(builder, "compute_dimer", failing_once)
    assert builder.main([csv_path, "--out", out, *MINIMAL]) == 1
    assert calls == ["w0", "w1", "w2"] and list(meta_of(out).index) == ["w0", "w2"]
    assert "1 x SCF not converged: w1" in capsys.readouterr().out
    with open(os.path.join(out, "failed.json")) as fh:
        assert json.load(fh) == {"w1": "SCF not converged: simulated"}
    assert not os.path.exists(os.path.join(out, "w1", "energies.json"))
    (tmp_path / "out" / "w1").mkdir()
    (tmp_path / "out" / "w1" / "A.pdb").write_text("half-written by a crash\n")
    finished = {rid: os.path.getmtime(os.path.join(out, rid, "dimer.npz")) for rid in ("w0", "w2")}

    calls.clear()
    monkeypatch.setattr(builder, "compute_dimer",
                        lambda dimer, level: calls.append(dimer.id) or real(dimer, level))
    assert builder.main([csv_path, "--out", out, *MINIMAL]) == 0
    assert calls == ["w1"]  # only the failed dimer
    assert {rid: os.path.getmtime(os.path.join(out, rid, "dimer.npz"))
            for rid in ("w0", "w2")} == finished
    assert list(meta_of(out).index) == ["w0", "w1", "w2"]
    assert not os.path.exists(os.path.join(out, "failed.json"))
    assert not [f for _, _, files in os.walk(out) for f in files if ".tmp" in f]


def test_sigterm_stops_a_build_as_ctrl_c_does_and_meta_lists_the_finished(builder, tmp_path,
                                                                          monkeypatch, capsys):
    """A session's or a job's end sends SIGTERM: the finished dimers stay listed in
    meta.xlsx, the exit status is 130, and the same command continues."""
    import signal
    csv_path = water_csv(tmp_path)
    out = str(tmp_path / "out")
    real = builder.compute_dimer

    def terminated_at_w1(dimer, level):
        if dimer.id == "w1":
            os.kill(os.getpid(), signal.SIGTERM)
        return real(dimer, level)

    monkeypatch.setattr(builder, "compute_dimer", terminated_at_w1)
    before = signal.getsignal(signal.SIGTERM)
    assert builder.main([csv_path, "--out", out, *MINIMAL]) == builder.EXIT_INTERRUPTED
    assert signal.getsignal(signal.SIGTERM) is before  # put back
    assert "interrupted: finished dimers are kept" in capsys.readouterr().err
    assert list(meta_of(out).index) == ["w0"]
    monkeypatch.setattr(builder, "compute_dimer", real)
    assert builder.main([csv_path, "--out", out, *MINIMAL]) == 0
    assert list(meta_of(out).index) == ["w0", "w1", "w2"]


def test_bad_csv_rows_are_all_reported_before_any_calculation(builder, tmp_path, monkeypatch,
                                                              capsys):
    symbols, pos = water_dimer()
    write_xyz(tmp_path / "d.xyz", symbols, pos)
    write_xyz(tmp_path / "fe.xyz", ["Fe", "O"], [[0, 0, 0], [0, 0, 3]])
    (tmp_path / "bad.csv").write_text(
        "id,xyz,n_atoms_a,Vref,spin_a,colour\n"
        "ok,d.xyz,3,-1.0,0,red\n"
        "missing,nowhere.xyz,3,-1.0,0,red\n"
        "vref,d.xyz,3,strong,0,red\n"
        "split,d.xyz,6,-1.0,0,red\n"
        "ok,d.xyz,3,-1.0,0,red\n"
        "iron,fe.xyz,1,-1.0,0,red\n"
        "spin,d.xyz,3,-1.0,-1,red\n"
        ",d.xyz,3,-1.0,0,red\n"
        "nosplit,d.xyz,,-1.0,0,red\n")
    monkeypatch.setattr(builder, "compute_dimer", lambda *a: pytest.fail("computed"))
    out = tmp_path / "out"
    assert builder.main([str(tmp_path / "bad.csv"), "--out", str(out), *MINIMAL]) == 2
    err = capsys.readouterr().err
    csv_name = str(tmp_path / "bad.csv")
    expected = [
        "line 1: unknown column 'colour'",
        "line 3 (id missing): xyz file", "nowhere.xyz not found",
        "line 4 (id vref): Vref = 'strong' is not a number",
        "line 5 (id split): n_atoms_a = 6 must be an integer from 1 to 5",
        "line 6 (id ok): duplicate id (also line 2)",
        "line 7 (id iron): xyz file", "element(s) ['Fe'] not supported",
        "line 8 (id spin): spin_a = '-1' is not an integer >= 0",
        "line 9 (id ?): empty id",
        "line 10 (id nosplit): no n_atoms_a"]
    for piece in expected:
        assert piece in err, piece
    assert err.count(csv_name) >= 9 and "nothing computed" in err
    assert not out.exists()  # nothing written either


def test_another_level_of_theory_or_changed_input_is_refused(builder, water_built, tmp_path,
                                                             monkeypatch, capsys):
    out = str(tmp_path / "copy")
    shutil.copytree(water_built["out"], out)
    monkeypatch.setattr(builder, "compute_dimer", lambda *a: pytest.fail("computed"))
    for extra, says in ((["--basis", "3-21g"], "basis: 'sto-3g' in the folder, '3-21g' asked"),
                        (["--counterpoise"], "counterpoise: False in the folder, True asked"),
                        (["--method", "b3lyp"], "method: 'hf' in the folder, 'b3lyp' asked"),
                        (["--no-density-fit"], "density_fit: True in the folder, False asked")):
        assert builder.main([water_built["csv"], "--out", out, *MINIMAL, *extra]) == 2
        err = capsys.readouterr().err
        assert "another level of theory" in err and says in err, extra
    assert builder.main([water_built["csv"], "--out", out, "--method", "nonsense",
                         *MINIMAL]) == 2
    assert "--method 'nonsense'" in capsys.readouterr().err
    assert builder.main([water_built["csv"], "--out", out, *MINIMAL, "--basis", "cc-pvtz"]) == 2
    assert "f (or higher) functions" in capsys.readouterr().err
    # the same level again: everything finished, nothing computed
    assert builder.main([water_built["csv"], "--out", out, *MINIMAL]) == 0
    # a finished id whose geometry changed in the CSV is refused, not silently kept
    symbols, pos = water_dimer(WATER_B_SHIFT + [0.0, 0.5, 0.0])
    write_xyz(water_built["folder"] / "moved.xyz", symbols, pos)
    moved = write_csv(water_built["folder"] / "moved.csv",
                      [{"id": "w0", "xyz": "moved.xyz", "n_atoms_a": 3, "Vref": -5.0}])
    assert builder.main([moved, "--out", out, *MINIMAL]) == 2
    assert "(id w0): finished in" in capsys.readouterr().err


def test_s22x5_driver_reproduces_the_bundled_water_dimer(builder, tmp_path):
    sys.path.insert(0, os.path.join(HERE, "examples"))
    import build_s22x5
    out = str(tmp_path / "s22")
    assert build_s22x5.main(["--out", out, "--only", "Water_dimer", "--multipliers", "1.0"]) == 0
    new, old = meta_of(out), meta_of(S22X5_DIR)
    # the bundled folder was computed on another machine: the SCF energies agree to their
    # convergence threshold (three of them in V0), the density, and so the populations and
    # multipoles, to its square root (PySCF's default gradient threshold); geometry exactly
    scf = {"V0": 3 * builder.SCF_CONV_TOL * builder.HARTREE_TO_KCAL_MOL}
    for col in ("R_nm", "theta_deg", "V0", "Vref", "PR"):
        assert new.loc["Water_dimer_1.0", col] == pytest.approx(
            old.loc["Water_dimer_1.0", col], rel=0, abs=scf.get(col, 1e-9)), col
    assert new.loc["Water_dimer_1.0", "group"] == "Water_dimer"
    for key, arr in npz_of(out, "Water_dimer_1.0").items():
        np.testing.assert_allclose(arr, npz_of(S22X5_DIR, "Water_dimer_1.0")[key], rtol=0,
                                   atol=math.sqrt(builder.SCF_CONV_TOL), err_msg=key)
    for pdb in ("A.pdb", "B.pdb"):
        with open(os.path.join(out, "Water_dimer_1.0", pdb)) as a, \
                open(os.path.join(S22X5_DIR, "Water_dimer_1.0", pdb)) as b:
            assert a.read() == b.read()
    assert builder.read_level_of_theory(out) == {
        **builder.read_level_of_theory(S22X5_DIR),
        "program_version": builder.read_level_of_theory(out)["program_version"]}


# --- several processes: torchrun + DistributedDataParallel (gloo, two CPU processes)
# Each launch starts two fresh interpreters (a few seconds each); the launches are shared.
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
DDP_RUN = ["--epochs", "4", "--device", "cpu", "--compile", "off", "--quiet", *SMALL_RUN]


def torchrun(script, *args, cwd=HERE):
    """Launch ``script`` on two gloo processes; return the CompletedProcess (text)."""
    import subprocess
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": HERE}
    return subprocess.run(TORCHRUN + [script, *map(str, args)], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=600)


def ddp_step_and_evaluation(data_dir, out_path):
    """Run under torchrun (2 ranks, gloo, float64): one SGD step of DDP with batch 2 per rank,
    then an evaluation and a prediction of rows 0-6 split between the ranks; rank 0 saves the
    gradients, weights and figures to ``out_path``."""
    import torch.distributed as dist
    dist.init_process_group("gloo")  # what torchrun's environment says
    dc.DIST = dc.DistEnv(rank=dist.get_rank(), world_size=dist.get_world_size(), active=True)
    torch.set_default_dtype(torch.float64)
    graphs = list(dc.DimerDataset(data_dir, 12.0))
    torch.manual_seed(0)
    model = small_model()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    mine = graphs[2 * dc.DIST.rank:2 * dc.DIST.rank + 2]
    step = dc.run_epoch(ddp, DataLoader(mine, batch_size=2), torch.device("cpu"), optimizer,
                        skip_failed_batches=False)
    part = [graphs[i] for i in dc.rank_part(list(range(7)))]
    evaluation = dc.run_epoch(model, DataLoader(part, batch_size=2), torch.device("cpu"),
                              skip_failed_batches=False)
    rows = dc.predict_rows(model, DataLoader(part, batch_size=2), torch.device("cpu"),
                           skip_failed_batches=False)
    if dc.DIST.master:
        torch.save({"grads": {n: p.grad for n, p in model.named_parameters()},
                    "state": model.state_dict(), "step_loss": step.loss, "n_part": len(part),
                    "eval": {k: getattr(evaluation, k) for k in ("n_graphs", "mape", "mae",
                                                                 "rmse", "baseline_mae")},
                    "rows": {"id": rows["id"], "pred": torch.from_numpy(rows["pred"])}},
                   out_path)
    dc.DIST = dc.DistEnv()  # (the process group stays: main() takes it over)
    torch.set_default_dtype(torch.float32)


@pytest.fixture(scope="module")
def torchrun_runs(tmp_path_factory):
    """One 4-epoch torchrun training on 10 dimers; on a copy of the data the same run stopped
    by Ctrl-C in epoch 3 (every rank) after the DDP step/evaluation checks of
    ``ddp_step_and_evaluation``, and resumed by a third launch."""
    base = tmp_path_factory.mktemp("torchrun")
    straight = write_dataset(str(base / "straight"), 10)
    resumed = str(base / "resumed")
    shutil.copytree(straight, resumed)
    wrapper = base / "interrupted.py"
    wrapper.write_text(
        "import sys\n"
        "import delta_coupling as dc\n"
        "import test_delta_coupling as t\n"
        f"t.ddp_step_and_evaluation({straight!r}, {str(base / 'ddp_checks.pt')!r})\n"
        "real, calls = dc.run_epoch, []\n"
        "def run_epoch(model, loader, device, optimizer=None, *args, **kwargs):\n"
        "    if optimizer is not None:\n"
        "        calls.append(1)\n"
        "        if len(calls) == 3:\n"
        "            raise KeyboardInterrupt\n"
        "    return real(model, loader, device, optimizer, *args, **kwargs)\n"
        "dc.run_epoch = run_epoch\n"
        "dc.main(sys.argv[1:])\n")
    runs = {"base": str(base), "straight": straight, "resumed": resumed}
    runs["straight_run"] = torchrun("delta_coupling.py", "--root_dir", straight, *DDP_RUN)
    runs["interrupted_run"] = torchrun(str(wrapper), "--root_dir", resumed, *DDP_RUN)
    runs["state_path"] = os.path.join(resumed, "models", dc.RESUME_CHECKPOINT)
    runs["interrupted_state"] = torch.load(runs["state_path"], weights_only=True)
    runs["resumed_run"] = torchrun("delta_coupling.py", "--resume", runs["state_path"],
                                   "--device", "cpu")
    return runs


def test_rank_parts_are_contiguous_cover_everything_and_pad_nothing(monkeypatch):
    for n in (0, 1, 5, 7, 12):
        for world in (1, 2, 3, 4):
            parts = []
            for rank in range(world):
                monkeypatch.setattr(dc, "DIST", dc.DistEnv(rank=rank, world_size=world))
                parts.append(dc.rank_part(list(range(n))))
            assert [i for p in parts for i in p] == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_more_processes_than_training_dimers_is_a_clear_error(tmp_path, monkeypatch, capsys):
    root = write_dataset(str(tmp_path / "three"), 3)  # split 1 / 1 / 1
    monkeypatch.setattr(dc, "DIST", dc.DistEnv(world_size=2))
    args = dc.build_arg_parser().parse_args(["--root_dir", root, "--quiet"])
    with pytest.raises(SystemExit) as exc:
        dc.prepare_data(args, torch.device("cpu"))
    assert exc.value.code == 2
    assert ("2 processes but only 1 training dimer: every process needs at least one"
            in capsys.readouterr().err)


def test_torchrun_trains_one_model_and_rank_0_alone_writes(torchrun_runs, tmp_path):
    run = torchrun_runs["straight_run"]
    assert run.returncode == 0, run.stderr[-3000:]
    root = torchrun_runs["straight"]
    assert run.stdout.count("10 dimers from") == 1  # rank 0 alone prints
    assert run.stdout.count("saved ") == 1 and "error" not in run.stderr
    assert sorted(os.listdir(os.path.join(root, "models"))) == sorted([
        dc.BEST_CHECKPOINT, dc.FINAL_CHECKPOINT, dc.RESUME_CHECKPOINT, dc.METRICS_FILE,
        dc.HISTORY_FILE, dc.RUN_CONFIG_FILE, "split_ids.json"])  # one set, no temp files
    assert sorted(os.listdir(os.path.join(root, "plots"))) == sorted([
        dc.LEARNING_CURVES_PLOT, "val_final_delta_learning.png", "test_final_delta_learning.png"])
    final_path = os.path.join(root, "models", dc.FINAL_CHECKPOINT)
    model, final = dc.load_checkpoint(final_path)  # no "module." prefix: loads as it is
    assert not [k for k in final["model_state"] if k.startswith("module.")]
    hashes = [line.split(": ")[1].split() for line in run.stdout.splitlines()
              if line.startswith("parameter sha256 of the 2 ranks")]
    assert len(hashes) == 1 and len(hashes[0]) == 2
    assert hashes[0][0] == hashes[0][1] == dc.parameters_sha256(model)  # bitwise the same
    with open(os.path.join(root, "models", dc.RUN_CONFIG_FILE)) as fh:
        assert json.load(fh)["world_size"] == 2
    # the checkpoint predicts in one process: its test rows give the run's test figures
    copy = str(tmp_path / "copy")
    shutil.copytree(root, copy, ignore=shutil.ignore_patterns("models", "plots", "cached*"))
    out = dc.main(["--predict", "--checkpoint", final_path, "--root_dir", copy, "--quiet",
                   "--device", "cpu"])
    tol = meta_figure_tolerances(root)  # two processes' batches against one process's
    for split in ("train", "val", "test"):
        for who in ("model", "baseline"):
            assert_figures_close(out["metrics"][split][who], final["final_metrics"][split][who],
                                 tol, (split, who))
        assert out["metrics"][split]["n"] == len(final["split_ids"][split])


def test_ddp_step_with_batch_b_per_rank_equals_one_process_with_batch_2b(torchrun_runs,
                                                                        float64):
    assert torchrun_runs["interrupted_run"].returncode != 0  # (stopped by the Ctrl-C below)
    ddp = torch.load(os.path.join(torchrun_runs["base"], "ddp_checks.pt"), weights_only=True)
    graphs = list(dc.DimerDataset(torchrun_runs["straight"], 12.0))
    torch.manual_seed(0)
    model = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    step = dc.run_epoch(model, DataLoader(graphs[:4], batch_size=4), torch.device("cpu"),
                        optimizer, skip_failed_batches=False)
    for name, p in model.named_parameters():  # the union's loss: the same gradient and step
        torch.testing.assert_close(ddp["grads"][name], p.grad, rtol=1e-10, atol=1e-13)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(ddp["state"][key], value, rtol=1e-12, atol=1e-14)
    assert ddp["step_loss"] == pytest.approx(step.loss, rel=1e-12)
    assert any(p.grad.abs().max() > 1e-6 for p in model.parameters())  # a step that moved
    # the evaluation of rows 0-6, split 3 / 4 between the ranks, gives one process's figures
    assert ddp["n_part"] == 3
    single = dc.run_epoch(model, DataLoader(graphs[:7], batch_size=2), torch.device("cpu"),
                          skip_failed_batches=False)
    assert ddp["eval"]["n_graphs"] == single.n_graphs == 7
    tol = meta_figure_tolerances(torchrun_runs["straight"], dtype=torch.float64)
    tol["baseline_mae"] = tol["mae"]
    for key in ("mape", "mae", "rmse", "baseline_mae"):
        assert ddp["eval"][key] == pytest.approx(getattr(single, key), rel=0, abs=tol[key]), key
    rows = dc.predict_rows(model, DataLoader(graphs[:7], batch_size=3), torch.device("cpu"))
    assert ddp["rows"]["id"] == rows["id"]  # joined in rank order: the rows' order
    np.testing.assert_allclose(ddp["rows"]["pred"].numpy(), rows["pred"], rtol=0,
                               atol=scaled_atol(rows["pred"], dtype=torch.float64, floor=1.0))


def test_torchrun_interrupt_then_resume_reproduces_the_straight_run(torchrun_runs):
    interrupted = torchrun_runs["interrupted_run"]
    state_path = torchrun_runs["state_path"]
    assert interrupted.stderr.count(
        f"continue with: torchrun --nproc_per_node=2 delta_coupling.py --resume {state_path}") \
        == 1, interrupted.stderr[-3000:]
    state = torchrun_runs["interrupted_state"]
    assert state["epoch"] == 2 and state["world_size"] == 2 and len(state["rng_ranks"]) == 2
    assert not torch.equal(state["rng_ranks"][0]["rng_torch"], state["rng_ranks"][1]["rng_torch"])
    resumed = torchrun_runs["resumed_run"]
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.count("resumed from") == 1
    one, two = (torch.load(os.path.join(torchrun_runs[r], "models", dc.FINAL_CHECKPOINT),
                           weights_only=True) for r in ("straight", "resumed"))
    assert [h["epoch"] for h in two["history"]] == [1, 2, 3, 4]
    assert [h["train_loss"] for h in two["history"]] == pytest.approx(
        [h["train_loss"] for h in one["history"]], rel=0,
        abs=meta_figure_tolerances(torchrun_runs["straight"])["mae"])
    for key, value in one["model_state"].items():
        assert_tensors_close(two["model_state"][key], value, key)


def test_a_torchrun_state_resumes_only_with_its_number_of_processes(torchrun_runs, capsys):
    with pytest.raises(SystemExit) as exc:
        dc.main(["--resume", torchrun_runs["state_path"], "--device", "cpu"])
    assert exc.value.code == 2
    assert ("world_size: saved by 2 processes, this launch has 1; a run resumes with its own "
            "number of processes: torchrun --nproc_per_node=2 delta_coupling.py --resume "
            f"{torchrun_runs['state_path']}") in capsys.readouterr().err


# --- the command line as a user meets it: `python delta_coupling.py` and
# `python preprocess_and_cache.py` in their own interpreters (run as __main__, the module
# imported by its companions), each error ending in its one line and its exit status
CLI_RUN = ["--device", "cpu", "--compile", "off", "--quiet", *SMALL_RUN]


def run_script(script, *args, timeout=300):
    """``python <script> args`` from the repository, one torch thread; CompletedProcess."""
    import subprocess
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, os.path.join(HERE, script), *map(str, args)],
                          cwd=HERE, env=env, text=True, capture_output=True, timeout=timeout)


def temp_files(root):
    """The atomic writers' temp files (``.<name>.tmp.<pid>``) left anywhere under root."""
    return [os.path.join(d, f) for d, _, files in os.walk(root) for f in files if ".tmp." in f]


def assert_one_line_error(proc, code, *fragments):
    """Exit status ``code``; stderr's last line is ``error: ...`` naming every fragment; no
    traceback."""
    assert proc.returncode == code, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in last, (fragment, last)


@pytest.mark.parametrize("script", ["delta_coupling.py", "preprocess_and_cache.py"])
def test_cli_cache_folder_blocked_by_a_file(tmp_path, script):
    """The OutputError is raised in preprocess_and_cache's build_cache (imported lazily by
    the script): main() catches it only when both see one delta_coupling module."""
    root = write_dataset(str(tmp_path / "data"), 6)
    blocker = os.path.join(root, "cached_graphs_shards")
    open(blocker, "w").close()
    proc = run_script(script, "--root_dir", root, *(CLI_RUN if script == "delta_coupling.py"
                                                    else ["--quiet"]), "--epochs", "1") \
        if script == "delta_coupling.py" else run_script(script, "--root_dir", root, "--quiet")
    assert_one_line_error(proc, 2, blocker, "a file is in the way")
    assert os.path.isfile(blocker) and not os.path.exists(os.path.join(root, "cached_graphs.pt"))
    assert temp_files(root) == []


def test_cli_models_folder_blocked_by_a_file(tmp_path):
    root = write_dataset(str(tmp_path / "data"), 6)
    blocker = os.path.join(root, "models")
    open(blocker, "w").close()
    proc = run_script("delta_coupling.py", "--root_dir", root, "--epochs", "1", *CLI_RUN)
    assert_one_line_error(proc, 2, blocker, "a file is in the way")
    assert os.path.isfile(blocker) and temp_files(root) == []


@pytest.mark.parametrize("damage", ["truncated", "bytes changed"])
def test_cli_damaged_cache_shard(tmp_path, damage):
    root = write_dataset(str(tmp_path / "data"), 6)
    built = run_script("preprocess_and_cache.py", "--root_dir", root, "--quiet")
    assert built.returncode == 0, built.stderr[-3000:]
    [shard] = glob_shards(root)
    with open(shard, "rb") as fh:
        blob = bytearray(fh.read())
    if damage == "truncated":
        blob = blob[:len(blob) // 2]
    else:  # same size, other bytes: only the checksum can tell
        blob[len(blob) // 2] ^= 0xFF
    with open(shard, "wb") as fh:
        fh.write(blob)
    proc = run_script("delta_coupling.py", "--root_dir", root, "--epochs", "1", *CLI_RUN)
    assert_one_line_error(proc, 2, shard, "python preprocess_and_cache.py --root_dir")
    assert not os.path.exists(os.path.join(root, "models", dc.BEST_CHECKPOINT))
    assert temp_files(root) == []


def glob_shards(root):
    import glob
    return sorted(glob.glob(os.path.join(root, "cached_graphs_shards", "*", "shard_*.pt")))


@pytest.mark.parametrize("script", ["delta_coupling.py", "preprocess_and_cache.py"])
def test_cli_bad_data_folder_lists_the_row_and_writes_nothing(tmp_path, script):
    root = write_dataset(str(tmp_path / "data"), 6)
    with open(os.path.join(root, "d2", "A.pdb"), "w") as fh:
        fh.write("not a PDB\n")
    args = ["--epochs", "1", *CLI_RUN] if script == "delta_coupling.py" else ["--quiet"]
    proc = run_script(script, "--root_dir", root, *args)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[0] == f"error: checked 6 rows of {root}: 1 problem", proc.stderr
    assert any(os.path.join(root, "meta.xlsx") + ", row 4 (id dimer2)" in line and
               "no ATOM/HETATM records" in line for line in lines), proc.stderr
    assert sorted(os.listdir(root)) == ["d0", "d1", "d2", "d3", "d4", "d5", "meta.xlsx"]


def test_cli_ctrl_c_during_training_keeps_the_state_and_says_how_to_resume(tmp_path):
    import signal
    import subprocess
    import time
    root = write_dataset(str(tmp_path / "data"), 6)
    state = os.path.join(root, "models", dc.RESUME_CHECKPOINT)
    # --patience too: tiny epochs take milliseconds, so 250 stale ones (the default) can end the
    # run normally before the signal arrives (with the signal lost, it did: exit status 0)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "delta_coupling.py"),
                             "--root_dir", root, "--epochs", "100000", "--patience", "100000",
                             *CLI_RUN], cwd=HERE,
                            env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            # Ctrl-C's default action even when pytest itself was started in
                            # the background (`cmd &` ignores SIGINT, and a child inherits that)
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 240
        while not os.path.exists(state) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None and os.path.exists(state), "no epoch finished in time"
        time.sleep(0.5)  # into a later epoch, or a checkpoint write: either must end cleanly
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == dc.EXIT_INTERRUPTED, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert f"continue with: python delta_coupling.py --resume {state}" in err, err[-3000:]
    saved = torch.load(state, weights_only=True)  # whole, and not the final checkpoint
    assert saved["epoch"] >= 1 and saved["config"]["epochs"] == 100000
    assert not os.path.exists(os.path.join(root, "models", dc.FINAL_CHECKPOINT))
    assert temp_files(root) == []


def test_one_module_when_run_as_a_script(tmp_path):
    """Run as __main__, delta_coupling is also what `import delta_coupling` gives, so the
    companions share its classes and constants (checked in a child interpreter running the
    file by runpy, as `python delta_coupling.py` does)."""
    import subprocess
    code = ("import runpy, sys\n"
            f"sys.argv = [{os.path.join(HERE, 'delta_coupling.py')!r}, '--help']\n"
            "try:\n"
            "    runpy.run_path(sys.argv[0], run_name='__main__')\n"
            "except SystemExit:  # --help\n"
            "    pass\n"
            "import delta_coupling, preprocess_and_cache\n"
            "assert delta_coupling.__name__ == '__main__', 'two copies of delta_coupling'\n"
            "assert preprocess_and_cache.OutputError is delta_coupling.OutputError\n"
            "assert preprocess_and_cache.DEFAULT_CACHE_FILE is delta_coupling.DEFAULT_CACHE_FILE\n"
            "print('one module')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=str(tmp_path), text=True,
                          capture_output=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": HERE, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0 and "one module" in proc.stdout, proc.stderr[-3000:]
