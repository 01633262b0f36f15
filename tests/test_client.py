"""The command-line client: names, destinations, tree restores, options, and the README's examples.

One cluster (a master with a shared secret and two nodes) serves the whole
module: tests store under names of their own and never stop a process.
Names an older master accepted and today's refuses (``t/../escape``) are
put in the master's metadata before it starts (``conftest.seed_names``).
The CLI runs as a subprocess, as a user runs it, and its exit status is
checked; pure parts (temporary names, option parsing, help) run in-process.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import re
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time

import pytest

import forkserver
from conftest import (FAST_MASTER, FAST_TIMING, ROOT, CliResult, SecureCluster, master_address, random_bytes,
                      seed_names, sha256)

import client as client_module
import metadata_log
import protocol
import security as security_module
import transport

CLIENT = os.path.join(ROOT, "client.py")
SECRET = b"0123456789abcdef0123456789abcdef-client-tests"
# Stored straight into the metadata: today's master refuses this name at upload.
ESCAPING_NAME = "t/../escape"


# --- the shared cluster -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A master with a shared secret and two nodes; ESCAPING_NAME stored as an older master would.

    Overrides conftest's function-scoped ``cluster`` in this module: one cluster for every test here.
    """
    base = tmp_path_factory.mktemp("client-cluster")
    secret_file = base / "secret"
    secret_file.write_bytes(SECRET)
    os.chmod(secret_file, 0o600)
    c = SecureCluster(str(base / "cluster"), nodes=2, master_args=FAST_MASTER, node_args=FAST_TIMING,
                      secret_file=str(secret_file), client_args=["--secret-file", str(secret_file)],
                      client_security=security_module.Security(SECRET, None))
    c.secret_file = str(secret_file)
    seed_names(os.path.join(c.data_dir, "master"), [ESCAPING_NAME])
    try:
        c.start()
        c.wait_nodes_alive(2)
        yield c
    finally:
        c.stop()
        shutil.rmtree(base, ignore_errors=True)


