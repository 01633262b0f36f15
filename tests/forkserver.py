"""Start the suite's masters, nodes and CLI runs by forking one pre-imported interpreter.

Why: the suite starts about 500 processes (``python master.py``,
``python storage_node.py``, ``python client.py``), and each spent 0.15-0.35 s
of CPU starting an interpreter and importing the same modules before doing
anything: a third of the suite's CPU on 2 cores.  This module's ``Popen`` and
``run`` take the place of ``subprocess.Popen`` / ``subprocess.run`` for those
three scripts.  One server process per test session (``python
tests/forkserver.py FD``, started on first use) imports the scripts' modules
once; for each request it forks, and the child sets its argv, cwd,
environment and fds 0-2 from the request and executes the script's code as
``__main__``, exactly as ``python SCRIPT ARGS`` would from there on: it exits
through the normal interpreter exit (atexit, flushed streams), with the
script's status.  A child costs about 15 ms of CPU instead of 150-350 ms.

The children are real processes with their own pid: tests kill them by pid
(SIGKILL, SIGSTOP/SIGCONT), read their stdout and exit status, and
``LocalCluster.stop()`` kills every one.  ``ps`` shows them with the server's
command line (``python tests/forkserver.py FD SOCKET``), not the script's: no
exec happens.  The server reaps them and tells
the test process each exit status.  What differs from a fresh interpreter:
the imports were done before the fork (by the server, in a clean state:
nothing a test monkeypatches reaches them), and interpreter start-up itself
is not exercised (bench/bench.py measures it).  ``BACKUP_TEST_SPAWN=exec``
starts every process with a fresh interpreter instead (plain subprocess),
for a run that trusts nothing of this.

Shell scripts reach it too: ``python_command()`` is what to run for
``python`` (``python -S forkserver.py --call SOCKET``, which hands its own
stdio, cwd and environment to a forked child and exits with its status), so
the README's examples run through ``bash`` fork as well.

Any other command (another script, ``-c``, a non-Python program) goes to
``subprocess`` unchanged.  The server is single-threaded (fork is safe), and
children are not its responsibility once reported: tests kill them by pid.
"""

from __future__ import annotations

import atexit
import gc
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS_DIR)
# Scripts started by forking: the server imports what they import.
SCRIPTS = ("master.py", "storage_node.py", "client.py")
ENV_SPAWN = "BACKUP_TEST_SPAWN"  # "exec": every process from a fresh interpreter
MAX_REQUEST_BYTES = 1 << 20  # argv + cwd + environment of one request
PIPE = subprocess.PIPE
DEVNULL = subprocess.DEVNULL


# --- the test process's side ------------------------------------------------------------------------
def _script_of(argv) -> str | None:
    """The script ``argv`` runs if it is ``[sys.executable, ROOT/SCRIPT, ...]`` for a SCRIPT forked here."""
    if isinstance(argv, (str, bytes)) or len(argv) < 2 or argv[0] != sys.executable:
        return None
    path = os.fspath(argv[1])
    if not os.path.isabs(path) or os.path.normpath(path) not in (os.path.join(ROOT, name) for name in SCRIPTS):
        return None
    return path


def forking() -> bool:
    return os.environ.get(ENV_SPAWN, "fork") != "exec"


