"""pytest plugin: wall and CPU time of each test file, to see what the suite costs.

``PYTHONPATH=bench python -m pytest -p suite_times`` prints, after the run,
one line per test file: seconds of wall time from its first test's start to
the next file's (setup, call and teardown of its tests, module fixtures
included) and seconds of CPU (user + system) spent meanwhile by the test
process and every child it reaped, plus the children of the test fork server
(tests/forkserver.py), which are not the test process's own.  CPU time is
what a loaded machine disturbs least: wall time on a shared machine counts
the other users too.
"""

from __future__ import annotations

import resource
import sys
import time

_totals: dict[str, list[float]] = {}
_current = {"file": None, "wall": 0.0, "cpu": 0.0}


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
