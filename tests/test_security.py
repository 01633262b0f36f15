"""Security: shared-secret authentication, protected mode, TLS, limits, fuzzing, names as keys.

Fast tests drive an in-process ``transport.Server``; the rest start real
clusters (conftest) with a secret file, a TLS certificate made with the
``openssl`` CLI, or nothing, and attack them over loopback.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
import zlib

import pytest

import forkserver
from conftest import FAST_MASTER, FAST_TIMING, ROOT, CliResult, SecureCluster, serve_in_thread, wait_until

import client as client_module
import config as config_module
import protocol
import security
import transport

HELLO = protocol.encode(protocol.Hello(version=protocol.PROTOCOL_VERSION, role="client"))
SECRET = b"correct horse battery staple"


def frame(header: dict, body: bytes = b"") -> bytes:
    data = json.dumps(header).encode("utf-8")
    return len(data).to_bytes(4, "big") + data + body


def read_frames(sock: socket.socket, timeout_s: float = 5.0) -> tuple[list, bool]:
    """Frames received until the server closes (True) or ``timeout_s`` passes (False)."""
    sock.settimeout(timeout_s)
    received = bytearray()
    closed = False
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                closed = True
                break
            received += chunk
    except socket.timeout:
        pass
    except ConnectionResetError:
        closed = True
    decoder = protocol.FrameDecoder()
    decoder.feed(bytes(received))
    frames = []
    while (msg := decoder.next_message()) is not protocol.NEED_DATA:
        frames.append(msg)
    return frames, closed


def write_secret(path, secret: bytes = SECRET) -> str:
    path.write_bytes(b"  " + secret + b"\n")
    os.chmod(path, 0o600)
    return str(path)


# --- in-process servers -----------------------------------------------------------------------
class EchoHandler(transport.RequestHandler):
    def do_STATUS(self, msg):
        self.reply(protocol.StatusReply(nodes=[], totals={"role": self.role}))


@pytest.fixture
def serve(request):
    """Factory: ``serve(secret=..., **server_kwargs)`` -> a running in-process Server."""
    stoppers = []

    def factory(secret=None, server_context=None, io_timeout_s=2.0, idle_timeout_s=30.0, **kwargs):
        server = transport.Server(("127.0.0.1", 0), EchoHandler, server_id="test", io_timeout_s=io_timeout_s,
                                  idle_timeout_s=idle_timeout_s,
                                  security=security.Security(secret, server_context), **kwargs)
        stoppers.append(serve_in_thread(server))
        return server

    yield factory
    for stop in stoppers:
        stop()


def status_via(server, secret=None, role="client", **kwargs):
    with transport.Connection(server.server_address, role, 5.0, secret=secret, **kwargs) as conn:
        return conn.request(protocol.Status(), protocol.StatusReply)


# --- the handshake's arithmetic -----------------------------------------------------------------
def test_macs_bind_direction_nonces_and_role():
    """The client and server MACs differ, and each changes with either nonce and the role."""
    challenge, nonce = b"c" * 32, b"n" * 32
    mac = security.client_mac(SECRET, challenge, nonce, "client")
    assert mac != security.server_mac(SECRET, nonce, challenge)
    assert mac != security.server_mac(SECRET, challenge, nonce)  # no reflection, in either order
    assert mac != security.client_mac(SECRET, challenge, nonce, "node")
    assert mac != security.client_mac(SECRET, b"d" * 32, nonce, "client")
    assert mac != security.client_mac(b"other", challenge, nonce, "client")
    assert security.parse_hex("zz" * 32, 32) is None and security.parse_hex("ab", 32) is None


def test_secret_file_is_stripped_and_an_empty_one_refused(tmp_path):
    """A secret file's whitespace is ignored; a missing or blank file is a ValueError naming the path only."""
    assert security.load_secret_file(write_secret(tmp_path / "s")) == SECRET
    (tmp_path / "blank").write_text(" \n\t\n")
    with pytest.raises(ValueError, match="empty"):
        security.load_secret_file(str(tmp_path / "blank"))
    with pytest.raises(ValueError, match="cannot read"):
        security.load_secret_file(str(tmp_path / "missing"))


