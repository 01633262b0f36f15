"""Data-safety review: each test pins down one suspicion the review raised and that proved a defect.

Unit tests on a Master without nodes, or on pure parts, where the
interleaving can be forced deterministically; see the report in each
test's docstring.
"""

from __future__ import annotations

import pytest

import config as config_module
import history
from master import Master
from namespace import Namespace, make_entry, put_record

CHUNK = 1024
BATCH = 4
A, B, C = "node-a", "node-b", "node-c"


def stored(version: str, chunks: int = 4, nodes=(A, B)) -> dict:
    return make_entry(chunks * CHUNK, CHUNK, version[-1] * 64, version, [[0, chunks, list(nodes)]], BATCH)


def put(name: str, entry: dict, i: int, keep: int = 3) -> dict:
    return put_record(name, entry) | {"i": i, "t": float(i), "keep": keep}


@pytest.fixture
def master(tmp_path):
    config = config_module.load_config(None, keep_versions=3, safe_mode_s=0)
    m = Master(config, str(tmp_path / "master"))
    yield m
    m.log.close()


# --- undelete: one delete operation, not one millisecond ------------------------------------------
def test_undelete_brings_back_only_the_newest_delete_when_two_share_a_millisecond():
    """Two deletes of a name stamped with the same time: undelete brings back the second one's entries only."""
    namespace = Namespace()
    namespace.apply(put("f", stored("v1"), 1))
    namespace.apply({"op": "delete", "name": "f", "trash": True, "t": 10.0, "i": 2})
    namespace.apply(put("f", stored("v3"), 3))
    namespace.apply({"op": "delete", "name": "f", "trash": True, "t": 10.0, "i": 4})  # same millisecond
    namespace.apply({"op": "undelete", "name": "f", "i": 5})
    assert [history.version_id(e) for e in namespace.history("f")] == [3], "undelete merged two deletes"
    assert [history.version_id(e) for e in namespace.trash["f"]] == [1]
    namespace.apply({"op": "delete", "name": "f", "trash": True, "t": 11.0, "i": 6})
    namespace.apply({"op": "undelete", "name": "f", "i": 7})  # and the older one after it
    assert [history.version_id(e) for e in namespace.history("f")] == [3]
