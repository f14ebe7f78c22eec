"""bench/recall_bgu.py refuses a --train_pooled descriptor that --pooled does not compute, before any work."""
import subprocess
import sys

import pytest

from helpers import REPO


@pytest.mark.slow
def test_train_pooled_must_be_in_pooled() -> None:
    run = subprocess.run([sys.executable, str(REPO / "bench" / "recall_bgu.py"), "--pooling_rows",
                          "--pooled", "vlad:8", "--train_pooled", "vlad:-2"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert "--train_pooled vlad:-2 must also be in --pooled" in run.stderr
    assert "Traceback" not in run.stderr
