"""The tests' fork server (tests/forkserver.py) reports each child's own exit status.

The kernel reuses pids (pid_max is 32768 here, and every thread of every
process on the machine takes one), so over a suite run a child may get the
pid of an earlier child whose exit status the test process already holds.
The first tests drive the test process's side (its reader thread included)
against a scripted server on a socket pair.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading

import forkserver
from conftest import ROOT, wait_until


def send(sock: socket.socket, message: dict) -> None:
    sock.send(json.dumps(message).encode("utf-8"))


def scripted_server() -> tuple[forkserver._Server, socket.socket]:
    """A _Server whose server side is the returned socket, which the test writes the replies to."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    send(theirs, {"ready": True})
    return forkserver._Server(ours), theirs


def spawn(server: forkserver._Server, theirs: socket.socket, replies=()) -> int:
    """A request to ``server``; the scripted side reads it and sends ``replies`` (none: already sent)."""
    def serve():
        _, fds, _, _ = socket.recv_fds(theirs, forkserver.MAX_REQUEST_BYTES, 3)
        for fd in fds:
            os.close(fd)
        for reply in replies:
            send(theirs, reply)
    thread = threading.Thread(target=serve)
    thread.start()
    null = os.open(os.devnull, os.O_RDWR)
    try:
        return server.spawn(["python", "client.py"], [null, null, null], "/", {})
    finally:
        os.close(null)
        thread.join()


def test_a_new_child_with_an_earlier_childs_pid_is_not_taken_for_exited():
    """Pid 4242 was a master killed with SIGKILL; a client forked later gets 4242 again: it is running, not -9."""
    server, theirs = scripted_server()
    try:
        send(theirs, {"exit": 4242, "code": -9, "cpu_s": 0.0})  # the killed master, reaped
        pid = spawn(server, theirs, [{"pid": 4242}])
        assert pid == 4242
        assert server.wait_exit(pid, 0) is None, "the running child was given the earlier child's exit status"
        send(theirs, {"exit": 4242, "code": 3, "cpu_s": 0.0})  # now it exits
        assert server.wait_exit(pid, 5.0) == 3
    finally:
        server.close()
        theirs.close()


def test_a_child_that_exits_before_spawn_takes_its_pid_keeps_its_status():
    """The reply and the child's exit are both read before the spawning thread wakes: that exit is the child's own.

    Forgetting a reused pid's status when spawn() takes the reply (not when
    the reader reads it) lost it, and wait() hung until its timeout.
    """
    server, theirs = scripted_server()
    try:
        send(theirs, {"exit": 4242, "code": 0, "cpu_s": 0.0})  # an earlier child
        send(theirs, {"pid": 4242})  # the reply to the request below, and that child exits at once
        send(theirs, {"exit": 4242, "code": 3, "cpu_s": 0.0})
        wait_until(lambda: server.replies and server.exits.get(4242) == 3, 5.0, message="both read")
        assert spawn(server, theirs) == 4242
        assert server.wait_exit(4242, 1.0) == 3, "the child's own exit status was forgotten"
    finally:
        server.close()
        theirs.close()


def test_a_forked_script_reports_its_own_status():
    result = forkserver.run([sys.executable, f"{ROOT}/client.py", "no-such-command"], capture_output=True,
                            timeout=60)
    assert result.returncode == 2 and b"invalid choice" in result.stderr
    assert forkserver.run([sys.executable, f"{ROOT}/client.py", "--help"], capture_output=True,
                          timeout=60).returncode == 0
