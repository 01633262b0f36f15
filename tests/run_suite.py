"""Run the test suite as several concurrent pytest processes, one per shard of the test files.

Why: about half of the suite's wall time is waiting on cluster timers (a node
dead after 1 s, safe mode, leases, repair grace) that are the behaviour under
test, so one serial pytest leaves the second core idle. This runner (standard
library only, no pytest plugin) splits the test FILES into ``--jobs`` shards
(default 2) balanced by ``tests/suite_durations.json`` (seconds of wall per
file, measured serially; a file not in it counts ``default_s``), longest file
first onto the least loaded shard, and runs ``python -m pytest`` on each at
once, each with its own ``--basetemp`` under one temporary root that is
removed at the end. A file never runs in two shards, so its module fixtures
(shared clusters) are built once, as in a serial run.

    python tests/run_suite.py                       # the whole suite on 2 shards
    python tests/run_suite.py --jobs 1 -x           # serially, through the runner
    python tests/run_suite.py -k space tests/test_space.py tests/test_heal.py

Every argument the runner does not know goes to each pytest (``-k``, ``-x``,
``-q``, ``--durations``...); arguments naming existing test files, directories
or node ids (``tests/test_x.py::test_y``) choose what is sharded instead of
``tests/``. Each shard's output is printed, whole and prefixed by its shard,
when it ends; then a summary per shard (passed, failed, skipped..., wall) and
the total wall time. Exit status: 0 if every shard passed (a shard whose
tests were all deselected counts as passed), 1 if a shard failed, was killed
or timed out, 2 on a usage error, 130 on Ctrl-C. On Ctrl-C or ``--timeout``
each pytest gets SIGINT (it runs its finalizers: clusters killed by pid,
loop mounts undone) and, ``KILL_GRACE_S`` later, its whole process group
SIGKILL. With ``-x``/``--exitfirst`` the first failing shard stops the others
the same way.

``python -m pytest`` still runs the suite serially, unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS_DIR)
DURATIONS_FILE = os.path.join(TESTS_DIR, "suite_durations.json")
# A shard told to stop (SIGINT) gets this long to run its finalizers before SIGKILL.
KILL_GRACE_S = 15.0
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
PYTEST_NO_TESTS = 5  # pytest's exit code when every test was deselected
# The counts of pytest's last line, e.g. "= 3 failed, 120 passed, 1 skipped in 60.1s =".
COUNT_RE = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected|warnings?)")
SUMMARY_KEYS = ("passed", "failed", "error", "skipped", "xfailed", "xpassed", "deselected")


def load_estimates(path: str = DURATIONS_FILE) -> tuple[dict, float]:
    """(seconds per test file relative to the repository, default seconds for a file not listed)."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return {k: float(v) for k, v in data["files"].items()}, float(data["default_s"])


