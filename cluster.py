"""Run a local cluster, a master and N storage nodes, as child processes.

``python cluster.py`` is the quickest way to try the system: it starts the
master on the configured port (``[master] port``, 7700) and three nodes,
node1..node3, on free ports, prints their addresses and pids, and stops them
all on Ctrl-C or SIGTERM.  Each process logs to ``DATA_DIR/logs/``.  While it
runs it supervises its children: one that dies (a crash, a ``kill -9``) is
restarted after a pause that doubles on every quick death (``Supervisor``),
so you can kill a node and watch the master re-replicate and then take it
back.

``LocalCluster`` is the same thing as a class, without the supervision; the
tests and benchmarks use it to start real processes on 127.0.0.1 with
ephemeral ports, kill them (SIGKILL), freeze them (SIGSTOP) and restart
them, and a killed child stays dead until they restart it.  Every process
it starts is killed by PID in ``stop()``, whatever state it is in.
"""

from __future__ import annotations

import argparse
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time

import config as config_module

HERE = os.path.dirname(os.path.abspath(__file__))

EXIT_OK = 0
EXIT_CHILD_DIED = 1
EXIT_CONFIG = 2
EXIT_START_FAILED = 3

# Lines of a child's log shown when it fails to start or dies.
LOG_TAIL_LINES = 10
# Supervision (cluster.py main only): the first restart of a dead child waits
# RESTART_BACKOFF_S; each death within RESTART_STABLE_S of its start doubles
# the wait, up to RESTART_BACKOFF_MAX_S.  After RESTART_MAX_FAILED_STARTS
# starts in a row that fail (bad config, port taken) it gives up.
RESTART_BACKOFF_S = 1.0
RESTART_BACKOFF_MAX_S = 30.0
RESTART_STABLE_S = 60.0
RESTART_MAX_FAILED_STARTS = 5


class ProcessFailed(RuntimeError):
    """A child process exited or did not say it was listening in time."""


class Server:
    """One child process that prints ``listening on HOST:PORT`` once ready."""

    def __init__(self, name: str, argv: list[str], log_path: str, spawn=subprocess.Popen):
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.spawn = spawn  # subprocess.Popen, or a stand-in with its interface (tests/forkserver.py)
        self.process: subprocess.Popen | None = None
        self._lines: queue.Queue | None = None  # its stdout, line by line, once launched
        self.address: str | None = None
        self.http_url: str | None = None  # the master's status page, if it printed one

    @property
    def pid(self) -> int:
        return self.process.pid

    def start(self, timeout_s: float = 15.0) -> str:
        """Launch the process and wait until it says it listens; its address."""
        self.launch()
        return self.wait_listening(timeout_s)

    def launch(self) -> None:
        """Start the process without waiting for it (``wait_listening`` does): several start side by side."""
        # Logs name files and peers: readable by the owner only, like the data.
        log = os.fdopen(os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab")
        try:
            # The caller's cwd, so relative paths in flags and config mean what they say.
            self.process = self.spawn(self.argv, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL)
        finally:
            log.close()
        self._lines = queue.Queue()
        threading.Thread(target=_pump, args=(self.process.stdout, self._lines), daemon=True).start()

    def wait_listening(self, timeout_s: float = 15.0) -> str:
        """Wait for the ``listening on`` line of a launched process; its address (ProcessFailed if none)."""
        lines = self._lines
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=0.1)
            except queue.Empty:
                if self.process.poll() is not None:
                    break
                continue
            if line is None:
                break
            if line.startswith("status page on "):
                self.http_url = line.split(" ", 3)[3].strip()
            if line.startswith("listening on "):
                self.address = line.split(" ", 2)[2].strip()
                return self.address
        exited = self.process.poll()
        self.kill()
        how = f"exited with status {exited}" if exited is not None else f"did not listen within {timeout_s:g} s"
        raise ProcessFailed(f"{self.name} did not start ({how}); {self.log_tail_text()}")

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> list[str]:
        """The last ``lines`` lines of this child's log (its stderr)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 64 * 1024))
                tail = f.read().decode("utf-8", "replace").splitlines()
        except OSError:
            return []
        return tail[-lines:]

    def log_tail_text(self) -> str:
        tail = self.log_tail()
        if not tail:
            return f"{self.log_path} is empty"
        return f"last lines of {self.log_path}:\n" + "\n".join("    " + line for line in tail)

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, signum: int) -> None:
        if self.running():
            os.kill(self.process.pid, signum)

    def kill(self) -> None:
        """SIGKILL and reap; safe to call in any state."""
        if self.process is None:
            return
        if self.process.poll() is None:
            try:
                os.kill(self.process.pid, signal.SIGCONT)  # a stopped process must wake to die cleanly
                self.process.kill()
            except ProcessLookupError:
                pass
        self.process.wait()

    def terminate(self, timeout_s: float = 10.0) -> None:
        """SIGTERM, then SIGKILL if it does not exit in time."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()


