"""MasterLink (master_link.py): finding the leader, following NOT_LEADER, failing with NO_LEADER.

The logic runs against a fake connector and clock (no sockets, no waiting);
one test drives the real client CLI against a fake follower socket that
answers every HELLO with NOT_LEADER and a real single-master cluster.
"""

from __future__ import annotations

import io
import socket
import threading
import time

import pytest

from conftest import running_cluster, write_local

import client as client_module
import config as config_module
import master_link
import protocol

A, B, C = ("127.0.0.1", 1), ("127.0.0.1", 2), ("127.0.0.1", 3)


class FakeClock:
    def __init__(self):
        self.now = 0.0
        self.slept = []

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.slept.append(seconds)
        self.now += seconds


def make_link(answers, addresses=(A, B, C), failover_timeout_s=2.0):
    """A link whose connector answers from ``answers``: address -> exception to raise or value to return."""
    clock = FakeClock()
    tried = []

    def connector(address, role, timeout_s, security, **kwargs):
        tried.append(address)
        answer = answers[address]
        if callable(answer):
            answer = answer()
        if isinstance(answer, BaseException):
            raise answer
        return answer

    link = master_link.MasterLink(list(addresses), "client", 5.0, failover_timeout_s=failover_timeout_s,
                                  connector=connector, clock=clock, sleep=clock.sleep)
    return link, tried, clock


def refused_by_followers(link, times: int):
    """An operation that connects through ``link`` and is refused NOT_LEADER with a hint naming a dead
    master ``times`` times in all, then returns the connection it got."""
    refusals = iter([protocol.NotLeader("follower", leader="127.0.0.1:1")] * times)

    def op():
        conn = link.connect()
        refusal = next(refusals, None)
        if refusal is not None:
            raise refusal
        return conn
    return op


def test_follows_the_leader_hint():
    link, tried, _ = make_link({A: protocol.NotLeader("follower", leader="127.0.0.1:3"),
                                B: AssertionError("B must not be tried"), C: "conn-C"})
    assert link.connect() == "conn-C"
    assert tried == [A, C] and link.current == C


def test_skips_unreachable_masters_in_order():
    link, tried, clock = make_link({A: protocol.Unavailable("refused"), B: "conn-B", C: "conn-C"})
    assert link.connect() == "conn-B"
    assert tried == [A, B] and clock.slept == []
    # The next connection starts at the master that led last time.
    assert link.connect() == "conn-B" and tried[-1] == B


def test_no_leader_within_failover_timeout():
    link, tried, clock = make_link({A: protocol.Unavailable("down"), B: protocol.Unavailable("down"),
                                    C: protocol.NotLeader("no leader yet")}, failover_timeout_s=2.0)
    with pytest.raises(protocol.NoLeader) as info:
        link.connect()
    assert 2.0 <= clock.now <= 2.0 + master_link.BACKOFF_MAX_S
    assert "127.0.0.1:1,127.0.0.1:2,127.0.0.1:3" in str(info.value) and "within 2 s" in str(info.value)
    assert set(tried) == {A, B, C} and len(tried) > 6  # kept trying during the whole time


def test_one_master_fails_at_once_as_before():
    link, tried, clock = make_link({A: protocol.Unavailable("cannot reach 127.0.0.1:1")}, addresses=(A,))
    with pytest.raises(protocol.Unavailable, match="cannot reach"):
        link.connect()
    assert tried == [A] and clock.now == 0.0
    calls = []

    def op():
        calls.append(1)
        raise protocol.Timeout("slow")
    with pytest.raises(protocol.Timeout, match="^slow$"):
        link.run(op, safe=True)
    assert calls == [1]


