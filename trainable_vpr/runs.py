"""A training run's moving parts: its state, where its head starts (and, with --pooling auto, which
pooling), its optimiser, schedule and triplet miner, its checkpoints and what --resume restores.
The loop that drives them is trainable_vpr/training.py."""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import trainable_vpr as vpr
from trainable_vpr import blocks as trained_blocks
from trainable_vpr.checkpoints import checkpoint_path, checkpoint_payload, random_states, restore_random_states
from trainable_vpr.data import TrainingData, extract_training_data, load_splits
from vprkit.cli import VPRError
from vprkit.retrieval.evaluation import RecallResult, evaluate_retrieval
from vprkit.cli.settings import resumable_settings
from trainable_vpr.miners import BatchMiner, Miner, UCBMiner, load_difficulty_parquet
from vprkit.logs.tensorboard_log import TensorBoardLog, tensorboard_dir


@dataclass
class TrainState:
    """Where a run stands after an epoch: what --resume restores besides weights and random states."""

    epoch: int = 0
    best_recall: dict[int, float] = dataclasses.field(default_factory=dict)
    best_epoch: int = 0
    best_val_loss: float = math.inf
    stale: int = 0
    early_stopped: bool = False
    untrained_r1: float = math.nan  # val R@1 at epoch 0 (before training)

    def as_checkpoint(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "best_recall": {str(n): r for n, r in self.best_recall.items()}}

    @classmethod
    def from_checkpoint(cls, saved: dict[str, Any]) -> "TrainState":
        return cls(**{**saved, "best_recall": {int(n): float(r) for n, r in saved["best_recall"].items()}})


# The settings a resumed run may change (more epochs, another machine, other output folders) are
# the flags declared resumable (vprkit.cli.settings.flag(..., resumable=True)); any other difference
# would make the resumed run a different run. `--resume CKPT` alone takes every setting from the
# checkpoint; a flag beside it may change only these.
RESUMABLE_CHANGES = resumable_settings(vpr.TrainConfig)


def resumed_config(path: str, parsed: vpr.TrainConfig, given: set[str]) -> vpr.TrainConfig:
    """The checkpoint's whole configuration, with the settings given now (flags, VPR_* variables,
    --config) that resume may change (the resumable flags); any other given setting that differs
    from the run's stops with one line naming it."""
    saved = vpr.load_checkpoint(path)
    if "resume" not in saved:
        raise VPRError(f"--resume {path}: not a resumable checkpoint; give the run's _last or _final checkpoint")
    fields = {f.name for f in dataclasses.fields(vpr.TrainConfig)}
    values = dataclasses.asdict(vpr.TrainConfig.from_saved(saved["config"]))
    for name in sorted(given & fields):
        now = getattr(parsed, name)
        if name in RESUMABLE_CHANGES:
            values[name] = now
        elif now != values[name]:
            raise VPRError(f"--resume {path}: --{name} {now} would change the run (it used {values[name]}); "
                           f"resume may change only --{', --'.join(sorted(RESUMABLE_CHANGES - {'resume'}))}")
    values["resume"] = path
    return vpr.TrainConfig(**values)


def head_config_for(config: vpr.TrainConfig, in_dim: int) -> vpr.HeadConfig:
    """in_dim: the width of the features (a local feature's channels for --head netvlad)."""
    return vpr.HeadConfig(config.head, in_dim, config.projection_dim, config.hidden_dim, config.dropout,
                          config.use_residual, config.use_layer_norm,
                          clusters=config.vlad_clusters if config.head in vpr.LOCAL_HEADS else 0)


