"""Turn your own dimers (geometries + reference energies) into a DeltaCoupling data folder.

Usage::

    pip install pyscf ase dftd4               # build-time only (see examples/requirements.txt)
    python tools/build_dataset.py dimers.csv --out my_dimers [--basis def2-svp] [--method hf]
                                  [--dispersion d4]
    python delta_coupling.py --root_dir my_dimers            # train (every row has a Vref)
    python delta_coupling.py --predict --checkpoint BEST.pt --root_dir my_dimers   # no Vref

The CSV has one row per dimer (column names are case-insensitive; paths are relative to the
CSV's folder):

* ``id`` (required): the dimer's name, also the name of its folder in the output;
* the geometry, either ``xyz`` (one XYZ/extended-XYZ file with A's atoms first; the split in a
  column ``n_atoms_a`` or in the file's comment line as ``n_atoms_a=K``) or ``geom_a`` and
  ``geom_b`` (one file per monomer). Files are read with ASE, so any single-structure format
  ASE reads works (XYZ, PDB, ...). Elements H to Ca, positions in Angstrom;
* ``Vref`` (optional; kcal/mol, the unit of V0): every row has one (a folder to train on) or
  none (a folder for ``--predict``);
* ``charge_a``, ``charge_b`` (default 0) and ``spin_a``, ``spin_b`` (default 0): the monomers'
  charges and 2S = N_alpha - N_beta (0 singlet, 1 doublet, 2 triplet; PySCF's ``spin``). The
  dimer has charge_a + charge_b and spin_a + spin_b (the high-spin coupling);
* ``group`` (optional): rows of one group stay in one split when training;
* ``PR`` (optional): the per-dimer scalar descriptor; when empty, the contact ratio below.

For each row it writes ``<out>/<id>/A.pdb``, ``B.pdb`` (the monomers in the dimer frame),
``dimer.npz`` (Mulliken s/p/d populations per atom, dipole in Debye, traceless quadrupole in
Debye*Angstrom, from the dimer calculation) and ``energies.json`` (the raw energies in Hartree,
written last: it marks the dimer finished), and at the end ``<out>/meta.xlsx`` from every
finished row, ``<out>/level_of_theory.json`` and, when a dimer failed, ``<out>/failed.json``.

Frame and descriptors (as the bundled example ``examples/s22x5``): the dimer is translated and
rotated so that A's centroid (unweighted mean of its atom positions) is the origin and B's
centroid lies on +z; ``R_nm`` is the distance of the two centroids; ``theta_deg`` the acute angle
between the monomers' first principal axes (largest-variance direction of the atom positions;
0 when a monomer has one atom); the dipole and the quadrupole are taken about the centroid of
all atoms. ``PR`` when not given: the contact ratio, min over atom pairs a in A, b in B of
d_ab / (r_vdW(a) + r_vdW(b)) with the van der Waals radii below (about 1 at van der Waals
contact, smaller for hydrogen bonds and ion contacts, larger when the monomers are apart).

Dispersion: ``--dispersion d4`` adds the DFT-D4 interaction dispersion energy E_D4(AB) - E_D4(A)
- E_D4(B) (the ``dftd4`` package: the method's damping parameters, EEQ charges from each
molecule's charge, the three-body term on) to V0, milliseconds per dimer; meta.xlsx keeps
``V0_HF`` and ``E_disp`` beside V0, energies.json ``E_disp_AB``, ``E_disp_A``, ``E_disp_B``
(Hartree). Run on a folder built without it, it adds the term to every finished dimer from its
geometry, no SCF repeated.

Baseline: V0 = E_AB - E_A - E_B in kcal/mol, Hartree-Fock (default) or a DFT functional, with
density fitting (def2-universal-jkfit) unless ``--no-density-fit``; closed-shell singlets are
restricted (RHF/RKS), anything with spin > 0 unrestricted (UHF/UKS). ``--counterpoise``
computes E_A and E_B in the full dimer basis (the partner's atoms as ghost atoms: basis
functions without nuclei or electrons), which removes the basis-set superposition error.

Long runs: a progress bar with an ETA; a finished dimer is never recomputed (run the same
command again to continue after a crash, Ctrl-C or SIGTERM, which write meta.xlsx of the
finished dimers first); a dimer that fails (SCF not converged, an element the basis lacks,
overlapping monomers, impossible charge/spin) is recorded with its reason in failed.json and
the others go on; the exit status is 1 when any failed.
Exit status: 0 all done, 1 some dimer failed, 2 bad input (every bad CSV row is listed before
any calculation) or a level of theory other than the folder's, 130 interrupted.
"""
import argparse
import csv
import json
import math
import multiprocessing
import os
import re
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the repository root: delta_coupling.py
import delta_coupling as dc  # noqa: E402  (the data contract: elements, checks, atomic writes)

BUILDER_VERSION = "1"  # bump when the frame, the descriptors or the NPZ/meta content change
HARTREE_TO_KCAL_MOL = 627.5094740631  # kcal/mol per Hartree (CODATA 2018)
ANGSTROM_TO_BOHR = 1.0 / 0.52917721092  # bohr per Angstrom (PySCF's BOHR)
DEFAULT_METHOD = "hf"
DEFAULT_BASIS = "def2-svp"
DEFAULT_AUXBASIS = "def2-universal-jkfit"  # density-fitting basis, H to Rn
SCF_CONV_TOL = 1e-9  # Hartree: SCF energy convergence
ANGULAR_LETTERS = "spd"  # Mulliken populations kept per atom: l = 0, 1, 2
PDB_DECIMALS_ANGSTROM = 1.5e-3  # a finished dimer's PDB must match its input this well
ANTIPARALLEL_TOL = 1e-6  # 1 + cos below this: the frame's rotation goes by a turn about x
LEVEL_FILE = dc.LEVEL_OF_THEORY_FILE  # <out>/: the level every dimer of the folder has
FAILED_FILE = "failed.json"  # <out>/: id -> reason, of the dimers that failed in the last run
FINISHED_FILE = "energies.json"  # <out>/<id>/: raw energies; written last, marks it finished
LEVEL_KEYS = dc.LEVEL_OF_THEORY_KEYS  # must agree within a folder
RESERVED_IDS = ("models", "plots")  # folders training writes into the data folder
EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 1, 2, 130
# van der Waals radii (Angstrom) for the contact ratio (PR): Bondi (1964) and, for Be, B, Al,
# Ca, Mantina et al., J. Phys. Chem. A 113, 5806 (2009); the values of ase.data.vdw_radii
VDW_RADII_ANGSTROM = {
    "H": 1.20, "He": 1.40, "Li": 1.82, "Be": 1.53, "B": 1.92, "C": 1.70, "N": 1.55, "O": 1.52,
    "F": 1.47, "Ne": 1.54, "Na": 2.27, "Mg": 1.73, "Al": 1.84, "Si": 2.10, "P": 1.80,
    "S": 1.80, "Cl": 1.75, "Ar": 1.88, "K": 2.75, "Ca": 2.31}
