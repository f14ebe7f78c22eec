#!/usr/bin/env python3
"""Export a trained checkpoint, or a frozen backbone, as one self-contained model file.

    python export_model.py --model_path trained_models/trained_effnet_lite0_seed42.pth --output vpr.pt2
    python export_model.py --model_path trained_models/trained_effnet_lite0_seed42.pth --output vpr.onnx
    python export_model.py --baseline --model effnet_lite0 --output effnet_lite0.onnx
    python export_model.py --baseline --model dinov2_s --pooling vlad --db_csv data/train.csv --output anyloc.pt2
    python export_model.py --model_path trained_models/SEQUENCE_RUN.pth --output route.onnx

The file is the whole descriptor (trainable_vpr.model.PlaceDescriptor, DESIGN.md §6): it takes
float32 RGB images [B, 3, H, W] in [0, 1], any batch size and any H and W (at least 2 pixels),
resizes them to the backbone's square input (bicubic, antialiased), normalises, runs the frozen
backbone, its pooling (with the VLAD vocabulary) and the head, and returns L2-normalised
descriptors [B, D] float32. The suffix chooses the format: .pt2 (torch.export; load with
torch.export.load(FILE).module()) or .onnx (torch.onnx.export(dynamo=True), opset 18, input
`images`, output `descriptors`; needs the onnx and onnxscript packages). The written file is
loaded back and checked against the model on a batch of another size before the script ends.

A sequence checkpoint (train_vpr.py --head seqnet --seq_len L) exports its sequence model
(trainable_vpr.sequence_model.SequenceDescriptor): windows of frames [B, L, 3, H, W] in (L fixed,
the last frame the one localised; ONNX input `frames`), one L2-normalised window descriptor [B, D]
out: every frame through the frozen backbone as above, then the sequence head. Sequence matching
and the fusion with it compare a route with a database, so they stay outside the file (localize.py).

A --pooling vlad baseline needs its vocabulary: it is fitted on the --db_csv images (the
database you will search), as eval_trained.py and localize.py fit it, through the same cache.
An existing --output is kept unless --overwrite.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

import trainable_vpr as vpr
from trainable_vpr.checkpoints import SEQUENCE, load_checkpoint
from trainable_vpr.sequence_model import SequenceDescriptor, load_route_model
from vprkit.cli import CliParser, VPRError, atomic_write, check_new_file, run_cli
from vprkit.cli.extraction_settings import extraction_settings, pooling_config
from vprkit.tables.places import is_parquet
from vprkit.tables.load import load_table
from vprkit.cli.settings import config_parser, parse_config

FORMATS = (".pt2", ".onnx")
ONNX_OPSET = 18  # the first opset whose Resize has antialias (the suite's resize is antialiased)
IMAGE_TRACE, IMAGE_CHECK = (181, 243), (97, 130)  # traced: odd, non-square (no size baked in); checked: another size
TRACE_BATCH, CHECK_BATCH = 2, 3                   # the batch checked is another size than the one traced
MIN_COSINE = 0.999


@dataclass(frozen=True)
class ModelInput:
    """The exported model's input: `[B, 3, H, W]` images, or `[B, L, 3, H, W]` windows of L frames
    (a sequence model; L fixed, the batch and the frame size free)."""

    name: str
    seq_len: int | None = None

    def shape(self, batch: int, size: tuple[int, int]) -> tuple[int, ...]:
        frames = () if self.seq_len is None else (self.seq_len,)
        return (batch, *frames, 3, *size)

    def dynamic_shapes(self) -> tuple[dict[int, torch.export.Dim], ...]:
        """Batch, height and width free; the model resizes to its input size inside."""
        at = 0 if self.seq_len is None else 1
        return ({0: torch.export.Dim("batch", min=1), 2 + at: torch.export.Dim("height", min=2),
                 3 + at: torch.export.Dim("width", min=2)},)

    def describe(self) -> str:
        return "[B, 3, H, W]" if self.seq_len is None else f"[B, {self.seq_len}, 3, H, W] (windows of frames)"


def model_input(model: nn.Module) -> ModelInput:
    return ModelInput("frames", model.seq_len) if isinstance(model, SequenceDescriptor) else ModelInput("images")

def build_parser() -> CliParser:
    return config_parser(vpr.ExportConfig, __doc__.split("\n\n")[0], skip=("camera_id",), optional=("db_csv",))


def parse_args(argv: Sequence[str] | None) -> vpr.ExportConfig:
    return parse_config(build_parser(), vpr.ExportConfig, argv)


# ---------------------------------------------------------------------------------------------
# The steps
# ---------------------------------------------------------------------------------------------
def check_output(args: vpr.ExportConfig) -> Path:
    """A known suffix, a writable folder, no file replaced without --overwrite, and for ONNX the
    exporter's packages: all before any model is built."""
    output = Path(args.output)
    if output.suffix.lower() not in FORMATS:
        raise VPRError(f"--output {output}: unknown model format {output.suffix or '(no suffix)'!r}; "
                       f"name the file .pt2 (torch.export) or .onnx (ONNX)")
    check_new_file(output, args.overwrite, "--output")
    if output.suffix.lower() == ".onnx":
        require_onnx_exporter()
    return output


def require_onnx_exporter() -> None:
    """torch.onnx.export(dynamo=True) needs onnx and onnxscript (optional dependencies)."""
    for package in ("onnx", "onnxscript"):
        try:
            __import__(package)
        except ImportError:
            raise VPRError(f"--output .onnx: the {package} package is not installed; pip install onnx onnxscript "
                           f"(and onnxruntime to run the file), or export .pt2") from None


