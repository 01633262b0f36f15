"""The tests' fork server (tests/forkserver.py) reports each child's own exit status."""

from __future__ import annotations

import sys
import threading

import forkserver
from conftest import ROOT


def test_an_exit_of_an_earlier_child_with_the_same_pid_is_not_the_new_childs():
    # The server reaps children at once, so the kernel may give a later child the pid of
    # an earlier one (pid_max is 32768 in some containers).  A stale exit status kept under
    # that pid made a test read the earlier child's status for the new child: clients that
    # printed AUTH_FAILED appeared to exit 0.
    server = object.__new__(forkserver._Server)
    server.changed = threading.Condition()
    server.replies = [{"pid": 4242}]
    server.exits = {4242: 0}  # the earlier child that had pid 4242
    server.gone = False
    assert server._next_reply(timeout_s=1.0) == {"pid": 4242}
    assert server.wait_exit(4242, timeout_s=0.05) is None  # still running, as far as anyone knows


def test_a_forked_script_reports_its_own_status():
    result = forkserver.run([sys.executable, f"{ROOT}/client.py", "no-such-command"], capture_output=True,
                            timeout=60)
    assert result.returncode == 2 and b"invalid choice" in result.stderr
    assert forkserver.run([sys.executable, f"{ROOT}/client.py", "--help"], capture_output=True,
                          timeout=60).returncode == 0