def test_run_resends_safe_operations_and_not_unsafe_ones():
    link, _, _ = make_link({A: "conn-A", B: "conn-B", C: "conn-C"})
    seen = []

    def op():
        conn = link.connect()
        seen.append(conn)
        if conn == "conn-A":
            raise protocol.Unavailable("lost connection to 127.0.0.1:1")
        return conn
    retries = []
    assert link.run(op, safe=True, on_retry=lambda: retries.append(1)) == "conn-B"
    assert seen == ["conn-A", "conn-B"] and retries == [1]

    link, _, _ = make_link({A: "conn-A", B: "conn-B", C: "conn-C"})
    with pytest.raises(protocol.Unavailable, match="outcome is unknown"):
        link.run(lambda: op() if link.connect() == "conn-A" else None, safe=False)


def test_run_always_resends_after_not_leader():
    """NOT_LEADER means nothing was done, so even an append goes again."""
    link, _, clock = make_link({A: "conn-A", B: "conn-B", C: "conn-C"})
    answers = iter([protocol.NotLeader("stepped down"), protocol.NotLeader("lost it", leader="127.0.0.1:3")])

    def op():
        conn = link.connect()
        answer = next(answers, None)
        if answer is not None:
            raise answer
        return conn
    assert link.run(op, safe=False) == "conn-C"
    assert clock.slept == [master_link.BACKOFF_FIRST_S]  # no hint: waited for the election once


def test_a_hint_naming_a_dead_master_is_no_hint():
    """Followers name the dead leader until their election timeout ends: the link must back off between
    rounds instead of bouncing between the dead master and a follower with no pause (a busy loop that ate
    the CPU the election needed, and made failover slow)."""
    link, tried, clock = make_link({A: protocol.Unavailable("refused"), B: "conn-B", C: "conn-C"},
                                   failover_timeout_s=5.0)
    op = refused_by_followers(link, 6)
    assert link.run(op, safe=True) in ("conn-B", "conn-C")
    assert len(clock.slept) == 6, clock.slept  # one back-off per stale hint
    assert tried.count(A) <= 4  # the dead master is retried in turn (every third try), no more


def test_a_master_that_times_out_is_tried_last_and_handshakes_are_short_at_first():
    """A paused master accepts connections and never answers HELLO: with several masters the first
    handshake is bounded by GROUP_HANDSHAKE_FIRST_S, not the io timeout, and doubles each round."""
    bounds = []
    clock = FakeClock()

    def connector(address, role, timeout_s, security, handshake_timeout_s=None, **kwargs):
        bounds.append((address, handshake_timeout_s))
        if address == A or clock.now < 1.0:
            raise protocol.Timeout("answered nothing")
        return f"conn-{address[1]}"
    link = master_link.MasterLink([A, B, C], "client", 10.0, handshake_timeout_s=10.0, connector=connector,
                                  clock=clock, sleep=clock.sleep)
    assert link.connect() == "conn-2"
    first = [t for _, t in bounds[:3]]
    assert first == [master_link.GROUP_HANDSHAKE_FIRST_S] * 3
    assert max(t for _, t in bounds) > master_link.GROUP_HANDSHAKE_FIRST_S
    # Back to the short bound once a master answered; a request timing out moves the link away from it.
    link.mark_down(B)
    bounds.clear()
    assert link.connect() == "conn-3" and bounds == [(C, master_link.GROUP_HANDSHAKE_FIRST_S)]
    # One master: its handshake bound is the caller's, as before.
    single = master_link.MasterLink([A], "client", 10.0, handshake_timeout_s=7.0, connector=connector)
    with pytest.raises(protocol.Timeout):
        single.connect()
    assert bounds[-1] == (A, 7.0)


def test_run_gives_up_with_no_leader():
    link, _, clock = make_link({A: "conn-A", B: "conn-B", C: "conn-C"}, failover_timeout_s=1.0)

    def op():
        link.connect()
        raise protocol.NotLeader("no leader")
    with pytest.raises(protocol.NoLeader):
        link.run(op, safe=True)
    assert 1.0 <= clock.now <= 1.0 + 2 * master_link.BACKOFF_MAX_S