def run_client(*args, cwd, env=None, stdin: bytes | None = None, timeout_s: float = 60.0) -> CliResult:
    """``python client.py ARGS`` as a user runs it; BACKUP_* variables only as given in ``env``."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("BACKUP_")}
    full_env.update(env or {})
    proc = forkserver.run([sys.executable, CLIENT, *args], input=stdin, capture_output=True, timeout=timeout_s,
                          cwd=cwd, env=full_env)
    return CliResult(proc)


def cli(cluster, *args, cwd, stdin: bytes | None = None) -> CliResult:
    """The CLI against the shared cluster, master and secret given as flags before the command."""
    return run_client("--master", cluster.master_address, "--secret-file", cluster.secret_file, *args,
                      cwd=cwd, stdin=stdin)


def store(cluster, name: str, data: bytes, tmp_path) -> None:
    """Store ``data`` as ``name`` through an in-process client (quicker than the CLI)."""
    local = tmp_path / "store.tmp"
    local.write_bytes(data)
    c = cluster.client()
    try:
        c.upload_file(str(local), name)
    finally:
        c.close()
        local.unlink()


def stored_names(cluster) -> set[str]:
    c = cluster.client()
    try:
        return {entry["name"] for entry in c.list()}
    finally:
        c.close()


def raw_connection(cluster) -> transport.Connection:
    return transport.Connection(master_address(cluster), "client", 10.0, secret=SECRET)


def files_below(root) -> dict[str, bytes]:
    """relative path -> content of every regular file below ``root``."""
    found = {}
    for directory, _, names in os.walk(root):
        for name in names:
            path = os.path.join(directory, name)
            if stat.S_ISREG(os.lstat(path).st_mode):
                with open(path, "rb") as f:
                    found[os.path.relpath(path, root)] = f.read()
    return found


# --- issue 9 defect 5: long base names ---------------------------------------------------------------
def base_of(nbytes: int, letter: str) -> str:
    """A file name of exactly ``nbytes`` UTF-8 bytes made of ``letter`` (1 or 2 bytes) and 'x' padding."""
    width = len(letter.encode("utf-8"))
    return letter * (nbytes // width) + "x" * (nbytes % width)


LONG_BASES = {245: base_of(245, "a"), 250: base_of(250, "b"), 255: base_of(255, "é")}


def test_names_with_245_to_255_byte_base_names_download(cluster, tmp_path):
    """Base names of 245, 250 and 255 bytes (NAME_MAX) download to a file of that name, leaving no temp file.

    (A tree restore makes its temporary files with the same function.)
    """
    for nbytes, base in LONG_BASES.items():
        store(cluster, f"long/{base}", f"{nbytes} bytes of name".encode(), tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    for nbytes, base in LONG_BASES.items():
        result = cli(cluster, "download", f"long/{base}", cwd=out)
        assert result.returncode == 0, f"{nbytes}-byte base name: {result}"
    assert files_below(out) == {base: f"{nbytes} bytes of name".encode() for nbytes, base in LONG_BASES.items()}


@pytest.mark.parametrize("letter", ["a", "é", "語"])
def test_temporary_names_fit_name_max_whatever_the_target(tmp_path, letter):
    """The temporary file beside a target of any name length fits NAME_MAX and cuts no character in two."""
    limit = client_module.name_max(str(tmp_path))
    for nbytes in (1, 100, limit - 16, limit - 15, limit - 14, limit - 1, limit):
        target = tmp_path / base_of(nbytes, letter)
        fd, temp_path = client_module.open_temp_beside(str(target))
        os.close(fd)
        temp_name = os.path.basename(temp_path)
        os.unlink(temp_path)
        assert len(os.fsencode(temp_name)) <= limit, (nbytes, temp_name)
        assert temp_name.startswith("." + target.name[:8]) and temp_name.endswith(".part")
        os.fsencode(temp_name).decode("utf-8")  # no UTF-8 sequence cut in two


# --- issue 9 defect 6: a tree restore restores what it can ---------------------------------------------
def test_tree_restore_restores_every_file_it_can_and_names_the_rest(cluster, tmp_path):
    """Ten files restore beside '..', a 300-byte component and a file/directory clash; each refusal named; exit 15."""
    ordinary = {f"f{n}": random_bytes(9000 + n, 100 + n) for n in range(10)}
    for relative, data in ordinary.items():
        store(cluster, f"t/{relative}", data, tmp_path)
    long_component = "c" * 300
    for name, data in ((f"t/{long_component}", b"long"), ("t/dup", b"the file"), ("t/dup/inner", b"below it")):
        store(cluster, name, data, tmp_path)
    target = tmp_path / "restore"
    result = cli(cluster, "download", "t/", str(target), cwd=tmp_path)
    assert result.returncode == client_module.EXIT_PARTIAL, result
    assert files_below(target) == {**ordinary, "dup": b"the file"}
    refused = [line for line in result.stderr.splitlines() if line.startswith("client: failed ")]
    for name, reason in ((ESCAPING_NAME, "'..' path component"), (f"t/{long_component}", "300 bytes"),
                         ("t/dup/inner", "t/dup is a file too")):
        assert any(line.startswith(f"client: failed {name}: ") and reason in line for line in refused), \
            (name, result.stderr)
    assert len(refused) == 3, result.stderr
    assert not (tmp_path / "escape").exists()


# --- issue 10 item 2: --force replaces regular files only ---------------------------------------------
def special_files(directory) -> dict[str, str]:
    """A FIFO, a symlink to a regular file and one to /dev/stdout in ``directory``: name -> kind.

    (No device: making one needs root, and a test that failed would replace it.)
    """
    os.mkfifo(directory / "fifo")
    (directory / "real").write_bytes(b"the link's target")
    os.symlink("real", directory / "link")
    os.symlink("/dev/stdout", directory / "stdout-link")
    return {"fifo": "FIFO", "link": "symlink", "stdout-link": "symlink"}


def test_force_refuses_to_replace_anything_but_a_regular_file(cluster, tmp_path):
    """download --force onto a FIFO or a symlink (even to /dev/stdout) exits 2 naming what it is, leaving it."""
    store(cluster, "special/data", b"new bytes", tmp_path)
    kinds = special_files(tmp_path)
    before = {name: os.lstat(tmp_path / name) for name in kinds}
    for name, kind in kinds.items():
        result = cli(cluster, "download", "special/data", name, "--force", cwd=tmp_path)
        assert result.returncode == client_module.EXIT_USAGE and f"it is a {kind}" in result.stderr, (name, result)
        after = os.lstat(tmp_path / name)
        assert (after.st_ino, after.st_mode) == (before[name].st_ino, before[name].st_mode), name
    assert (tmp_path / "real").read_bytes() == b"the link's target"
    assert [n for n in os.listdir(tmp_path) if n.endswith(".part")] == []


def test_force_fsyncs_the_new_bytes_and_directory_before_the_old_copy_is_gone(cluster, tmp_path, monkeypatch):
    """Replacing a local file fsyncs the new file before the rename and its directory after it."""
    store(cluster, "durable/data", b"restored bytes", tmp_path)
    target = tmp_path / "target"
    target.write_bytes(b"the only good local copy")
    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append((os.readlink(f"/proc/self/fd/{fd}"), target.read_bytes()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    real_fsync_dir = metadata_log.fsync_dir
    monkeypatch.setattr(metadata_log, "fsync_dir", lambda path: real_fsync_dir(path, fsync=recording_fsync))
    c = cluster.client()
    try:
        c.download("durable/data", str(target), force=True)
    finally:
        c.close()
    assert target.read_bytes() == b"restored bytes"
    paths = [path for path, _ in synced]
    assert any(p.endswith(".part") for p in paths), paths  # the new bytes, before the rename
    assert synced[-1] == (str(tmp_path), b"restored bytes"), synced  # the directory, after it


def test_tree_restore_writes_neither_onto_special_files_nor_through_symlinks(cluster, tmp_path):
    """In a tree restore with --force a FIFO target and a symlinked directory are refused per file; the rest restore."""
    for name in ("s/a", "s/sub/b", "s/c"):
        store(cluster, name, name.encode(), tmp_path)
    target, elsewhere = tmp_path / "target", tmp_path / "elsewhere"
    target.mkdir()
    elsewhere.mkdir()
    os.mkfifo(target / "a")
    os.symlink(elsewhere, target / "sub")
    result = cli(cluster, "download", "s/", str(target), "--force", cwd=tmp_path)
    assert result.returncode == client_module.EXIT_PARTIAL, result
    assert stat.S_ISFIFO(os.lstat(target / "a").st_mode)
    assert os.listdir(elsewhere) == [], "a restore wrote through a symlink"
    assert (target / "c").read_bytes() == b"s/c"
    assert "failed s/a: " in result.stderr and "failed s/sub/b: " in result.stderr, result.stderr


# --- issue 10 item 5: names that could not be restored are refused at upload ----------------------------
UNRESTORABLE = {"dir/": "ends with '/'", "a//b": "empty path component", "/abs": "starts with '/'",
                "./a": "'.' path component", "a/../b": "'..' path component", "..": "'..' path component"}


def test_client_refuses_unrestorable_names_before_sending_and_says_why(cluster, tmp_path):
    """upload, append and touch of 'dir/', 'a//b', 'a/../b' exit INVALID_NAME with the rule broken."""
    local = tmp_path / "f"
    local.write_bytes(b"data")
    for args in (("upload", str(local), "dir/"), ("append", "a//b", str(local)), ("touch", "a/../b")):
        result = cli(cluster, *args, cwd=tmp_path)
        assert result.returncode == client_module.EXIT_INVALID_NAME, (args, result)
        assert UNRESTORABLE[args[1] if args[0] != "upload" else args[2]] in result.stderr, result
    assert not {"dir/", "a//b", "a/../b"} & stored_names(cluster)


def test_master_refuses_unrestorable_names_at_upload_and_touch(cluster):
    """The master itself answers INVALID_NAME, saying why, to an upload or touch of each unrestorable name."""
    with raw_connection(cluster) as conn:
        for name, reason in UNRESTORABLE.items():
            conn.send(protocol.UploadBegin(name=name, size=3))
            conn.send(protocol.Data(body=b"abc"))
            conn.send(protocol.UploadEnd(sha256=sha256(b"abc")))
            with pytest.raises(protocol.InvalidName, match=re.escape(reason)):
                conn.expect(protocol.Uploaded)
            with pytest.raises(protocol.InvalidName, match=re.escape(reason)):
                conn.request(protocol.Touch(name=name), protocol.Touched)
    assert not set(UNRESTORABLE) & stored_names(cluster)


# --- issue 10 items 6 and 7 -----------------------------------------------------------------------------
def test_tree_to_stdout_is_refused(cluster, tmp_path):
    """download PREFIX/ - exits 2 and creates no directory named '-'."""
    store(cluster, "stdout-tree/x", b"x", tmp_path)
    result = cli(cluster, "download", "stdout-tree/", "-", cwd=tmp_path)
    assert result.returncode == client_module.EXIT_USAGE and "standard output" in result.stderr, result
    assert not os.path.lexists(tmp_path / "-")


def test_negative_length_is_refused_like_a_negative_offset(cluster, tmp_path):
    """--length -5 exits INVALID_RANGE for cat and download (no file); the master refuses it too."""
    store(cluster, "range/neg", b"0123456789", tmp_path)
    for args in (("cat", "range/neg", "--length", "-5"), ("download", "range/neg", "out", "--length", "-5")):
        result = cli(cluster, *args, cwd=tmp_path)
        assert result.returncode == client_module.EXIT_INVALID_RANGE and "-5" in result.stderr, (args, result)
    assert not (tmp_path / "out").exists()
    with raw_connection(cluster) as conn:
        with pytest.raises(protocol.InvalidRange):
            conn.request(protocol.Download(name="range/neg", length=-5), protocol.FileInfo)


# --- issue 10 item 12: options in either position ------------------------------------------------------
def test_client_options_work_before_and_after_the_command(cluster, tmp_path):
    """--no-wait, --master, --secret-file and --quiet are accepted before the command and after it."""
    store(cluster, "options/1", b"1", tmp_path)
    store(cluster, "options/2", b"2", tmp_path)
    before = run_client("--master", cluster.master_address, "--secret-file", cluster.secret_file, "--no-wait",
                        "--quiet", "delete", "options/1", cwd=tmp_path)
    assert before.returncode == 0 and before.stdout == b"", before
    after = run_client("delete", "options/2", "--master", cluster.master_address, "--secret-file",
                       cluster.secret_file, "--no-wait", "--quiet", cwd=tmp_path)
    assert after.returncode == 0 and after.stdout == b"", after
    assert not {"options/1", "options/2"} & stored_names(cluster)


def test_wait_options_are_refused_where_no_lock_is_taken():
    """--no-wait with a reading command, or with --wait, is a usage error (exit 2)."""
    for argv in (["--no-wait", "list"], ["stat", "x", "--wait", "3"], ["--wait", "3", "delete", "x", "--no-wait"]):
        with pytest.raises(SystemExit) as exit_info:
            client_module.parse_args(argv)
        assert exit_info.value.code == client_module.EXIT_USAGE, argv



def test_parser_of_the_command_alone_reads_argv_as_the_whole_parser(capsys):
    """parse_args builds only the command being run; it reads every command line as the full parser does."""
    argvs = [["list"], ["-q", "list", "a/", "--json"], ["--master", "h:1", "upload", "f", "n", "--no-wait"],
             ["--master", "list", "upload", "f"],  # a command's name as an option's value
             ["--timeout", "3", "download", "n", "out", "--at", "2024-05-01T13:00", "--force"],
             ["stat", "x", "--version", "3", "--master", "h:2"], ["--log-level", "debug", "health", "--detail"],
             ["masters", "replace", "h:1", "h:2"]]
    for argv in argvs:
        assert client_module.parse_args(argv) == client_module.build_arg_parser().parse_args(argv), argv
    assert client_module.command_name(["--master", "list", "upload", "f"]) == "upload"
    assert client_module.command_name(["--timeout", "x", "list"]) == ""
    for argv in (["--help"], ["list", "--help"], ["upload", "--help"], [], ["frob"], ["--timeout", "x", "list"],
                 ["upload"], ["list", "a", "b"], ["masters", "--help"], ["masters", "replace", "--help"]):
        outputs = []
        for parse in (client_module.parse_args, client_module.build_arg_parser().parse_args):
            with pytest.raises(SystemExit) as exit_info:
                parse(argv)
            outputs.append((exit_info.value.code, capsys.readouterr()))
        assert outputs[0] == outputs[1], argv


# --- issue 15: uploads carry the client's chunk CRCs ------------------------------------------------------
def test_uploads_with_and_without_client_crcs_store_the_clients_bytes(cluster, tmp_path):
    """The client's CRCs are used when cut as the master cuts (the default); with another chunk size the master
    ignores them and hashes the file itself.  Either way the file reads back whole, with the client's SHA-256."""
    data = random.Random(1501).randbytes(2 * 1024 * 1024 + 777)
    local = tmp_path / "crc.bin"
    local.write_bytes(data)
    c = cluster.client()
    try:
        assert c.crc_chunk_size == 1024
        used = c.upload_file(str(local), "crcs/used")
        c.crc_chunk_size = 512  # not the cluster's chunk size
        ignored = c.upload_file(str(local), "crcs/ignored")
    finally:
        c.close()
    for reply in (used, ignored):
        assert reply.sha256 == hashlib.sha256(data).hexdigest() and reply.size == len(data)
        out = tmp_path / "out.bin"
        assert cli(cluster, "--quiet", "download", reply.name, str(out), cwd=tmp_path).returncode == 0
        assert out.read_bytes() == data
        out.unlink()