def test_config_secret_file_wins_and_secret_is_never_in_repr(tmp_path):
    """[security] secret_file beats secret; neither Config nor Security shows the secret."""
    ini = tmp_path / "c.ini"
    ini.write_text(f"[security]\nsecret = inline-secret\nsecret_file = {write_secret(tmp_path / 's')}\n")
    config = config_module.load_config(str(ini))
    sec = security.from_config(config)
    assert sec.secret == SECRET
    assert "inline-secret" not in repr(config) and SECRET.decode() not in repr(sec)
    inline = security.from_config(config_module.load_config(str(ini), secret_file=""))
    assert inline.secret == b"inline-secret"


def test_protected_mode_refuses_public_addresses_without_a_secret():
    """Loopback needs nothing; any other address needs a secret or an explicit insecure."""
    none = security.Security()
    for host in ("127.0.0.1", "localhost", "::1"):
        assert security.protected_mode_problem(host, none, False) is None
    for host in ("0.0.0.0", "", "::", "192.0.2.7"):
        problem = security.protected_mode_problem(host, none, False)
        assert problem and "--secret-file" in problem and "--insecure" in problem
        assert security.protected_mode_problem(host, none, True) is None
        assert security.protected_mode_problem(host, security.Security(SECRET), False) is None


# --- authentication over real sockets ------------------------------------------------------------
def test_no_secret_anywhere_works_as_before(serve):
    """Without a secret HELLO_OK carries no challenge and requests are served."""
    server = serve()
    assert status_via(server).totals == {"role": "client"}
    with socket.create_connection(server.server_address) as sock:
        sock.sendall(HELLO)
        frames, _ = read_frames(sock, 0.5)
    assert frames == [protocol.HelloOk(version=protocol.PROTOCOL_VERSION, server_id="test")]
    assert b"challenge" not in protocol.encode(frames[0])


def test_right_secret_authenticates_both_ways(serve):
    """With the same secret on both sides, each role is served."""
    server = serve(secret=SECRET)
    for role in ("client", "node", "master"):
        assert status_via(server, SECRET, role).totals == {"role": role}


def test_wrong_secret_gets_auth_failed_and_a_log_line_with_the_peer(serve, caplog):
    """A wrong secret: AUTH_FAILED for the client, a warning with its address on the server, no secret logged."""
    server = serve(secret=SECRET)
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(protocol.AuthFailed, match="authentication failed"):
            status_via(server, b"wrong secret")
        wait_until(lambda: "authentication failed" in caplog.text, 5, message="the log line")
    assert "127.0.0.1:" in caplog.text
    assert SECRET.decode() not in caplog.text and "wrong secret" not in caplog.text.replace("wrong shared secret", "")


def test_missing_secret_on_either_side_is_refused(serve, caplog):
    """A client without the server's secret, or with one the server lacks, refuses with AuthFailed."""
    with caplog.at_level(logging.WARNING):
        with pytest.raises(protocol.AuthFailed, match="requires authentication"):
            status_via(serve(secret=SECRET))
        wait_until(lambda: "authentication failed" in caplog.text, 5, message="the log line")
    with pytest.raises(protocol.AuthFailed, match="does not require authentication"):
        status_via(serve(), SECRET)


@pytest.mark.parametrize("attack", ["request instead of AUTH", "request before HELLO", "bad hex", "wrong length",
                                    "replayed AUTH", "AUTH before HELLO", "body before auth", "big header"])
