"""What a retrieval returned, for people: one prediction table (one row per query and rank) and one
picture (each query beside its top matches), shared by eval_trained.py (with ground truth) and
localize.py (without)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from vprkit.cli import write_png
from vprkit.retrieval.evaluation import RecallResult
from vprkit.tables.places import PlaceTable


def predictions_frame(database: PlaceTable, queries: PlaceTable, top: np.ndarray, scores: np.ndarray,
                      result: RecallResult | None = None) -> pd.DataFrame:
    """One row per (query, rank): query_index, query_image, [condition], [query_label], rank,
    db_index, db_image, [db_label], then with an evaluation `result` distance_m (unrounded: `correct`
    is decided on it; NaN, written empty, without positions), similarity, correct and
    query_has_positive; without one (localize) similarity only. Bracketed columns appear when the
    tables have conditions or place labels."""
    q_count, k = top.shape
    q_index = np.repeat(np.arange(q_count), k)
    db_index = top.ravel()
    frame = pd.DataFrame({
        "query_index": q_index,
        "query_image": np.asarray(queries.paths)[q_index],
        "rank": np.tile(np.arange(1, k + 1), q_count),
        "db_index": db_index,
        "db_image": np.asarray(database.paths)[db_index],
    })
    if result is not None:
        frame["distance_m"] = result.top_distances_m.ravel()
    frame["similarity"] = scores.ravel().round(5)
    if result is not None:
        frame["correct"] = result.correct.ravel()
        frame["query_has_positive"] = np.repeat(result.has_positive, k)
    if database.labels is not None:
        frame.insert(frame.columns.get_loc("db_image") + 1, "db_label", database.labels[db_index])
    if queries.labels is not None:
        frame.insert(2, "query_label", queries.labels[q_index])
    if queries.conditions is not None:
        frame.insert(2, "condition", queries.conditions[q_index])
    return frame


@dataclass
class PictureRow:
    """One row of the retrieval picture: the query and its matches, each (image, caption, frame
    colour; None: no frame); `note` is written under the query."""

    query_image: str
    query_caption: str
    matches: list[tuple[str, str, str | None]] = field(default_factory=list)
    note: str = ""


def draw_retrievals(rows: Sequence[PictureRow], path: str | Path, title: str) -> Path:
    """A grid: each row a query and its matches (framed in their colour), images upright and
    thumbnailed; written atomically as PNG."""
    from matplotlib.figure import Figure  # object API: no GUI backend, no global state

    from vprkit.tables.images import open_rgb

    columns = 1 + max((len(r.matches) for r in rows), default=0)
    fig = Figure(figsize=(2.2 * columns, 2.6 * len(rows) + 0.6), layout="constrained")
    axes = fig.subplots(max(len(rows), 1), columns, squeeze=False)
    for r, row in enumerate(rows):
        cells = [(row.query_image, row.query_caption, "black"), *row.matches]
        for c in range(columns):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(cells):
                ax.axis("off")
                continue
            image_path, caption, colour = cells[c]
            image = open_rgb(image_path)
            image.thumbnail((320, 320))  # phone photos are 12 MP; the cells are 2 inches wide
            ax.imshow(image)
            ax.set_title(caption, fontsize=9, color=colour or "black")
            if colour is not None:
                for spine in ax.spines.values():
                    spine.set_edgecolor(colour)
                    spine.set_linewidth(4 if c else 1)
        if row.note:
            axes[r, 0].set_xlabel(row.note, fontsize=8, color="0.45")
    fig.suptitle(title, fontsize=11)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_png(fig, path, dpi=80)


def evaluation_rows(result: RecallResult, database: PlaceTable, queries: PlaceTable, count: int,
                    top: int = 5) -> tuple[list[PictureRow], str]:
    """(picture rows, legend) of `count` queries spread over an evaluation: matches framed green
    (correct by the run's rule) or red, captioned with place labels (labelled runs; metres too where
    there are positions) or distances (GPS runs)."""
    rows = np.linspace(0, result.num_queries - 1, num=min(count, result.num_queries)).round().astype(int)
    top = min(top, result.top_indices.shape[1])
    positions = database.xyz is not None and queries.xyz is not None
    if result.by_label:
        legend = "green: same place label" + (f" within {result.pos_threshold_m:g} m" if positions else "")
    else:
        legend = f"green: within {result.pos_threshold_m:g} m"
    picture = []
    for q in rows:
        retrieved = result.top_indices[q, :top]
        condition = f" ({queries.conditions[q]})" if queries.conditions is not None else ""
        if result.by_label:
            metres = [f"  {result.top_distances_m[q, r]:.0f} m" if positions else "" for r in range(top)]
            captions = [f"#{r + 1}  {database.labels[i]}{metres[r]}" for r, i in enumerate(retrieved)]
            query_caption = f"query {queries.labels[q]}{condition}"
        else:
            captions = [f"#{r + 1}  {result.top_distances_m[q, r]:.0f} m" for r in range(top)]
            query_caption = f"query{condition}"
        matches = [(database.paths[i], captions[r], "tab:green" if result.correct[q, r] else "tab:red")
                   for r, i in enumerate(retrieved)]
        # no database image could be right: the red frames are no fault of the model
        rule = "of its place label" if result.by_label else f"within {result.pos_threshold_m:g} m"
        note = "" if result.has_positive[q] else f"no match {rule}\nin the database"
        picture.append(PictureRow(queries.paths[q], query_caption, matches, note))
    return picture, legend


def frame_rows(frame: pd.DataFrame, max_queries: int) -> list[PictureRow]:
    """Picture rows of the first `max_queries` queries of a prediction table without ground truth
    (localize): each match captioned with its similarity and its label or position."""
    queries = list(dict.fromkeys(frame["query_image"]))[:max_queries]
    position_columns = [c for c in frame.columns
                        if c.startswith("db_") and c not in ("db_image", "db_label", "db_index")]
    picture = []
    for query in queries:
        matches = []
        for _, row in frame[frame["query_image"] == query].sort_values("rank").iterrows():
            where = str(row["db_label"]) if "db_label" in row else \
                ", ".join(f"{row[c]:.5f}" if "lat" in c or "lon" in c else f"{row[c]:.0f}" for c in position_columns)
            matches.append((row["db_image"], f"#{row['rank']} sim {row['similarity']:.2f}\n{where}", None))
        picture.append(PictureRow(query, f"query {Path(query).name}"[:28], matches))
    return picture