class _Server:
    """The test process's handle on the fork server: one request at a time; a thread reads replies and exits."""

    def __init__(self, sock: socket.socket | None = None):
        """Start the server process; with ``sock``, talk to whatever holds its other end instead (tests of this class)."""
        self.process = self.socket_dir = self.socket_path = None
        if sock is None:
            sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            # Where shell scripts reach the server (``call``): a directory only this user can enter.
            self.socket_dir = tempfile.mkdtemp(prefix="forkserver-")
            self.socket_path = os.path.join(self.socket_dir, "socket")
            # stderr inherited: a crash of the server itself is seen in pytest's output.
            self.process = subprocess.Popen([sys.executable, os.path.abspath(__file__), str(theirs.fileno()),
                                             self.socket_path],
                                            pass_fds=[theirs.fileno()], stdin=DEVNULL, stdout=DEVNULL, cwd=ROOT)
            theirs.close()
        self.sock = sock
        self.request_lock = threading.Lock()
        self.changed = threading.Condition()
        self.replies: list[dict] = []
        self.exits: dict[int, int] = {}
        self.children_cpu_s = 0.0  # CPU time of the children reaped so far (resource.RUSAGE_CHILDREN misses it)
        self.gone = False
        threading.Thread(target=self._read, name="forkserver-reader", daemon=True).start()
        self._next_reply(timeout_s=60.0)  # {"ready": true} once the modules are imported

    def _read(self) -> None:
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                data = b""
            with self.changed:
                if not data:
                    self.gone = True
                    self.changed.notify_all()
                    return
                message = json.loads(data)
                if "exit" in message:
                    self.exits[message["exit"]] = message["code"]
                    self.children_cpu_s += message["cpu_s"]
                else:
                    if "pid" in message:
                        # The kernel reuses pids (pid_max is 32768 here, and
                        # every thread on the machine takes one): an exit
                        # reported for this pid before its reply was an
                        # earlier child's (the server sends the reply before
                        # it can reap the new child), and taken for the new
                        # one's it made a client still running look exited
                        # (-9 of a killed master, or 0 although it printed
                        # an error) and kill() skip it.  Forgotten here, as
                        # the reply is read, not when spawn() takes it: by
                        # then the new child may have exited and its own
                        # status been recorded.
                        self.exits.pop(message["pid"], None)
                    self.replies.append(message)
                self.changed.notify_all()

    def _next_reply(self, timeout_s: float) -> dict:
        with self.changed:
            if not self.changed.wait_for(lambda: self.replies or self.gone, timeout_s):
                raise RuntimeError(f"the fork server did not answer within {timeout_s:g} s")
            if not self.replies:
                raise RuntimeError(f"the fork server exited (status {self.process and self.process.poll()})")
            return self.replies.pop(0)

    def spawn(self, argv: list[str], fds: list[int], cwd: str, env: dict) -> int:
        request = json.dumps({"argv": argv, "cwd": cwd, "env": env}).encode("utf-8")
        if len(request) > MAX_REQUEST_BYTES:
            raise ValueError(f"request of {len(request)} bytes for the fork server")
        with self.request_lock:
            socket.send_fds(self.sock, [request], fds)
            reply = self._next_reply(timeout_s=30.0)
        if "error" in reply:
            raise OSError(f"the fork server could not start {argv[1]}: {reply['error']}")
        return reply["pid"]

    def wait_exit(self, pid: int, timeout_s: float | None) -> int | None:
        with self.changed:
            self.changed.wait_for(lambda: pid in self.exits or self.gone, timeout_s)
            if pid not in self.exits and self.gone and not _exists(pid):
                self.exits[pid] = -signal.SIGKILL  # reaped by init after the server died: status unknown
            return self.exits.get(pid)

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # the server exits at end of file
        except OSError:
            pass
        self.sock.close()
        if self.process is None:
            return
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        shutil.rmtree(self.socket_dir, ignore_errors=True)


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_server: _Server | None = None
_server_lock = threading.Lock()


def _the_server() -> _Server:
    global _server
    with _server_lock:
        if _server is None or _server.gone:
            _server = _Server()
            atexit.register(_server.close)
        return _server


def python_command() -> list[str]:
    """What a shell script should run for ``python``: the fork server's caller (or plain python in exec mode)."""
    if not forking():
        return [sys.executable]
    return [sys.executable, "-S", "-E", os.path.abspath(__file__), "--call", _the_server().socket_path]


def children_cpu_s() -> float:
    """CPU seconds (user + system) of every forked child that has exited, for measuring the suite."""
    return _server.children_cpu_s if _server is not None else 0.0


def _child_fd(spec, default: int, parent_ends: list, child_ends: list, reading: bool) -> int:
    """The fd a child gets for one of stdin/stdout/stderr given like subprocess's argument."""
    if spec is None:
        return default
    if spec == PIPE:
        r, w = os.pipe()
        parent_ends.append(w if reading else r)
        child_ends.append(r if reading else w)
        return r if reading else w
    if spec == DEVNULL:
        fd = os.open(os.devnull, os.O_RDWR)
        child_ends.append(fd)
        return fd
    return spec if isinstance(spec, int) else spec.fileno()


