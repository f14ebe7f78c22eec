"""One entry point for every table a script reads: a poses CSV, an embeddings parquet, or a
benchmark layout. It dispatches to vprkit.tables.places and vprkit.tables.benchmarks (which builds
on places); neither imports this module, so the two never import each other."""
from __future__ import annotations

from pathlib import Path

from vprkit.tables.benchmarks import load_benchmark
from vprkit.tables.places import PlaceTable, is_parquet, load_embeddings_parquet, load_poses


def load_table(path: str | Path, image_root: str | Path | None = None, camera_id: str | None = None,
               on_bad_image: str = "error") -> PlaceTable:
    """A poses CSV or, by its .parquet suffix, an embeddings parquet, or a benchmark layout (a
    folder of @-named images, an MSLS city folder or CSV, a GSV-Cities dataframe:
    vprkit.tables.benchmarks): one entry point for every script."""
    if is_parquet(path):
        return load_embeddings_parquet(path, camera_id)
    benchmark = load_benchmark(path, image_root, camera_id, on_bad_image)
    return benchmark if benchmark is not None else load_poses(path, image_root, camera_id, on_bad_image=on_bad_image)
