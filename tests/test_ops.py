"""Operating the system: data-dir locks, config mistakes, logs, status truths, cluster.py.

What an operator meets before any byte is stored: a second process on a
data dir, a typo in config.ini, a mistyped flag, a node killed or stopped,
a client that goes away mid-transfer.  Each must end in one clear line (or
one log line at the right level), never a traceback or silence.  Process
tests use real processes on 127.0.0.1 with short intervals; every process is
killed by PID in a finalizer.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

import forkserver
from conftest import FAST_MASTER, ROOT, random_bytes, running_cluster, wait_until, write_local

import config as config_module
import dirlock
import protocol
import repair
import storage_node

PROGRAMS = ["master.py", "storage_node.py", "client.py", "cluster.py"]
MIB = 1024 * 1024


def run_program(program: str, *args, cwd=None, timeout_s: float = 20.0) -> subprocess.CompletedProcess:
    argv = [sys.executable, os.path.join(ROOT, program), *args]
    if program == "client.py":
        argv.append("status")  # the client needs a command
    return forkserver.run(argv, capture_output=True, text=True, timeout=timeout_s, cwd=cwd)


def read_log(server) -> str:
    """What a cluster's child (its Server) has logged so far."""
    with open(server.log_path, encoding="utf-8", errors="replace") as f:
        return f.read()


def all_logs(cluster) -> str:
    return "".join(read_log(server) for server in [cluster.master, *cluster.nodes])


def node_id(cluster, index: int) -> str:
    with open(os.path.join(cluster.node_data_dir(index), "node.json"), encoding="utf-8") as f:
        return json.load(f)["node_id"]


# --- config mistakes ------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("[cluster]\nreplicaton = 3\n", r"\[cluster\] replicaton is not a known key \(did you mean replication\?\)"),
    ("[clinet]\nmaster = 127.0.0.1:7700\n", r"\[clinet\] is not a known section \(did you mean \[client\]\?\)"),
    ("[client]\nmastr = 127.0.0.1:7700\n", r"\[client\] mastr is not a known key \(did you mean master\?\)"),
    ("[node]\nreplication = 3\n", r"\[node\] replication is not a known key \(it belongs in \[cluster\]\)"),
    ("replication = 3\n", r"line 1: 'replication = 3' comes before any \[section\] header"),
    ("[cluster]\nreplication = 2\n[cluster]\n", r"line 3: section \[cluster\] appears twice"),
    ("[cluster]\nreplication = 2\nreplication = 3\n", r"line 3: \[cluster\] replication is set twice"),
    ("[cluster]\njust words\n", r"line 2: cannot parse 'just words'"),
    ("[cluster]\nreplication = two\n", r"\[cluster\] replication = 'two' is not a valid int"),
])
def test_config_mistakes_are_one_line_errors_naming_file_section_and_key(tmp_path, text, expected):
    """Unknown sections and keys, a missing header, duplicates and bad values raise one line naming the file."""
    path = tmp_path / "bad.ini"
    path.write_text(text)
    with pytest.raises(ValueError) as error:
        config_module.load_config(str(path))
    message = str(error.value)
    assert "\n" not in message and message.startswith(str(path)), message
    assert re.search(expected, message), message


def test_config_values_are_taken_literally(tmp_path):
    """A '%' in a value (a secret) is not interpolation syntax that crashes the parser."""
    path = tmp_path / "percent.ini"
    path.write_text("[security]\nsecret = 50%off%(x)s\n")
    assert config_module.load_config(str(path)).secret == "50%off%(x)s"


def test_every_program_refuses_a_config_typo_with_exit_2_and_one_line(tmp_path):
    """master, storage_node, client and cluster.py each exit 2 with one stderr line naming file and key."""
    path = tmp_path / "typo.ini"
    path.write_text("[cluster]\nreplicaton = 3\n")
    for program in PROGRAMS:
        result = run_program(program, "--config", str(path))
        assert result.returncode == 2, (program, result.stderr)
        assert result.stderr.count("\n") == 1, (program, result.stderr)
        assert str(path) in result.stderr and "replicaton" in result.stderr and "did you mean replication" \
            in result.stderr, (program, result.stderr)


