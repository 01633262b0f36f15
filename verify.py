"""What `client.py verify` checks, as pure functions: subsets of files and tree comparisons.

Reading the stored data is the client's download path (the master checks
every chunk's CRC and fails over between replicas; the client checks the
file's SHA-256), so this module only decides *which* files to read and
compares a local tree with a stored listing.  No sockets, no clock.

Subsets, as restic's ``check --read-data-subset``:

* ``n/t`` reads group ``n`` of ``t``: the files whose name hashes to
  ``n - 1`` modulo ``t``.  Fixed by the names alone, so running ``1/t`` up
  to ``t/t`` (say one a day) reads every file exactly once.
* ``P%`` reads each file with probability ``P`` percent, decided by hashing
  the name with a seed.  The seed is printed, and ``--seed`` repeats a run.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

_GROUP = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")
_PERCENT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")


@dataclass(frozen=True)
class Subset:
    """Group ``n`` of ``t`` (``percent`` None), or ``percent`` of the files chosen with ``seed``."""

    n: int = 1
    t: int = 1
    percent: float | None = None
    seed: int = 0

    def describe(self) -> str:
        if self.percent is not None:
            return f"{self.percent:g}% (seed {self.seed})"
        return f"{self.n}/{self.t}"

    def selects(self, name: str) -> bool:
        if self.percent is not None:
            return _hash(f"{self.seed}:{name}") < self.percent / 100 * 2 ** 64
        return _hash(name) % self.t == self.n - 1


def _hash(text: str) -> int:
    """64 bits of SHA-256: the same on every machine and Python (unlike hash())."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8", "surrogateescape")).digest()[:8], "big")


def parse_subset(text: str, seed: int) -> Subset:
    """``n/t`` (1 <= n <= t) or ``P%`` (0 < P <= 100) as a Subset; ValueError names what is wrong."""
    group = _GROUP.match(text)
    if group:
        n, t = int(group[1]), int(group[2])
        if not 1 <= n <= t:
            raise ValueError(f"{text!r}: n/t needs 1 <= n <= t")
        return Subset(n=n, t=t)
    percent = _PERCENT.match(text)
    if percent:
        p = float(percent[1])
        if not 0 < p <= 100:
            raise ValueError(f"{text!r}: the percentage must be above 0 and at most 100")
        return Subset(percent=p, seed=seed)
    raise ValueError(f"{text!r} is neither n/t (e.g. 1/10) nor a percentage (e.g. 5%)")


# Kinds of difference compare_tree reports, in the order they are listed.
MISSING_LOCALLY = "missing locally"
MISSING_REMOTELY = "missing remotely"
DIFFERENT = "different"


def compare_tree(local: dict, stored: dict, local_sha256) -> list[tuple[str, str, str]]:
    """Differences between a local tree and a stored one, sorted by name then kind.

    ``local``: relative name -> (kind, size); ``stored``: relative name ->
    (kind, size, sha256).  ``local_sha256(name)`` hashes a local file; it is
    called only when kind and size agree, so an unchanged tree costs one
    read of each file and a changed size costs none.  Returns (difference,
    name, detail) triples.
    """
    found = []
    for name in sorted(set(local) | set(stored)):
        if name not in local:
            found.append((MISSING_LOCALLY, name, ""))
        elif name not in stored:
            found.append((MISSING_REMOTELY, name, ""))
        else:
            (kind, size), (stored_kind, stored_size, stored_sha) = local[name], stored[name]
            if kind != stored_kind:
                found.append((DIFFERENT, name, f"a {kind} here, a {stored_kind} stored"))
            elif size != stored_size:
                found.append((DIFFERENT, name, f"{size} bytes here, {stored_size} stored"))
            elif local_sha256(name) != stored_sha:
                found.append((DIFFERENT, name, "same size, different SHA-256"))
    return found
