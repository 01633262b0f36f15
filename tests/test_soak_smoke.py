"""The soak benchmark, shortened: ten seconds of load and faults must lose nothing.

Runs ``bench/soak.py`` as a subprocess (it starts and kills its own cluster)
with a fixed seed, and checks its exit status and its summary line.  The
seed is chosen so that the fault thread's first three faults are one of each
kind (a node kill, a master kill, a node stop), all due within the first
seven seconds; how many of them land before the load stops depends on the
machine's speed, so the test asks for at least one.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

from conftest import ROOT

SEED = 21582
SECONDS = 10


def test_ten_second_soak_loses_nothing(tmp_path):
    """Ten seconds of uploads, downloads and deletes under node and master faults end with every file intact."""
    argv = [sys.executable, os.path.join(ROOT, "bench", "soak.py"), "--seconds", str(SECONDS), "--seed", str(SEED),
            "--data-dir", str(tmp_path / "soak")]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=90, cwd=ROOT)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"soak failed (seed {SEED}):\n{output}"
    assert "lost 0;" in proc.stdout, f"seed {SEED}:\n{output}"
    assert "wrong bytes 0;" in proc.stdout, f"seed {SEED}:\n{output}"
    faults = re.search(r"faults injected (\d+)", proc.stdout)
    assert faults and int(faults.group(1)) >= 1, f"no fault was injected (seed {SEED}):\n{output}"