def test_no_leader_after_a_cut_off_attempt_says_it_may_take_effect():
    """A write lost midway may still commit (the old leader had logged it): NO_LEADER must say so."""
    state = {"up": True}
    link, _, _ = make_link({a: (lambda: "conn" if state["up"] else protocol.NotLeader("no leader"))
                            for a in (A, B, C)}, failover_timeout_s=1.0)

    def op():
        link.connect()
        state["up"] = False  # the leader dies with the request in flight; nobody leads after it
        raise protocol.Unavailable("lost connection to 127.0.0.1:1")
    with pytest.raises(protocol.NoLeader, match="may yet take effect"):
        link.run(op, safe=True)


def test_addresses_and_precedence(tmp_path):
    assert config_module.parse_addresses("h:1, h:2,h:1") == [("h", 1), ("h", 2)]
    with pytest.raises(ValueError, match="empty entry"):
        config_module.parse_addresses("h:1,,h:2")
    ini = tmp_path / "c.ini"
    ini.write_text("[cluster]\nmasters = a:1,b:2\n[client]\nmaster = c:3\n[timing]\nfailover_timeout_s = 4\n")
    config = config_module.load_config(str(ini))
    assert config_module.master_addresses(config, "client_master") == [("a", 1), ("b", 2)]
    assert config.failover_timeout_s == 4.0
    assert config_module.master_addresses(config_module.load_config(str(ini), masters="d:4"),
                                          "client_master") == [("d", 4)]
    assert config_module.master_addresses(config_module.load_config(None), "node_master") == [("127.0.0.1", 7700)]


def test_not_leader_round_trips_with_its_hint():
    frame = protocol.error_message(protocol.NotLeader("follower", leader="127.0.0.1:9"))
    decoded = protocol.read_message(io.BytesIO(protocol.encode(frame)))
    with pytest.raises(protocol.NotLeader) as info:
        protocol.expect(decoded, protocol.StatusReply)
    assert info.value.leader == "127.0.0.1:9"
    # Other errors keep their old frames (no "leader" key).
    assert b"leader" not in protocol.encode(protocol.error_message(protocol.FileNotFound("x")))


class FakeFollower:
    """A socket that answers every HELLO with ERROR NOT_LEADER naming ``leader``."""

    def __init__(self, leader: str):
        self.leader = leader
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = "127.0.0.1:%d" % self.sock.getsockname()[1]
        self.hellos = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn, conn.makefile("rb") as rfile, conn.makefile("wb") as wfile:
                try:
                    protocol.read_message(rfile)
                    self.hellos += 1
                    protocol.write_message(wfile, protocol.Error(code="NOT_LEADER", message="a follower",
                                                                 leader=self.leader))
                except (OSError, protocol.BackupError):
                    pass

    def close(self):
        self.sock.close()


def test_cli_follows_not_leader_and_exits_no_leader(tmp_path):
    """The client CLI: redirected from a follower to the real master; NO_LEADER (exit 18) in time."""
    with running_cluster(tmp_path / "cluster", nodes=2) as cluster:
        follower = FakeFollower(cluster.master_address)
        closed = socket.create_server(("127.0.0.1", 0))
        dead = "127.0.0.1:%d" % closed.getsockname()[1]
        closed.close()
        try:
            local = write_local(tmp_path, "f", b"hello leader")
            result = cluster.cli("upload", local, "f", master=f"{dead},{follower.address}")
            assert result.returncode == 0, result
            assert follower.hellos >= 1
            assert cluster.cli("cat", "f").stdout == b"hello leader"
            ini = tmp_path / "short.ini"
            ini.write_text("[timing]\nfailover_timeout_s = 0.5\n")
            lone = FakeFollower("")  # knows no leader
            started = time.monotonic()
            result = cluster.cli("--config", str(ini), "list", master=f"{dead},{lone.address}")
            elapsed = time.monotonic() - started
            lone.close()
            assert result.returncode == client_module.EXIT_NO_LEADER, result
            assert "NO_LEADER" in result.stderr and elapsed < 5, (result, elapsed)
        finally:
            follower.close()