def test_log_level_is_validated_everywhere_and_works_in_the_client(tmp_path):
    """--log-level verbose is a usage error (exit 2, no traceback) everywhere; the client's --log-level DEBUG logs."""
    for program in PROGRAMS:
        result = run_program(program, "--log-level", "verbose")
        assert result.returncode == 2, (program, result.stderr)
        assert "not a log level" in result.stderr and "Traceback" not in result.stderr, (program, result.stderr)
    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    result = run_program("client.py", "--log-level", "debug", "--master", f"127.0.0.1:{port}")
    assert result.returncode == 5, result.stderr
    assert "DEBUG" in result.stderr and f"127.0.0.1:{port}" in result.stderr, result.stderr


def test_every_key_in_config_ini_has_a_comment():
    """Each key in the shipped config.ini follows a comment, or is named in the comment atop its group of keys."""
    with open(os.path.join(ROOT, "config.ini"), encoding="utf-8") as f:
        lines = f.read().splitlines()
    uncommented = []
    for number, line in enumerate(lines):
        key = re.match(r"(\w+)\s*=", line)
        if not key or lines[number - 1].startswith("#"):
            continue
        above = number - 1
        while re.match(r"\w+\s*=", lines[above]):
            above -= 1
        comment = []
        while lines[above].startswith("#"):
            comment.append(lines[above])
            above -= 1
        if key.group(1) not in " ".join(comment):
            uncommented.append(line)
    assert not uncommented, uncommented


# --- data-dir locks -------------------------------------------------------------------------------

def test_data_dir_lock_names_its_holder(tmp_path):
    """A second lock of a data dir fails naming the holder's pid; the dir is free again once released."""
    fd = dirlock.lock_data_dir(str(tmp_path / "d"))
    try:
        with pytest.raises(dirlock.DataDirLocked) as error:
            dirlock.lock_data_dir(str(tmp_path / "d"))
        assert error.value.pid == os.getpid() and str(os.getpid()) in str(error.value)
    finally:
        os.close(fd)
    os.close(dirlock.lock_data_dir(str(tmp_path / "d")))


@pytest.fixture(scope="module")
def ops_cluster(tmp_path_factory):
    """One master and two nodes shared by tests that only read from them or upload."""
    with running_cluster(tmp_path_factory.mktemp("ops-cluster")) as c:
        yield c


def test_second_server_on_a_data_dir_exits_2_naming_the_holder(ops_cluster, tmp_path):
    """A second node or master on a live one's data dir exits 2 and names the holder's pid; nothing registers."""
    result = run_program("storage_node.py", "--data-dir", ops_cluster.node_data_dir(0), "--port", "0",
                         "--master", ops_cluster.master_address)
    assert result.returncode == 2, result.stderr
    assert f"in use by process {ops_cluster.nodes[0].pid}" in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    result = run_program("master.py", "--data-dir", os.path.join(ops_cluster.data_dir, "master"), "--port", "0")
    assert result.returncode == 2, result.stderr
    assert f"in use by process {ops_cluster.master.pid}" in result.stderr, result.stderr
    # The shipped default data dir is one for every node: a second default node is told to pick its own.
    config = tmp_path / "default-dir.ini"
    config.write_text(f"[node]\ndata_dir = {ops_cluster.node_data_dir(1)}\n")
    result = run_program("storage_node.py", "--config", str(config), "--port", "0",
                         "--master", ops_cluster.master_address)
    assert result.returncode == 2 and "--data-dir" in result.stderr, result.stderr
    assert ops_cluster.status().totals["nodes"] == 2


# --- peers going away -----------------------------------------------------------------------------