CSV_COLUMNS = ("id", "xyz", "n_atoms_a", "geom_a", "geom_b", "Vref", "charge_a", "charge_b",
               "spin_a", "spin_b", "group", "PR")
META_COLUMNS = ("id", "pdb_a", "pdb_b", "npz", "R_nm", "theta_deg", "V0", "Vref", "PR", "group")
DISPERSION_META_COLUMNS = ("V0_HF", "E_disp")  # with --dispersion d4: V0's parts, kcal/mol
DISPERSION_MODELS = ("none", "d4")
DEFAULT_DISPERSION = "none"
D4_PARAMETER_SET = "bj-eeq-atm"  # rational (BJ) damping, EEQ charges, three-body ATM term on
D4_KEYS = ("E_disp_AB", "E_disp_A", "E_disp_B")  # energies.json: Hartree, like E_AB, E_A, E_B


class BuildInputError(ValueError):
    """Bad input found before any calculation: ``problems`` lists every one."""

    def __init__(self, problems):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class DimerFailure(RuntimeError):
    """One dimer cannot be computed (recorded with this message; the others go on)."""


@dataclass
class DimerInput:
    """One CSV row, read and checked; positions in the dimer frame (Angstrom)."""
    id: str
    where: str  # "<csv>, line N (id X)" for messages
    symbols: list  # (N,) element symbols, A's atoms first
    pos: np.ndarray  # (N, 3) Angstrom: A's centroid at 0, B's on +z
    n_a: int
    charge_a: int = 0
    charge_b: int = 0
    spin_a: int = 0
    spin_b: int = 0
    vref: float = None  # kcal/mol, or None
    group: str = None
    pr: float = None  # the CSV's PR, or None (then the contact ratio)
    r_angstrom: float = field(default=0.0)


# ----------------------------------------------------------------------------- frame
def rotation_to_z(direction):
    """Proper rotation matrix R (3, 3) with R @ unit(direction) = +z (Rodrigues)."""
    d = np.asarray(direction, float) / np.linalg.norm(direction)  # (3,)
    z = np.array([0.0, 0.0, 1.0])
    c = float(d @ z)  # cos of the angle
    if 1.0 + c < ANTIPARALLEL_TOL:  # at and near -z, 1 + c has lost its digits (0 on -z):
        flip = np.diag([1.0, -1.0, -1.0])  # turn 180 deg about x first, then from near +z
        return rotation_to_z(flip @ d) @ flip
    v = np.cross(d, z)  # (3,) rotation axis * sin
    vx = np.array([[0, -v[2], v[1]], [v[2], 0, -v[0]], [-v[1], v[0], 0]])
    return np.eye(3) + vx + vx @ vx / (1.0 + c)


def dimer_frame(pos, n_a):
    """(pos (N, 3) Angstrom with A's centroid at 0 and B's on +z, R in Angstrom)."""
    pos = np.asarray(pos, float)
    c_a, c_b = pos[:n_a].mean(0), pos[n_a:].mean(0)  # (3,) each
    rot = rotation_to_z(c_b - c_a)
    return (pos - c_a) @ rot.T, float(np.linalg.norm(c_b - c_a))


def first_principal_axis(pos):
    """Unit vector (3,) of largest spread of an atom cloud (unweighted covariance)."""
    centred = pos - pos.mean(0)  # (N, 3)
    evals, evecs = np.linalg.eigh(centred.T @ centred)
    return evecs[:, np.argmax(evals)]


def theta_deg(pos, n_a):
    """Acute angle (degrees) between A's and B's first principal axes; 0 for a lone atom."""
    if n_a == 1 or len(pos) - n_a == 1:
        return 0.0
    cos = abs(float(first_principal_axis(pos[:n_a]) @ first_principal_axis(pos[n_a:])))
    return float(np.degrees(np.arccos(min(1.0, cos))))


def intermonomer_distances(pos, n_a):
    """(N_A, N_B) Angstrom: every distance between an atom of A and an atom of B."""
    return np.linalg.norm(pos[:n_a, None, :] - pos[None, n_a:, :], axis=-1)


def contact_ratio(symbols, pos, n_a):
    """The default PR: min over a in A, b in B of d_ab / (r_vdW(a) + r_vdW(b))."""
    radii = np.array([VDW_RADII_ANGSTROM[s] for s in symbols])  # (N,) Angstrom
    contact = radii[:n_a, None] + radii[None, n_a:]  # (N_A, N_B) Angstrom
    return float((intermonomer_distances(pos, n_a) / contact).min())


def write_pdb(path, symbols, pos, chain):
    """Minimal PDB with HETATM records and the element in columns 77-78, atomically."""
    lines = []
    for i, (sym, (x, y, z)) in enumerate(zip(symbols, pos), start=1):
        name = f"{sym}{i}"[:4]
        lines.append(
            f"HETATM{i:5d} {name:<4s} MOL {chain}   1    "
            f"{x:8.3f}{y:8.3f}{z:8.3f}  1.00  0.00          {sym:>2s}"
        )
    lines.append("END")
    dc.atomic_write_text("\n".join(lines) + "\n", path)


