"""The soak benchmark, shortened: five seconds of load and faults must lose nothing.

Runs ``bench/soak.py`` as a subprocess (it starts and kills its own cluster)
with a fixed seed, and checks its exit status and its summary line.  The
seed is chosen so that the fault thread's first two faults are a node kill
(about 1 s in) and a master kill (about 4 s in, after the cluster healed
from the first); the load stops after five seconds but the faults thread
finishes the fault under way and its heal first.  How many faults land
depends on the machine's speed, so the test asks for at least one.  (Node
stops: tests/test_heal.py.  Longer soaks: ``python bench/soak.py --minutes N``.)
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

from conftest import ROOT

SEED = 63270
SECONDS = 5


def test_five_second_soak_loses_nothing(tmp_path):
    """Five seconds of uploads, downloads and deletes under node and master faults end with every file intact."""
    argv = [sys.executable, os.path.join(ROOT, "bench", "soak.py"), "--seconds", str(SECONDS), "--seed", str(SEED),
            "--data-dir", str(tmp_path / "soak")]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=90, cwd=ROOT)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"soak failed (seed {SEED}):\n{output}"
    assert "lost 0;" in proc.stdout, f"seed {SEED}:\n{output}"
    assert "wrong bytes 0;" in proc.stdout, f"seed {SEED}:\n{output}"
    faults = re.search(r"faults injected (\d+)", proc.stdout)
    assert faults and int(faults.group(1)) >= 1, f"no fault was injected (seed {SEED}):\n{output}"
