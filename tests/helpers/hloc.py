"""Readers of hloc's files, reimplemented as hloc reads them (list_h5_names, get_descriptors,
parse_retrieval), so tests check that hloc would find every name."""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np


def hloc_list_h5_names(path: Path) -> list[str]:
    """hloc.utils.io.list_h5_names: the parent group of every dataset, found by visititems."""
    names = []
    with h5py.File(str(path), "r") as fd:
        def visit_fn(_, obj):
            if isinstance(obj, h5py.Dataset):
                names.append(obj.parent.name.strip("/"))
        fd.visititems(visit_fn)
    return list(set(names))


def hloc_get_descriptors(path: Path, names: list[str], key: str = "global_descriptor") -> np.ndarray:
    """hloc.pairs_from_retrieval.get_descriptors: fd[name][key] per name, stacked."""
    with h5py.File(str(path), "r") as fd:
        return np.stack([fd[n][key].__array__() for n in names]).astype(np.float32)


def hloc_parse_retrieval(path: Path) -> dict[str, list[str]]:
    """hloc.utils.parsers.parse_retrieval: `q r` per line, whitespace-split."""
    retrieval: dict[str, list[str]] = {}
    for line in path.read_text().rstrip("\n").split("\n"):
        q, r = line.split()
        retrieval.setdefault(q, []).append(r)
    return retrieval
