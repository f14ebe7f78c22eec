"""The flag groups scripts compose their configs from, and the configs of the torch-free scripts.

Each flag is declared once, here or in trainable_vpr/config.py (the configs of the scripts that
describe images: training, evaluation, experiment, tuning, localize), with vprkit.cli.settings.flag.
A group is a small dataclass; a script's config inherits the groups it uses, so a flag means
one thing in every script. Each config checks itself once, in validate(). No torch here:
analyze_metrics.py, make_poses.py and demo_data.py parse with these alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from vprkit.cli import VPRError
from vprkit.cli.settings import check_choices, flag
from vprkit.routes.frames import FRAME_ORDERS
from vprkit.routes.order import DEFAULT_MAX_GAP

if TYPE_CHECKING:
    from vprkit.routes.matching import SeqMatchConfig

# positives (correct matches) within this many metres, unless a checkpoint says otherwise
DEFAULT_POS_THRESHOLD_M = 25.0
DEFAULT_RECALL_AT = (1, 5, 10)
DEFAULT_SEQ_VELOCITY = (0.8, 1.25)
DEFAULT_SEQ_SHORTLIST = 50
SUPERVISIONS = ("auto", "gps", "labels")


# ============================================================================================
# Shared groups
# ============================================================================================
@dataclass
class Supervision:
    supervision: str | None = flag(None, "which images show the same place: gps (positions), labels (place_id/"
                                   "building_id/label, gated by positions when present) or auto (labels when every "
                                   "table has them); default: auto, or the checkpoint's", "data", choices=SUPERVISIONS)


@dataclass
class PosThreshold:
    pos_threshold_m: float | None = flag(None, "positives: images within this many metres show the same place "
                                         f"(default: {DEFAULT_POS_THRESHOLD_M:g}, or the checkpoint's)", "data",
                                         old_sections=("training",))

    def check_pos_threshold(self) -> None:
        if self.pos_threshold_m is not None and self.pos_threshold_m <= 0:
            raise VPRError(f"--pos_threshold_m {self.pos_threshold_m:g}: must be positive")


@dataclass
class RouteSettings:
    """Routes (docs/inputs.md, DESIGN.md §8): windows of --seq_len frames and how sequence matching
    searches them. Every script that describes images takes them; --seq_len 1 is single frames."""

    seq_len: int = flag(1, "frames per window: each frame is localised with the window of the L frames of its drive "
                        "that end at it (tables must be routes: an order column); 1: single frames, no sequences",
                        "routes", metavar="L")
    seq_velocity: list[float] = flag(  # noqa: RUF009 (flag() gives a list default a default_factory)
        list(DEFAULT_SEQ_VELOCITY), "sequence matching: the range of database frames per query frame (the query drive "
        "slower or faster than the map's)", "routes", nargs=2, metavar=("MIN", "MAX"))
    seq_max_gap: float | None = flag(None, "the largest step between consecutive frames inside a drive, in the order "
                                     "column's units; a larger one cuts the drive (windows never cross it) "
                                     f"(default: {DEFAULT_MAX_GAP['frame']:g} frames, or "
                                     f"{DEFAULT_MAX_GAP['s']:g} s for a time column)", "routes")
    seq_shortlist: int = flag(DEFAULT_SEQ_SHORTLIST, "sequence matching: database frames shortlisted per query "
                              "frame (faiss) before accumulating along lines; a learned sequence descriptor "
                              "shortlists as many windows for fusion", "routes", metavar="K")

    @property
    def sequences(self) -> bool:
        """Windows of more than one frame are asked for."""
        return self.seq_len > 1

    def check_route_settings(self) -> None:
        if self.seq_len < 1:
            raise VPRError(f"--seq_len {self.seq_len}: must be at least 1 (1: single frames)")
        if len(self.seq_velocity) != 2:
            raise VPRError(f"--seq_velocity {' '.join(f'{v:g}' for v in self.seq_velocity)}: give two numbers, "
                           "MIN MAX (e.g. 0.8 1.25)")
        low, high = self.seq_velocity
        if not 0 < low <= high:
            raise VPRError(f"--seq_velocity {low:g} {high:g}: needs 0 < MIN <= MAX (database frames per query frame)")
        if self.seq_max_gap is not None and self.seq_max_gap <= 0:
            raise VPRError(f"--seq_max_gap {self.seq_max_gap:g}: must be positive (order column units)")
        if self.seq_shortlist < 1:
            raise VPRError(f"--seq_shortlist {self.seq_shortlist}: must be at least 1")

    def seq_match_config(self, seq_len: int | None = None) -> SeqMatchConfig:
        """The matching settings these flags give (at `seq_len`, default --seq_len)."""
        from vprkit.routes.matching import SeqMatchConfig

        low, high = self.seq_velocity
        return SeqMatchConfig(seq_len or self.seq_len, float(low), float(high), shortlist=self.seq_shortlist)


# the training flags whose defaults differ for the sequence head (bench/recall_route.py's choice)
FRAME_TRAINING_DEFAULTS = {"lr": 1e-4, "batch_size": 32, "images_per_place": 4, "hidden_dim": 512}
SEQ_TRAINING_DEFAULTS = {"lr": 1e-3, "batch_size": 64, "images_per_place": 2, "hidden_dim": 256}
SEQ_ARCHS = ("shared", "full")


@dataclass
class RouteFigure:
    """eval_trained.py on routes: the similarity matrix with the matched path."""

    route_figure: bool = flag(False, "with --seq_len L > 1: draw the query x database frame similarity with each "
                              "query's matched end frame and its true place as PLOT_DIR/{variant}_{model}"
                              "[_{checkpoint}]_{queries}_similarity_path.png (also drawn with --visualize)", "outputs")


@dataclass
class RouteFolder(RouteSettings):
    """The route flags and the order of a folder of frames (localize.py's --query FOLDER)."""

    order: str = flag("name", "the order of a folder of frames (its route with --seq_len > 1): name (file names, "
                      "numbers compared as numbers) or exif_time (EXIF capture time)", "data", choices=FRAME_ORDERS)


@dataclass
class SequenceHeadSettings:
    """train_vpr.py --head seqnet: the sequence head's own flags (trainable_vpr/seqnet.py SeqHeadConfig,
    trainable_vpr/sequence_training.py SeqTrainConfig); defaults = bench/recall_route.py's choice."""

    seq_arch: str = flag("shared", "--head seqnet: shared (one per-frame head started at the frame descriptor "
                         "chosen on val, optionally a zero-initialised temporal convolution: epoch 0 is a "
                         "training-free sequence match) or full (SeqNet's Conv1d over the whole window, random "
                         "start)", "routes", choices=SEQ_ARCHS)
    seq_proj_dim: int = flag(128, "--head seqnet: the per-frame projection's dimension (whitened starts)", "routes")
    seq_kernel: int = flag(0, "--head seqnet: the temporal convolution's width in frames (0: none, the default: "
                           "kernel 3 scored below on val at 10 frames and overfits after an epoch)", "routes")
    seq_frame_dropout: float = flag(0.0, "--head seqnet: the share of a training window's frames (never its last) "
                                    "left out", "routes")
    seq_steps: list[int] = flag(  # noqa: RUF009 (flag() gives a list default a default_factory)
        [1], "--head seqnet: frame steps training windows are drawn with, one per window at random (1 2: also "
        "windows of a drive twice as fast)", "routes")
    seq_train_projection: bool = flag(False, "--head seqnet: also train the per-frame linear map (else kept at its "
                                      "start, frames projected once: epochs several times cheaper)", "routes")

    def fill_training_defaults(self, sequence: bool) -> None:
        """--lr, --batch_size, --images_per_place, --hidden_dim left unset: the defaults of the kind of head."""
        for name, value in (SEQ_TRAINING_DEFAULTS if sequence else FRAME_TRAINING_DEFAULTS).items():
            if getattr(self, name, None) is None:
                setattr(self, name, value)

    def check_sequence_head(self) -> None:
        """--head seqnet's flags, and the training flags it does not take (one line each)."""
        if getattr(self, "seq_len", 1) < 2:
            raise VPRError("--head seqnet: give --seq_len L, 2 or more (the frames of each window)")
        if self.seq_proj_dim < 1 or self.seq_kernel < 0 or not 0.0 <= self.seq_frame_dropout < 1.0:
            raise VPRError(f"--seq_proj_dim {self.seq_proj_dim} / --seq_kernel {self.seq_kernel} / "
                           f"--seq_frame_dropout {self.seq_frame_dropout:g}: need a dimension >= 1, a kernel >= 0 "
                           "and a dropout in [0, 1)")
        if not self.seq_steps or min(self.seq_steps) < 1:
            raise VPRError(f"--seq_steps {' '.join(map(str, self.seq_steps))}: frame steps must be 1 or more")
        refused = {"--resume": getattr(self, "resume", None), "--train_blocks": getattr(self, "train_blocks", 0),
                   "--augment_views": getattr(self, "augment_views", 0),
                   "--positive_selection feature": getattr(self, "positive_selection", "gps") == "feature",
                   "--neg_sampler ucb": getattr(self, "neg_sampler", "hard") == "ucb",
                   "--supervision labels": getattr(self, "supervision", None) == "labels"}
        for name, given in refused.items():
            if given:
                raise VPRError(f"--head seqnet: not with {name} (a sequence run trains at cache speed from its "
                               f"start: run it again; positives are by positions); drop {name}")


@dataclass
class DatabaseTable:
    """The searched database (evaluation, the experiment's final test, localize)."""

    db_csv: str | None = flag(None, "the searched database: poses CSV or embeddings parquet (run_experiment.py: "
                              "default --train_csv)", "data", required=True, aliases=("--db_parquet",),
                              deprecated=("--train_csv", "--train_parquet"), old_sections=("experiment",))


@dataclass
class TestTable:
    test_csv: str | None = flag(None, "the queries with ground truth: poses CSV or embeddings parquet", "data",
                                required=True, aliases=("--test_parquet",), old_sections=("experiment",))


@dataclass
class RecallAt:
    recall_at: list[int] = flag(  # noqa: RUF009 (flag() gives a list default a default_factory)
        list(DEFAULT_RECALL_AT), "the N of Recall@N", "evaluation", old_sections=("data", "experiment"))

    def check_recall_at(self) -> None:
        if any(n <= 0 for n in self.recall_at):
            raise VPRError("--recall_at values must be positive")


@dataclass
class PlotDir:
    plot_dir: str = flag("plots", "folder of the figures (and of analyze_metrics.py's summary tables)", "outputs",
                         deprecated=("--plots_dir",))


@dataclass
class Overwrite:
    overwrite: bool = flag(False, "replace existing output files this script's flags name (else it stops before any "
                           "work: docs/files.md)", "outputs")


@dataclass
class StudyName:
    study_name: str | None = flag(None, "the Optuna study: tune_vpr.py creates or joins it (default: vpr_tune), "
                                  "analyze_metrics.py plots it (default: the storage's only study)", "tuning")


# ============================================================================================
# The torch-free scripts
# ============================================================================================
@dataclass
class AnalyzeConfig(StudyName, PlotDir):
    """analyze_metrics.py: figures and tables of runs, experiments and tuning studies."""

    DEPRECATED_FLAGS: ClassVar[dict[str, str]] = {"--output_dir": "plot_dir"}

    path: str | None = flag(None, "a run log (logs/RUN.csv), an experiment CSV, or a folder of them (logs/)", "inputs",
                            positional=True)
    study: str | None = flag(None, "plot a tuning study instead, e.g. sqlite:///tune.db (tune_vpr.py's --storage): "
                             "trial values and parameter importance", "tuning", metavar="STORAGE_URL")
    smooth: int | None = flag(None, "moving-average window for batch losses (default: 50, smaller when there are few "
                              "batches)", "outputs", metavar="N")
    runs: str | None = flag(None, "glob on log file names choosing the runs in a folder, e.g. 'dinov2_b_*' "
                            "(default: all)", "inputs", metavar="PATTERN")

    def validate(self) -> None:
        if not self.path and not self.study:
            raise VPRError("give a run log, an experiment CSV or a folder of them, or --study STORAGE_URL; see --help")
        if self.smooth is not None and self.smooth < 1:
            raise VPRError(f"--smooth {self.smooth}: the window must be at least 1 batch")


@dataclass
class MakePosesConfig(Overwrite):
    """make_poses.py: a poses CSV from a folder of GPS-tagged photos."""

    photo_dir: str = flag(None, "folder of photos (searched recursively)", "inputs", positional=True, required=True,
                          metavar="PHOTO_DIR")
    output: str = flag(None, "poses CSV to write; image paths in it are relative to its folder, so train_vpr.py "
                       "--train_csv CSV finds them without --image_root", "outputs", required=True, metavar="CSV")


@dataclass
class DemoDataConfig:
    """demo_data.py: the synthetic demo route."""

    out_dir: str = flag("demo_data", "folder to write into", "outputs", positional=True)
    seed: int = flag(0, "random seed of the street and the drives", "data")
    num_places: int = flag(72, "places along the route", "data")
    spacing_m: float = flag(18.0, "metres between consecutive places", "data")
    force: bool = flag(False, "regenerate even if a complete data set is there", "outputs")

    def validate(self) -> None:
        check_choices(self)