def test_nothing_but_a_valid_auth_gets_past_the_handshake(serve, attack):
    """Every way around AUTH ends in an ERROR (AUTH_FAILED, or TOO_LARGE) and a closed connection."""
    server = serve(secret=SECRET)
    status = protocol.encode(protocol.Status())
    if attack == "replayed AUTH":
        # Record a genuine exchange, then replay its AUTH against a fresh challenge.
        with socket.create_connection(server.server_address) as sock:
            sock.sendall(HELLO)
            rfile = sock.makefile("rb")
            challenge = bytes.fromhex(protocol.read_message(rfile).challenge)
            nonce = b"\x01" * 32
            recorded = protocol.encode(protocol.Auth(
                client_nonce=nonce.hex(), mac=security.client_mac(SECRET, challenge, nonce, "client").hex()))
            sock.sendall(recorded)
            assert isinstance(protocol.read_message(rfile), protocol.AuthOk)
    payload = {
        "request instead of AUTH": HELLO + status,
        "request before HELLO": status,
        "bad hex": HELLO + frame({"op": "AUTH", "client_nonce": "zz" * 32, "mac": "00" * 32}),
        "wrong length": HELLO + frame({"op": "AUTH", "client_nonce": "00", "mac": "00"}),
        "replayed AUTH": HELLO + (recorded if attack == "replayed AUTH" else b""),
        "AUTH before HELLO": frame({"op": "AUTH", "client_nonce": "00" * 32, "mac": "00" * 32}),
        "body before auth": HELLO + frame({"op": "DATA", "body": 10}, b"x" * 10),
        "big header": HELLO + frame({"op": "LIST", "prefix": "x" * 10000}),
    }[attack]
    with socket.create_connection(server.server_address) as sock:
        sock.sendall(payload)
        frames, closed = read_frames(sock)
    errors = [f for f in frames if isinstance(f, protocol.Error)]
    assert closed and errors, f"{attack}: {frames}"
    assert errors[-1].code in ({"TOO_LARGE"} if attack in ("body before auth", "big header") else {"AUTH_FAILED"})
    assert not any(isinstance(f, (protocol.StatusReply, protocol.AuthOk)) for f in frames)
    assert status_via(server, SECRET).totals == {"role": "client"}  # and it still serves


def test_client_rejects_an_impostor_that_cannot_prove_the_secret():
    """A fake server that sends a challenge but a wrong AUTH_OK is refused by the client (mutual auth)."""
    listener = socket.create_server(("127.0.0.1", 0))

    def impostor():
        conn, _ = listener.accept()
        with conn:
            rfile = conn.makefile("rb")
            protocol.read_message(rfile)
            conn.sendall(protocol.encode(protocol.HelloOk(version=1, server_id="master", challenge="ab" * 32)))
            protocol.read_message(rfile)
            conn.sendall(protocol.encode(protocol.AuthOk(mac="00" * 32)))
            time.sleep(0.5)

    thread = threading.Thread(target=impostor, daemon=True)
    thread.start()
    try:
        with pytest.raises(protocol.AuthFailed, match="could not prove"):
            transport.Connection(listener.getsockname(), "client", 5.0, secret=SECRET)
    finally:
        thread.join(5)
        listener.close()


# --- limits ---------------------------------------------------------------------------------------
def test_connection_flood_is_capped_and_others_are_served_again(serve):
    """Past max_connections extra sockets are closed at once; stalled ones go after io_timeout_s; threads stay bounded."""
    server = serve(max_connections=8, io_timeout_s=0.5)
    threads_before = threading.active_count()
    started = time.monotonic()
    flood = [socket.create_connection(server.server_address) for _ in range(60)]
    try:
        for sock in flood[:8]:
            sock.sendall(HELLO[:3])  # half a frame, then silence
        assert threading.active_count() <= threads_before + 8
        answers = [read_frames(sock, 2.0) for sock in flood[8:]]
        assert all(closed for _, closed in answers), "connections past the limit were not closed"
        assert time.monotonic() - started < 2.0, "connections past the limit were not closed promptly"
        assert all(frames and frames[0].code == "UNAVAILABLE" for frames, _ in answers), answers[:3]
        # The stalled eight are dropped after io_timeout_s; a normal client gets through.
        wait_until(lambda: status_via(server).totals == {"role": "client"}, 5, message="a client served")
    finally:
        for sock in flood:
            sock.close()