def _reset(sock: socket.socket) -> None:
    """Close with a TCP reset, as a killed process's socket may."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()


def _handshake(address: str) -> socket.socket:
    host, _, port = address.rpartition(":")
    sock = socket.create_connection((host, int(port)), timeout=5)
    sock.sendall(protocol.encode(protocol.Hello(version=protocol.PROTOCOL_VERSION, role="client")))
    protocol.read_message(sock.makefile("rb"))
    return sock


def test_a_peer_going_away_is_one_info_line_not_a_traceback(ops_cluster, tmp_path):
    """cat | head (relayed or direct), a reset mid-download and a reset mid-upload frame leave no traceback in any server log."""
    # Twice the frames a download buffers (cli._FrameSink._BUFFERS, 6): a reader that goes away leaves
    # the rest of the reply unread, so the master meets a reset, not a clean close after DATA_END.
    data = random_bytes(8, 12 * MIB)
    assert ops_cluster.cli("upload", write_local(tmp_path, "big", data), "big").returncode == 0
    client = [sys.executable, os.path.join(ROOT, "client.py"), "--master", ops_cluster.master_address, "--quiet"]
    # Relayed twice (the master sees the reader go away), and once read from the nodes (they see it).
    for extra in (["--via-master"], ["--via-master"], []):
        with forkserver.Popen([*client, "cat", "big", *extra], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL) as cat:
            assert len(cat.stdout.read(10)) == 10  # then go away, like `| head -c 10`
            cat.stdout.close()
            cat.wait(20)
    sock = _handshake(ops_cluster.master_address)
    sock.sendall(protocol.encode(protocol.Download(name="big")))
    sock.recv(1000)
    _reset(sock)
    sock = _handshake(ops_cluster.master_address)
    sock.sendall(protocol.encode(protocol.UploadBegin(name="torn", size=MIB)))
    sock.sendall(protocol.encode(protocol.Data(body=b"x" * 1000))[:500])  # half a frame
    _reset(sock)
    wait_until(lambda: read_log(ops_cluster.master).count("went away") >= 4
               or "unhandled error" in read_log(ops_cluster.master), 10, message="the master's disconnect lines")
    time.sleep(0.3)  # no condition to poll for: the nodes may or may not see the abandoned reads
    logs = all_logs(ops_cluster)
    assert "Traceback" not in logs and "unhandled error" not in logs, logs[-3000:]
    assert re.search(r"master INFO transport: 127\.0\.0\.1:\d+: peer went away", logs), logs[-3000:]
    assert ops_cluster.cli("list").stdout.decode().count("torn") == 0


# --- master: node deaths, returns, repair ---------------------------------------------------------

def test_node_death_return_and_repair_are_logged_once(make_cluster, tmp_path):
    """A killed node is logged dead at WARNING once, repair as start/done lines (not per batch), and its return."""
    cluster = make_cluster(nodes=3, master_args=[*FAST_MASTER, "--safe-mode", "1"])
    data = random_bytes(9, 3 * MIB + 5)
    assert cluster.cli("upload", write_local(tmp_path, "f", data), "f").returncode == 0
    victim = node_id(cluster, 0)
    cluster.nodes[0].kill()
    dead = re.compile(rf"master WARNING master: node {victim} at \S+ is dead: silent for [\d.]+ s")
    wait_until(lambda: dead.search(read_log(cluster.master)), 10, message="the death warning")
    wait_until(lambda: "repair done" in read_log(cluster.master), 15, message="the repair done line")
    cluster.restart_node(0)
    wait_until(lambda: f"node {victim} is back" in read_log(cluster.master), 10, message="the return warning")
    log = read_log(cluster.master)
    assert len(dead.findall(log)) == 1, log
    assert re.search(r"INFO master\.repair: repair started: \d+ batch", log), log
    assert re.search(r"INFO master\.repair: repair done: (\d+) of \1 batch\(es\), \d+ chunk\(s\) re-replicated", log)
    assert "re-replicated 'f'" not in log, "one INFO line per batch"
    assert re.search(rf"WARNING master: node {victim} is back at \S+ \(it was dead\)", log), log


def test_repair_progress_is_logged_every_ten_seconds(caplog):
    """RepairProgress logs start, a progress line only after PROGRESS_LOG_INTERVAL_S, and done with totals."""
    now = [0.0]
    tasks = [repair.RepairTask(1, "f", i * 1024, 1024) for i in range(4)]
    with caplog.at_level(logging.INFO, logger="master.repair"):
        progress = repair.RepairProgress(tasks, clock=lambda: now[0])
        for i, task in enumerate(tasks):
            now[0] = 4.0 * (i + 1)
            progress.step(task, 1024 * 1024)
        progress.finish()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("repair started: 4 batch(es), 4096 chunk(s)")
    assert [line for line in lines if "progress" in line] == [
        "repair progress: 3 of 4 batch(es), 3072 chunk(s) copied (3.0 MiB) in 12 s"]
    assert lines[-1] == "repair done: 4 of 4 batch(es), 4096 chunk(s) re-replicated (4.0 MiB copied) in 16.0 s"


# --- node: an unreachable master, a re-registration -----------------------------------------------

def test_outage_log_says_the_first_failure_then_once_a_minute(caplog):
    """OutageLog logs the first failure at once, then at most once per interval, and resets on recovery."""
    now = [0.0]
    outage = storage_node.OutageLog(60.0, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="storage_node"):
        for t in range(0, 125, 2):
            now[0] = float(t)
            outage.failed("master 127.0.0.1:1 unreachable")
        assert outage.recovered() == 124.0
        outage.failed("master 127.0.0.1:1 unreachable")
    lines = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert lines == [("WARNING", "master 127.0.0.1:1 unreachable"),
                     ("WARNING", "master 127.0.0.1:1 unreachable (failing for 60 s, 31 attempts)"),
                     ("WARNING", "master 127.0.0.1:1 unreachable (failing for 120 s, 61 attempts)"),
                     ("WARNING", "master 127.0.0.1:1 unreachable")]


def test_node_with_a_mistyped_master_says_so_at_warning(tmp_path):
    """A node whose master does not answer logs a WARNING naming the address at the first failure."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    argv = [sys.executable, os.path.join(ROOT, "storage_node.py"), "--port", "0", "--data-dir",
            str(tmp_path / "n"), "--master", f"127.0.0.1:{port}", "--heartbeat-interval", "0.2"]
    with open(tmp_path / "node.log", "wb") as log:
        proc = forkserver.Popen(argv, stdout=subprocess.DEVNULL, stderr=log)
    try:
        wait_until(lambda: f"WARNING storage_node: master 127.0.0.1:{port} unreachable"
                   in (tmp_path / "node.log").read_text(), 10, message="the unreachable warning")
    finally:
        proc.kill()
        proc.wait()


