"""MasterLink: reach whichever master of the group leads, and follow it when it changes.

Job
---
Clients, storage nodes and the benchmarks talk to "the master".  With a
replicated group (``[cluster] masters = A,B,C``) only the leader serves;
a follower answers every request with ``NOT_LEADER`` (protocol.NotLeader)
carrying the leader's address when it knows one.  This module is the one
place that knows that: it tries the listed masters, follows the hint, backs
off while an election runs, re-runs an operation when that is safe, and
gives up with ``NO_LEADER`` (protocol.NoLeader) after ``failover_timeout_s``
without a leader.

What is safe to re-run
----------------------
* ``NOT_LEADER``: the follower refused the request before doing anything,
  so any operation may go again to the leader.
* A connection that cannot be opened: nothing was sent.
* A connection lost or timed out in the middle of an operation: the
  outcome is unknown (the old leader may have committed it).  The caller
  says whether its operation may be repeated (``run(..., safe=True)``: a
  read, an upload from a file that replaces the name); otherwise the error
  goes up with a message saying the outcome is unknown.

With one address nothing changes: connection errors go up at once, as
before the group existed (a single master never answers NOT_LEADER, and
when it does, its hint is followed like any other).

The connector (``transport.Connection`` by default), clock and sleep are
injected so tests run the logic without sockets or waiting.
"""

from __future__ import annotations

import time

import protocol

# transport (sockets, TLS) and logging are imported when first needed, as in
# cli.py (the client): a client that only prints --help or a usage error never loads them.


def _log(level: str, text: str, *args) -> None:
    import logging  # noqa: PLC0415 - see above
    getattr(logging.getLogger("master_link"), level)(text, *args)


def _connect(*args, **kwargs):
    import transport  # noqa: PLC0415 - see above
    return transport.Connection(*args, **kwargs)


def format_address(address: tuple[str, int]) -> str:
    import transport  # noqa: PLC0415 - see above
    return transport.format_address(address)

# Pause between two rounds over every master while none leads (an election
# takes 1-2 s): doubles from the first to the last value.
BACKOFF_FIRST_S = 0.05
BACKOFF_MAX_S = 0.25
# With several masters, the first handshake with each is bounded by this (then
# doubled on every round without a leader, up to the caller's handshake
# timeout): a SIGSTOPped (paused) master accepts TCP connections in its
# kernel backlog but never answers HELLO, and waiting io_timeout_s (10 s) for
# it would make a paused leader cost far more than an election.  A master
# that is merely slow answers within the doubled bound of a later round.
GROUP_HANDSHAKE_FIRST_S = 1.0
# A master whose connection failed is passed over (in turn and in hints) for
# this long, so a paused one does not cost a handshake bound on every round
# while the others elect; then it is tried again (it may lead by then).
DOWN_MEMORY_S = 2.0


def parse_hint(text: str) -> tuple[str, int] | None:
    """A NOT_LEADER leader hint 'HOST:PORT' -> (host, port); None when absent or malformed."""
    host, sep, port = (text or "").rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
        return None
    return host.strip("[]"), int(port)


