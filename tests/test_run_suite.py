"""tests/run_suite.py: the shards it makes, what it reads of pytest's output, its exit status and clean-up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import run_suite  # tests/ is on sys.path (pytest's rootdir-relative import of this directory)

RUNNER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "run_suite.py")


def test_partition_puts_the_longest_files_on_different_shards_and_balances():
    estimates = {"tests/a.py": 30.0, "tests/b.py": 25.0, "tests/c.py": 10.0, "tests/d.py": 10.0, "tests/e.py": 5.0}
    shards = run_suite.partition(["tests/a.py", "tests/b.py", "tests/c.py", "tests/d.py", "tests/e.py",
                                  "tests/new.py"], 2, estimates, 2.0)
    assert len(shards) == 2 and sorted(sum(shards, [])) == sorted(
        ["tests/a.py", "tests/b.py", "tests/c.py", "tests/d.py", "tests/e.py", "tests/new.py"])
    a, b = (s for s in shards if "tests/a.py" in s), (s for s in shards if "tests/b.py" in s)
    assert next(a) is not next(b), "the two longest files share a shard"
    loads = sorted(sum(estimates.get(u, 2.0) for u in s) for s in shards)
    assert loads == [40.0, 42.0]  # 30+10 | 25+10+5, then the unknown file (2 s) onto the first of the tie
    assert run_suite.partition(["tests/a.py"], 4, estimates, 2.0) == [["tests/a.py"]], "no empty shard"


def test_every_file_of_the_checked_in_estimates_exists_and_every_test_file_has_one():
    """The estimates name real files (renames must follow), and a new file is only a default until measured."""
    estimates, default_s = run_suite.load_estimates()
    files = {os.path.relpath(p, run_suite.ROOT).replace(os.sep, "/") for p in run_suite.test_files(run_suite.TESTS_DIR)}
    assert set(estimates) <= files, f"estimates for missing files: {sorted(set(estimates) - files)}"
    assert default_s > 0 and all(v >= 0 for v in estimates.values())


def test_counts_read_pytest_summary_line_and_targets_are_told_from_options():
    out = "....F\n=========== 1 failed, 120 passed, 2 skipped, 3 deselected, 1 error in 60.12s (0:01:00) ===========\n"
    assert run_suite.counts(out) == {"failed": 1, "passed": 120, "skipped": 2, "deselected": 3, "error": 1}
    assert run_suite.counts("12 passed in 0.5s\n") == {"passed": 12}
    assert run_suite.counts("INTERNALERROR\n") == {}
    here = os.path.relpath(RUNNER)
    assert run_suite.split_targets(["-k", "tests", "-x", here, f"{here}::test_x", "--durations", "5"]) == (
        [here, f"{here}::test_x"], ["-k", "tests", "-x", "--durations", "5"])


def write_tests(directory, files: dict) -> list[str]:
    os.makedirs(directory, exist_ok=True)
    paths = []
    for name, body in files.items():
        path = os.path.join(directory, name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(body)
        paths.append(path)
    return paths


def run_runner(*args, timeout_s: float = 60.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, RUNNER, *args], capture_output=True, text=True, timeout=timeout_s)


def test_a_failing_shard_fails_the_run_and_each_shard_gets_its_own_basetemp_removed_after(tmp_path):
    paths = write_tests(tmp_path / "t", {
        "test_good.py": "def test_one(tmp_path):\n    (tmp_path / 'x').write_text('x')\n\ndef test_two():\n    pass\n",
        "test_bad.py": "import pytest\n\ndef test_fails():\n    assert 1 == 2\n\n"
                       "@pytest.mark.skip(reason='no')\ndef test_skipped():\n    pass\n",
    })
    root = tmp_path / "base"
    result = run_runner("--basetemp", str(root), "-q", *paths)
    assert result.returncode == run_suite.EXIT_FAILED, result.stdout + result.stderr
    assert "[1/2] " in result.stdout and "[2/2] " in result.stdout
    assert "all shards: FAILED: 2 passed, 1 failed, 1 skipped" in result.stdout, result.stdout
    assert os.listdir(root) == [], "a shard's basetemp or output was left behind"
    ok = run_runner("--basetemp", str(root), "-q", "-k", "two", *paths)
    assert ok.returncode == 0 and "all shards: passed: 1 passed" in ok.stdout, ok.stdout + ok.stderr


def test_timeout_stops_every_shard_and_kills_what_they_started(tmp_path):
    pid_file = tmp_path / "child.pid"
    body = ("import os, subprocess, sys, time\n\ndef test_hangs():\n"
            f"    child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'])\n"
            f"    open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
            "    time.sleep(300)\n")
    paths = write_tests(tmp_path / "t", {"test_hang.py": body, "test_quick.py": "def test_quick():\n    pass\n"})
    started = time.monotonic()
    result = run_runner("--timeout", "2", "-q", *paths)
    assert result.returncode == run_suite.EXIT_FAILED, result.stdout + result.stderr
    assert "TIMED OUT" in result.stdout and time.monotonic() - started < 2 + run_suite.KILL_GRACE_S + 10
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while os.path.exists(f"/proc/{child}") and time.monotonic() < deadline:
        with open(f"/proc/{child}/stat", encoding="utf-8") as f:
            if f.read().split(") ")[-1].startswith("Z"):
                break  # killed, waiting for its reaper
        time.sleep(0.05)
    else:
        assert not os.path.exists(f"/proc/{child}"), "the shard's child process survived the timeout"


def test_list_prints_the_plan_without_running(tmp_path):
    result = run_runner("--list", "--jobs", "3")
    assert result.returncode == 0 and result.stdout.count("shard ") == 3, result.stdout
    listed = sum((line.split(": ", 2)[2].split() for line in result.stdout.splitlines()), [])
    estimates, _ = run_suite.load_estimates()  # raises if the estimates file does not parse
    assert sorted(listed) == sorted(
        os.path.relpath(p, run_suite.ROOT) for p in run_suite.test_files(run_suite.TESTS_DIR))
    assert estimates, "tests/suite_durations.json lists no test file: every shard would be balanced blind"