def test_reregistration_asked_by_the_master_is_not_called_unreachable(make_cluster):
    """A node frozen past dead_after_s, then thawed, logs that the master asked it to re-register."""
    cluster = make_cluster(nodes=2)
    frozen = cluster.nodes[1]
    frozen.signal(signal.SIGSTOP)
    try:
        cluster.wait_nodes_alive(1, 10)  # the frozen one is dead to the master
    finally:
        frozen.signal(signal.SIGCONT)
    wait_until(lambda: "master asked to re-register" in read_log(frozen), 10,
               message="the re-registration line")
    log = read_log(frozen)
    assert "unreachable" not in log, log
    assert re.search(r"INFO storage_node: master asked to re-register: .*it was silent for", log), log


# --- status: what each node really is -------------------------------------------------------------

def test_status_says_stopped_at_once_and_waiting_in_safe_mode(make_cluster):
    """A node stopped with SIGTERM is 'stopped' long before dead_after_s; after a master restart nodes are 'waiting'."""
    cluster = make_cluster(nodes=2, master_args=["--heartbeat-interval", "0.2", "--dead-after", "30"])
    stopped = node_id(cluster, 0)
    started = time.monotonic()
    cluster.nodes[0].terminate()
    states = lambda: {n["id"]: n.get("state") for n in cluster.status().nodes}  # noqa: E731
    wait_until(lambda: states()[stopped] == "stopped", 5, message="the stopped state")
    assert time.monotonic() - started < 10, "took as long as dead_after_s"
    assert cluster.status().totals["nodes_alive"] == 1
    assert f"node {stopped} at" in read_log(cluster.master) and "said goodbye" in read_log(cluster.master)

    cluster.nodes[1].kill()
    cluster.master_args += ["--safe-mode", "30"]
    cluster.restart_master()
    assert set(states().values()) == {"waiting"}
    result = cluster.cli("status")
    assert result.returncode == 0 and "waiting" in result.stdout.decode() and "DEAD" not in result.stdout.decode()


