"""The command-line shell, one sub-package: here errors and the command line (VPRError: one line,
exit 2; run_cli, CliParser, SIGTERM, safe files); settings.py the flag machinery (flag, the layers,
parse_config: the one parse call of every script); configs.py the shared flag groups and the
torch-free scripts' configs; extraction_settings.py the image and extraction flags."""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence


class VPRError(Exception):
    """A problem with the user's input: printed as one line, exit code 2, no traceback."""


def run_cli(main: Callable[[Sequence[str] | None], Any], argv: Sequence[str] | None = None) -> None:
    """Run a script's main(); turn VPRError (and Ctrl-C) into one line on stderr and exit code.

    With `--debug` anywhere on the command line, the full traceback is printed first, then the line.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    try:
        main(args)
    except VPRError as exc:
        if debug:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


class CliParser(argparse.ArgumentParser):
    """argparse whose command-line errors are VPRErrors: one line naming the flag (run_cli
    prints it, exit code 2), instead of the usage text followed by the error."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        raise VPRError(f"{message}; see --help")


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within it, SIGTERM (a scheduler's or `kill`'s stop) raises KeyboardInterrupt like Ctrl-C,
    so both end a run the same clean way. Signals reach only the main thread: elsewhere a no-op."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")


def _cannot_write_in(folder: Path) -> str | None:
    """Why files cannot be written in `folder` (created if needed), or None if they can."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write_probe_{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    return None


def check_writable_dir(path: str | Path, flag: str) -> Path:
    """Create `path` if needed and make sure files can be written there."""
    path = Path(path)
    reason = _cannot_write_in(path)
    if reason:
        raise VPRError(f"{flag} {path}: cannot write there ({reason}); choose another folder")
    return path


def check_writable_file(path: str | Path | None, flag: str) -> None:
    """Fail now, not after the work, when an output file is a folder or its folder cannot be written."""
    if path and Path(path).is_dir():
        raise VPRError(f"{flag} {path}: is a folder, not a file; give a file path (e.g. inside that folder)")
    if path:
        reason = _cannot_write_in(Path(path).parent)
        if reason:
            raise VPRError(f"{flag} {path}: cannot write its folder {Path(path).parent} ({reason}); "
                           f"choose another path")


def check_new_file(path: str | Path | None, overwrite: bool, flag: str) -> None:
    """The one rule for every output file a flag names (docs/files.md): an existing file is
    replaced only with --overwrite, else the script stops here, before any work; a folder in its
    place, or a folder that cannot be written, is an error too."""
    if path and Path(path).is_file() and not overwrite:
        raise VPRError(f"{flag} {path}: the file exists; pass --overwrite to replace it, or choose another path")
    check_writable_file(path, flag)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call write(tmp_path), then rename tmp_path onto path: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
    try:
        write(Path(tmp))
        with open(tmp, "rb") as handle:  # on disk before the rename: a power cut leaves old or new
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


FIGURE_DPI = 110  # every figure of the suite (the pictures of images: 80, they are photo grids)


def write_png(fig: Any, path: str | Path, dpi: int = FIGURE_DPI) -> Path:
    """Save a matplotlib figure as PNG atomically (atomic_write): readers never see half a picture."""
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
    return Path(path)