class MasterLink:
    """Connections to the leader of a group of masters (or to the one master).

    ``addresses``: the masters, in the order to try them.  ``connect()``
    returns a connection to a master that accepted the handshake (the
    leader, or the one master); ``run(op, safe=...)`` runs ``op()`` and
    re-runs it on a leader change as the module docstring says.  Not
    thread-safe: one link per client session or node loop.
    """

    def __init__(self, addresses, role: str, timeout_s: float, security=None, *,
                 handshake_timeout_s: float | None = None, failover_timeout_s: float = 10.0,
                 expect_server_id: str | None = "master", connector=_connect,
                 clock=time.monotonic, sleep=time.sleep):
        if isinstance(addresses, tuple):
            addresses = [addresses]
        self.addresses: list[tuple[str, int]] = list(addresses)
        if not self.addresses:
            raise ValueError("MasterLink needs at least one master address")
        self.role = role
        self.timeout_s = timeout_s
        self.security = security
        self.handshake_timeout_s = handshake_timeout_s
        self.failover_timeout_s = failover_timeout_s
        self.expect_server_id = expect_server_id
        self._connector = connector
        self._clock = clock
        self._sleep = sleep
        self.current = self.addresses[0]  # the master tried first: the last leader seen
        self._deadline: float | None = None  # run()'s failover deadline, for connect() inside op
        # Masters whose last connection attempt failed (refused, timed out).  A follower names the
        # old leader in NOT_LEADER until its election timeout ends; following that hint to a master
        # just found dead, straight back to the follower, and again, without a pause, is a busy
        # loop that eats the CPU the election needs.  Such a hint counts as none (back off).
        self._down: dict[tuple[str, int], float] = {}  # address -> clock() of its last failure
        # The handshake bound of the next attempt (several masters): see GROUP_HANDSHAKE_FIRST_S.
        self._handshake_s = self._first_handshake_s()

    @property
    def replicated(self) -> bool:
        return len(self.addresses) > 1

    def describe(self) -> str:
        return ",".join(format_address(a) for a in self.addresses)

    def _first_handshake_s(self) -> float | None:
        if not self.replicated:
            return self.handshake_timeout_s
        return min(GROUP_HANDSHAKE_FIRST_S, self.handshake_timeout_s or self.timeout_s)

    def _open(self, address):
        try:
            conn = self._connector(address, self.role, self.timeout_s, self.security,
                                   handshake_timeout_s=self._handshake_s,
                                   expect_server_id=self.expect_server_id)
        except (protocol.Unavailable, protocol.Timeout):
            self._down[address] = self._clock()
            raise
        self._down.pop(address, None)
        self._handshake_s = self._first_handshake_s()
        return conn

    def open_one(self, address, timeout_s: float):
        """A connection to that one master, whatever its role, bounded by ``timeout_s`` (for requests
        every master answers, such as MASTER_STATUS); no failover, no change to the link's state."""
        return self._connector(address, self.role, timeout_s, self.security, handshake_timeout_s=timeout_s,
                               expect_server_id=self.expect_server_id)

    def mark_down(self, address) -> None:
        """``address`` stopped answering (a request timed out): a hint naming it counts as none,
        and the next connection tries the other masters first."""
        self._down[address] = self._clock()
        if address == self.current:
            self._advance()

    def _candidates(self):
        """The current master first, then the others in list order."""
        start = self.addresses.index(self.current) if self.current in self.addresses else 0
        return [self.current] + [a for a in self.addresses[start + 1:] + self.addresses[:start]
                                 if a != self.current]

    def follow(self, exc: protocol.NotLeader) -> bool:
        """Make the leader named by a NOT_LEADER the next master tried (or the next one in the list).

        True when it names a leader worth trying at once; False when it names
        none, or one whose last connection failed (a follower still naming a
        dead or paused leader): the caller backs off before the next round.
        """
        hint = parse_hint(exc.leader)
        if hint is not None and hint != self.current and not self._is_down(hint):
            _log("info", "master %s is not the leader; following it to %s",
                        format_address(self.current), format_address(hint))
            self.current = hint
            return True
        self._advance()
        return False

    def _is_down(self, address) -> bool:
        failed = self._down.get(address)
        return failed is not None and self._clock() - failed < DOWN_MEMORY_S

    def _advance(self) -> None:
        """The next master in list order, passing over those that failed within DOWN_MEMORY_S."""
        candidates = self._candidates()
        others = candidates[1:] or candidates
        self.current = next((a for a in others if not self._is_down(a)), others[0])

    def connect(self, deadline: float | None = None):
        """A handshaken connection to the leader; NoLeader when none is found by ``deadline``.

        One master: its errors go up unchanged (unless it redirects us).
        ``deadline`` (a ``clock`` value) defaults to now + failover_timeout_s.
        """
        if deadline is None:
            deadline = self._deadline if self._deadline is not None else self._clock() + self.failover_timeout_s
        backoff = BACKOFF_FIRST_S
        last: protocol.BackupError | None = None
        while True:
            for _ in range(len(self.addresses) + 1):
                address = self.current
                try:
                    conn = self._open(address)
                except protocol.NotLeader as exc:
                    last = exc
                    if not self.follow(exc):
                        break  # nobody (reachable) leads yet: wait before the next round
                    continue
                except (protocol.Unavailable, protocol.Timeout) as exc:
                    if not self.replicated and self.current in self.addresses:
                        raise
                    last = exc
                    _log("debug", "master %s: %s", format_address(address), exc)
                    if self.current not in self.addresses:
                        # A hinted leader outside our list that is gone: back to the list.
                        self.current = self.addresses[0]
                    else:
                        self._advance()
                    continue
                return conn
            if self._clock() >= deadline:
                raise protocol.NoLeader(f"no leader among masters {self.describe()} within "
                                        f"{self.failover_timeout_s:g} s (last answer: {last})")
            self._sleep(min(backoff, max(0.0, deadline - self._clock())))
            backoff = min(backoff * 2, BACKOFF_MAX_S)
            if self.replicated:  # a slow (not paused) master gets a longer handshake next round
                self._handshake_s = min(self._handshake_s * 2, self.handshake_timeout_s or self.timeout_s)

    def run(self, op, *, safe: bool, on_retry=None):
        """``op()``, re-run on a leader change while that is safe; see the module docstring.

        ``on_retry()`` runs before each re-run (the caller drops its broken
        connection there).  The failover deadline starts at the first
        failure and is lifted by ``progress()``, so a long operation is never
        cut short by it and each leader change gets the full time.
        """
        try:
            return self._run(op, safe, on_retry)
        finally:
            self._deadline = None

    def progress(self) -> None:
        """A leader acknowledged part of the running operation: a later failure gets a full failover time.

        (Not lifted by a mere connection: a master that accepts connections
        and refuses every request must not keep an operation going forever.)
        """
        self._deadline = None

    def _run(self, op, safe: bool, on_retry):
        backoff = BACKOFF_FIRST_S
        cut_off = ""  # an attempt lost midway: it may yet take effect, say so if we give up
        while True:
            try:
                return op()
            except protocol.NoLeader as exc:  # from connect() inside op
                if cut_off:
                    raise protocol.NoLeader(exc.message + cut_off) from None
                raise
            except protocol.NotLeader as exc:
                if not self.follow(exc):
                    self._sleep(backoff)  # an election is running: give it time
                    backoff = min(backoff * 2, BACKOFF_MAX_S)
            except (protocol.Unavailable, protocol.Timeout) as exc:
                if isinstance(exc, protocol.WrongNode) or not self.replicated:
                    raise
                if not safe:
                    raise type(exc)(f"{exc.message}; lost the master during the request, so its outcome "
                                    f"is unknown (check with list or stat before repeating it)") from None
                _log("info", "lost master %s (%s); looking for the leader",
                            format_address(self.current), exc)
                self.mark_down(self.current)
                cut_off = (f"; an attempt was cut off midway ({exc.message}), so it may yet take effect "
                           f"(check with list or stat)")
            if self._deadline is None:
                self._deadline = self._clock() + self.failover_timeout_s
            elif self._clock() >= self._deadline:
                raise protocol.NoLeader(f"no leader among masters {self.describe()} within "
                                        f"{self.failover_timeout_s:g} s{cut_off}")
            if on_retry is not None:
                on_retry()
