"""Smoke test of the benchmark: ``bench/bench.py --quick`` runs end to end.

The benchmark is not a test (its numbers depend on the machine), but it is
code that rots silently when the product changes under it: a renamed flag, a
new argument, a changed metadata format.  This runs the quick variant once
as a subprocess, as a user would, and checks only that it finishes with exit
status 0 (no correctness failure) and writes the JSON with every expected
row.  No timing is asserted: a slow or loaded machine must not fail it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

EXPECTED_ROWS = {
    "upload_32mib", "relay_upload_32mib", "upload_cpu_32mib", "relay_cpu_32mib", "copy2_32mib", "download_32mib", "copy1_32mib",
    "mem_master_32mib", "mem_node_32mib", "mem_client_32mib", "node_growth_32mib",
    "metadata_per_gib", "small_upload", "relay_small", "small_download",
    "restart_big", "restart_100", "list_big", "list_100", "commit_big", "commit_100",
    "startup_pass", "startup_help", "startup_list", "startup_pass_cpu", "startup_help_cpu", "startup_list_cpu",
}
ROW_KEYS = {"key", "label", "unit", "values", "median", "min", "max", "baseline", "baseline_median", "ratio",
            "target", "met", "status", "note"}


def test_quick_bench_runs_and_writes_json(tmp_path):
    """The quick benchmark exits 0 and its JSON holds the machine, the parameters and every row."""
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench.py"), "--quick", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert {"machine", "params", "rows", "correctness_failures", "elapsed_s"} <= set(report)
    assert report["correctness_failures"] == []
    assert {"nproc", "cpu", "mem_total_bytes", "python", "temp_fs"} <= set(report["machine"])
    rows = {row["key"]: row for row in report["rows"]}
    assert EXPECTED_ROWS <= set(rows), EXPECTED_ROWS - set(rows)
    for row in rows.values():
        assert ROW_KEYS <= set(row), row["key"]