def _pump(stream, lines: queue.Queue) -> None:
    for raw in stream:
        lines.put(raw.decode("utf-8", "replace"))
    lines.put(None)


def _start_together(servers: list[Server]) -> None:
    """Launch every server, then wait for each to listen: start-up costs the slowest, not the sum."""
    for server in servers:
        server.launch()
    for server in servers:
        server.wait_listening()


def free_ports(host: str, count: int) -> list[int]:
    """``count`` ports free on ``host`` now (bound then released: another process could take one)."""
    socks = [socket.create_server((host, 0)) for _ in range(count)]
    try:
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


class LocalCluster:
    """A master and ``nodes`` storage nodes on ``host``, data under ``data_dir``.

    ``master_args`` / ``node_args`` are extra flags for every master / node
    (e.g. short heartbeat intervals in tests).  ``master_port=0`` picks a
    free port.
    """

    def __init__(self, data_dir: str, nodes: int = 3, host: str = "127.0.0.1", master_port: int = 0,
                 master_args=(), node_args=(), config_path: str | None = None, secret_file: str | None = None,
                 insecure: bool = False, http_port: str | None = None, masters: int = 1, spawn=subprocess.Popen):
        self.data_dir = os.path.abspath(data_dir)
        # How a child is started: subprocess.Popen, or a stand-in with its interface (the tests fork theirs).
        self.spawn = spawn
        # masters > 1: a replicated group (replication.py) on master_port, master_port + 1, ...
        # (free ports when master_port is 0: a group needs its addresses before it starts).
        self.master_count = masters
        self.masters: list[Server | None] = [None] * masters
        self.master_ports = ([master_port + i for i in range(masters)] if master_port
                             else free_ports(host, masters)) if masters > 1 else []
        self.host = host
        self.master_port = master_port
        # http_port: the master's --http-port ("0" off, "any"); None = its config's.
        self.master_args = list(master_args) + (["--http-port", str(http_port)] if http_port is not None else [])
        self.node_args = list(node_args)
        # Given to the master and every node alike (the secret file by path: never on a command line).
        # Absolute: a path the caller gave is relative to the caller's cwd.
        self.config_args = ["--config", os.path.abspath(config_path)] if config_path else []
        if secret_file:
            self.config_args += ["--secret-file", os.path.abspath(secret_file)]
        if insecure:
            self.config_args.append("--insecure")
        # Extra flags for one master of a group, by index (the nemesis test's per-master --raft-dial).
        self.group_master_args: dict[int, list[str]] = {}
        self.log_dir = os.path.join(self.data_dir, "logs")
        os.makedirs(self.data_dir, mode=0o700, exist_ok=True)
        os.makedirs(self.log_dir, mode=0o700, exist_ok=True)
        self.master: Server | None = None
        self.nodes: list[Server] = []
        self.node_count = nodes

    @property
    def master_address(self) -> str:
        """The master's HOST:PORT, or every master's, comma-separated, for a group."""
        if self.master_count > 1:
            return ",".join(f"{self.host}:{port}" for port in self.master_ports)
        return self.master.address

    @staticmethod
    def node_name(index: int) -> str:
        """Nodes are node1..N (as in the README), though ``nodes`` is indexed from 0."""
        return f"node{index + 1}"

    @property
    def http_url(self) -> str | None:
        """The master's status page URL (``http://HOST:PORT/``), or None if it serves none."""
        return self.master.http_url

    def node_data_dir(self, index: int) -> str:
        return os.path.join(self.data_dir, self.node_name(index))

    def start(self) -> "LocalCluster":
        """Start the master(s), then every node; processes of one kind start side by side."""
        try:
            if self.master_count > 1:
                _start_together([self._group_master_server(index) for index in range(self.master_count)])
            else:
                self.start_master()
            _start_together([self._node_server(index) for index in range(self.node_count)])
        except BaseException:
            self.stop()
            raise
        return self

    def start_master(self) -> str:
        # After a restart, keep the port the nodes already know.
        port = self.master.address.rpartition(":")[2] if self.master and self.master.address else self.master_port
        argv = [sys.executable, os.path.join(HERE, "master.py"), *self.config_args, "--host", self.host,
                "--port", str(port), "--data-dir", os.path.join(self.data_dir, "master"), *self.master_args]
        self.master = Server("master", argv, os.path.join(self.log_dir, "master.log"), self.spawn)
        return self.master.start()

    def start_group_master(self, index: int) -> str:
        """Start master ``index`` (0-based) of a group; it keeps its port and data dir master1..N."""
        return self._group_master_server(index).start()

    def _group_master_server(self, index: int) -> Server:
        """Master ``index`` of a group as a Server, not yet started, in its place in ``masters``."""
        name = f"master{index + 1}"
        argv = [sys.executable, os.path.join(HERE, "master.py"), *self.config_args, "--host", self.host,
                "--port", str(self.master_ports[index]), "--masters", self.master_address,
                "--data-dir", os.path.join(self.data_dir, name), *self.master_args,
                *self.group_master_args.get(index, [])]
        server = Server(name, argv, os.path.join(self.log_dir, f"{name}.log"), self.spawn)
        self.masters[index] = server
        if index == 0:
            self.master = server
        return server

    def restart_group_master(self, index: int) -> str:
        self.masters[index].kill()
        return self.start_group_master(index)

    def add_node(self, index: int | None = None, extra_args=()) -> Server:
        server = self._node_server(index, extra_args)
        server.start()
        return server

    def _node_server(self, index: int | None = None, extra_args=()) -> Server:
        """Node ``index`` (default: a new one) as a Server, not yet started, in its place in ``nodes``."""
        index = len(self.nodes) if index is None else index
        argv = [sys.executable, os.path.join(HERE, "storage_node.py"), *self.config_args, "--host", self.host,
                "--port", "0", "--data-dir", self.node_data_dir(index), "--master", self.master_address,
                *self.node_args, *extra_args]
        name = self.node_name(index)
        server = Server(name, argv, os.path.join(self.log_dir, f"{name}.log"), self.spawn)
        if index < len(self.nodes):
            self.nodes[index] = server
        else:
            self.nodes.append(server)
        return server

    def restart_node(self, index: int, extra_args=()) -> Server:
        self.nodes[index].kill()
        return self.add_node(index, extra_args)

    def restart_master(self) -> str:
        self.master.kill()
        return self.start_master()

    def all_masters(self) -> list:
        return [m for m in self.masters if m is not None] if self.master_count > 1 else [self.master]

    def pids(self) -> list[int]:
        servers = [*self.all_masters(), *self.nodes]
        return [s.pid for s in servers if s is not None and s.process is not None]

    def stop(self, graceful: bool = False) -> None:
        """Stop every process started, nodes first; SIGKILL unless ``graceful``."""
        for server in [*self.nodes, *self.all_masters()]:
            if server is None:
                continue
            if graceful:
                server.terminate()
            else:
                server.kill()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()