def test_trickling_handshake_is_cut_at_the_deadline(serve):
    """A peer sending HELLO a byte at a time, each within io_timeout_s, is still dropped after io_timeout_s."""
    server = serve(io_timeout_s=0.6)
    started = time.monotonic()
    with socket.create_connection(server.server_address) as sock:
        closed = False
        for byte in HELLO:
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                closed = True
                break
            time.sleep(0.2)
            sock.setblocking(False)
            try:
                if sock.recv(1) == b"":
                    closed = True
                    break
            except BlockingIOError:
                pass
            finally:
                sock.setblocking(True)
    assert closed and time.monotonic() - started < 3.0


def test_half_frame_after_handshake_is_dropped_within_io_timeout(serve):
    """After HELLO, a half-sent frame and a stall close the connection after io_timeout_s, not the idle timeout."""
    server = serve(io_timeout_s=0.5, idle_timeout_s=60.0)
    with socket.create_connection(server.server_address) as sock:
        sock.sendall(HELLO)
        sock.sendall(protocol.encode(protocol.Status())[:5])
        started = time.monotonic()
        frames, closed = read_frames(sock, 5.0)
    assert closed and time.monotonic() - started < 3.0, frames


# --- TLS --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed certificate and key made with the openssl CLI (skips without it)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is not installed, so no test certificate can be made")
    directory = tmp_path_factory.mktemp("tls")
    cert, key = str(directory / "cert.pem"), str(directory / "key.pem")
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    return cert, key


def test_tls_handshake_in_process(serve, certificate):
    """A TLS server serves a TLS client with the secret; a plain client and an untrusting one are refused."""
    cert, key = certificate
    server = serve(secret=SECRET, server_context=security.server_tls_context(cert, key))
    client_context = security.client_tls_context(cert)
    reply = status_via(server, SECRET, ssl_context=client_context)
    assert reply.totals == {"role": "client"}
    with pytest.raises(protocol.BackupError):
        status_via(server, SECRET)  # no TLS on our side
    other = security.client_tls_context(certifi_like_default_bundle(cert))
    with pytest.raises(protocol.AuthFailed, match="certificate"):
        status_via(server, SECRET, ssl_context=other)


def certifi_like_default_bundle(cert: str) -> str:
    """A CA file that does not contain ``cert``: another self-signed one, beside it."""
    path = cert + ".other.pem"
    if not os.path.exists(path):
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", path + ".key",
                        "-out", path, "-days", "2", "-subj", "/CN=other"], check=True, capture_output=True, timeout=60)
    return path


# --- real clusters ------------------------------------------------------------------------------------
@pytest.fixture
def make_secure_cluster(tmp_path):
    started = []

    def factory(nodes=2, client_args=(), client_security=None, **kwargs) -> SecureCluster:
        c = SecureCluster(str(tmp_path / f"cluster{len(started)}"), nodes=nodes, master_args=FAST_MASTER,
                          node_args=FAST_TIMING, client_args=client_args, client_security=client_security, **kwargs)
        started.append(c)
        c.start()
        c.wait_nodes_alive(nodes)
        return c

    yield factory
    for c in started:
        c.stop()


def read_logs(cluster) -> str:
    return "".join(open(os.path.join(cluster.log_dir, n), encoding="utf-8", errors="replace").read()
                   for n in os.listdir(cluster.log_dir))