def initial_head(config: vpr.TrainConfig, data: TrainingData) -> tuple[torch.nn.Module, vpr.HeadConfig,
                                                                        vpr.StartChoice | None]:
    """A fresh head, its config and, for the residual head, its start (trainable_vpr.starts): the
    frozen descriptor --head_start names (auto: the best on val R@1 of raw, PCA-whitened and learned
    whitening), which the untrained head reproduces exactly."""
    if getattr(data, "tail", None) is not None:  # the head starts on the frozen descriptors, then trains with the tail
        frozen = {name: dataclasses.replace(split, features=vpr.embed(data.tail, split.features))
                  for name, split in (("train", data.train), ("val", data.val), ("val_db", data.val_db))
                  if split is not None}
        head, head_config, choice = initial_head(config, dataclasses.replace(data, **frozen, tail=None))
        return trained_blocks.BlocksAndHead(data.tail, head), head_config, choice
    torch.manual_seed(config.seed)
    head_config = head_config_for(config, data.train.features.shape[-1])  # netvlad: a local feature's channels
    if config.head in vpr.LOCAL_HEADS:
        head = vpr.build_head(head_config)
        head.init_vocabulary(data.vocabulary)
        print(f"netvlad head start: the VLAD vocabulary (K={config.vlad_clusters}, assignment scale "
              f"{vpr.NETVLAD_ASSIGNMENT_SCALE:g}): epoch 0 is the training-free --pooling vlad", flush=True)
        return head, head_config, None
    if config.head != "residual":
        return vpr.build_head(head_config), head_config, None
    choice = vpr.choose_start(config.head_start, head_config, start_fit_data(config, data),
                              lambda head: val_recall(head, data, config).recalls[1], config.seed)
    print(f"residual head start: {choice.text()} (--head_start {config.head_start}; val queries against "
          f"{config.val_db_csv or 'the training images'})", flush=True)
    return choice.chosen.head, choice.chosen.head_config, choice


def start_fit_data(config: vpr.TrainConfig, data: TrainingData) -> vpr.FitData:
    """What the head's starts are fitted on (training features, their pairs) and chosen on (val
    queries against the validation database)."""
    database, val = data.val_database, data.val
    return vpr.FitData(data.train.features, data.train.xyz, data.train.labels, database.features, database.xyz,
                       database.labels, val.features, val.xyz, val.labels, config.pos_threshold_m)


def val_recall(head: torch.nn.Module, data: TrainingData, config: vpr.TrainConfig) -> RecallResult:
    """Val queries against the validation database (--val_db_csv, else the training images;
    DESIGN.md §7), through the head."""
    database = data.val_database
    return evaluate_retrieval(vpr.embed(head, database.features), database.xyz, vpr.embed(head, data.val.features),
                              data.val.xyz, config.pos_threshold_m, db_labels=database.labels,
                              q_labels=data.val.labels)


def resolved_pooling(config: vpr.TrainConfig, tables: tuple | None = None) -> tuple[vpr.TrainConfig,
                                                                                     vpr.PoolingChoice | None]:
    """--pooling auto: the config of the pooling whose start scores best on validation
    (trainable_vpr.starts.choose_pooling), each candidate extracted (through the cache) and its start
    chosen as initial_head does; any other --pooling: the config as is. `tables`: load_splits'."""
    if config.pooling != vpr.POOLING_AUTO:
        return config, None
    train_table, val_table, by_label, val_db_table = tables or load_splits(config)

    prepared: dict[str, tuple[TrainingData, vpr.StartChoice, torch.Tensor]] = {}

    def start_of(candidate: vpr.TrainConfig) -> vpr.StartChoice:
        print(f"pooling auto: candidate {candidate.pooling}", flush=True)
        data = extract_training_data(candidate, train_table, val_table, by_label, None, val_db_table)
        start = initial_head(candidate, data)[2]
        prepared[candidate.pooling] = (data, start, torch.get_rng_state())  # the state a run's initial_head leaves
        return start

    choice = vpr.choose_pooling(config, start_of)
    choice.prepared = prepared[choice.chosen]  # train() goes on from the winner's data and start, not again
    print(choice.text(), flush=True)
    vpr.set_determinism(config.seed)  # the run draws what a run given the chosen --pooling draws
    return vpr.pooling_candidate(config, choice.chosen), choice


