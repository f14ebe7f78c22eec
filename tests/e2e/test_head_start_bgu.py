"""End to end on real data (bgu_campus, effnet_lite0): the untrained head's epoch-0 validation R@1
equals its chosen frozen descriptor's, computed without the head. Skips without ../shared; a warm
feature cache (BGU_CACHE_DIR, e.g. /work/ref/cache) makes it take seconds."""
from __future__ import annotations

import os

import pandas as pd
import pytest

import train_vpr
from vprkit.retrieval.evaluation import evaluate_retrieval, fit_pca_whitening, l2_normalise
from vprkit.cli.extraction_settings import ExtractionSettings
from vprkit.extraction.features import extract_features
from vprkit.tables.pairs import positive_pairs
from vprkit.tables.places import load_poses
from vprkit.retrieval.whitening import choose_shrinkage
from helpers import REPO, SHARED, requires_shared

BGU = SHARED / "bgu_campus"


@requires_shared
def test_bgu_epoch0_equals_the_chosen_frozen_descriptor(tmp_path):
    import trainable_vpr as vpr

    cache = os.environ.get("BGU_CACHE_DIR", str(REPO / ".cache" / "test_features"))  # shared with test_bgu_campus
    result = train_vpr.main(["--train_csv", str(BGU / "train.csv"), "--val_csv", str(BGU / "val.csv"),
                             "--model", "effnet_lite0", "--epochs", "1", "--lr", "1e-12", "--cache_dir", cache,
                             "--log_dir", str(tmp_path / "logs"), "--checkpoint_dir", str(tmp_path / "models")])
    train, val = load_poses(BGU / "train.csv"), load_poses(BGU / "val.csv")
    backbone = vpr.create_backbone("effnet_lite0")
    options = ExtractionSettings(cache_dir=cache)
    ft, fv = extract_features(backbone, train, options), extract_features(backbone, val, options)
    pairs = positive_pairs(train.xyz, None, 25.0, seed=42)
    projections = {"raw": l2_normalise, "pca_whitened": fit_pca_whitening(ft, 256),
                   "learned_whitened": choose_shrinkage(ft, pairs, train.xyz, fv, val.xyz, 25.0, 256).whitening.apply}
    frozen = {name: evaluate_retrieval(p(ft), train.xyz, p(fv), val.xyz, 25.0).recalls[1]
              for name, p in projections.items()}
    assert result.head_start["val_r1"] == frozen
    chosen = result.head_start["chosen"]
    assert frozen[chosen] == max(frozen.values())
    log = pd.read_csv(result.log_file)
    assert float(log.loc[(log.event == "validation") & (log.epoch == 0), "val_r1"].iloc[0]) == pytest.approx(
        frozen[chosen], abs=1e-6)