def test_status_merges_each_masters_own_word_with_the_leaders_view():
    """`status` asks every master (MASTER_STATUS, followers answer it): its own role, term, commit and
    applied index, beside what the leader knows (match, last contact); a silent one is unreachable."""
    own = {A: {"address": "127.0.0.1:1", "role": "leader", "term": 5, "commit": 40, "applied": 40,
               "leader": "127.0.0.1:1", "last_contact_s": 0.0},
           C: {"address": "127.0.0.1:3", "role": "follower", "term": 5, "commit": 38, "applied": 37,
               "leader": "127.0.0.1:1", "last_contact_s": 0.1}}

    class Conn:
        def __init__(self, address):
            self.address = address

        def request(self, msg, reply_cls):
            assert isinstance(msg, protocol.MasterStatus)
            return reply_cls(master=own[self.address])

        def close(self):
            pass

    def connector(address, role, timeout_s, security, **kwargs):
        if address == B:
            raise protocol.Timeout("answered nothing")
        return Conn(address)
    c = client_module.Client([A, B, C], timeout_s=5.0, frame_bytes=1024, show_progress=False)
    c.link._connector = connector
    leader_view = [{"address": "127.0.0.1:1", "role": "leader", "term": 5, "commit": 40, "applied": 40,
                    "leader": "127.0.0.1:1", "last_contact_s": 0.0},
                   {"address": "127.0.0.1:2", "role": "follower", "term": 5, "match": 12, "last_contact_s": 30.5},
                   {"address": "127.0.0.1:3", "role": "follower", "term": 5, "match": 40, "last_contact_s": 0.05}]
    rows = {r["address"]: r for r in c.masters(leader_view)}
    assert rows["127.0.0.1:2"]["role"] == "unreachable" and "answered nothing" in rows["127.0.0.1:2"]["error"]
    assert rows["127.0.0.1:2"]["match"] == 12 and rows["127.0.0.1:2"]["last_contact_s"] == 30.5
    assert rows["127.0.0.1:3"] == {"address": "127.0.0.1:3", "role": "follower", "term": 5, "commit": 38,
                                   "applied": 37, "leader": "127.0.0.1:1", "match": 40, "last_contact_s": 0.05}
    assert rows["127.0.0.1:1"]["role"] == "leader" and list(rows) == ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]


def test_health_follows_the_leader_like_every_other_request():
    """`health` (and so `status`, which starts with it) went straight to the first master: with a
    follower first it failed NOT_LEADER instead of following the hint to the leader."""
    class Conn:
        broken = False

        def __init__(self, address):
            self.address = address

        def request(self, msg, reply_cls):
            if self.address == A:
                raise protocol.NotLeader("a follower", leader="127.0.0.1:3")
            return reply_cls(status="HEALTH_OK", checks=[])

        def close(self):
            pass

    c = client_module.Client([A, B, C], timeout_s=5.0, frame_bytes=1024, show_progress=False)
    c.link._connector = lambda address, *args, **kwargs: Conn(address)
    assert c.health() == {"status": "HEALTH_OK", "checks": []} and c.master == C


def test_a_failed_master_is_passed_over_for_a_while_then_tried_again():
    """While the others elect, a paused leader would cost a handshake bound on every round: a master
    whose connection failed is passed over for DOWN_MEMORY_S (in turn and in hints), then tried again."""
    link, tried, clock = make_link({A: protocol.Timeout("answered nothing"), B: "conn-B", C: "conn-C"},
                                   failover_timeout_s=30.0)
    op = refused_by_followers(link, 12)
    first_rounds = []

    def count_early():
        if clock.now < master_link.DOWN_MEMORY_S:
            first_rounds.append(tried.count(A))
    link.run(lambda: (count_early(), op())[1], safe=True)
    assert max(first_rounds) == 1  # tried once, then passed over while it is remembered as down
    assert tried.count(A) >= 2  # and tried again once that memory expired