def triplet_miner(config: vpr.TrainConfig) -> Miner:
    """--neg_sampler ucb: a UCB1 bandit picks each negative's difficulty band; hard / random: the
    hardest in-batch negative for a share hard_neg_ratio of the triplets, random for the rest."""
    if config.neg_sampler != "ucb":
        return BatchMiner(vpr.effective_hard_neg_ratio(config))
    difficulty = load_difficulty_parquet(config.difficulty_parquet) if config.difficulty_parquet else None
    return UCBMiner(config.ucb_bands, config.ucb_exploration_constant, config.ucb_warmup_samples, difficulty)


def lr_scheduler(optimizer: torch.optim.Optimizer, config: vpr.TrainConfig, batches_per_epoch: int):
    """Constant, or cosine decay to 0 over all the run's steps."""
    if config.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, config.epochs * batches_per_epoch))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


@dataclass
class Run:
    """The moving parts of one training run, in one place for checkpoints and resume."""

    config: vpr.TrainConfig
    data: TrainingData
    head: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    miner: Miner
    rng: np.random.Generator
    generator: torch.Generator
    state: TrainState
    head_config: vpr.HeadConfig | None = None
    start: dict[str, Any] | None = None  # StartChoice.record() of a residual head (resumed: the checkpoint's)
    start_head: torch.nn.Module | None = None  # the untrained head (a copy; None when resumed)
    start_candidates: dict[str, torch.nn.Module] = dataclasses.field(default_factory=dict)  # untrained, by name
    run_id: str = ""
    log_file: Path = Path()
    tensorboard: TensorBoardLog | None = None  # --tensorboard: fed the log's rows (CsvLogger on_row)

    def checkpoint_file(self, kind: str = "") -> Path:
        """This run's checkpoint: the best ("" kind), "last" or "final" (named by its run id)."""
        return checkpoint_path(self.config.checkpoint_dir, self.run_id, kind)

    def checkpoint(self, epoch: int, resumable: bool) -> dict[str, Any]:
        """The head at `epoch` with the run's best metrics; resumable adds optimizer,
        scheduler, random and miner states (the _last and _final checkpoints)."""
        state = self.state
        progress = {
            "best_val_recall": {f"recall@{n}": r for n, r in state.best_recall.items()},
            "best_val_epoch": state.best_epoch,
            "best_val_loss": state.best_val_loss,
            "early_stopped": state.early_stopped,
            "epoch": epoch,
            "epochs_completed": state.epoch,
            **({"head_start": self.start} if self.start is not None else {}),
        }
        resume = None if not resumable else {
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "random_states": random_states(self.rng, self.generator), "train_state": state.as_checkpoint(),
            "sampler": self.miner.state_dict(),
        }
        blocks = isinstance(self.head, trained_blocks.BlocksAndHead)
        payload = checkpoint_payload(self.head.head if blocks else self.head, self.head_config,
                                     self.data.backbone, self.config, progress, self.run_id, self.log_file,
                                     self.data.vocabulary, resume)
        if blocks:  # only the trained blocks' modules, beside the head
            payload["trained_blocks"] = trained_blocks.trained_blocks_payload(self.head.tail)
        return payload

    @property
    def head_in_dim(self) -> int:
        """The head's input width: the features' (the descriptor's with --train_blocks)."""
        if isinstance(self.head, trained_blocks.BlocksAndHead):
            return int(self.data.backbone["feature_dim"])
        return int(self.data.train.features.shape[-1])

    def restore(self, saved: dict[str, Any], path: str) -> None:
        """Continue the run saved in a resumable checkpoint `saved`, read from `path` (same
        settings, checked)."""
        if "resume" not in saved:
            raise VPRError(f"--resume {path}: not a resumable checkpoint; give the run's _last or _final checkpoint")
        changed = [k for k, v in saved["config"].items()
                   if k not in RESUMABLE_CHANGES and getattr(self.config, k, v) != v]
        if changed:
            key = changed[0]
            raise VPRError(f"--resume {path}: the run used --{key} {saved['config'][key]}, not "
                               f"{getattr(self.config, key)}; resume with the run's settings")
        vpr.check_input_dim(saved["head_config"], self.head_in_dim, self.config.train_csv)
        if isinstance(self.head, trained_blocks.BlocksAndHead):
            self.head.head.load_state_dict(saved["model_state_dict"])
            self.head.tail.load_state_dict(saved["trained_blocks"]["state_dict"])
        else:
            self.head.load_state_dict(saved["model_state_dict"])
        self.optimizer.load_state_dict(saved["resume"]["optimizer"])
        self.scheduler.load_state_dict(saved["resume"]["scheduler"])
        restore_random_states(saved["resume"]["random_states"], self.rng, self.generator)
        self.miner.load_state_dict(saved["resume"]["sampler"])
        self.state = TrainState.from_checkpoint(saved["resume"]["train_state"])
        self.run_id, self.log_file = saved["run_id"], Path(saved["log_file"])
        self.start = saved.get("head_start")


