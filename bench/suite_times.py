"""pytest plugin: wall and CPU time of each test file, to see what the suite costs.

``PYTHONPATH=bench python -m pytest -p suite_times`` prints, after the run,
one line per test file: seconds of wall time from its first test's start to
the next file's (setup, call and teardown of its tests, module fixtures
included) and seconds of CPU (user + system) spent meanwhile by the test
process and every child it reaped, plus the children of the test fork server
(tests/forkserver.py), which are not the test process's own.  CPU time is
what a loaded machine disturbs least: wall time on a shared machine counts
the other users too.

With ``SUITE_TIMES_TESTS=FILE`` (one test id a line, as ``pytest
--collect-only -q`` prints them; ``#`` starts a comment line) it also prints the wall time of those tests
alone, setup, call and teardown, per file: e.g. ``bench/suite_tests_b0b4c09.txt``,
the tests that existed at ``b0b4c09``, which issue 15 budgets at 90 s.
"""

from __future__ import annotations

import os
import resource
import sys
import time

_totals: dict[str, list[float]] = {}
_current = {"file": None, "wall": 0.0, "cpu": 0.0}
_listed_s: dict[str, float] = {}  # file -> wall of its tests listed in SUITE_TIMES_TESTS
_listed_found: set[str] = set()


def _listed() -> set[str]:
    path = os.environ.get("SUITE_TIMES_TESTS")
    if not path:
        return set()
    with open(path, encoding="utf-8") as f:
        return {line.strip() for line in f if "::" in line and not line.startswith("#")}


_LISTED = _listed()


def _cpu_s() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
    forkserver = sys.modules.get("forkserver")
    forked = forkserver.children_cpu_s() if forkserver is not None else 0.0
    return own.ru_utime + own.ru_stime + reaped.ru_utime + reaped.ru_stime + forked


def _close_file() -> None:
    if _current["file"] is not None:
        total = _totals.setdefault(_current["file"], [0.0, 0.0])
        total[0] += time.monotonic() - _current["wall"]
        total[1] += _cpu_s() - _current["cpu"]


def pytest_runtest_protocol(item, nextitem):
    path = item.nodeid.split("::")[0]
    if path != _current["file"]:
        _close_file()
        _current.update(file=path, wall=time.monotonic(), cpu=_cpu_s())


def pytest_runtest_logreport(report):
    if report.nodeid in _LISTED:
        path = report.nodeid.split("::")[0]
        _listed_s[path] = _listed_s.get(path, 0.0) + report.duration
        _listed_found.add(report.nodeid)


def pytest_sessionfinish(session):
    _close_file()
    _current["file"] = None


def pytest_terminal_summary(terminalreporter):
    write = terminalreporter.write_line
    terminalreporter.write_sep("=", "wall and CPU seconds per test file")
    wall_sum = cpu_sum = 0.0
    for path, (wall_s, cpu_s) in sorted(_totals.items(), key=lambda kv: -kv[1][0]):
        write(f"{wall_s:8.1f} {cpu_s:8.1f}  {path}")
        wall_sum += wall_s
        cpu_sum += cpu_s
    write(f"{wall_sum:8.1f} {cpu_sum:8.1f}  all files")
    if _LISTED:
        terminalreporter.write_sep("=", f"wall seconds of the {len(_LISTED)} tests in {os.environ['SUITE_TIMES_TESTS']}")
        for path, wall_s in sorted(_listed_s.items(), key=lambda kv: -kv[1]):
            write(f"{wall_s:8.1f}  {path}")
        write(f"{sum(_listed_s.values()):8.1f}  all of them ({len(_listed_found)} run, "
              f"{len(_LISTED - _listed_found)} not run)")