# ----------------------------------------------------------------------------- input CSV
def _read_structure(path, what):
    """(symbols, positions (N, 3) Angstrom, info dict) of the one structure in ``path``."""
    import ase.io
    from ase.io.formats import UnknownFileTypeError

    if not os.path.isfile(path):
        raise ValueError(f"{what} file {path} not found")
    try:
        frames = ase.io.read(path, index=":")
    except (OSError, ValueError, KeyError, IndexError, UnknownFileTypeError) as exc:
        raise ValueError(f"{what} file {path} cannot be read by ASE ({type(exc).__name__}: "
                         f"{exc}); write it as XYZ or PDB") from None
    if len(frames) != 1:
        raise ValueError(f"{what} file {path} holds {len(frames)} structures; give one "
                         f"structure per file")
    atoms = frames[0]
    symbols = atoms.get_chemical_symbols()
    bad = sorted({s for s in symbols if s.upper() not in dc.ELEMENT_TO_Z})
    if bad:
        raise ValueError(f"{what} file {path}: element(s) {bad} not supported (the model "
                         f"takes {dc.ELEMENTS[0]} to {dc.ELEMENTS[-1]})")
    if not symbols:
        raise ValueError(f"{what} file {path} holds no atoms")
    return symbols, np.asarray(atoms.positions, float), atoms.info


def _int_cell(rec, col, default, minimum=None):
    text = rec.get(col, "")
    if text == "":
        return default
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value.is_integer() or (minimum is not None and value < minimum):
        raise ValueError(f"{col} = {text!r} is not an integer"
                         + ("" if minimum is None else f" >= {minimum}"))
    return int(value)


def _float_cell(rec, col):
    text = rec.get(col, "")
    if text == "":
        return None
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{col} = {text!r} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"{col} = {text!r} is not a finite number")
    return value


def _row_geometry(rec, folder, problems, where):
    """(symbols, pos, n_a) of one row, or None with the problems appended."""
    if rec.get("xyz"):
        if rec.get("geom_a") or rec.get("geom_b"):
            problems.append(f"{where}: give either xyz or geom_a + geom_b, not both")
            return None
        try:
            symbols, pos, info = _read_structure(os.path.join(folder, rec["xyz"]), "xyz")
        except ValueError as exc:
            problems.append(f"{where}: {exc}")
            return None
        try:
            n_a = _int_cell(rec, "n_atoms_a", None, minimum=1)
        except ValueError as exc:
            problems.append(f"{where}: {exc}")
            return None
        in_file = info.get("n_atoms_a")
        if n_a is None and in_file is None:
            problems.append(f"{where}: no n_atoms_a: write the number of A's atoms in column "
                            f"n_atoms_a or as n_atoms_a=K in the XYZ comment line")
            return None
        if n_a is not None and in_file is not None and int(in_file) != n_a:
            problems.append(f"{where}: n_atoms_a = {n_a} in the CSV but {in_file} in "
                            f"{rec['xyz']}; make them agree")
            return None
        n_a = n_a if n_a is not None else in_file
        if not (isinstance(n_a, (int, np.integer)) and 1 <= n_a < len(symbols)):
            problems.append(f"{where}: n_atoms_a = {n_a!r} must be an integer from 1 to "
                            f"{len(symbols) - 1} ({rec['xyz']} holds {len(symbols)} atoms)")
            return None
        return symbols, pos, int(n_a)
    if not (rec.get("geom_a") and rec.get("geom_b")):
        problems.append(f"{where}: no geometry: fill column xyz (one file, A's atoms first) or "
                        f"both geom_a and geom_b")
        return None
    if rec.get("n_atoms_a"):
        problems.append(f"{where}: n_atoms_a is for an xyz file; leave it empty with geom_a "
                        f"and geom_b")
        return None
    parts = []
    for col in ("geom_a", "geom_b"):
        try:
            parts.append(_read_structure(os.path.join(folder, rec[col]), col))
        except ValueError as exc:
            problems.append(f"{where}: {exc}")
    if len(parts) < 2:
        return None
    (sym_a, pos_a, _), (sym_b, pos_b, _) = parts
    return sym_a + sym_b, np.concatenate([pos_a, pos_b]), len(sym_a)


