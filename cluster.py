"""Run a local cluster, a master and N storage nodes, as child processes.

``python cluster.py`` is the quickest way to try the system: it starts the
master on the configured port (7700) and three nodes on free ports, prints
their addresses, and stops them all on Ctrl-C or SIGTERM.  Each process
logs to ``DATA_DIR/logs/``.

``LocalCluster`` is the same thing as a class; the tests and benchmarks use
it to start real processes on 127.0.0.1 with ephemeral ports, kill them
(SIGKILL), freeze them (SIGSTOP) and restart them.  Every process it starts
is killed by PID in ``stop()``, whatever state it is in.
"""

from __future__ import annotations

import argparse
import os
import queue
import signal
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))

EXIT_OK = 0
EXIT_CHILD_DIED = 1
EXIT_START_FAILED = 3


class ProcessFailed(RuntimeError):
    """A child process exited or did not say it was listening in time."""


class Server:
    """One child process that prints ``listening on HOST:PORT`` once ready."""

    def __init__(self, name: str, argv: list[str], log_path: str):
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.process: subprocess.Popen | None = None
        self.address: str | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def start(self, timeout_s: float = 15.0) -> str:
        # Logs name files and peers: readable by the owner only, like the data.
        log = os.fdopen(os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab")
        try:
            self.process = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL,
                                            cwd=HERE)
        finally:
            log.close()
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=_pump, args=(self.process.stdout, lines), daemon=True).start()
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
            if line.startswith("listening on "):
                self.address = line.split(" ", 2)[2].strip()
                return self.address
        self.kill()
        raise ProcessFailed(f"{self.name} did not start (see {self.log_path})")

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


class LocalCluster:
    """A master and ``nodes`` storage nodes on ``host``, data under ``data_dir``.

    ``master_args`` / ``node_args`` are extra flags for every master / node
    (e.g. short heartbeat intervals in tests).  ``master_port=0`` picks a
    free port.
    """

    def __init__(self, data_dir: str, nodes: int = 3, host: str = "127.0.0.1", master_port: int = 0,
                 master_args=(), node_args=(), config_path: str | None = None, secret_file: str | None = None,
                 insecure: bool = False):
        self.data_dir = os.path.abspath(data_dir)
        self.host = host
        self.master_port = master_port
        self.master_args = list(master_args)
        self.node_args = list(node_args)
        # Given to the master and every node alike (the secret file by path: never on a command line).
        self.config_args = ["--config", config_path] if config_path else []
        if secret_file:
            self.config_args += ["--secret-file", os.path.abspath(secret_file)]
        if insecure:
            self.config_args.append("--insecure")
        self.log_dir = os.path.join(self.data_dir, "logs")
        os.makedirs(self.data_dir, mode=0o700, exist_ok=True)
        os.makedirs(self.log_dir, mode=0o700, exist_ok=True)
        self.master: Server | None = None
        self.nodes: list[Server] = []
        self.node_count = nodes

    @property
    def master_address(self) -> str:
        return self.master.address

    def node_data_dir(self, index: int) -> str:
        return os.path.join(self.data_dir, f"node{index}")

    def start(self) -> "LocalCluster":
        try:
            self.start_master()
            for index in range(self.node_count):
                self.add_node(index)
        except BaseException:
            self.stop()
            raise
        return self

    def start_master(self) -> str:
        # After a restart, keep the port the nodes already know.
        port = self.master.address.rpartition(":")[2] if self.master and self.master.address else self.master_port
        argv = [sys.executable, os.path.join(HERE, "master.py"), *self.config_args, "--host", self.host,
                "--port", str(port), "--data-dir", os.path.join(self.data_dir, "master"), *self.master_args]
        self.master = Server("master", argv, os.path.join(self.log_dir, "master.log"))
        return self.master.start()

    def add_node(self, index: int | None = None, extra_args=()) -> Server:
        index = len(self.nodes) if index is None else index
        argv = [sys.executable, os.path.join(HERE, "storage_node.py"), *self.config_args, "--host", self.host,
                "--port", "0", "--data-dir", self.node_data_dir(index), "--master", self.master.address,
                *self.node_args, *extra_args]
        server = Server(f"node{index}", argv, os.path.join(self.log_dir, f"node{index}.log"))
        server.start()
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

    def pids(self) -> list[int]:
        servers = [self.master, *self.nodes]
        return [s.pid for s in servers if s is not None and s.process is not None]

    def stop(self, graceful: bool = False) -> None:
        """Stop every process started, nodes first; SIGKILL unless ``graceful``."""
        for server in [*self.nodes, self.master]:
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Start a local master and storage nodes; Ctrl-C stops them.")
    parser.add_argument("--nodes", type=int, default=3, help="number of storage nodes (default 3)")
    parser.add_argument("--data-dir", default="data", help="where the master and nodes keep data and logs")
    parser.add_argument("--port", type=int, default=7700, help="master port (default 7700, the client's default)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind every process to")
    parser.add_argument("--config", metavar="PATH", help="config file passed to every process")
    parser.add_argument("--secret-file", metavar="PATH", help="shared secret file passed to every process")
    parser.add_argument("--insecure", action="store_true",
                        help="let the master and nodes listen beyond loopback without a secret")
    args = parser.parse_args(argv)
    cluster = LocalCluster(args.data_dir, nodes=args.nodes, host=args.host, master_port=args.port,
                           config_path=args.config, secret_file=args.secret_file, insecure=args.insecure)
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stopping.set())
    try:
        cluster.start()
    except ProcessFailed as exc:
        print(f"cluster: {exc}", file=sys.stderr)
        return EXIT_START_FAILED
    print(f"master listening on {cluster.master_address}")
    for index, node in enumerate(cluster.nodes):
        print(f"node{index} listening on {node.address} (data in {cluster.node_data_dir(index)})")
    print(f"logs in {cluster.log_dir}; press Ctrl-C to stop", flush=True)
    status = EXIT_OK
    try:
        while not stopping.is_set():
            for server in [cluster.master, *cluster.nodes]:
                if not server.running():
                    status = EXIT_CHILD_DIED
                    print(f"cluster: {server.name} exited with status {server.process.returncode}; "
                          f"see {server.log_path}", file=sys.stderr)
                    stopping.set()
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