def test_repair_waits_dead_after_s_for_a_node_that_said_goodbye(make_cluster, tmp_path):
    """A cleanly stopped node's chunks count as degraded at once but are re-copied only after dead_after_s."""
    # Long enough that the degraded count is seen (and nothing repaired) well before it runs out,
    # also on a loaded machine; the test waits all of it.
    dead_after_s = 2.5
    cluster = make_cluster(nodes=3, master_args=["--heartbeat-interval", "0.2", "--dead-after", str(dead_after_s),
                                                 "--io-timeout", "3"])
    path = write_local(tmp_path, "f.bin", random_bytes(7, 300_000))
    assert cluster.cli("upload", path, "f.bin").returncode == 0
    holder = next(run[2][0] for run in cluster.client().stat("f.bin").runs)
    index = next(i for i in range(3) if node_id(cluster, i) == holder)
    stopped_at = time.monotonic()
    cluster.nodes[index].terminate()
    totals = lambda: cluster.status().totals  # noqa: E731
    wait_until(lambda: totals()["under_replicated_chunks"] > 0, 5, message="the degraded count")
    assert totals()["repaired_chunks"] == 0
    wait_until(lambda: totals()["under_replicated_chunks"] == 0, 20, message="the repair after the grace")
    assert time.monotonic() - stopped_at >= dead_after_s - 0.5, "repair did not wait for dead_after_s"
    assert totals()["repaired_chunks"] > 0


# --- cluster.py -----------------------------------------------------------------------------------

class ClusterProcess:
    """``python cluster.py`` as a user runs it, with every child's pid collected for clean-up."""

    def __init__(self, args, cwd):
        self.proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "cluster.py"), *args], cwd=cwd,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.pids: set[int] = set()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)
            self.pids.update(int(p) for p in re.findall(r"pid (\d+)", line))

    def text(self) -> str:
        return "".join(self.lines)

    def kill_all(self):
        for pid in [self.proc.pid, *self.pids]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()


def test_cluster_py_restarts_a_killed_node_and_honours_its_config(tmp_path):
    """cluster.py reads a relative --config from the caller's cwd, listens on its [master] port, names nodes
    node1..N, restarts a node killed with SIGKILL, and stops every child on SIGTERM."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    (tmp_path / "fast.ini").write_text(f"[master]\nport = {port}\n[timing]\nheartbeat_interval_s = 0.2\n"
                                       f"dead_after_s = 1\n")
    cluster = ClusterProcess(["--nodes", "2", "--config", "fast.ini", "--data-dir", "data"], cwd=tmp_path)
    try:
        wait_until(lambda: "press Ctrl-C" in cluster.text(), 20, message=f"cluster.py to start: {cluster.text()}")
        assert f"master listening on 127.0.0.1:{port}" in cluster.text(), cluster.text()
        node1 = re.search(r"^node1 listening on \S+ \(pid (\d+), data in (\S+)\)", cluster.text(), re.M)
        assert node1 and node1.group(2) == str(tmp_path / "data" / "node1"), cluster.text()
        os.kill(int(node1.group(1)), signal.SIGKILL)
        restarted = wait_until(lambda: re.search(r"restarted node1: listening on \S+ \(pid (\d+)\)", cluster.text()),
                               15, message="the restart")
        assert "node1 (pid" in cluster.text() and "exited with status -9" in cluster.text(), cluster.text()
        os.kill(int(restarted.group(1)), 0)  # alive
        cluster.proc.send_signal(signal.SIGTERM)
        assert cluster.proc.wait(20) == 0, cluster.text()
        for pid in cluster.pids - {int(node1.group(1))}:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    finally:
        cluster.kill_all()


def test_cluster_py_shows_the_log_of_a_child_that_cannot_start(tmp_path):
    """When the master cannot start (its port is taken), cluster.py exits 3 and prints the master's own error."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cluster = ClusterProcess(["--nodes", "1", "--port", str(port), "--data-dir", "data"], cwd=tmp_path)
        try:
            assert cluster.proc.wait(20) == 3
            cluster._reader.join(5)
            assert f"master: cannot listen on 127.0.0.1:{port}" in cluster.text(), cluster.text()
        finally:
            cluster.kill_all()