class Supervisor:
    """Restarts the dead children of a started LocalCluster (what ``cluster.py`` does, not the tests).

    Call ``poll()`` now and then.  A child found dead is reported with its
    exit status and the tail of its log, and restarted after a backoff: 1 s,
    doubled after each death within RESTART_STABLE_S of its (re)start, at
    most RESTART_BACKOFF_MAX_S.  The master keeps its port, so the nodes find
    it again; a node keeps its data dir and node id.  ``poll()`` returns False
    once a child has failed RESTART_MAX_FAILED_STARTS starts in a row.
    """

    def __init__(self, cluster: LocalCluster, say=None, clock=time.monotonic):
        self.cluster = cluster
        self.say = say or (lambda text: print(f"cluster: {text}", file=sys.stderr, flush=True))
        self.clock = clock
        now = clock()
        if cluster.master_count > 1:
            self._children = [_Supervised(f"master{i + 1}", lambda i=i: cluster.restart_group_master(i),
                                          lambda i=i: cluster.masters[i], now) for i in range(cluster.master_count)]
        else:
            self._children = [_Supervised("master", cluster.restart_master, lambda: cluster.master, now)]
        self._children += [_Supervised(cluster.node_name(i), lambda i=i: cluster.restart_node(i),
                                       lambda i=i: cluster.nodes[i], now) for i in range(len(cluster.nodes))]

    def poll(self) -> bool:
        now = self.clock()
        for child in self._children:
            server = child.server()
            if server.running():
                continue
            if child.restart_at is None:  # just found dead
                if now - child.started_at >= RESTART_STABLE_S:
                    child.backoff_s = RESTART_BACKOFF_S
                child.restart_at = now + child.backoff_s
                self.say(f"{child.name} (pid {server.pid}) exited with status {server.process.returncode}; "
                         f"restarting it in {child.backoff_s:g} s; {server.log_tail_text()}")
                continue
            if now < child.restart_at:
                continue
            try:
                child.restart()
            except ProcessFailed as exc:
                child.failed_starts += 1
                if child.failed_starts >= RESTART_MAX_FAILED_STARTS:
                    self.say(f"{exc}\ngave up on {child.name} after {child.failed_starts} failed starts")
                    return False
                child.backoff_s = min(child.backoff_s * 2, RESTART_BACKOFF_MAX_S)
                child.restart_at = self.clock() + child.backoff_s
                self.say(f"{exc}\nretrying in {child.backoff_s:g} s")
                continue
            server = child.server()
            child.started_at, child.restart_at, child.failed_starts = self.clock(), None, 0
            child.backoff_s = min(child.backoff_s * 2, RESTART_BACKOFF_MAX_S)
            self.say(f"restarted {child.name}: listening on {server.address} (pid {server.pid})")
        return True