def test_files(directory: str) -> list[str]:
    """The ``test_*.py`` files under ``directory`` (pytest's default pattern), sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__")))
        found += [os.path.join(dirpath, n) for n in sorted(filenames) if n.startswith("test_") and n.endswith(".py")]
    return found


def split_targets(extra: list[str]) -> tuple[list[str], list[str]]:
    """(test targets named in ``extra``: files, directories, node ids; the other pytest arguments).

    An argument is a target when it does not start with ``-`` and its path
    (before ``::``) exists, and it is not the value of the option before it
    (``-k space``: ``space`` is no path here; ``--rootdir .`` would be, so
    options taking a value are left to pytest only when given as ``--opt=value``).
    """
    targets, rest = [], []
    for i, arg in enumerate(extra):
        previous = extra[i - 1] if i else ""
        takes_value = previous in ("-k", "-m", "-p", "-c", "-o", "--durations", "--maxfail", "--tb", "-W",
                                   "--deselect", "--ignore", "--rootdir", "--junit-xml", "--log-level")
        if not arg.startswith("-") and not takes_value and os.path.exists(arg.split("::")[0]):
            targets.append(arg)
        else:
            rest.append(arg)
    return targets, rest


def units_of(targets: list[str]) -> list[str]:
    """What shards are made of: test files (directories expanded) and node ids, each once, in order."""
    units: list[str] = []
    for target in targets:
        for unit in test_files(target) if os.path.isdir(target) else [target]:
            path, sep, rest = unit.partition("::")
            unit = os.path.relpath(os.path.abspath(path), ROOT).replace(os.sep, "/") + sep + rest  # shards run in ROOT
            if unit not in units:
                units.append(unit)
    return units


def estimate(unit: str, estimates: dict, default_s: float) -> float:
    """Estimated seconds of a test file or node id (its whole file's)."""
    path = os.path.relpath(os.path.abspath(unit.split("::")[0]), ROOT).replace(os.sep, "/")
    return estimates.get(path, default_s)


def partition(units: list[str], jobs: int, estimates: dict, default_s: float) -> list[list[str]]:
    """``units`` into at most ``jobs`` non-empty shards of about equal estimated seconds.

    Longest first, each onto the shard with the least estimated time so far
    (LPT: within 4/3 of the best split); node ids count their whole file's time.
    """
    def seconds(unit: str) -> float:
        return estimate(unit, estimates, default_s)

    shards: list[list[str]] = [[] for _ in range(max(1, min(jobs, len(units))))]
    loads = [0.0] * len(shards)
    for unit in sorted(units, key=lambda u: (-seconds(u), u)):
        i = loads.index(min(loads))
        shards[i].append(unit)
        loads[i] += seconds(unit)
    return [sorted(s) for s in shards if s]


def counts(output: str) -> dict:
    """The counts of pytest's summary line (the last line naming any), e.g. {'passed': 120, 'failed': 3}."""
    for line in reversed(output.splitlines()):
        found = COUNT_RE.findall(line)
        if found and (" in " in line or line.startswith("=")):
            result = {}
            for number, word in found:
                key = word.rstrip("s") if word.startswith(("error", "warning")) else word
                result[key] = result.get(key, 0) + int(number)
            return result
    return {}


class Shard:
    """One pytest process over some test files; its output goes to a file until it ends."""

    def __init__(self, index: int, units: list[str], pytest_args: list[str], basetemp: str, out_dir: str):
        self.index, self.units, self.basetemp = index, units, basetemp
        self.out_path = os.path.join(out_dir, f"shard-{index}.out")
        self.argv = [sys.executable, "-m", "pytest", "--basetemp", basetemp,
                     *pytest_args, *units]
        self.proc: subprocess.Popen | None = None
        self.started = self.ended = 0.0
        self.returncode: int | None = None
        self.stopped = ""  # why the runner stopped it, if it did

    def start(self) -> None:
        self.started = time.monotonic()
        with open(self.out_path, "wb") as out:
            # Its own session: the terminal's Ctrl-C reaches only the runner, which
            # stops each shard in order (SIGINT, then SIGKILL of the group).
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         cwd=ROOT, start_new_session=True)

    def poll(self) -> bool:
        """True once it has ended (and records when)."""
        if self.returncode is None and self.proc is not None and self.proc.poll() is not None:
            self.returncode, self.ended = self.proc.returncode, time.monotonic()
        return self.returncode is not None

    def interrupt(self, why: str) -> None:
        if not self.poll() and not self.stopped:
            self.stopped = why
            try:
                os.kill(self.proc.pid, signal.SIGINT)
            except ProcessLookupError:
                pass

    def kill_group(self) -> None:
        """SIGKILL whatever is left of its process group (pytest and anything it started that did not leave it)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def output(self) -> str:
        with open(self.out_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    @property
    def passed(self) -> bool:
        return not self.stopped and self.returncode in (0, PYTEST_NO_TESTS)


def stop_all(shards: list[Shard], why: str) -> None:
    """SIGINT every running shard, wait up to KILL_GRACE_S for their finalizers, then SIGKILL their groups."""
    for shard in shards:
        shard.interrupt(why)
    deadline = time.monotonic() + KILL_GRACE_S
    while time.monotonic() < deadline and not all(s.poll() for s in shards):
        time.sleep(0.1)
    for shard in shards:
        shard.kill_group()
        if shard.proc is not None:
            shard.proc.wait()
        shard.poll()


def print_shard(shard: Shard, total: int) -> None:
    prefix = f"[{shard.index}/{total}] "
    sys.stdout.write(f"{prefix}{'=' * 20} shard {shard.index}: {len(shard.units)} file(s), "
                     f"{shard.ended - shard.started:.1f} s, exit {shard.returncode}"
                     f"{', ' + shard.stopped if shard.stopped else ''}\n")
    for line in shard.output().splitlines():
        sys.stdout.write(f"{prefix}{line}\n")
    sys.stdout.flush()


def summary(shards: list[Shard], wall_s: float) -> str:
    lines = ["", f"{'=' * 24} run_suite: {len(shards)} shard(s) {'=' * 24}"]
    total: dict = {}
    for shard in shards:
        found = counts(shard.output())
        for key, value in found.items():
            total[key] = total.get(key, 0) + value
        shown = ", ".join(f"{found[k]} {k}" for k in SUMMARY_KEYS if found.get(k)) or "no summary"
        state = "ok" if shard.passed else (shard.stopped or f"FAILED (exit {shard.returncode})")
        lines.append(f"shard {shard.index}: {state:<10} {shard.ended - shard.started:7.1f} s  {shown}  "
                     f"({len(shard.units)} file(s))")
    shown = ", ".join(f"{total[k]} {k}" for k in SUMMARY_KEYS if total.get(k)) or "no tests counted"
    verdict = "passed" if all(s.passed for s in shards) else "FAILED"
    lines.append(f"all shards: {verdict}: {shown} in {wall_s:.1f} s of wall")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Run the test suite as concurrent pytest processes over a partition of the test files; "
                    "other arguments go to each pytest.")
    parser.add_argument("--jobs", "-j", type=int, default=2, help="concurrent pytest processes (default 2)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="stop every shard (SIGINT, then SIGKILL) after this many seconds; exit 1")
    parser.add_argument("--basetemp", default=None,
                        help="root of the shards' --basetemp directories (shard-N under it; default: a fresh "
                             "temporary directory); the shards' directories are removed at the end")
    parser.add_argument("--list", action="store_true", help="print the shards and their estimated seconds, run nothing")
    args, extra = parser.parse_known_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    targets, pytest_args = split_targets(extra)
    units = units_of(targets or [os.path.relpath(TESTS_DIR)])
    if not units:
        parser.error("no test files found")
    estimates, default_s = load_estimates()
    plan = partition(units, args.jobs, estimates, default_s)
    if args.list:
        for i, units_ in enumerate(plan, 1):
            est = sum(estimate(u, estimates, default_s) for u in units_)
            print(f"shard {i}: ~{est:.0f} s: {' '.join(units_)}")
        return EXIT_OK

    root = args.basetemp or tempfile.mkdtemp(prefix="run-suite-")
    os.makedirs(root, exist_ok=True)
    shards = [Shard(i, units_, pytest_args, os.path.join(root, f"shard-{i}"), root)
              for i, units_ in enumerate(plan, 1)]
    exitfirst = any(a in ("-x", "--exitfirst") for a in pytest_args)
    started = time.monotonic()
    deadline = started + args.timeout if args.timeout else None
    interrupted = False
    printed: set[int] = set()
    try:
        for shard in shards:
            shard.start()
        print(f"run_suite: {len(shards)} shard(s) of {len(units)} file(s), basetemp {root}", flush=True)
        while len(printed) < len(shards):
            for shard in shards:
                if shard.index not in printed and shard.poll():
                    printed.add(shard.index)
                    print_shard(shard, len(shards))
                    if exitfirst and not shard.passed:
                        stop_all(shards, "stopped (-x)")
            if deadline is not None and time.monotonic() > deadline:
                stop_all(shards, f"TIMED OUT ({args.timeout:g} s)")
            time.sleep(0.1)
    except KeyboardInterrupt:
        interrupted = True
        stop_all(shards, "interrupted")
        for shard in shards:
            if shard.index not in printed:
                print_shard(shard, len(shards))
    finally:
        for shard in shards:
            if shard.proc is not None and shard.returncode is None:
                stop_all(shards, "interrupted")
                break
    sys.stdout.write(summary(shards, time.monotonic() - started))
    sys.stdout.flush()
    for shard in shards:
        shutil.rmtree(shard.basetemp, ignore_errors=True)
        os.unlink(shard.out_path)
    if not args.basetemp:
        shutil.rmtree(root, ignore_errors=True)
    if interrupted:
        return EXIT_INTERRUPTED
    if not all(s.passed for s in shards):
        return EXIT_FAILED
    if all(s.returncode == PYTEST_NO_TESTS for s in shards):
        return PYTEST_NO_TESTS
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