def read_input_csv(csv_path):
    """Read and check every row of the input CSV. Returns the list of ``DimerInput``.

    Raises ``BuildInputError`` listing every problem (file, line, id, what is wrong).
    """
    if not os.path.isfile(csv_path):
        raise BuildInputError([f"{csv_path}: input CSV not found"])
    folder = os.path.dirname(os.path.abspath(csv_path))
    problems, dimers, seen = [], [], {}
    with open(csv_path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if not header:
            raise BuildInputError([f"{csv_path}: empty file; write a header line "
                                   f"({', '.join(CSV_COLUMNS)})"])
        known = {c.lower(): c for c in CSV_COLUMNS}
        names = [h.strip() for h in header]
        for h in names:
            if h.lower() not in known:
                problems.append(f"{csv_path}, line 1: unknown column {h!r}; the columns are "
                                f"{', '.join(CSV_COLUMNS)} (case-insensitive)")
        lowered = [h.lower() for h in names]
        for h in sorted({h for h in lowered if lowered.count(h) > 1}):
            problems.append(f"{csv_path}, line 1: column {known.get(h, h)} appears twice")
        if "id" not in lowered:
            problems.append(f"{csv_path}, line 1: no id column; give every dimer an id")
        line = reader.line_num
        for cells in reader:
            start, line = line + 1, reader.line_num
            if not any(c.strip() for c in cells):
                continue
            rec = {known[h]: c.strip() for h, c in zip(lowered, cells) if h in known}
            rid = rec.get("id", "")
            where = f"{csv_path}, line {start} (id {rid or '?'})"
            if len(cells) > len(names):
                problems.append(f"{where}: {len(cells)} cells but {len(names)} columns in "
                                f"the header")
            n_problems = len(problems)
            if not rid:
                problems.append(f"{where}: empty id; give every dimer an id")
            elif (re.search(r"[/\\\x00]", rid) or rid.startswith(".")
                  or rid.lower() in RESERVED_IDS):
                problems.append(f"{where}: id {rid!r} cannot be a folder name (no / or \\, no "
                                f"leading dot, not {' or '.join(RESERVED_IDS)})")
            elif rid in seen:
                problems.append(f"{where}: duplicate id (also line {seen[rid]})")
            seen.setdefault(rid, start)
            values = {}
            for col, read in (("charge_a", lambda r, c: _int_cell(r, c, 0)),
                              ("charge_b", lambda r, c: _int_cell(r, c, 0)),
                              ("spin_a", lambda r, c: _int_cell(r, c, 0, minimum=0)),
                              ("spin_b", lambda r, c: _int_cell(r, c, 0, minimum=0)),
                              ("Vref", _float_cell), ("PR", _float_cell)):
                try:
                    values[col] = read(rec, col)
                except ValueError as exc:
                    problems.append(f"{where}: {exc}")
            geometry = _row_geometry(rec, folder, problems, where)
            if len(problems) > n_problems:
                continue
            symbols, pos, n_a = geometry
            pos, r_angstrom = dimer_frame(pos, n_a)
            dimers.append(DimerInput(
                id=rid, where=where, symbols=[s.capitalize() for s in symbols], pos=pos,
                n_a=n_a, charge_a=values["charge_a"], charge_b=values["charge_b"],
                spin_a=values["spin_a"], spin_b=values["spin_b"], vref=values["Vref"],
                group=rec.get("group") or None, pr=values["PR"], r_angstrom=r_angstrom))
    if not dimers and not problems:
        problems.append(f"{csv_path}: no data rows; add one row per dimer below the header")
    with_vref = [d for d in dimers if d.vref is not None]
    if with_vref and len(with_vref) < len(dimers):
        missing = [d.id for d in dimers if d.vref is None]
        problems.append(f"{csv_path}: Vref is given for {len(with_vref)} rows but empty for "
                        f"{len(missing)} (ids {', '.join(missing[:5])}"
                        f"{', ...' if len(missing) > 5 else ''}); give every row a Vref (a "
                        f"folder to train on) or none (a folder for --predict)")
    if problems:
        raise BuildInputError(problems)
    return dimers


# ----------------------------------------------------------------------------- level of theory
def level_of_theory(method=DEFAULT_METHOD, basis=DEFAULT_BASIS, density_fit=True,
                    auxbasis=DEFAULT_AUXBASIS, counterpoise=False,
                    dispersion=DEFAULT_DISPERSION):
    """The record written to ``<out>/level_of_theory.json``; raises ``ValueError`` for an
    unknown method, basis or auxiliary basis, a basis with f (or higher) functions, or a
    dispersion model without parameters for the method."""
    import pyscf
    from pyscf import gto
    from pyscf.dft import libxc
    from pyscf.lib.exceptions import BasisNotFoundError

    method, basis = method.strip().lower(), basis.strip().lower()
    auxbasis = auxbasis.strip().lower() if density_fit else None
    if method != "hf":
        try:
            libxc.parse_xc(method)
        except KeyError:
            raise ValueError(f"--method {method!r}: neither hf nor a functional PySCF knows "
                             f"(e.g. b3lyp, pbe0, wb97x)") from None
    for name, what in ((basis, "--basis"), (auxbasis, "--auxbasis")):
        if name is None:
            continue
        try:
            shells = gto.basis.load(name, "C")
        except BasisNotFoundError:
            raise ValueError(f"{what} {name!r}: PySCF knows no such basis") from None
        if what == "--basis" and max(shell[0] for shell in shells) > 2:
            raise ValueError(f"--basis {name!r} has f (or higher) functions on carbon; the data "
                             f"format keeps Mulliken s, p and d populations only: choose a "
                             f"basis with s, p and d functions (def2-svp, 6-31g*, cc-pvdz, ...)")
    record = {"method": method, "basis": basis, "density_fit": bool(density_fit),
              "auxbasis": auxbasis, "counterpoise": bool(counterpoise), "program": "pyscf",
              "program_version": pyscf.__version__, "builder_version": BUILDER_VERSION,
              "dispersion": dispersion}
    if dispersion not in DISPERSION_MODELS:
        raise ValueError(f"--dispersion {dispersion!r}: choose one of "
                         f"{', '.join(DISPERSION_MODELS)}")
    if dispersion == "d4":
        import dftd4
        record["dispersion_parameters"] = d4_parameters(method)
        record["dispersion_program"] = f"dftd4 {dftd4.__version__} ({D4_PARAMETER_SET})"
    return record


# ----------------------------------------------------------------------------- dispersion
# --dispersion d4 adds the DFT-D4 interaction dispersion energy E_D4(AB) - E_D4(A) - E_D4(B) to
# V0 (milliseconds per dimer, no SCF): the dftd4 package's model with EEQ charges for each
# molecule's total charge, rational damping and the three-body (ATM) term, with the damping
# parameters dftd4 publishes for the builder's --method. HF has no dispersion at all, so
# without it dV has to learn all of it (docs/DESIGN.md, decision 25).
def d4_parameters(method):
    """The D4 damping parameters of ``method`` (``bj-eeq-atm``: s6, s8, s9, a1, a2, alp) from
    the dftd4 package's own parameter table; ``ValueError`` when it has none for the method."""
    import tomllib

    import dftd4
    with open(os.path.join(os.path.dirname(dftd4.__file__), "parameters.toml"), "rb") as fh:
        table = tomllib.load(fh)
    params = dict(table["default"]["parameter"]["d4"][D4_PARAMETER_SET])
    entry = table["parameter"].get(method.lower().replace("-", ""), {}).get("d4", {})
    if D4_PARAMETER_SET not in entry:
        raise ValueError(f"--dispersion d4: dftd4 has no {D4_PARAMETER_SET} parameters for "
                         f"--method {method!r}; use a method it lists (hf, pbe0, b3lyp, ...) "
                         f"or --dispersion none")
    params.update(entry[D4_PARAMETER_SET])
    return {k: float(params[k]) for k in ("s6", "s8", "s9", "a1", "a2", "alp")}


def d4_energy(symbols, pos, charge, params):
    """DFT-D4 dispersion energy (Hartree) of one molecule: ``pos`` (N, 3) Angstrom, EEQ
    charges for the total ``charge``."""
    from dftd4.interface import DampingParam, DispersionModel
    numbers = np.array([dc.ELEMENT_TO_Z[s.upper()] for s in symbols])
    model = DispersionModel(numbers, np.asarray(pos, dtype=float) * ANGSTROM_TO_BOHR,
                            charge=float(charge))
    return float(model.get_dispersion(DampingParam(**params), grad=False)["energy"])


def d4_parts(symbols, pos, n_a, charge_a, charge_b, params):
    """{E_disp_AB, E_disp_A, E_disp_B} in Hartree: D4 of a dimer (``pos`` (N, 3) Angstrom, A's
    ``n_a`` atoms first) and of each monomer in its place in it."""
    return {"E_disp_AB": d4_energy(symbols, pos, charge_a + charge_b, params),
            "E_disp_A": d4_energy(symbols[:n_a], pos[:n_a], charge_a, params),
            "E_disp_B": d4_energy(symbols[n_a:], pos[n_a:], charge_b, params)}


def d4_energies(dimer, params):
    """``d4_parts`` of a ``DimerInput``."""
    return d4_parts(dimer.symbols, dimer.pos, dimer.n_a, dimer.charge_a, dimer.charge_b, params)


def interaction_kcal(energies, keys=("E_AB", "E_A", "E_B")):
    """E(AB) - E(A) - E(B) in kcal/mol from a record's energies in Hartree: the SCF's, or with
    ``keys=D4_KEYS`` the D4 term's."""
    e_ab, e_a, e_b = (energies[k] for k in keys)
    return (e_ab - e_a - e_b) * HARTREE_TO_KCAL_MOL


def add_dispersion(out, dimer, record, level):
    """A finished dimer's record with the D4 energies of ``level`` (computed and written into
    its energies.json, atomically, when it lacks them or has other parameters)."""
    params = level["dispersion_parameters"]
    if record.get("dispersion_parameters") == params and all(k in record for k in D4_KEYS):
        return record
    record = {**record, **d4_energies(dimer, params), "dispersion_parameters": params}
    record["meta"] = meta_row(dimer, record, level)
    dc.atomic_write_json(record, os.path.join(out, dimer.id, FINISHED_FILE))
    return record


def read_level_of_theory(folder):
    """The ``level_of_theory.json`` record of a data folder, or None when it has none."""
    return dc.read_level_of_theory(folder)


def claim_folder(out, level, dimers):
    """Write ``level`` into ``out`` or check that it is the level the folder already has.

    Raises ``BuildInputError`` when the folder has another level (or finished dimers and no
    record): one folder never mixes levels of theory. Returns notes to print.
    """
    existing = read_level_of_theory(out)
    if existing is None:
        finished = [d.id for d in dimers
                    if os.path.isfile(os.path.join(out, d.id, FINISHED_FILE))]
        if finished:
            raise BuildInputError([
                f"{out} holds finished dimers ({', '.join(finished[:3])}, ...) but no {LEVEL_FILE}"
                f": cannot tell the level of theory they were computed at; build into a new "
                f"folder (or write the record by hand if you know it)"])
        dc.atomic_write_json(level, os.path.join(out, LEVEL_FILE))
        return []
    keys = [k for k in LEVEL_KEYS if existing.get(k) != level[k]]  # (read with its defaults)
    if keys == ["dispersion"] and existing["dispersion"] == "none":  # D4 added to a folder
        return [f"note: adding the {level['dispersion']} dispersion term to the dimers of "
                f"{out} (no SCF repeated); {LEVEL_FILE} records it once all have it"]
    if keys:
        differ = [f"{k}: {existing.get(k)!r} in the folder, {level[k]!r} asked" for k in keys]
        raise BuildInputError([
            f"{out} was built at another level of theory ({'; '.join(differ)}); one folder "
            f"never mixes levels: use the folder's options to continue it, or a new --out"])
    return [f"note: {out} was started with {k} {existing.get(k)!r}, this run has {level[k]!r}"
            for k in ("program_version", "builder_version") if existing.get(k) != level[k]]


# ----------------------------------------------------------------------------- calculation
def _electrons(symbols, charge):
    return sum(dc.ELEMENT_TO_Z[s.upper()] for s in symbols) - charge


def precheck(dimer):
    """The reason this dimer cannot be computed (overlap, charge/spin), or None. Cheap."""
    closest = dc.closest_pair(dimer.pos[:dimer.n_a], dimer.pos[dimer.n_a:])[0]  # Angstrom
    if closest < dc.MIN_INTERMONOMER_DISTANCE_ANGSTROM:
        return (f"overlapping monomers: atoms of A and B are {closest:.3f} Angstrom apart (< "
                f"{dc.MIN_INTERMONOMER_DISTANCE_ANGSTROM}); check the geometry and "
                f"n_atoms_a")
    for part, symbols, charge, spin in (("A", dimer.symbols[:dimer.n_a], dimer.charge_a,
                                         dimer.spin_a),
                                        ("B", dimer.symbols[dimer.n_a:], dimer.charge_b,
                                         dimer.spin_b)):
        n_el = _electrons(symbols, charge)
        if n_el < 1 or spin > n_el or (n_el - spin) % 2:
            return (f"impossible charge/spin: monomer {part} has {n_el} electrons (charge "
                    f"{charge}), which cannot have spin {spin} (2S: 0 singlet, 1 doublet, "
                    f"...; 2S and the electron count must both be even or both odd); check "
                    f"charge_{part.lower()} and spin_{part.lower()}")
    return None


def run_scf(symbols, pos, charge, spin, level, ghost=()):
    """Converged SCF of the atoms ``symbols``/``pos`` (+ ``ghost`` atoms: basis functions only).

    Returns (mol, mf). Raises ``DimerFailure`` when the basis lacks an element or the SCF does
    not converge.
    """
    from pyscf import dft, gto, scf
    from pyscf.lib.exceptions import BasisNotFoundError

    atoms = list(zip(symbols, pos.tolist())) + [(f"ghost-{s}", p.tolist()) for s, p in ghost]
    try:
        mol = gto.M(atom=atoms, basis=level["basis"], unit="Angstrom", charge=charge, spin=spin,
                    verbose=0)
    except BasisNotFoundError as exc:
        raise DimerFailure(f"element missing from the basis: {level['basis']}: {exc}") from None
    if level["method"] == "hf":
        mf = scf.RHF(mol) if spin == 0 else scf.UHF(mol)
    else:
        mf = dft.RKS(mol) if spin == 0 else dft.UKS(mol)
        mf.xc = level["method"]
    if level["density_fit"]:
        mf = mf.density_fit(auxbasis=level["auxbasis"])
    mf.conv_tol = SCF_CONV_TOL
    mf.kernel()
    if not mf.converged:
        raise DimerFailure(f"SCF not converged: {type(mf).__name__} of {len(symbols)} atoms, "
                           f"charge {charge}, spin {spin}, {mf.max_cycle} cycles")
    return mol, mf


def mulliken_spd(mol, mf, dm):
    """Mulliken AO populations of density matrix ``dm`` summed per atom and angular momentum:
    (N, 3) electrons."""
    pop, _ = mf.mulliken_pop(dm=dm, verbose=0)  # (n_ao,), or (2, n_ao) alpha and beta
    pop = np.asarray(pop).reshape(-1, mol.nao).sum(0)  # (n_ao,) electrons
    out = np.zeros((mol.natm, len(ANGULAR_LETTERS)))
    for p, (atom, _sym, shell, _m) in zip(pop, mol.ao_labels(fmt=False)):
        letter = shell[-1]
        if letter not in ANGULAR_LETTERS:
            raise DimerFailure(f"basis with f functions: {shell}; choose another basis")
        out[atom, ANGULAR_LETTERS.index(letter)] += p
    return out


def compute_dimer(dimer, level):
    """The dimer's and the monomers' SCF: (energies dict, NPZ arrays dict). Raises
    ``DimerFailure``."""
    n_a, sym, pos = dimer.n_a, dimer.symbols, dimer.pos
    t0 = time.time()
    mol_ab, mf_ab = run_scf(sym, pos, dimer.charge_a + dimer.charge_b,
                            dimer.spin_a + dimer.spin_b, level)
    t1 = time.time()
    ghost_b = list(zip(sym[n_a:], pos[n_a:])) if level["counterpoise"] else ()
    ghost_a = list(zip(sym[:n_a], pos[:n_a])) if level["counterpoise"] else ()
    _, mf_a = run_scf(sym[:n_a], pos[:n_a], dimer.charge_a, dimer.spin_a, level, ghost_b)
    _, mf_b = run_scf(sym[n_a:], pos[n_a:], dimer.charge_b, dimer.spin_b, level, ghost_a)
    t2 = time.time()
    centroid_bohr = pos.mean(0) * ANGSTROM_TO_BOHR  # (3,) origin of dipole and quadrupole
    dm = mf_ab.make_rdm1()
    arrays = {
        "mulliken_spd": mulliken_spd(mol_ab, mf_ab, dm),  # (N, 3) electrons
        "dipole": np.asarray(mf_ab.dip_moment(  # (3,) Debye
            unit="Debye", dm=dm, origin=centroid_bohr, verbose=0)),
        "quadrupole": np.asarray(mf_ab.quad_moment(  # (3, 3) Debye*Angstrom, traceless
            unit="DebyeAngstrom", dm=dm, origin=centroid_bohr, verbose=0)),
    }
    energies = {"E_AB": float(mf_ab.e_tot), "E_A": float(mf_a.e_tot), "E_B": float(mf_b.e_tot),
                "unit": "Hartree", "scf": [type(m).__name__ for m in (mf_ab, mf_a, mf_b)],
                "seconds_dimer": t1 - t0, "seconds_monomers": t2 - t1,
                "seconds": time.time() - t0}
    return energies, arrays


def _run_one(dimer, level):
    """(id, (energies, arrays) or None, failure reason or None): never raises DimerFailure."""
    try:
        return dimer.id, compute_dimer(dimer, level), None
    except DimerFailure as exc:
        return dimer.id, None, str(exc)
    except np.linalg.LinAlgError as exc:  # e.g. a linearly dependent basis
        return dimer.id, None, f"linear algebra: {exc}"


def _init_worker(threads):
    """Set PySCF's thread count (None: leave it); returns the previous count."""
    from pyscf import lib
    previous = lib.num_threads()
    if threads:
        lib.num_threads(threads)
    return previous


def _pool_task(task):
    return _run_one(*task)


# ----------------------------------------------------------------------------- output
def finished_record(out, dimer):
    """The ``energies.json`` of a finished dimer, or None."""
    path = os.path.join(out, dimer.id, FINISHED_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def pdb_dimer(path_a, path_b):
    """(symbols, positions (N, 3) Angstrom, A's atom count) of a built dimer, read back from
    its two PDBs (A's atoms first)."""
    z_a, pos_a = dc.parse_pdb(path_a)
    z_b, pos_b = dc.parse_pdb(path_b)
    symbols = [dc.ELEMENTS[z - 1] for z in np.concatenate([z_a, z_b])]
    return symbols, np.concatenate([pos_a, pos_b]), len(z_a)


def same_input(out, dimer, record):
    """Why the finished dimer in ``out`` is not this row's input, or None when it is."""
    for key in ("charge_a", "charge_b", "spin_a", "spin_b"):
        if record.get(key, 0) != getattr(dimer, key):
            return f"{key} {record.get(key, 0)} there, {getattr(dimer, key)} in the CSV"
    for name, sl in (("A.pdb", slice(0, dimer.n_a)), ("B.pdb", slice(dimer.n_a, None))):
        z, pos = dc.parse_pdb(os.path.join(out, dimer.id, name))
        want = [dc.ELEMENT_TO_Z[s.upper()] for s in dimer.symbols[sl]]
        if z.tolist() != want:
            return f"other atoms in {name}"
        deviation = float(np.abs(pos - dimer.pos[sl]).max())
        if deviation > PDB_DECIMALS_ANGSTROM:
            return f"{name} deviates by {deviation:.4f} Angstrom from the CSV's geometry"
    return None


def write_dimer(out, dimer, energies, arrays, level):
    """Write one dimer's PDBs, NPZ and (last) energies.json, each atomically."""
    folder = os.path.join(out, dimer.id)
    write_pdb(os.path.join(folder, "A.pdb"), dimer.symbols[:dimer.n_a], dimer.pos[:dimer.n_a],
              "A")
    write_pdb(os.path.join(folder, "B.pdb"), dimer.symbols[dimer.n_a:], dimer.pos[dimer.n_a:],
              "B")
    with dc._atomic_target(os.path.join(folder, "dimer.npz")) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
    if level.get("dispersion") == "d4":
        energies = {**energies, **d4_energies(dimer, level["dispersion_parameters"]),
                    "dispersion_parameters": level["dispersion_parameters"]}
    record = {**energies, "basis": level["basis"], "method": describe_level(level),
              "level_of_theory": level, "charge_a": dimer.charge_a, "charge_b": dimer.charge_b,
              "spin_a": dimer.spin_a, "spin_b": dimer.spin_b,
              "meta": meta_row(dimer, energies, level)}
    dc.atomic_write_json(record, os.path.join(folder, FINISHED_FILE))


def describe_level(level):
    """E.g. 'RHF, density fitting (def2-universal-jkfit), no counterpoise'."""
    name = "RHF" if level["method"] == "hf" else f"DFT {level['method'].upper()}"
    fit = f"density fitting ({level['auxbasis']})" if level["density_fit"] else "no density fit"
    disp = " + D4 dispersion" if level.get("dispersion") == "d4" else ""
    return (f"{name}{disp}, {fit}, "
            f"{'counterpoise' if level['counterpoise'] else 'no counterpoise'}")


def meta_row(dimer, energies, level=None):
    """The meta.xlsx row of a finished dimer (V0 in kcal/mol). With a D4 ``level``, V0 is
    V0_HF (the SCF's E_AB - E_A - E_B; HF or the DFT method) + E_disp, both kept as columns."""
    pr = dimer.pr if dimer.pr is not None else contact_ratio(dimer.symbols, dimer.pos, dimer.n_a)
    v0 = interaction_kcal(energies)
    row = {"id": dimer.id, "pdb_a": f"{dimer.id}/A.pdb", "pdb_b": f"{dimer.id}/B.pdb",
           "npz": f"{dimer.id}/dimer.npz", "R_nm": dimer.r_angstrom / dc.NM_TO_ANGSTROM,
           "theta_deg": theta_deg(dimer.pos, dimer.n_a), "V0": v0,
           "Vref": dimer.vref, "PR": pr, "group": dimer.group}
    if level is not None and level.get("dispersion") == "d4":
        e_disp = interaction_kcal(energies, D4_KEYS)
        row.update({"V0": v0 + e_disp, "V0_HF": v0, "E_disp": e_disp})
    return row


def write_meta(out, rows):
    """meta.xlsx from ``rows`` (atomically); Vref and group columns only when used, V0's
    parts (V0_HF, E_disp) when the folder has a dispersion term."""
    extra = DISPERSION_META_COLUMNS if "E_disp" in rows[0] else ()
    frame = pd.DataFrame(rows, columns=META_COLUMNS + extra)
    if frame["Vref"].isna().all():
        frame = frame.drop(columns=["Vref"])
    if frame["group"].isna().all():
        frame = frame.drop(columns=["group"])
    with dc._atomic_target(os.path.join(out, "meta.xlsx")) as tmp:
        with open(tmp, "wb") as fh:
            frame.to_excel(fh, index=False, engine="openpyxl")


def check_output(out, with_vref):
    """Problems delta_coupling finds in the folder (training's check, or prediction's)."""
    return dc.check_dataset(out, require_vref=with_vref)[1]


# ----------------------------------------------------------------------------- driver
@dataclass
class BuildSummary:
    done: list  # ids finished (this run or before), CSV order
    computed: list  # ids computed in this run
    failed: dict  # id -> reason
    problems: list  # problems delta_coupling's check found in the written folder

    @property
    def exit_code(self):
        return EXIT_FAILED if self.failed or self.problems else 0


def build_dataset(csv_path, out, method=DEFAULT_METHOD, basis=DEFAULT_BASIS, density_fit=True,
                  auxbasis=DEFAULT_AUXBASIS, counterpoise=False, threads=None, processes=1,
                  quiet=False, log=print, dispersion=DEFAULT_DISPERSION):
    """Build (or continue) the data folder ``out`` from the dimers of ``csv_path``.

    Raises ``BuildInputError`` (every problem listed) before any calculation for bad CSV rows,
    an unknown method/basis, or a folder built at another level. Returns a ``BuildSummary``.
    """
    try:
        level = level_of_theory(method, basis, density_fit, auxbasis, counterpoise, dispersion)
    except ValueError as exc:
        raise BuildInputError([str(exc)]) from None
    dimers = read_input_csv(csv_path)
    stale = []
    for d in dimers:
        record = finished_record(out, d)
        why = record is not None and same_input(out, d, record)
        if why:
            stale.append(f"{d.where}: finished in {os.path.join(out, d.id)} from other input "
                         f"({why}); delete that folder to recompute it, or give the row a new "
                         f"id")
    if stale:
        raise BuildInputError(stale)
    os.makedirs(out, exist_ok=True)
    for note in claim_folder(out, level, dimers):
        log(note)
    if level["dispersion"] != "none":  # finished dimers without the term (or with other
        t0, added = time.time(), 0     # parameters) gain it from their geometry: no SCF
        for d in dimers:
            record = finished_record(out, d)
            if record is not None:
                added += add_dispersion(out, d, record, level) is not record
        if added:
            log(f"added the {level['dispersion']} term to {added} finished dimers in "
                f"{time.time() - t0:.1f} s (no SCF)")
        recorded = read_level_of_theory(out)
        if [recorded.get(k) for k in ("dispersion", "dispersion_parameters")] != \
                [level[k] for k in ("dispersion", "dispersion_parameters")]:
            dc.atomic_write_json({**recorded, **{k: level[k] for k in (
                "dispersion", "dispersion_parameters", "dispersion_program")}},
                os.path.join(out, LEVEL_FILE))
    failed = {d.id: reason for d in dimers
              if finished_record(out, d) is None and (reason := precheck(d))}
    todo = [d for d in dimers if d.id not in failed and finished_record(out, d) is None]
    log(f"{len(dimers)} dimers in {csv_path}: {len(dimers) - len(todo) - len(failed)} finished "
        f"before, {len(todo)} to compute, {len(failed)} refused before any SCF; "
        f"{describe_level(level)}, basis {level['basis']}, {processes} process(es)")
    by_id = {d.id: d for d in dimers}
    computed = []
    pool, threads_before = None, None
    try:
        if processes > 1 and len(todo) > 1:
            pool = multiprocessing.get_context("spawn").Pool(
                processes, initializer=_init_worker,
                initargs=(threads or max(1, (os.cpu_count() or 1) // processes),))
            results = pool.imap_unordered(_pool_task, [(d, level) for d in todo])
        else:
            threads_before = _init_worker(threads)  # restored below: this process goes on
            results = (_run_one(d, level) for d in todo)
        for rid, result, reason in dc.progress(results, quiet, total=len(todo), unit="dimer",
                                               desc="SCF"):
            if reason is not None:
                failed[rid] = reason
                dc.log_line(f"{rid}: failed: {reason}")
                continue
            energies, arrays = result
            write_dimer(out, by_id[rid], energies, arrays, level)
            computed.append(rid)
            if not quiet:
                v0 = interaction_kcal(energies)  # the SCF's part
                dc.log_line(f"{rid}: V0 {v0:.3f} kcal/mol ({energies['seconds']:.1f} s)")
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        if threads_before is not None:
            _init_worker(threads_before)
        done, rows = [], []
        for d in dimers:
            record = finished_record(out, d)
            if record is not None:
                done.append(d.id)
                rows.append(meta_row(d, record, level))
        if rows:
            write_meta(out, rows)
        failed_path = os.path.join(out, FAILED_FILE)
        if failed:
            dc.atomic_write_json(failed, failed_path)
        elif os.path.exists(failed_path):
            os.remove(failed_path)
    problems = check_output(out, all(d.vref is not None for d in dimers)) if rows else []
    return BuildSummary(done=done, computed=computed, failed=failed, problems=problems)


def report(summary, out):
    """The end-of-run summary: done, failed (grouped by reason) and what to run next."""
    lines = [f"{len(summary.done)} dimers done ({len(summary.computed)} computed now), "
             f"{len(summary.failed)} failed"]
    kinds = {}  # every failure reason starts with its kind: "SCF not converged: ..."
    for rid, reason in summary.failed.items():
        kinds.setdefault(reason.split(":")[0], []).append(rid)
    for kind, ids in kinds.items():
        lines.append(f"  {len(ids)} x {kind}: {', '.join(ids[:5])}"
                     f"{', ...' if len(ids) > 5 else ''}")
    if summary.failed:
        lines.append(f"reasons in full: {os.path.join(out, FAILED_FILE)}; fix the CSV rows and "
                     f"run the same command again (finished dimers are kept)")
    for problem in summary.problems:
        lines.append(f"  check: {problem}")
    if summary.done:
        lines.append(f"wrote {os.path.join(out, 'meta.xlsx')} ({len(summary.done)} rows); next: "
                     f"python delta_coupling.py --root_dir {out}  (or --predict --checkpoint "
                     f"BEST.pt --root_dir {out} when the CSV has no Vref)")
    return "\n".join(lines)


def build_arg_parser():
    p = argparse.ArgumentParser(
        description="Build a DeltaCoupling data folder (meta.xlsx; A.pdb, B.pdb, dimer.npz per "
                    "dimer)\nfrom a CSV of dimer geometries, with a PySCF baseline V0 = E_AB - "
                    "E_A - E_B (kcal/mol).",
        epilog="""CSV columns (case-insensitive; paths relative to the CSV's folder):
  id                 the dimer's name (its folder in --out)
  xyz, n_atoms_a     one XYZ file per dimer, A's atoms first; the split in n_atoms_a or in
                     the XYZ comment line as n_atoms_a=K
  geom_a, geom_b     or one file per monomer (XYZ, PDB, anything ASE reads)
  Vref               optional, kcal/mol: in every row (to train) or in none (to --predict)
  charge_a, charge_b optional, default 0
  spin_a, spin_b     optional 2S (0 singlet, 1 doublet, ...), default 0; the dimer has
                     charge_a + charge_b and spin_a + spin_b; spin > 0: UHF/UKS
  group              optional: rows of a group stay in one split
  PR                 optional; when empty, the contact ratio: min over atoms a of A, b of B
                     of d_ab / (r_vdW(a) + r_vdW(b)) (Bondi radii)
Frame: A's centroid at the origin, B's on +z (R_nm = centroid distance, theta_deg = acute
angle of the monomers' first principal axes). Writes level_of_theory.json and refuses a
folder built at another level. Exit status: 0 all done, 1 some dimer failed (reasons in
failed.json), 2 bad input (every bad row listed, nothing computed), 130 interrupted.
See tools/README.md.""",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("csv", help="input CSV, one row per dimer")
    p.add_argument("--out", required=True,
                   help="output data folder (created; run again to continue it)")
    p.add_argument("--method", default=DEFAULT_METHOD,
                   help=f"hf, or a DFT functional PySCF knows, e.g. b3lyp, pbe0 "
                        f"(default: {DEFAULT_METHOD})")
    p.add_argument("--basis", default=DEFAULT_BASIS,
                   help=f"AO basis with s, p, d functions only (default: {DEFAULT_BASIS})")
    p.add_argument("--density-fit", dest="density_fit", action=argparse.BooleanOptionalAction,
                   default=True, help="density fitting of the two-electron integrals "
                                      "(default: on)")
    p.add_argument("--auxbasis", default=DEFAULT_AUXBASIS,
                   help=f"density-fitting basis (default: {DEFAULT_AUXBASIS})")
    p.add_argument("--dispersion", default=DEFAULT_DISPERSION, choices=DISPERSION_MODELS,
                   help="d4: add the DFT-D4 interaction dispersion energy (dftd4 package, "
                        "the --method's damping parameters, EEQ charges, three-body term) to "
                        "V0; meta.xlsx keeps V0_HF and E_disp. Adds the term to a folder "
                        "built without it, with no SCF repeated")
    p.add_argument("--counterpoise", action="store_true",
                   help="E_A and E_B in the dimer basis (the partner as ghost atoms): no "
                        "basis-set superposition error in V0 (default: off)")
    p.add_argument("--threads", type=dc.positive_int, default=None,
                   help="PySCF threads per process (default: PySCF's, all cores; with "
                        "--processes N: cores / N)")
    p.add_argument("--processes", type=dc.positive_int, default=1,
                   help="dimers computed at the same time (default: 1)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or per-dimer lines")
    return p


def main(argv=None):
    """Command line: build the folder, print the summary; returns the exit status. SIGTERM (a
    job's or a session's end, ``kill``) stops it as Ctrl-C does: meta.xlsx is written from
    the finished dimers, and the same command continues."""
    args = build_arg_parser().parse_args(argv)
    try:
        with dc.sigterm_as_interrupt():
            summary = build_dataset(args.csv, args.out, method=args.method, basis=args.basis,
                                    density_fit=args.density_fit, auxbasis=args.auxbasis,
                                    counterpoise=args.counterpoise, threads=args.threads,
                                    processes=args.processes, quiet=args.quiet,
                                    dispersion=args.dispersion)
    except BuildInputError as exc:
        print(f"error: {len(exc.problems)} problem(s), nothing computed:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  - {problem}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted: finished dimers are kept (meta.xlsx lists them); run the same "
              "command again to continue", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(report(summary, args.out))
    return summary.exit_code


if __name__ == "__main__":
    sys.exit(main())