def test_cluster_with_a_secret_serves_only_those_who_know_it(make_secure_cluster, tmp_path):
    """Nodes register, the CLI works with the secret; a wrong or missing one exits 14; a wrong node never registers."""
    secret_file = write_secret(tmp_path / "secret")
    cluster = make_secure_cluster(secret_file=secret_file, client_args=["--secret-file", secret_file],
                                  client_security=security.Security(SECRET))
    local = tmp_path / "in.bin"
    local.write_bytes(os.urandom(5000))
    assert cluster.cli("upload", str(local), "f").returncode == 0
    out = tmp_path / "out.bin"
    assert cluster.cli("download", "f", str(out)).returncode == 0
    assert out.read_bytes() == local.read_bytes()

    wrong_file = write_secret(tmp_path / "wrong", b"not the secret")
    for label, args in (("wrong", ["--secret-file", wrong_file]), ("missing", [])):
        argv = [sys.executable, os.path.join(ROOT, "client.py"), "--master", cluster.master_address, "--quiet",
                *args, "list"]
        result = CliResult(forkserver.run(argv, capture_output=True, timeout=30, cwd=tmp_path))
        assert result.returncode == client_module.EXIT_AUTH_FAILED, (label, result)
        assert result.stderr.count("\n") == 1 and "AUTH_FAILED" in result.stderr, result

    wrong_node = cluster.add_node(extra_args=["--secret-file", wrong_file])  # the last --secret-file wins
    wait_until(lambda: "cannot register" in open(wrong_node.log_path).read(), 10,
               message="the wrong node's log line")
    assert cluster.status().totals["nodes_alive"] == 2
    logs = read_logs(cluster)
    assert "authentication failed" in logs and "127.0.0.1:" in logs
    assert SECRET.decode() not in logs and "not the secret" not in logs

    # A raw connection to a node without the secret gets nowhere either (master -> node is authenticated).
    host, _, port = cluster.nodes[0].address.rpartition(":")
    with pytest.raises(protocol.AuthFailed):
        transport.Connection((host, int(port)), "master", 5.0)


