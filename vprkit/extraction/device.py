"""Where extraction runs: the device, the precision, the ranks under torchrun (every rank extracts
its share; release_other_ranks returns the rank and the script decides to exit), the CPU allocator
and the decoding workers."""
from __future__ import annotations

import os
import sys

import torch

from vprkit.cli import VPRError


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise VPRError(f"--device {device}: not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise VPRError(f"--device {device}: CUDA is not available on this machine; use --device cpu or auto")
    return resolved


PRECISIONS = ("fp32", "bf16", "fp16", "auto")


def _cpu_supports_bf16() -> bool:
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def resolve_precision(precision: str, device: torch.device) -> str:
    """The autocast precision actually used: auto picks the fastest safe one (bf16 on CUDA
    with bf16 or on CPUs with AMX / AVX512-BF16, fp16 on older CUDA GPUs, else fp32)."""
    if precision not in PRECISIONS:
        raise VPRError(f"--precision {precision}: choose one of {', '.join(PRECISIONS)}")
    cuda = device.type == "cuda"
    bf16_ok = torch.cuda.is_bf16_supported() if cuda else device.type == "cpu" and _cpu_supports_bf16()
    if precision == "auto":
        return "bf16" if bf16_ok else ("fp16" if cuda else "fp32")
    if precision == "bf16" and not bf16_ok:
        raise VPRError(f"--precision bf16: not supported on {device.type} here; use fp32 or auto")
    if precision == "fp16" and not cuda:
        raise VPRError("--precision fp16: only on CUDA GPUs; use bf16 (recent CPUs), fp32 or auto")
    return precision


_ranks_released = False  # set once the other torchrun ranks have left (see release_other_ranks)


def distributed_rank_and_world() -> tuple[int, int]:
    """(rank, world size); under torchrun, joins the process group (nccl on GPUs, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or _ranks_released:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world


def rank_zero_list(items: list[int], rank: int, world: int) -> list[int]:
    """Rank 0's `items` on every torchrun rank (broadcast); `items` itself in a single process."""
    if world <= 1:
        return items
    import torch.distributed as dist

    # nccl sends through a GPU: the one its barrier uses for this rank (no rank sets a device)
    device = torch.device("cuda", rank % torch.cuda.device_count()) if torch.cuda.is_available() else None
    box = [items]
    dist.broadcast_object_list(box, src=0, device=device)
    return box[0]


def release_other_ranks() -> int:
    """Under torchrun, once every table's features are in the cache: leave the process group
    and return this process's rank. The script decides: ranks other than 0 exit, rank 0 goes
    on alone (training and evaluation on cached features are cheap). 0 in a single process.
    Call it after the last extract_features of a script."""
    global _ranks_released
    rank, world = distributed_rank_and_world()
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    _ranks_released = True
    return rank


_allocator_tuned = False


def keep_freed_memory_for_reuse() -> bool:
    """glibc only: keep large freed blocks in the heap for reuse (mallopt M_MMAP_THRESHOLD and
    M_TRIM_THRESHOLD = 1 GiB). Why: CPU inference allocates and frees its large activation
    buffers on every forward; by default glibc maps each one fresh from the kernel and gives it
    back, and the page faults cost as much as the convolutions (bench/bench_extraction.py:
    about 19,500 faults per image; effnet_lite0 at batch 32 on 2 cores ran 34 images/s without
    and 73 with). PyTorch's CPU tuning guide swaps in jemalloc or tcmalloc for the same reason;
    this needs no install. Process-wide, applied once; returns whether it is in effect."""
    global _allocator_tuned
    if not _allocator_tuned and sys.platform.startswith("linux"):
        import ctypes

        try:
            libc = ctypes.CDLL("libc.so.6")
        except OSError:
            return False
        m_trim_threshold, m_mmap_threshold = -1, -3
        _allocator_tuned = (bool(libc.mallopt(m_mmap_threshold, 1 << 30))
                            and bool(libc.mallopt(m_trim_threshold, 1 << 30)))
    return _allocator_tuned


def default_num_workers() -> int:
    """Image-decoding worker processes: a quarter of the CPU cores, at most 4. On 2 cores none:
    decoding a batch in the main process costs less than workers taking cores from the forward
    pass (bench/bench_extraction.py: 0.88 of the bare forward speed with 0 workers, 0.60 with 2)."""
    return max(0, min(4, (os.cpu_count() or 1) // 4))