class _Supervised:
    """One child as the Supervisor sees it."""

    def __init__(self, name: str, restart, server, now: float):
        self.name = name
        self.restart = restart  # () -> starts it again (raises ProcessFailed)
        self.server = server  # () -> its current Server
        self.started_at = now
        self.restart_at: float | None = None
        self.backoff_s = RESTART_BACKOFF_S
        self.failed_starts = 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Start a local master and storage nodes node1..N; restart any that dies; Ctrl-C stops them.")
    parser.add_argument("--nodes", type=int, default=3, help="number of storage nodes (default 3)")
    parser.add_argument("--masters", type=int, default=1,
                        help="number of masters; 3 (or 5) = a replicated group on ports PORT, PORT+1, ... (default 1)")
    parser.add_argument("--data-dir", default="data", help="where the master and nodes keep data and logs")
    parser.add_argument("--port", type=int, help="master port (default [master] port of the config, 7700)")
    parser.add_argument("--host", help="address to bind every process to (default [master] host of the config)")
    parser.add_argument("--config", metavar="PATH",
                        help="config file passed to every process (relative to the current directory)")
    parser.add_argument("--secret-file", metavar="PATH", help="shared secret file passed to every process")
    parser.add_argument("--insecure", action="store_true",
                        help="let the master and nodes listen beyond loopback without a secret")
    parser.add_argument("--log-level", type=config_module.log_level, metavar="LEVEL",
                        help=f"log level of every process: {', '.join(config_module.LOG_LEVELS)} (default INFO)")
    parser.add_argument("--log-format", choices=("text", "json"), help="log format of every process (default text)")
    parser.add_argument("--http-port", metavar="PORT",
                        help="the master's status page port (default [http] port, 7780); 0 = off; any = any free port")
    args = parser.parse_args(argv)
    try:
        # The children check it too, but a mistake is one line here rather than in a child's log.
        config = config_module.load_config(args.config)
    except ValueError as exc:
        print(f"cluster: bad configuration: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    port = config.master_port if args.port is None else args.port
    host = config.master_host if args.host is None else args.host
    log_args = ["--log-level", args.log_level] if args.log_level else []
    log_args += ["--log-format", args.log_format] if args.log_format else []
    cluster = LocalCluster(args.data_dir, nodes=args.nodes, host=host, master_port=port, master_args=log_args,
                           node_args=log_args, config_path=args.config, secret_file=args.secret_file,
                           insecure=args.insecure, http_port=args.http_port, masters=args.masters)
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stopping.set())
    try:
        cluster.start()
    except ProcessFailed as exc:
        print(f"cluster: {exc}", file=sys.stderr)
        return EXIT_START_FAILED
    for master in cluster.all_masters():
        print(f"{master.name} listening on {master.address} (pid {master.pid})")
    if args.masters > 1:
        print(f"clients and nodes: --masters {cluster.master_address}")
    if cluster.http_url:
        print(f"status page on {cluster.http_url}")
    for index, node in enumerate(cluster.nodes):
        print(f"{node.name} listening on {node.address} (pid {node.pid}, data in {cluster.node_data_dir(index)})")
    print(f"logs in {cluster.log_dir}; a process that dies is restarted; press Ctrl-C to stop", flush=True)
    supervisor = Supervisor(cluster)
    status = EXIT_OK
    try:
        while not stopping.is_set():
            if not supervisor.poll():
                status = EXIT_CHILD_DIED
                break
            stopping.wait(0.5)
    except KeyboardInterrupt:
        pass
    print("stopping...", flush=True)
    # A second Ctrl-C (or the terminal's SIGINT reaching us again) must not
    # cut the orderly stop short and leave children behind.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    cluster.stop(graceful=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
