"""The soak benchmark, shortened: 20 seconds of load and faults must lose nothing.

Runs ``bench/soak.py`` as a subprocess (it starts and kills its own cluster)
with a fixed seed, and checks its exit status and its summary line.
"""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import ROOT

SEED = 20240


def test_twenty_second_soak_loses_nothing(tmp_path):
    """Twenty seconds of uploads, downloads and deletes under node and master faults end with every file intact."""
    argv = [sys.executable, os.path.join(ROOT, "bench", "soak.py"), "--seconds", "20", "--seed", str(SEED),
            "--data-dir", str(tmp_path / "soak")]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=90, cwd=ROOT)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"soak failed (seed {SEED}):\n{output}"
    assert "lost 0;" in proc.stdout, f"seed {SEED}:\n{output}"
    assert "wrong bytes 0;" in proc.stdout, f"seed {SEED}:\n{output}"