class RecordingConn:
    """Stands for the master connection of a Client: records the frames sent, answers UPLOADED."""

    def __init__(self):
        self.sent = []
        self.sock, self._peer = socket.socketpair()  # never readable: no early reply

    def send(self, msg, flush=True):
        self.sent.append(msg)

    def expect(self, cls):
        return protocol.Uploaded(name="n", size=0, chunks=0, sha256="", version="v")


class TricklingStdin:
    """A pipe that gives 100 bytes per read, as a slow producer does."""

    def __init__(self, data: bytes):
        self.buffer = self
        self.data = memoryview(data)

    def readinto(self, view) -> int:
        n = min(100, len(view), len(self.data))
        view[:n] = self.data[:n]
        self.data = self.data[n:]
        return n


def test_file_frames_are_whole_chunks_with_crcs_and_stdin_frames_go_as_they_come(tmp_path, monkeypatch):
    """A file is sent in whole frames, each after the DATA_CRCS of its chunks; stdin (a slow pipe must not wait
    to fill a frame while the master's lock lease runs) in the pieces it gives, without CRCs."""
    data = random.Random(1503).randbytes(5000)
    local = tmp_path / "f"
    local.write_bytes(data)
    c = client_module.Client(("127.0.0.1", 1), 5.0, 2048, show_progress=False, chunk_size=1024)
    conn = c._conn = RecordingConn()
    try:
        c._upload_file(str(local), "n", "replace", 0, -1.0)
        ops = [type(m).__name__ for m in conn.sent]
        assert ops == ["UploadBegin"] + ["DataCrcs", "Data"] * 3 + ["UploadEnd"], ops
        assert conn.sent[0].chunk_size == 1024
        datas = [m for m in conn.sent if isinstance(m, protocol.Data)]
        assert [len(m.body) for m in datas] == [2048, 2048, 904]
        conn.sent.clear()
        monkeypatch.setattr(sys, "stdin", TricklingStdin(data[:250]))
        c._upload_file("-", "n", "replace", 0, -1.0)
        assert [type(m).__name__ for m in conn.sent] == ["UploadBegin", "Data", "Data", "Data", "UploadEnd"]
        assert conn.sent[0].chunk_size == 0
    finally:
        conn.sock.close()
        conn._peer.close()
        c._conn = None


