"""Extraction options of issue "speed and scale": mixed precision (checked against fp32 on real
photos) and multi-process extraction under torchrun (identical to one process)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import REPO, SHARED, TINY_MODEL, TINY_SIZE, requires_shared, write_poses
import vprkit.extraction.device
import trainable_vpr as vpr
from vprkit.cli import VPRError
from vprkit.retrieval.evaluation import l2_normalise
from vprkit.cli.extraction_settings import ExtractionSettings
from vprkit.extraction.cache import FeatureCache, image_fingerprint
from vprkit.extraction.device import _cpu_supports_bf16, resolve_precision
from vprkit.extraction.features import extract_features
from vprkit.tables.places import load_poses


# --------------------------------------------------------------------------------------------
# precision
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bf16_cpu, asked, expected", [
    (True, "auto", "bf16"), (False, "auto", "fp32"), (True, "bf16", "bf16"), (True, "fp32", "fp32"),
])
def test_resolve_precision_on_cpu(monkeypatch, bf16_cpu, asked, expected):
    monkeypatch.setattr(vprkit.extraction.device, "_cpu_supports_bf16", lambda: bf16_cpu)
    assert resolve_precision(asked, torch.device("cpu")) == expected


@pytest.mark.parametrize("bf16_cpu, asked, flag_hint", [(False, "bf16", "fp32 or auto"), (True, "fp16", "CUDA")])
def test_unsupported_precision_is_a_clear_error(monkeypatch, bf16_cpu, asked, flag_hint):
    monkeypatch.setattr(vprkit.extraction.device, "_cpu_supports_bf16", lambda: bf16_cpu)
    with pytest.raises(VPRError, match=rf"--precision {asked}.*{flag_hint}"):
        resolve_precision(asked, torch.device("cpu"))


@requires_shared
@pytest.mark.skipif(not _cpu_supports_bf16(), reason="this CPU has no bf16 (AMX / AVX512-BF16)")
def test_bf16_features_match_fp32_on_real_photos(tmp_path, capsys):
    table = load_poses(SHARED / "gardens_point_mini" / "queries_day.csv")
    backbone = vpr.create_backbone("effnet_lite0")

    def features(precision: str, cache_dtype: str = "float32") -> np.ndarray:
        options = ExtractionSettings(extract_batch_size=10, num_workers=0, device="cpu", cache_dir=str(tmp_path),
                                        precision=precision, cache_dtype=cache_dtype)
        return extract_features(backbone, table, options)

    fp32, bf16, bf16_half = features("fp32"), features("bf16"), features("bf16", "float16")
    cosine = np.sum(l2_normalise(fp32) * l2_normalise(bf16), axis=1)
    assert cosine.min() >= 0.99, cosine
    assert not np.array_equal(fp32, bf16)  # bf16 really ran
    assert np.allclose(bf16_half, bf16, rtol=2e-3, atol=2e-3)  # float16 storage rounds, nothing more
    # precision and storage type are part of the cache key: three configurations, three folders
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 3
    assert features("bf16").tobytes() == bf16.tobytes()  # and a later call reads it back
    assert "10/10 from cache" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# torchrun: two CPU processes (gloo) share the extraction through the cache
# --------------------------------------------------------------------------------------------
def _eval_command(data: Path, cache: Path, out_json: Path) -> list[str]:
    return ["eval_trained.py", "--baseline", "--model", TINY_MODEL, "--weights", "random", "--image_size",
            str(TINY_SIZE), "--device", "cpu", "--num_workers", "0", "--extract_batch_size", "1",
            "--db_csv", str(data / "db.csv"), "--test_csv", str(data / "q.csv"),
            "--cache_dir", str(cache), "--output_json", str(out_json)]


@pytest.mark.slow
def test_torchrun_two_processes_give_what_one_process_gives(tmp_path):
    data = tmp_path / "data"
    write_poses(data, [(i * 40.0, 0.0) for i in range(14)], name="db.csv", seed=0)
    write_poses(data, [(i * 40.0 + 3, 0.0) for i in range(6)], name="q.csv", seed=1)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = Path(sys.executable).with_name("torchrun")
    two = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2",
                          *_eval_command(data, tmp_path / "cache2", tmp_path / "two.json")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "over 2 processes" in two.stdout
    assert two.stdout.count("wrote ") == 1  # rank 0 alone evaluates and writes
    one = subprocess.run([sys.executable, *_eval_command(data, tmp_path / "cache1", tmp_path / "one.json")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = json.loads((tmp_path / "one.json").read_text()), json.loads((tmp_path / "two.json").read_text())
    assert {k: v for k, v in a.items() if k != "settings"} == {k: v for k, v in b.items() if k != "settings"}

    # each rank wrote its own shards; read together they equal the single-process features
    backbone = vpr.create_backbone(TINY_MODEL, "random", TINY_SIZE)
    for csv_name in ("db.csv", "q.csv"):
        keys = [image_fingerprint(p) for p in load_poses(data / csv_name).paths]
        single = FeatureCache(tmp_path / "cache1", backbone.info).get(keys)
        sharded = FeatureCache(tmp_path / "cache2", backbone.info).get(keys)
        # batches of one image: the same kernels run on the same inputs, so the features are equal
        # to the bit (with larger batches oneDNN may pick other kernels for other batch shapes)
        np.testing.assert_array_equal(sharded, single)
    shard_dirs = [p for p in (tmp_path / "cache2").iterdir() if p.is_dir()]
    assert len(list(shard_dirs[0].glob("shard-*.npy"))) == 4  # two tables x two ranks
