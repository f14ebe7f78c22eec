"""Descriptors out, in the layouts other VPR tools read (DESIGN.md §6).

- `database_descriptors.npy` / `queries_descriptors.npy`: float32 N x D, one row per row of the
  input table, as gmberton/VPR-methods-evaluation saves them (`np.save`).
- `global-feats.h5`: hloc's layout (cvg/Hierarchical-Localization, extract_features.py): one
  group per image name, nested by the `/` in the name as h5py creates it, holding the dataset
  `global_descriptor` (float16, hloc's `as_half`); hloc's `list_h5_names` / `get_descriptors`
  find it.
- retrieval pairs: `query db`, one pair per line, top-k per query, as hloc's
  `pairs_from_retrieval` writes them for `match_features` and `localize_sfm`.

Image names are relative to the folder that holds all the images written together (database
and queries): what hloc calls `image_dir`, and names stay distinct where a database and a query
image share a file name. Every file is written atomically (vprkit.cli.atomic_write); a folder
that cannot be written is one VPRError line. No torch here.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from vprkit.cli import VPRError, atomic_write, check_writable_dir

DATABASE_NPY = "database_descriptors.npy"
QUERIES_NPY = "queries_descriptors.npy"
HLOC_GLOBAL_FEATURES = "global-feats.h5"
DESCRIPTOR_FILES = (DATABASE_NPY, QUERIES_NPY, HLOC_GLOBAL_FEATURES)  # what save_descriptors writes
HLOC_DESCRIPTOR_KEY = "global_descriptor"


def image_folder_and_names(paths: Sequence[str]) -> tuple[Path, list[str]]:
    """(the deepest folder holding every image, each image's name relative to it with `/`
    separators): hloc's image_dir and names. Relative paths count from the working directory."""
    if not paths:
        return Path.cwd(), []
    absolute = [os.path.abspath(p) for p in paths]
    root = os.path.commonpath([os.path.dirname(p) for p in absolute])
    return Path(root), [Path(os.path.relpath(p, root)).as_posix() for p in absolute]


def _write(path: Path, write: Callable[[Path], None], flag: str) -> Path:
    """atomic_write, with an OSError (disk full, permissions) as one VPRError line."""
    try:
        atomic_write(path, write)
    except OSError as exc:
        raise VPRError(f"{flag} {path}: cannot write it ({exc.strerror or type(exc).__name__}); "
                       f"choose another place") from None
    return path


def _float32_rows(descriptors: np.ndarray, what: str) -> np.ndarray:
    array = np.asarray(descriptors, dtype=np.float32)
    if array.ndim != 2:
        raise ValueError(f"{what}: expected an N x D array, got shape {array.shape}")
    return array


def write_npy(path: str | Path, descriptors: np.ndarray, flag: str = "--save_descriptors") -> Path:
    """One N x D float32 array as a .npy file (np.load reads it back)."""
    array = _float32_rows(descriptors, str(path))

    def save(tmp: Path) -> None:
        with open(tmp, "wb") as handle:  # a file object: np.save(path) would append ".npy" to the temporary name
            np.save(handle, array)

    return _write(Path(path), save, flag)


def write_hloc_global_features(path: str | Path, names: Sequence[str], descriptors: np.ndarray,
                               flag: str = "--save_descriptors") -> Path:
    """hloc's global-features file: group `name` (nested by its `/`) with dataset
    `global_descriptor`, float16. A name given twice (an image both in the database and among
    the queries) is written once, with its first descriptor."""
    import h5py  # runtime dependency of this export only

    array = _float32_rows(descriptors, str(path))
    if len(names) != len(array):
        raise ValueError(f"{path}: {len(names)} names for {len(array)} descriptors")

    def save(tmp: Path) -> None:
        with h5py.File(tmp, "w") as handle:
            for name, row in zip(names, array):
                if name in handle:
                    continue
                handle.create_group(name).create_dataset(HLOC_DESCRIPTOR_KEY, data=row.astype(np.float16))

    return _write(Path(path), save, flag)


def retrieval_pairs_text(query_names: Sequence[str], db_names: Sequence[str], top_indices: np.ndarray) -> str:
    """hloc's pairs file: `query db` per line, each query's top-k in rank order. hloc splits the
    lines on whitespace, so a name with a space or a line break cannot be written."""
    top = np.asarray(top_indices)
    if top.ndim != 2 or len(top) != len(query_names):
        raise ValueError(f"top_indices: expected {len(query_names)} x k, got shape {top.shape}")
    check_pair_names([*query_names, *db_names])
    lines = [f"{query} {db_names[j]}" for query, row in zip(query_names, top) for j in row]
    return "".join(line + "\n" for line in lines)


def check_pair_names(names: Sequence[str]) -> None:
    """Names that fit hloc's pairs file (no whitespace): localize.py checks before any work."""
    bad = next((n for n in names if not n or any(c.isspace() for c in n)), None)
    if bad is not None:
        raise VPRError(f"image name {bad!r}: hloc's pairs files separate names by spaces, so a name with "
                       f"whitespace cannot be written; rename the file")


def write_retrieval_pairs(path: str | Path, query_names: Sequence[str], db_names: Sequence[str],
                          top_indices: np.ndarray, flag: str = "--pairs") -> Path:
    text = retrieval_pairs_text(query_names, db_names, top_indices)
    return _write(Path(path), lambda tmp: tmp.write_text(text), flag)


def save_descriptors(folder: str | Path, database_paths: Sequence[str], query_paths: Sequence[str],
                     database: np.ndarray, queries: np.ndarray,
                     flag: str = "--save_descriptors") -> tuple[Path, list[Path]]:
    """Write DATABASE_NPY, QUERIES_NPY (rows in table order) and HLOC_GLOBAL_FEATURES (names
    relative to the images' common folder) into `folder`. Returns (that image folder, the files)."""
    if len(database_paths) != len(database) or len(query_paths) != len(queries):
        raise ValueError("one descriptor row per image: the paths and the arrays differ in length")
    folder = check_writable_dir(folder, flag)
    image_dir, names = image_folder_and_names([*database_paths, *query_paths])
    rows = np.concatenate([_float32_rows(database, "database"), _float32_rows(queries, "queries")])
    files = [write_npy(folder / DATABASE_NPY, database, flag), write_npy(folder / QUERIES_NPY, queries, flag),
             write_hloc_global_features(folder / HLOC_GLOBAL_FEATURES, names, rows, flag)]
    return image_dir, files