def test_bytes_unlike_the_client_crcs_are_refused_end_to_end(cluster, tmp_path):
    """DATA whose bytes differ from its DATA_CRCS (as after damage between client and master): the real nodes
    refuse them, the upload fails with CHECKSUM_MISMATCH, and the name is not stored."""
    sent = random.Random(1502).randbytes(8 * 1024)
    meant = bytearray(sent)
    meant[100] ^= 1
    crcs = protocol.crcs_to_bytes(protocol.chunk_crcs(bytes(meant), 1024))
    conn = raw_connection(cluster)
    try:
        conn.send(protocol.UploadBegin(name="crcs/damaged", size=len(sent), chunk_size=1024))
        conn.send(protocol.DataCrcs(body=crcs))
        conn.send(protocol.Data(body=sent))
        conn.send(protocol.UploadEnd(sha256=hashlib.sha256(bytes(meant)).hexdigest()))
        with pytest.raises(protocol.ChecksumMismatch, match="arrived damaged"):
            conn.expect(protocol.Uploaded)
        # An upload refused at once has the rest of its frames, DATA_CRCS too, read and dropped.
        conn.send(protocol.UploadBegin(name="crcs/../bad", size=len(sent), chunk_size=1024))
        conn.send(protocol.DataCrcs(body=crcs))
        conn.send(protocol.Data(body=sent))
        conn.send(protocol.UploadEnd(sha256=hashlib.sha256(sent).hexdigest()))
        with pytest.raises(protocol.InvalidName):
            conn.expect(protocol.Uploaded)
        conn.send(protocol.UploadBegin(name="crcs/intact", size=len(sent), chunk_size=1024))
        conn.send(protocol.DataCrcs(body=protocol.crcs_to_bytes(protocol.chunk_crcs(sent, 1024))))
        conn.send(protocol.Data(body=sent))
        conn.send(protocol.UploadEnd(sha256=hashlib.sha256(sent).hexdigest()))
        assert conn.expect(protocol.Uploaded).sha256 == hashlib.sha256(sent).hexdigest()
    finally:
        conn.close()
    assert "crcs/damaged" not in stored_names(cluster)