def new_run(config: vpr.TrainConfig, data: TrainingData, resumed: dict | None = None,
            start: vpr.StartChoice | None = None) -> Run:
    """A fresh head, optimizer, schedule, triplet miner and random generators. A resumed run's head
    is rebuilt from its checkpoint's head config (its start was chosen when the run began); `start`:
    the residual head's start chosen already (--pooling auto), else initial_head chooses it.
    --train_blocks: the trained blocks and the head, the blocks at --backbone_lr."""
    if resumed is not None:
        head_config, choice = vpr.HeadConfig.from_dict(resumed["head_config"]), None
        head = vpr.build_head(head_config)
        if data.tail is not None:
            head = trained_blocks.BlocksAndHead(data.tail, head)
    elif start is not None:
        head, head_config, choice = start.chosen.head, start.chosen.head_config, start
    else:
        head, head_config, choice = initial_head(config, data)
    groups: list[dict[str, Any]] = [{"params": list(head.parameters()), "lr": config.lr}]
    if isinstance(head, trained_blocks.BlocksAndHead):
        for param in head.tail.parameters():
            param.requires_grad_(True)
        groups = [{"params": list(head.head.parameters()), "lr": config.lr},
                  {"params": list(head.tail.parameters()), "lr": config.backbone_lr}]
    optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = lr_scheduler(optimizer, config, math.ceil(len(data.train) / config.batch_size))
    run = Run(config, data, head, optimizer, scheduler, triplet_miner(config), np.random.default_rng(config.seed),
              torch.Generator().manual_seed(config.seed), TrainState(), head_config,
              None if choice is None else choice.record())
    run.start_head = None if choice is None else copy.deepcopy(choice.chosen.head)
    if choice is not None:  # the chosen head trains in place: its untrained copy stands for it
        run.start_candidates = {name: run.start_head if c is choice.chosen else c.head
                                for name, c in choice.candidates.items()}
    return run


def start_text(start: dict[str, Any] | None) -> str:
    """The start record in one cell: "learned_whitened; raw=0.505 pca_whitened=0.568 learned_whitened=0.663"."""
    if not start:
        return ""
    pooling = start.get("pooling")  # --pooling auto: "; pooling gem; backbone=0.6630 gem=0.6800 vlad=0.6000"
    return (f"{start['chosen']}; " + " ".join(f"{name}={r1:.4f}" for name, r1 in start["val_r1"].items())
            + (f"; pooling {pooling['chosen']}; " + " ".join(f"{name}={r1:.4f}" for name, r1 in
                                                           pooling["val_r1"].items()) if pooling else ""))


def open_tensorboard(run: Run, log_dir: Path) -> None:
    """--tensorboard: the run's SummaryWriter under {log_dir}/tensorboard/{run_id}."""
    if run.config.tensorboard:
        run.tensorboard = TensorBoardLog(tensorboard_dir(log_dir, run.run_id),
                                         purge_step=run.state.epoch + 1 if run.config.resume else None)
        print(f"tensorboard: {run.tensorboard.folder}", flush=True)