class ForkedProcess:
    """What the tests use of ``subprocess.Popen`` (binary pipes only), for a child of the fork server."""

    def __init__(self, argv, stdin=None, stdout=None, stderr=None, cwd=None, env=None):
        self.args = list(argv)
        self.returncode: int | None = None
        self._server = _the_server()
        parent_ends: list[int] = []
        child_ends: list[int] = []
        try:
            fds = [_child_fd(stdin, 0, parent_ends, child_ends, reading=True),
                   _child_fd(stdout, 1, parent_ends, child_ends, reading=False),
                   _child_fd(stderr, 2, parent_ends, child_ends, reading=False)]
            self.pid = self._server.spawn([os.fspath(a) for a in self.args], fds,
                                          os.path.abspath(os.fspath(cwd)) if cwd is not None else os.getcwd(),
                                          dict(os.environ if env is None else env))
        except BaseException:
            for fd in parent_ends:
                os.close(fd)
            raise
        finally:
            for fd in child_ends:
                os.close(fd)
        ends = iter(parent_ends)
        self.stdin = open(next(ends), "wb") if stdin == PIPE else None
        self.stdout = open(next(ends), "rb") if stdout == PIPE else None
        self.stderr = open(next(ends), "rb") if stderr == PIPE else None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self._server.wait_exit(self.pid, 0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self.returncode = self._server.wait_exit(self.pid, timeout)
            if self.returncode is None:
                raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:
                pass  # exited; the server's report is on its way

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def communicate(self, input: bytes | None = None, timeout: float | None = None):
        """Feed ``input``, read stdout and stderr to the end, wait; kills the child on timeout."""
        results: dict[str, bytes] = {}

        def drain(name, stream):
            results[name] = stream.read()
            stream.close()

        def feed():
            try:
                if input:
                    self.stdin.write(input)
            except BrokenPipeError:
                pass
            finally:
                try:
                    self.stdin.close()
                except BrokenPipeError:
                    pass

        # Streams already closed (an earlier communicate) are skipped, as subprocess does.
        threads = [threading.Thread(target=drain, args=(name, stream), daemon=True)
                   for name, stream in (("stdout", self.stdout), ("stderr", self.stderr))
                   if stream is not None and not stream.closed]
        if self.stdin is not None and not self.stdin.closed:
            threads.append(threading.Thread(target=feed, daemon=True))
        for thread in threads:
            thread.start()
        try:
            self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            self.wait()
            for thread in threads:
                thread.join()
            raise
        for thread in threads:
            thread.join()
        return results.get("stdout"), results.get("stderr")

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        for stream in (self.stdin, self.stdout, self.stderr):
            if stream is not None:
                try:
                    stream.close()
                except BrokenPipeError:
                    pass
        self.wait()


def Popen(argv, stdin=None, stdout=None, stderr=None, cwd=None, env=None, **kwargs):
    """``subprocess.Popen``, forked from the server for the scripts it knows (binary pipes, no other options)."""
    if kwargs or _script_of(argv) is None or not forking():
        return subprocess.Popen(argv, stdin=stdin, stdout=stdout, stderr=stderr, cwd=cwd, env=env, **kwargs)
    return ForkedProcess(argv, stdin=stdin, stdout=stdout, stderr=stderr, cwd=cwd, env=env)


def run(argv, input: bytes | None = None, capture_output: bool = False, timeout: float | None = None, cwd=None,
        env=None, text: bool = False, check: bool = False, stdin=None, stdout=None, stderr=None):
    """``subprocess.run`` for what the tests use of it; forked for the scripts the server knows."""
    if _script_of(argv) is None or not forking():
        return subprocess.run(argv, input=input, capture_output=capture_output, timeout=timeout, cwd=cwd, env=env,
                              text=text, check=check, stdin=stdin, stdout=stdout, stderr=stderr)
    if text and input is not None:
        input = input.encode("utf-8")
    if capture_output:
        stdout = stderr = PIPE
    with ForkedProcess(argv, stdin=PIPE if input is not None else stdin, stdout=stdout, stderr=stderr, cwd=cwd,
                       env=env) as proc:
        out, err = proc.communicate(input, timeout)
    if text:  # as subprocess's text mode: UTF-8 here, universal newlines
        out, err = (None if b is None else b.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
                    for b in (out, err))
    completed = subprocess.CompletedProcess(argv, proc.returncode, out, err)
    if check:
        completed.check_returncode()
    return completed


# --- the server ---------------------------------------------------------------------------------------
def _serve(sock: socket.socket, listener: socket.socket) -> None:
    """Fork a child per request; report each child's exit status.  Returns when the test process goes away.

    Runs in the server process only.  Requests come on ``sock`` (the test
    process) and on connections to ``listener`` (``--call`` from a shell
    script); each child's exit goes to whoever asked for it, and always to
    ``sock`` too, which counts the children's CPU.  A child never returns from
    here: it raises SystemExit out of the script (or any exception), which
    ends its interpreter the normal way.
    """
    path = sys.path[1:]  # without this file's directory, which a script's run replaces with its own
    sys.path.insert(0, ROOT)
    import client  # noqa: F401  (each import brings in what the script needs)
    import master  # noqa: F401
    import storage_node  # noqa: F401
    # The scripts themselves run as __main__ only, as from the command line.
    for name in ("master", "storage_node", "client"):
        sys.modules.pop(name, None)
    if threading.active_count() != 1:  # a thread would not exist in the children, and fork with threads is unsafe
        raise RuntimeError(f"importing the scripts' modules started threads: {threading.enumerate()}")
    codes = {}
    for name in SCRIPTS:
        script = os.path.join(ROOT, name)
        with open(script, "rb") as f:
            codes[script] = compile(f.read(), script, "exec", dont_inherit=True)

    # What the imports made lives as long as any child: moved out of the
    # collector's sight, a child's collections (and the one at its exit)
    # skip it.  A child's exit cost about 25 ms of CPU walking it, a
    # third of a CLI run's time; about 12 ms frozen.
    gc.collect()
    gc.freeze()
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    sys.stdout.flush()
    sys.stderr.flush()
    callers: list[socket.socket] = []  # --call connections
    asked_by: dict[int, socket.socket] = {}  # pid -> the connection that asked for it
    sock.send(json.dumps({"ready": True}).encode("utf-8"))
    while True:
        readable, _, _ = select.select([sock, listener, wake_r, *callers], [], [])
        if wake_r in readable:
            try:
                while os.read(wake_r, 512):
                    pass
            except BlockingIOError:
                pass
        while True:
            try:
                pid, status, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            report = json.dumps({"exit": pid, "code": os.waitstatus_to_exitcode(status),
                                 "cpu_s": usage.ru_utime + usage.ru_stime}).encode("utf-8")
            for conn in {sock, asked_by.pop(pid, sock)}:
                try:
                    conn.send(report)
                except OSError:
                    pass  # a caller gone: its child is on its own
        if listener in readable:
            callers.append(listener.accept()[0])
        for conn in [c for c in (sock, *callers) if c in readable]:
            data, fds, _, _ = socket.recv_fds(conn, MAX_REQUEST_BYTES, 3)
            if not data:
                if conn is sock:
                    return
                callers.remove(conn)
                conn.close()
                continue
            request = json.loads(data)
            try:
                code = codes[os.path.join(ROOT, os.path.basename(request["argv"][1]))]
                pid = os.fork()
            except Exception as exc:  # noqa: BLE001 -- reported to the test that asked
                for fd in fds:
                    os.close(fd)
                conn.send(json.dumps({"error": repr(exc)}).encode("utf-8"))
                continue
            if pid == 0:
                for server_sock in (sock, listener, *callers):
                    os.close(server_sock.detach())
                _become(request, fds, code, path, [wake_r, wake_w])
                raise AssertionError("unreachable: a script ends in SystemExit")
            for fd in fds:
                os.close(fd)
            asked_by[pid] = conn
            conn.send(json.dumps({"pid": pid}).encode("utf-8"))


def _become(request: dict, fds: list[int], code, path: list[str], server_fds: list[int]) -> None:
    """In a fresh child: take the request's fds, cwd, environment and argv, then run the script as __main__."""
    import types

    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for fd in server_fds:
        os.close(fd)
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
    for fd in set(fds) - {0, 1, 2}:
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    script = request["argv"][1]
    sys.argv = request["argv"][1:]
    sys.path[:] = [os.path.dirname(script), *path]
    module = types.ModuleType("__main__")
    module.__file__ = script
    module.__builtins__ = __builtins__
    sys.modules["__main__"] = module
    exec(code, module.__dict__)
    sys.exit(0)


# --- the command-line caller ------------------------------------------------------------------------
def call(socket_path: str, args: list[str]) -> int:
    """``python -S forkserver.py --call SOCKET SCRIPT ARGS``: run SCRIPT ARGS as ``python`` would, forked.

    For shell scripts (the README examples): this process's stdio, cwd and
    environment go to the child; its exit status (or signal) becomes ours.
    Anything but a script the server forks is exec'd as a plain ``python``.
    """
    argv = [sys.executable, *args]
    if _script_of(argv) is None:
        os.execv(sys.executable, argv)
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.connect(socket_path)
        request = {"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)}
        socket.send_fds(sock, [json.dumps(request).encode("utf-8")], [0, 1, 2])
        reply = json.loads(sock.recv(65536))
        if "error" in reply:
            print(f"forkserver: {reply['error']}", file=sys.stderr)
            return 1
        while True:
            data = sock.recv(65536)
            if not data:
                print("forkserver: the server went away", file=sys.stderr)
                return 1
            message = json.loads(data)
            if message.get("exit") == reply["pid"]:
                break
    code = message["code"]
    if code < 0:  # died of a signal: so do we, for the shell to see it
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    return code


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[0] == "--call":
        return call(argv[1], argv[2:])
    sock = socket.socket(fileno=int(argv[0]))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(argv[1])
    listener.listen(16)
    _serve(sock, listener)
    return 0


if __name__ == "__main__":
    sys.exit(main())