def build_model(args: vpr.ExportConfig) -> nn.Module:
    """The model to export, as the other scripts build it (trainable_vpr.sequence_model.load_route_model):
    what the checkpoint holds (a sequence checkpoint: its SequenceDescriptor, --seq_len when given
    must be its window; a single-frame one: its PlaceDescriptor), or the --baseline's PlaceDescriptor,
    whose --pooling vlad vocabulary is fitted on the --db_csv images."""
    settings = extraction_settings(args)
    if args.baseline and args.sequences:
        raise VPRError(f"--seq_len {args.seq_len}: a --baseline exports a single-frame model; export a sequence "
                       f"checkpoint (train_vpr.py --head seqnet --seq_len {args.seq_len}) for windows of frames")
    fit_on: Sequence[str] = ()
    if args.baseline and pooling_config(settings).pooling == "vlad":
        if not args.db_csv:
            raise VPRError("--pooling vlad: the VLAD vocabulary is fitted on the database images; give --db_csv "
                           "(the poses CSV or benchmark folder you will search)")
        if is_parquet(args.db_csv):
            raise VPRError(f"--db_csv {args.db_csv}: an embeddings parquet has no images to fit a vocabulary on; "
                           f"give a poses CSV or a benchmark folder")
        fit_on = load_table(args.db_csv, args.image_root, on_bad_image=args.on_bad_image).paths
    if args.model_path and args.sequences:  # windows asked for: a sequence checkpoint of that length
        load_checkpoint(args.model_path, SEQUENCE)
    model, _ = load_route_model(args.model_path, args.model, settings, args.seq_len if args.sequences else None,
                                fit_on)
    return model.cpu().eval()


def export(model: nn.Module, output: Path) -> None:
    """Trace the model on a TRACE_BATCH of IMAGE_TRACE-sized inputs and write it atomically in the
    format of output's suffix."""
    spec = model_input(model)
    example = (torch.rand(spec.shape(TRACE_BATCH, IMAGE_TRACE), generator=torch.Generator().manual_seed(0)),)
    if output.suffix.lower() == ".pt2":
        program = torch.export.export(model, example, dynamic_shapes=spec.dynamic_shapes())
        atomic_write(output, lambda p: save_program(program, p))
        return
    # external_data=False: the weights inside the one file (up to ONNX's 2 GB), not in FILE.onnx.data
    onnx_program = torch.onnx.export(model, example, dynamo=True, dynamic_shapes=spec.dynamic_shapes(),
                                     input_names=[spec.name], output_names=["descriptors"], opset_version=ONNX_OPSET,
                                     verbose=False)
    atomic_write(output, lambda p: onnx_program.save(str(p), external_data=False))


def save_program(program: torch.export.ExportedProgram, path: Path) -> None:
    """torch.export.save through an open file: given a path, it warns about one not ending in .pt2
    (atomic_write's temporary file). Its "No complete tensor found in the group" warning (weights
    sharing storage, e.g. the VLAD vocabulary) is noise here: the weights are on the CPU, and
    check_exported compares the written file with the model."""
    with open(path, "wb") as handle, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="No complete tensor found in the group")
        torch.export.save(program, handle)


def run_exported(output: Path, inputs: torch.Tensor, name: str) -> np.ndarray | None:
    """The written file's descriptors of `inputs` (its input `name`), read back with the library
    that defines the format (torch.export.load, onnxruntime); None for ONNX when onnxruntime is not
    installed."""
    if output.suffix.lower() == ".pt2":
        with torch.no_grad(), open(output, "rb") as handle:  # a file: given a path, torch warns unless it ends .pt2
            return torch.export.load(handle).module()(inputs).numpy()
    try:
        import onnxruntime
    except ImportError:
        return None
    session = onnxruntime.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    return session.run(None, {name: inputs.numpy()})[0]


def check_exported(model: nn.Module, output: Path) -> str:
    """The written file agrees with the model (PlaceDescriptor or SequenceDescriptor .forward) on a
    CHECK_BATCH of IMAGE_CHECK-sized inputs (cosine >= MIN_COSINE per output row)."""
    spec = model_input(model)
    shape = spec.shape(CHECK_BATCH, IMAGE_CHECK)
    inputs = torch.rand(shape, generator=torch.Generator().manual_seed(1))
    exported = run_exported(output, inputs, spec.name)
    if exported is None:
        return "not checked: onnxruntime is not installed"
    with torch.no_grad():
        expected = model(inputs).numpy()
    cosine = float((exported * expected).sum(axis=1).min())
    if exported.shape != expected.shape or not cosine >= MIN_COSINE:
        raise VPRError(f"--output {output}: the exported model disagrees with the suite's (shape {exported.shape} vs "
                       f"{expected.shape}, min cosine {cosine:.4f}); report this backbone and format")
    return f"checked on a {'x'.join(map(str, shape))} batch: min cosine {cosine:.6f}"


def main(argv: Sequence[str] | None = None) -> Path:
    args = parse_args(argv)
    output = check_output(args)
    model = build_model(args)
    started = time.perf_counter()
    export(model, output)
    seconds = time.perf_counter() - started
    check = check_exported(model, output)
    what = Path(args.model_path).name if args.model_path else f"raw {args.model}"
    print(f"wrote {output} ({what}: {model_input(model).describe()} float32 RGB in [0, 1] -> [B, {model.output_dim}] "
          f"L2-normalised; "
          f"{output.stat().st_size / 2**20:.1f} MiB, exported in {seconds:.1f} s; {check})")
    return output


if __name__ == "__main__":
    run_cli(main)