def test_download_sink_makes_threads_and_buffers_only_when_frames_come():
    """Nothing is started or allocated but the first buffer until the first frame (the first
    requests to the nodes go out meanwhile); then at most _BUFFERS buffers, bytes in order."""
    out, sha = io.BytesIO(), hashlib.sha256()
    threads_before = threading.active_count()
    sink = client_module._FrameSink(out, sha, client_module.Progress("x", 0, False), threaded=True,
                                    first_buffer=bytearray(8))
    assert threading.active_count() == threads_before
    frames, buffers = [bytes([n]) * 8 for n in range(20)], set()
    for frame in frames:
        buffer = sink.free_buffer()
        buffers.add(id(buffer))
        buffer[:] = frame
        sink.put(buffer, memoryview(buffer))
    sink.close()
    assert out.getvalue() == b"".join(frames)
    assert sha.digest() == hashlib.sha256(b"".join(frames)).digest()
    assert 1 < len(buffers) <= client_module._FrameSink._BUFFERS


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_download_to_a_full_stdout_fails_with_a_local_error_not_at_exit(cluster, tmp_path):
    """A small file's bytes sit in stdout's buffer until it is flushed: a write error there is
    EXIT_LOCAL_IO and one line, not a message and status 120 from Python's exit (buffered stdout,
    as a shell gives a fresh interpreter: no PYTHONUNBUFFERED, no fork server)."""
    store(cluster, "full/small", b"abc" * 100, tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKUP_") and k != "PYTHONUNBUFFERED"}
    with open("/dev/full", "wb") as full:
        proc = subprocess.run([sys.executable, CLIENT, "--master", cluster.master_address, "--secret-file",
                               cluster.secret_file, "download", "full/small", "-"], stdout=full,
                              stderr=subprocess.PIPE, env=env, cwd=tmp_path, timeout=60)
    stderr = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == client_module.EXIT_LOCAL_IO, stderr
    assert stderr == "client: cannot write: No space left on device\n", stderr


def test_client_start_up_leaves_out_what_the_command_does_not_use():
    """--help loads no transport, TLS, hashing or health code; a connection without TLS loads no ssl."""
    code = ("import sys, cli; cli.parse_args(sys.argv[1:]) if sys.argv[1:] else None; "
            "print(' '.join(sorted({'ssl', 'hashlib', 'transport', 'health', 'history', 'datetime', 'logging'} "
            "& set(sys.modules))))")
    loaded = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert loaded.stdout.split() == [], loaded
    code = "import sys, security, transport; print('ssl' in sys.modules)"
    loaded = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "False", loaded
    # A download loads neither uuid (with platform) nor difflib: one is for uploads, one for config typos.
    code = ("import sys, cli, direct_read; cli.parse_args(['download', 'a', '-']); "
            "print(' '.join(sorted({'uuid', 'platform', 'difflib', 'ssl'} & set(sys.modules))))")
    loaded = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert loaded.stdout.split() == [], loaded

# --- issue 10 item 13: a peer that is no backup master ----------------------------------------------------
class FakePeer:
    """A loopback listener that is no backup master: silent, or answering like an HTTP server."""

    def __init__(self, answer: bytes | None):
        self.answer = answer
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = "127.0.0.1:%d" % self.listener.getsockname()[1]
        self.held: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.held.append(conn)  # a silent peer keeps the connection open, answering nothing
            if self.answer is not None:
                conn.recv(4096)
                conn.sendall(self.answer)
                conn.close()

    def close(self) -> None:
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() (close alone does not)
        except OSError:
            pass
        self.listener.close()
        for conn in self.held:
            conn.close()
        self.thread.join(5)


@pytest.mark.parametrize("peer", ["silent", "http", "storage node"])
def test_a_peer_that_is_no_master_fails_within_io_timeout_saying_so(cluster, tmp_path, peer):
    """status against a silent peer, an HTTP server or a node fails within io_timeout_s naming what answered."""
    config = tmp_path / "client.ini"
    config.write_text("[timing]\nio_timeout_s = 1\n")
    fake = None
    if peer == "storage node":
        address = cluster.nodes[0].address
    else:
        fake = FakePeer(None if peer == "silent" else b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
        address = fake.address
    try:
        started = time.monotonic()
        result = run_client("--config", str(config), "--master", address, "status", cwd=tmp_path, timeout_s=20)
        elapsed = time.monotonic() - started
    finally:
        if fake is not None:
            fake.close()
    assert elapsed < 8, f"took {elapsed:.1f} s with io_timeout_s = 1"
    expected = {"silent": (client_module.EXIT_TIMEOUT, "answered nothing within 1 s"),
                "http": (client_module.EXIT_UNAVAILABLE, "is not a backup master (it answered 'HTTP/1.1 400"),
                "storage node": (client_module.EXIT_UNAVAILABLE, "is not a backup master")}[peer]
    assert result.returncode == expected[0] and expected[1] in result.stderr, result
    assert f"{address} " in result.stderr and len(result.stderr.splitlines()) == 1, result


def test_a_bad_master_address_names_the_flag_or_variable_it_came_from(tmp_path):
    """--master localhost names --master; BACKUP_MASTER=localhost names BACKUP_MASTER; both exit 2."""
    flag = run_client("--master", "localhost", "status", cwd=tmp_path)
    assert flag.returncode == client_module.EXIT_USAGE and "--master 'localhost'" in flag.stderr, flag
    env = run_client("status", cwd=tmp_path, env={"BACKUP_MASTER": "localhost"})
    assert env.returncode == client_module.EXIT_USAGE and "BACKUP_MASTER 'localhost'" in env.stderr, env


# --- client friction -------------------------------------------------------------------------------------
def test_upload_from_stdin_needs_a_name_and_round_trips(cluster, tmp_path):
    """upload - NAME stores standard input; upload - alone exits 2 asking for the name."""
    data = random_bytes(4242, 5000)
    assert cli(cluster, "upload", "-", "stdin/data", cwd=tmp_path, stdin=data).returncode == 0
    c = cluster.client()
    try:
        c.download("stdin/data", str(tmp_path / "back"))
    finally:
        c.close()
    assert (tmp_path / "back").read_bytes() == data
    nameless = cli(cluster, "upload", "-", cwd=tmp_path, stdin=data)
    assert nameless.returncode == client_module.EXIT_USAGE and "NAME" in nameless.stderr, nameless


def test_delete_takes_several_names_and_goes_on_past_a_missing_one(cluster, tmp_path):
    """delete a missing b deletes a and b, names the missing one, and exits FILE_NOT_FOUND."""
    store(cluster, "several/a", b"a", tmp_path)
    store(cluster, "several/b", b"b", tmp_path)
    result = cli(cluster, "delete", "several/a", "several/missing", "several/b", cwd=tmp_path)
    assert result.returncode == client_module.EXIT_NOT_FOUND and "several/missing" in result.stderr, result
    assert not {"several/a", "several/b"} & stored_names(cluster)


def test_download_of_a_directory_name_hints_at_the_trailing_slash(cluster, tmp_path):
    """download tree (files stored under tree/) exits FILE_NOT_FOUND with a hint to use tree/."""
    store(cluster, "hint/x", b"x", tmp_path)
    store(cluster, "hint/y", b"y", tmp_path)
    result = cli(cluster, "download", "hint", cwd=tmp_path)
    assert result.returncode == client_module.EXIT_NOT_FOUND, result
    assert "2 files are stored under hint/" in result.stderr and "download hint/" in result.stderr, result


def test_list_has_a_header_and_matches_whole_path_components(cluster, tmp_path):
    """list lp/a shows a header, lp/a and lp/a/x but not lp/ab; --quiet drops the header."""
    for name in ("lp/a", "lp/a/x", "lp/ab"):
        store(cluster, name, b"listed", tmp_path)
    result = cli(cluster, "list", "lp/a", cwd=tmp_path)
    lines = result.stdout.decode().splitlines()
    assert result.returncode == 0 and lines[0].split() == ["SIZE", "CHUNKS", "MODIFIED", "NAME"], result.stdout
    assert [line.split()[-1] for line in lines[1:]] == ["lp/a", "lp/a/x"], result.stdout
    quiet = cli(cluster, "list", "lp/a", "--quiet", cwd=tmp_path)
    assert [line.split()[-1] for line in quiet.stdout.decode().splitlines()] == ["lp/a", "lp/a/x"], quiet.stdout


def test_one_file_and_one_chunk_are_singular(cluster, tmp_path):
    """Summaries say '1 chunk' and '1 file', not '1 chunks' and '1 files'."""
    single = tmp_path / "one"
    single.mkdir()
    (single / "only").write_bytes(b"ten bytes!")
    file_line = cli(cluster, "upload", str(single / "only"), "plural/only", cwd=tmp_path).stdout.decode()
    tree_line = cli(cluster, "upload", str(single), "plural/tree", cwd=tmp_path).stdout.decode()
    assert "10 bytes, 1 chunk " in file_line, file_line
    assert tree_line.startswith("uploaded 1 file, "), tree_line


def test_every_command_help_describes_it_and_its_positionals(capsys):
    """COMMAND --help has a description beyond the usage line and help text for every positional argument."""
    for command in client_module.COMMANDS:
        with pytest.raises(SystemExit):
            client_module.build_arg_parser().parse_args([command, "--help"])
        text = capsys.readouterr().out
        blocks = text.split("\n\n")
        assert len(blocks) > 2 and not blocks[1].startswith(("positional", "options")), (command, text)
        if "positional arguments:" in text:
            section = text.split("positional arguments:\n")[1].split("\n\n")[0].splitlines()
            for n, line in enumerate(section):
                if re.match(r"^  \S", line):  # an argument: its help on this line or the next
                    has_help = re.match(r"^  \S+\s{2,}\S", line) or (
                        n + 1 < len(section) and re.match(r"^\s{6,}\S", section[n + 1]))
                    assert has_help, (command, line)


def test_environment_gives_master_and_secret_and_flags_override_it(cluster, tmp_path):
    """BACKUP_MASTER and BACKUP_SECRET_FILE reach the cluster; --master and --secret-file beat them."""
    store(cluster, "env/marker", b"m", tmp_path)
    wrong_secret = tmp_path / "wrong"
    wrong_secret.write_bytes(b"not the secret of this cluster")
    os.chmod(wrong_secret, 0o600)
    by_env = run_client("list", "env", cwd=tmp_path,
                        env={"BACKUP_MASTER": cluster.master_address, "BACKUP_SECRET_FILE": cluster.secret_file})
    assert by_env.returncode == 0 and b"env/marker" in by_env.stdout, by_env
    by_flags = run_client("list", "env", "--master", cluster.master_address, "--secret-file", cluster.secret_file,
                          cwd=tmp_path, env={"BACKUP_MASTER": "127.0.0.1:1", "BACKUP_SECRET_FILE": str(wrong_secret)})
    assert by_flags.returncode == 0 and b"env/marker" in by_flags.stdout, by_flags


# --- the README's examples ----------------------------------------------------------------------------------
README = os.path.join(ROOT, "README.md")
# Local files the examples name, created in the examples' working directory
# (HOME is that directory too, so ~/photos is there).  A new example that
# reads another local file needs it added here.
PLACEHOLDER_FILES = {"FILE": 3000, "report.pdf": 5000, "disk.img": 10000, "patch.bin": 100, "notes.txt": 200,
                     "photos/2024/beach.jpg": 4000, "photos/cat.jpg": 3000, "docs/a.txt": 100}


def readme_client_examples(text: str) -> list[str]:
    """Every ``python client.py ...`` command line in README.md, in order.

    From code blocks (fenced or indented) and from inline code; a synopsis
    (it has ``[`` for optional parts) is not an example.
    """
    examples = []
    for line in text.splitlines():
        stripped = line.strip()
        if "python client.py" not in line:
            continue
        spans = re.findall(r"`([^`]*python client\.py[^`]*)`", line)
        if spans:
            examples += [span for span in spans if "[" not in span]
        elif not stripped.startswith("|") and "[" not in stripped.split("#")[0]:
            examples.append(stripped)
    return examples


def test_readme_parser_finds_commands_in_blocks_and_inline_but_not_synopses():
    """The example finder takes code lines and inline commands and leaves synopses out."""
    text = ("Then `python client.py list` and `python client.py download FILE out`.\n"
            "```sh\npython client.py upload FILE   # comment\n```\n"
            "    python client.py --secret-file secret status\n"
            "Client (`python client.py [--master HOST:PORT] COMMAND`):\n")
    assert readme_client_examples(text) == ["python client.py list", "python client.py download FILE out",
                                            "python client.py upload FILE   # comment",
                                            "python client.py --secret-file secret status"]


@pytest.fixture(scope="module")
def tls_master(tmp_path_factory, cluster):
    """A master alone with TLS and the cluster's secret (for the README's --tls-ca example); skips without openssl."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is not installed, so no test certificate can be made")
    base = tmp_path_factory.mktemp("tls-master")
    cert, key = str(base / "cert.pem"), str(base / "key.pem")
    subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", key, "-out", cert,
                    "-days", "2", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    ini = base / "config.ini"
    ini.write_text(f"[security]\nsecret_file = {cluster.secret_file}\ntls_cert = {cert}\ntls_key = {key}\n"
                   f"tls_ca = {cert}\n")
    c = SecureCluster(str(base / "cluster"), nodes=0, master_args=FAST_MASTER, config_path=str(ini))
    c.cert = cert
    try:
        c.start()
        yield c
    finally:
        c.stop()
        shutil.rmtree(base, ignore_errors=True)


def test_every_readme_client_example_runs(cluster, request, tmp_path):
    """Each `python client.py` example of README.md runs, in order, and every client run in it exits 0."""
    with open(README, encoding="utf-8") as f:
        examples = readme_client_examples(f.read())
    assert len(examples) >= 10, examples
    work = tmp_path / "work"
    for relative, size in PLACEHOLDER_FILES.items():
        (work / relative).parent.mkdir(parents=True, exist_ok=True)
        (work / relative).write_bytes(random_bytes(size, size))
    shutil.copy(cluster.secret_file, work / "secret")
    os.chmod(work / "secret", 0o600)
    # A `python` that records each client run's exit status: an example's
    # shell may hide it (`|| echo`, a pipe).
    bin_dir, runs = tmp_path / "bin", tmp_path / "runs"
    bin_dir.mkdir()
    python = shlex.join(forkserver.python_command())
    (bin_dir / "python").write_text(f'#!/bin/sh\n{python} "$@"\nstatus=$?\n'
                                    f'echo "$status $*" >> {shlex.quote(str(runs))}\nexit $status\n')
    os.chmod(bin_dir / "python", 0o755)
    failures = []
    for example in examples:
        master = cluster
        if "--tls-ca" in example:
            master = request.getfixturevalue("tls_master")
            shutil.copy(master.cert, work / "cert.pem")
        command = re.sub(r"\b\d{1,3}(\.\d{1,3}){3}:\d+\b", master.master_address, example)
        command = command.replace("python client.py", f"python {shlex.quote(CLIENT)}")
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("BACKUP_")},
               "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "HOME": str(work),
               "BACKUP_MASTER": master.master_address, "BACKUP_SECRET_FILE": str(work / "secret")}
        runs.write_text("")
        proc = subprocess.run(["bash", "-o", "pipefail", "-c", command], cwd=work, env=env, capture_output=True,
                              timeout=60)
        statuses = [line.split(" ", 1)[0] for line in runs.read_text().splitlines()]
        if proc.returncode != 0 or not statuses or set(statuses) != {"0"}:
            failures.append(f"{example!r}: shell exit {proc.returncode}, client exits {statuses}, "
                            f"stderr {proc.stderr.decode(errors='replace')[-300:]!r}")
    assert not failures, "\n".join(failures)


def test_a_tree_upload_whose_reader_fails_ends_at_once_not_at_the_timeout(cluster, tmp_path, monkeypatch):
    """A local read error mid-tree ends the upload within seconds instead of waiting out the client timeout."""
    tree = tmp_path / "tree"
    tree.mkdir()
    for index in range(3):
        (tree / f"f{index}").write_bytes(b"x" * 5000)
    real_open_source = client_module.open_source

    class FailingReader:
        def __init__(self, f):
            self.f = f

        def readinto(self, buffer):
            raise OSError(5, "Input/output error")

        def __enter__(self):
            return self

        def __exit__(self, *exc_info):
            self.f.close()

    def open_source(path, kind):
        f, size, meta = real_open_source(path, kind)
        return (FailingReader(f) if path.endswith("f1") else f), size, meta

    monkeypatch.setattr(client_module, "open_source", open_source)
    c = cluster.client()
    c.timeout_s = 20.0
    started = time.monotonic()
    try:
        with pytest.raises(client_module.LocalFileError, match="cannot read"):
            c.upload_tree(str(tree), "hang/tree")
    finally:
        c.close()
    assert time.monotonic() - started < 5.0