def test_protected_mode_refuses_to_listen_publicly_without_a_secret(tmp_path):
    """master.py and storage_node.py on 0.0.0.0 without a secret exit 2 and say how; --insecure or a secret starts them."""
    secret_file = write_secret(tmp_path / "secret")
    for program, data_flag in (("master.py", "--data-dir"), ("storage_node.py", "--data-dir")):
        base = [sys.executable, os.path.join(ROOT, program), "--host", "0.0.0.0", "--port", "0",
                data_flag, str(tmp_path / program)]
        refused = forkserver.run(base, capture_output=True, timeout=30, text=True)
        assert refused.returncode == 2, refused
        assert "--secret-file" in refused.stderr and "--insecure" in refused.stderr
        for extra in (["--insecure"], ["--secret-file", secret_file]):
            proc = forkserver.Popen(base + extra, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            try:
                line = proc.stdout.readline().decode()
                if line.startswith("status page on "):  # the master's page comes up first
                    line = proc.stdout.readline().decode()
                assert line.startswith("listening on "), (program, extra, line)
            finally:
                proc.kill()
                proc.wait()


def test_tls_cluster_round_trip(make_secure_cluster, certificate, tmp_path):
    """With tls_cert/tls_key/tls_ca and a secret in config, nodes register over TLS and a file round-trips."""
    cert, key = certificate
    secret_file = write_secret(tmp_path / "secret")
    ini = tmp_path / "tls.ini"
    ini.write_text(f"[security]\nsecret_file = {secret_file}\ntls_cert = {cert}\ntls_key = {key}\ntls_ca = {cert}\n")
    cluster = make_secure_cluster(config_path=str(ini), client_args=["--config", str(ini)],
                                  client_security=security.from_config(config_module.load_config(str(ini))))
    local = tmp_path / "in.bin"
    local.write_bytes(os.urandom(300_000))
    assert cluster.cli("upload", str(local), "tls/f").returncode == 0
    out = tmp_path / "out.bin"
    assert cluster.cli("download", "tls/f", str(out)).returncode == 0
    assert out.read_bytes() == local.read_bytes()
    # A direct read through TLS: the node cannot sendfile, so it reads the record and sends it, payload CRC included.
    c = cluster.client()
    try:
        plan = c.conn.request(protocol.Download(name="tls/f", direct=True), protocol.ReadPlan)
        c.conn.request(protocol.ReadEnd(read_ids=[plan.read_id]), protocol.ReadEnded)
    finally:
        c.close()
    first, count, node_ids, blob = plan.runs[0]
    host, _, port = plan.nodes[node_ids[0]].rpartition(":")
    with transport.Connection((host, int(port)), "client", 10.0, cluster.client_security) as conn:
        reply = conn.request(protocol.GetChunks(blob=blob, first=first, count=count, cap=plan.caps[blob]),
                             protocol.ChunkData)
    payload = bytes(reply.body[count * protocol.CRC_BYTES:])
    assert payload == local.read_bytes()[:len(payload)] and reply.crc32 == zlib.crc32(payload)
    plain = forkserver.run([sys.executable, os.path.join(ROOT, "client.py"), "--master", cluster.master_address,
                            "--secret-file", secret_file, "--quiet", "list"], capture_output=True, timeout=30)
    assert plain.returncode != 0  # a client without TLS is not served


# --- fuzzing ---------------------------------------------------------------------------------------
def vm_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def fuzz_payloads(rng: random.Random, role: str) -> list[bytes]:
    """Valid request frames for ``role``'s server, to truncate and mutate."""
    name = rng.choice(["a", "../../x", "dir/ü", "x" * 300])
    if role == "master":
        frames = [frame({"op": "LIST", "prefix": ""}), frame({"op": "STATUS"}),
                  frame({"op": "DOWNLOAD", "name": name, "offset": rng.randint(-5, 50), "length": -1}),
                  frame({"op": "UPLOAD_BEGIN", "name": "fuzz/" + name, "size": 3})
                  + frame({"op": "DATA", "body": 3}, b"abc") + frame({"op": "UPLOAD_END", "sha256": "00" * 32}),
                  frame({"op": "DELETE", "name": "fuzz/" + name}),
                  frame({"op": "DATA", "body": protocol.MAX_BODY_BYTES}, b"promised 16 MiB, sent a few bytes")]
    else:
        frames = [frame({"op": "NODE_STAT"}), frame({"op": "FLUSH"}),
                  frame({"op": "GET_CHUNKS", "blob": "b" * 32, "first": rng.randint(-2, 5), "count": rng.randint(-1, 4)}),
                  frame({"op": "PUT_CHUNKS", "blob": "f" * 32, "first": 0, "count": 1, "chunk_size": 1024,
                         "body": 7}, b"\x00" * 7),
                  frame({"op": "DELETE_BLOBS", "blobs": ["f" * 32, 5, None]}),
                  frame({"op": "PUT_CHUNKS", "blob": "e" * 32, "first": 0, "count": 1, "chunk_size": 1024,
                         "body": protocol.MAX_BODY_BYTES}, b"promised 16 MiB, sent a few bytes")]
    return frames


def mutate(rng: random.Random, data: bytes) -> bytes:
    data = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        kind = rng.randrange(5)
        pos = rng.randrange(len(data) + 1)
        if kind == 0 and data:
            data[min(pos, len(data) - 1)] = rng.randrange(256)
        elif kind == 1:
            data[pos:pos] = os.urandom(rng.randint(1, 16))
        elif kind == 2:
            del data[pos:pos + rng.randint(1, 16)]
        elif kind == 3:  # a hostile length prefix
            data[0:4] = rng.choice([0, 1, 2 ** 31, 2 ** 32 - 1, protocol.MAX_HEADER_BYTES + 1]).to_bytes(4, "big")
        else:  # hostile JSON values
            value = rng.choice(['[' * 5000, '1e999', '"\\ud800"', 'null', '-1', '99999999999999999999', '{}'])
            data += frame({"op": rng.choice(["DATA", "LIST", "GET_CHUNKS", "HELLO"]), "body": 0})[:-1] + value.encode()
    return bytes(data)


def send_and_drain(address, payload: bytes) -> None:
    try:
        with socket.create_connection(address, timeout=5) as sock:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(65536):
                pass
    except OSError:
        pass  # the server may reset a connection it refuses: that is fine


FUZZ_CONNECTIONS = 4000


def test_fuzzed_frames_leave_master_and_node_up_and_bounded(make_cluster, tmp_path):
    """Thousands of truncated and mutated frames: both servers stay up, serve correctly and keep memory bounded."""
    seed = int(os.environ.get("FUZZ_SEED", "20261121"))
    print(f"fuzz seed {seed}")
    rng = random.Random(seed)
    cluster = make_cluster(nodes=2)
    targets = {
        "master": (cluster.master, cluster.master_address),
        "node": (cluster.nodes[0], cluster.nodes[0].address),
    }
    before = {role: vm_rss_kib(server.pid) for role, (server, _) in targets.items()}
    sent = 0
    # Budget of both servers' fuzz: the exhaustive truncations below, then random frames
    # until FUZZ_CONNECTIONS in all or 5 s, whichever comes first (a loaded 2-core
    # machine gets through about 4,000 in 5 s; an idle one in under 4).
    deadline = time.monotonic() + 5.0
    for role, (server, text) in targets.items():
        host, _, port = text.rpartition(":")
        address = (host, int(port))
        hello = protocol.encode(protocol.Hello(version=1, role="client" if role == "master" else "master"))
        valid = [hello + f for f in fuzz_payloads(rng, role)]
        # Truncation at every byte offset of every valid exchange.
        for data in valid:
            for cut in range(len(data)):
                send_and_drain(address, data[:cut])
                sent += 1
        # Random and mutated frames, pipelined several per connection, until the time share is spent.
        share = 2 if role == "master" else 1
        role_deadline = time.monotonic() + (deadline - time.monotonic()) / share
        role_limit = sent + max(0, FUZZ_CONNECTIONS - sent) // share
        while time.monotonic() < role_deadline and sent < role_limit:
            pick = rng.random()
            if pick < 0.1:
                payload = os.urandom(rng.randint(1, 600))
            elif pick < 0.2:
                payload = mutate(rng, rng.choice(valid))
            else:
                payload = hello + b"".join(mutate(rng, rng.choice(fuzz_payloads(rng, role))[0:])
                                           if rng.random() < 0.5 else rng.choice(fuzz_payloads(rng, role))
                                           for _ in range(rng.randint(1, 4)))
            send_and_drain(address, payload)
            sent += 1
        assert server.running(), f"{role} died (seed {seed})"
    print(f"{sent} fuzz connections")
    assert sent >= 2000
    after = {role: vm_rss_kib(server.pid) for role, (server, _) in targets.items()}
    print(f"VmRSS KiB before {before}, after {after}")
    for role in targets:
        assert after[role] < before[role] + 64 * 1024, f"{role} RSS {before[role]} -> {after[role]} KiB (seed {seed})"
    assert "Traceback" not in read_logs(cluster), "a fuzzed frame raised an unhandled exception (see the logs)"
    # Still correct afterwards.
    cluster.wait_nodes_alive(2)
    local = tmp_path / "after.bin"
    local.write_bytes(os.urandom(20_000))
    assert cluster.cli("upload", str(local), "after-fuzz").returncode == 0
    out = tmp_path / "after.out"
    assert cluster.cli("download", "after-fuzz", str(out)).returncode == 0
    assert out.read_bytes() == local.read_bytes()
    with transport.Connection(config_module.parse_address(cluster.nodes[0].address), "master", 5.0) as conn:
        assert conn.request(protocol.NodeStat(), protocol.NodeStatReply).node_id


# --- names are keys, never paths ---------------------------------------------------------------------
def run_client(cluster, *args, cwd) -> CliResult:
    argv = [sys.executable, os.path.join(ROOT, "client.py"), "--master", cluster.master_address, "--quiet", *args]
    return CliResult(forkserver.run(argv, capture_output=True, timeout=60, cwd=cwd))


def files_under(root) -> set[str]:
    return {os.path.relpath(os.path.join(d, n), root) for d, _, names in os.walk(root) for n in names}


def test_dotdot_names_are_refused_and_old_ones_restore_inside_the_target(make_cluster, tmp_path):
    """'../../x' is refused at upload; one stored earlier lands in the cwd or target, never above; no silent overwrite."""
    legacy = ("../../x", "t/../../evil", "/abs/y", "..")
    cluster = make_cluster(nodes=2, unchecked_names=legacy)
    work = tmp_path / "a" / "b" / "work"
    work.mkdir(parents=True)
    outside_before = files_under(tmp_path)
    source = tmp_path / "src.bin"
    source.write_bytes(b"payload of a dotted name")
    for name in legacy:
        result = run_client(cluster, "upload", str(source), name, cwd=work)
        assert result.returncode == client_module.EXIT_INVALID_NAME, (name, result)
    listed = run_client(cluster, "list", cwd=work)
    assert set(legacy) <= set(listed.stdout.decode().split()), listed.stdout
    new_files = files_under(tmp_path) - outside_before - {"src.bin"}
    assert all(f.startswith(os.path.relpath(cluster.data_dir, tmp_path)) for f in new_files), new_files

    assert run_client(cluster, "download", "../../x", cwd=work).returncode == 0
    assert (work / "x").read_bytes() == b""  # the names were stored as empty files
    (work / "x").write_bytes(b"mine")
    kept = run_client(cluster, "download", "../../x", cwd=work)
    assert kept.returncode == client_module.EXIT_LOCAL_IO and "--force" in kept.stderr
    assert (work / "x").read_bytes() == b"mine"
    assert run_client(cluster, "download", "--force", "../../x", cwd=work).returncode == 0
    assert (work / "x").read_bytes() == b""
    assert run_client(cluster, "download", "/abs/y", cwd=work).returncode == 0 and (work / "y").exists()

    refused = run_client(cluster, "download", "..", cwd=work)
    assert refused.returncode == client_module.EXIT_LOCAL_IO, refused
    tree = run_client(cluster, "download", "t/", "restore", cwd=work)
    assert tree.returncode == client_module.EXIT_PARTIAL and "'..' path component" in tree.stderr, tree
    assert run_client(cluster, "download", "../../", cwd=work).returncode in (0, client_module.EXIT_PARTIAL)
    cluster_dir = os.path.relpath(cluster.data_dir, tmp_path) + os.sep
    stray = {f for f in files_under(tmp_path) - outside_before - {"src.bin"}
             if not f.startswith(cluster_dir) and not f.startswith(os.path.join("a", "b", "work") + os.sep)}
    assert not stray, f"files written outside the target: {stray}"
    assert not (tmp_path / "a" / "x").exists() and not (tmp_path / "x").exists()
    assert not (tmp_path / "a" / "evil").exists() and not (tmp_path / "evil").exists()


def test_data_dirs_and_logs_are_private(make_cluster):
    """Master and node data dirs and the cluster's logs are 0700; node.json, metadata and logs 0600."""
    cluster = make_cluster(nodes=1)
    assert cluster.cli("status").returncode == 0
    master_dir = os.path.join(cluster.data_dir, "master")
    node_dir = cluster.node_data_dir(0)
    for directory in (cluster.data_dir, master_dir, node_dir, cluster.log_dir):
        assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700, directory
    files = [os.path.join(node_dir, "node.json"),
             *(os.path.join(cluster.log_dir, n) for n in os.listdir(cluster.log_dir)),
             *(os.path.join(master_dir, n) for n in os.listdir(master_dir))]
    for path in files:
        if os.path.isfile(path):
            assert stat.S_IMODE(os.stat(path).st_mode) & 0o077 == 0, path
