"""Settings: ``config.ini`` -> one frozen ``Config``; flags override it.

Every program loads the same file so that a cluster's processes agree on
chunk size, replication and timing.  ``load_config`` validates every key and
raises ``ValueError`` naming the key, so a typo fails at start, not at 3 am.
"""

from __future__ import annotations

import argparse
import ast
import configparser
import os
from dataclasses import dataclass, field

import protocol

DEFAULT_CONFIG_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config.ini")


@dataclass(frozen=True)
class Config:
    chunk_size_bytes: int = 1024
    replication: int = 2
    batch_bytes: int = 1024 * 1024
    # [cluster] masters: every master of a replicated group, HOST:PORT,...;
    # empty = the one master of [client] master / [node] master.
    masters: str = ""
    master_host: str = "127.0.0.1"
    master_port: int = 7700
    master_data_dir: str = "data/master"
    checkpoint_every: int = 10000
    lock_wait_s: float = 60.0
    lock_lease_s: float = 30.0
    read_lease_s: float = 600.0
    node_host: str = "127.0.0.1"
    node_port: int = 0
    node_data_dir: str = "data/node"
    node_master: str = "127.0.0.1:7700"
    capacity_bytes: int = 10 * 1024 ** 3
    segment_max_bytes: int = 64 * 1024 * 1024
    reserve_bytes: int = 4 * 1024 * 1024
    heartbeat_interval_s: float = 2.0
    dead_after_s: float = 10.0
    io_timeout_s: float = 10.0
    failover_timeout_s: float = 10.0
    raft_heartbeat_ms: int = 150
    raft_election_ms: int = 1000
    raft_snapshot_every: int = 10000
    raft_snapshot_log_mb: int = 64
    raft_snapshot_trailing: int = 1000
    raft_snapshot_piece_kb: int = 1024
    raft_dial: str = ""  # "ID=HOST:PORT,...": where to connect to reach a peer master (parse_dial)
    safe_mode_s: float = 15.0
    repair_rate_mb_s: float = 50.0
    scrub_rate_mb_s: float = 4.0
    compact_dead_fraction: float = 0.5
    compact_interval_s: float = 30.0
    inventory_interval_s: float = 600.0
    orphan_grace_s: float = 7 * 24 * 3600.0
    orphan_brake_fraction: float = 0.1
    meta_backup_interval_s: float = 300.0
    client_master: str = "127.0.0.1:7700"
    # [security]: see security.py and docs/SECURITY.md.  repr=False: a
    # Config may be logged, the secret must never be.
    secret: str = field(default="", repr=False)
    secret_file: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""
    max_connections: int = 256
    keep_versions: int = 10
    trash_days: float = 7.0
    # [http]: the master's status page and metrics (web_status.py).
    http_host: str = ""  # empty = the master's host
    http_port: int = 7780  # 0 = off, HTTP_ANY_PORT = any free port
    http_token: str = field(default="", repr=False)

    @property
    def chunks_per_batch(self) -> int:
        return max(1, self.batch_bytes // self.chunk_size_bytes)


# `--http-port any` / `[http] port = any`: bind any free port (0 means off).
HTTP_ANY_PORT = -1


def http_port(text: str) -> int:
    """A status page port: 1..65535, 0 (off) or 'any' (any free port, printed at start)."""
    if text.strip().lower() == "any":
        return HTTP_ANY_PORT
    port = int(text)
    if not 0 <= port <= 65535:
        raise ValueError(f"{text!r} is not a port")
    return port


# (section, key in the file, Config field, parser)
_KEYS = [
    ("cluster", "chunk_size_bytes", "chunk_size_bytes", int),
    ("cluster", "replication", "replication", int),
    ("cluster", "batch_bytes", "batch_bytes", int),
    ("cluster", "masters", "masters", str),
    ("master", "host", "master_host", str),
    ("master", "port", "master_port", int),
    ("master", "data_dir", "master_data_dir", str),
    ("master", "checkpoint_every", "checkpoint_every", int),
    ("master", "lock_wait_s", "lock_wait_s", float),
    ("master", "lock_lease_s", "lock_lease_s", float),
    ("master", "read_lease_s", "read_lease_s", float),
    ("master", "meta_backup_interval_s", "meta_backup_interval_s", float),
    ("node", "host", "node_host", str),
    ("node", "port", "node_port", int),
    ("node", "data_dir", "node_data_dir", str),
    ("node", "master", "node_master", str),
    ("node", "capacity_bytes", "capacity_bytes", int),
    ("node", "segment_max_bytes", "segment_max_bytes", int),
    ("node", "reserve_bytes", "reserve_bytes", int),
    ("timing", "heartbeat_interval_s", "heartbeat_interval_s", float),
    ("timing", "dead_after_s", "dead_after_s", float),
    ("timing", "io_timeout_s", "io_timeout_s", float),
    ("timing", "failover_timeout_s", "failover_timeout_s", float),
    ("raft", "heartbeat_ms", "raft_heartbeat_ms", int),
    ("raft", "election_ms", "raft_election_ms", int),
    ("raft", "snapshot_every", "raft_snapshot_every", int),
    ("raft", "snapshot_log_mb", "raft_snapshot_log_mb", int),
    ("raft", "snapshot_trailing", "raft_snapshot_trailing", int),
    ("raft", "snapshot_piece_kb", "raft_snapshot_piece_kb", int),
    ("raft", "dial", "raft_dial", str),
    ("repair", "safe_mode_s", "safe_mode_s", float),
    ("repair", "repair_rate_mb_s", "repair_rate_mb_s", float),
    ("repair", "scrub_rate_mb_s", "scrub_rate_mb_s", float),
    ("repair", "compact_dead_fraction", "compact_dead_fraction", float),
    ("repair", "compact_interval_s", "compact_interval_s", float),
    ("repair", "inventory_interval_s", "inventory_interval_s", float),
    ("repair", "orphan_grace_s", "orphan_grace_s", float),
    ("repair", "orphan_brake_fraction", "orphan_brake_fraction", float),
    ("client", "master", "client_master", str),
    ("security", "secret", "secret", str),
    ("security", "secret_file", "secret_file", str),
    ("security", "tls_cert", "tls_cert", str),
    ("security", "tls_key", "tls_key", str),
    ("security", "tls_ca", "tls_ca", str),
    ("security", "max_connections", "max_connections", int),
    ("retention", "keep_versions", "keep_versions", int),
    ("retention", "trash_days", "trash_days", float),
    ("http", "host", "http_host", str),
    ("http", "port", "http_port", http_port),
    ("http", "token", "http_token", str),
]


def load_config(path: str | None = None, **overrides) -> Config:
    """Read ``path`` (default: config.ini beside this file), apply overrides.

    Overrides whose value is None are ignored, so argparse results can be
    passed straight in.  Raises ValueError with a one-line message naming the
    file, section and key of the first mistake: an unreadable or malformed
    file, an unknown section or key (a typo must not silently fall back to a
    default), or a value of the wrong type or out of range.
    """
    values = {}
    if path is None:
        path = DEFAULT_CONFIG_PATH
    if os.path.exists(path) or path != DEFAULT_CONFIG_PATH:
        parser = read_ini(path)
    else:
        parser = configparser.ConfigParser(interpolation=None)
    check_known_keys(parser, path)
    for section, key, field_name, kind in _KEYS:
        if parser.has_option(section, key):
            raw = parser.get(section, key)
            try:
                values[field_name] = kind(raw)
            except ValueError:
                raise ValueError(f"{path}: [{section}] {key} = {raw!r} is not a valid {kind.__name__}") from None
    values.update({k: v for k, v in overrides.items() if v is not None})
    config = Config(**values)
    validate(config)
    return config


def read_ini(path: str) -> configparser.ConfigParser:
    """Parse an ini file; any problem is a one-line ValueError naming the file.

    No interpolation: a ``%`` in a value (a secret, a path) is taken as is.
    configparser's own errors span several lines and name internals, so they
    are reworded here.
    """
    parser = configparser.ConfigParser(interpolation=None)
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f)
    except FileNotFoundError:
        raise ValueError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise ValueError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None
    except configparser.MissingSectionHeaderError as exc:
        raise ValueError(f"{path}: line {exc.lineno}: {exc.line.strip()!r} comes before any [section] header") \
            from None
    except configparser.DuplicateSectionError as exc:
        raise ValueError(f"{path}: line {exc.lineno}: section [{exc.section}] appears twice") from None
    except configparser.DuplicateOptionError as exc:
        raise ValueError(f"{path}: line {exc.lineno}: [{exc.section}] {exc.option} is set twice") from None
    except configparser.ParsingError as exc:
        lineno, line = exc.errors[0] if exc.errors else (0, "''")
        try:
            line = ast.literal_eval(line)  # configparser stores the repr of the line
        except (ValueError, SyntaxError):
            pass
        raise ValueError(f"{path}: line {lineno}: cannot parse {str(line).strip()!r} (expected key = value)") \
            from None
    except configparser.Error as exc:
        raise ValueError(f"{path}: {exc.message.splitlines()[0]}") from None
    return parser


def check_known_keys(parser: configparser.ConfigParser, path: str) -> None:
    """Raise ValueError at the first section or key the program does not know.

    Says "did you mean" when a known name is close (``replicaton`` ->
    ``replication``), since a misspelt key would otherwise be ignored and
    its default used without a word.
    """
    known: dict[str, list[str]] = {}
    for section, key, _, _ in _KEYS:
        known.setdefault(section, []).append(key)
    for key in parser.defaults():
        raise ValueError(f"{path}: [{parser.default_section}] {key} is not a known key "
                         f"(keys belong in one of {', '.join(f'[{s}]' for s in known)})")
    for section in parser.sections():
        if section not in known:
            raise ValueError(f"{path}: [{section}] is not a known section{_did_you_mean(section, known, '[', ']')}")
        for key in parser.options(section):
            if key not in known[section]:
                elsewhere = [s for s, keys in known.items() if key in keys]
                hint = (f" (it belongs in [{elsewhere[0]}])" if elsewhere
                        else _did_you_mean(key, known[section]))
                raise ValueError(f"{path}: [{section}] {key} is not a known key{hint}")


def _did_you_mean(word: str, choices, before: str = "", after: str = "") -> str:
    import difflib  # noqa: PLC0415 - only a misspelt key or value needs it, not every start-up
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {before}{close[0]}{after}?)" if close else ""


def validate(config: Config) -> None:
    """Raise ValueError naming the first key whose value makes no sense."""
    if not protocol.MIN_CHUNK_BYTES <= config.chunk_size_bytes <= protocol.MAX_CHUNK_BYTES:
        raise ValueError(f"chunk_size_bytes must be {protocol.MIN_CHUNK_BYTES}..{protocol.MAX_CHUNK_BYTES}")
    if config.replication < 1:
        raise ValueError("replication must be at least 1")
    if config.batch_bytes < config.chunk_size_bytes:
        raise ValueError("batch_bytes must be at least chunk_size_bytes")
    batch_body = config.chunks_per_batch * (config.chunk_size_bytes + protocol.CRC_BYTES)
    if batch_body > protocol.MAX_BODY_BYTES:
        raise ValueError(f"batch_bytes too large: a batch frame would exceed {protocol.MAX_BODY_BYTES} bytes")
    for name in ("heartbeat_interval_s", "dead_after_s", "io_timeout_s", "lock_wait_s", "lock_lease_s",
                 "read_lease_s", "failover_timeout_s"):
        if getattr(config, name) <= 0:
            raise ValueError(f"{name} must be positive")
    for name in ("safe_mode_s", "scrub_rate_mb_s", "orphan_grace_s"):
        if getattr(config, name) < 0:
            raise ValueError(f"{name} must not be negative")
    for name in ("repair_rate_mb_s", "compact_interval_s", "inventory_interval_s", "meta_backup_interval_s"):
        if getattr(config, name) <= 0:
            raise ValueError(f"{name} must be positive")
    if not 0 < config.compact_dead_fraction <= 1:
        raise ValueError("compact_dead_fraction must be in (0, 1]")
    if not 0 < config.orphan_brake_fraction <= 1:
        raise ValueError("orphan_brake_fraction must be in (0, 1]")
    if config.dead_after_s <= config.heartbeat_interval_s:
        raise ValueError("dead_after_s must be larger than heartbeat_interval_s")
    if config.capacity_bytes <= 0:
        raise ValueError("capacity_bytes must be positive")
    if config.reserve_bytes < 0:
        raise ValueError("reserve_bytes must not be negative")
    if config.checkpoint_every < 1:
        raise ValueError("checkpoint_every must be at least 1")
    if config.trash_days < 0:
        raise ValueError("trash_days must not be negative (0 = deletes free space at once)")
    if config.keep_versions < 1:
        raise ValueError("keep_versions must be at least 1 (1 = no older versions)")
    if config.max_connections < 1:
        raise ValueError("max_connections must be at least 1")
    if not HTTP_ANY_PORT <= config.http_port <= 65535:
        raise ValueError("[http] port must be 1..65535, 0 (off) or any")
    for name in ("node_master", "client_master"):
        parse_addresses(getattr(config, name), name)
    if config.masters:
        parse_addresses(config.masters, "masters")
    if not 0 < config.raft_heartbeat_ms < config.raft_election_ms:
        raise ValueError("[raft] needs 0 < heartbeat_ms < election_ms")
    if min(config.raft_snapshot_every, config.raft_snapshot_log_mb, config.raft_snapshot_trailing) < 0:
        raise ValueError("[raft] snapshot_every, snapshot_log_mb and snapshot_trailing must be >= 0")
    if not 1 <= config.raft_snapshot_piece_kb <= 8192:  # a piece travels in one RAFT frame body (16 MiB max)
        raise ValueError("[raft] snapshot_piece_kb must be between 1 and 8192")
    parse_dial(config.raft_dial)


def parse_dial(text: str) -> dict[str, tuple[str, int]]:
    """``[raft] dial`` 'ID=HOST:PORT,...' -> {peer id: address to connect to}; raises ValueError.

    A peer's id is its address in ``[cluster] masters``; this master connects
    there unless dial names another address for it (an address translation,
    a tunnel; the nemesis test puts a TCP proxy per link there).
    """
    dial = {}
    for item in (part.strip() for part in (text or "").split(",")):
        if not item:
            continue
        peer, sep, via = item.partition("=")
        if not sep:
            raise ValueError(f"[raft] dial: {item!r} is not ID=HOST:PORT")
        parse_address(peer.strip(), "[raft] dial")
        dial[peer.strip()] = parse_address(via.strip(), "[raft] dial")
    return dial


def master_addresses(config: Config, own: str) -> list[tuple[str, int]]:
    """The masters a client or node talks to: ``[cluster] masters``, else its own key.

    ``own`` is "client_master" or "node_master" (one address or a comma
    list).  The --master/--masters flags and BACKUP_MASTER override
    ``masters``, so they win over both keys.
    """
    return parse_addresses(config.masters or getattr(config, own), "masters" if config.masters else own)


def parse_address(text: str, what: str = "address") -> tuple[str, int]:
    """'HOST:PORT' -> (host, port); raises ValueError saying what was wrong."""
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{what} {text!r} is not HOST:PORT")
    try:
        port_number = int(port)
    except ValueError:
        raise ValueError(f"{what} {text!r} has a bad port") from None
    if not 0 <= port_number <= 65535:
        raise ValueError(f"{what} {text!r} has a bad port")
    return host.strip("[]"), port_number


def parse_addresses(text: str, what: str = "addresses") -> list[tuple[str, int]]:
    """'HOST:PORT,HOST:PORT' -> [(host, port), ...] in order, without repeats; ValueError if bad or empty."""
    addresses: list[tuple[str, int]] = []
    for part in text.split(","):
        if not part.strip():
            raise ValueError(f"{what} {text!r} has an empty entry (expected HOST:PORT,HOST:PORT,...)")
        address = parse_address(part.strip(), what)
        if address not in addresses:
            addresses.append(address)
    return addresses


def add_common_flags(parser: argparse.ArgumentParser, default_log_level: str = "INFO") -> None:
    """Flags every program shares."""
    parser.add_argument("--config", metavar="PATH", help="config file (default: config.ini beside the program)")
    parser.add_argument("--log-level", default=default_log_level, type=log_level, metavar="LEVEL",
                        help=f"{', '.join(LOG_LEVELS)} (default {default_log_level})")
    parser.add_argument("--secret-file", metavar="PATH",
                        help="file holding the cluster's shared secret (overrides [security] secret)")
    parser.add_argument("--tls-ca", metavar="PATH",
                        help="CA certificate (or the self-signed certificate) that peers' TLS certificates must "
                             "chain to; turns on TLS for connections this program opens (default [security] tls_ca)")


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def log_level(text: str) -> str:
    """argparse type of --log-level: a level name in any case, else a usage error (exit 2)."""
    level = text.upper()
    if level not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a log level; use one of {', '.join(LOG_LEVELS)}")
    return level


def add_server_flags(parser: argparse.ArgumentParser) -> None:
    """Flags of the programs that listen (master, storage node)."""
    parser.add_argument("--insecure", action="store_true",
                        help="allow listening on a non-loopback address without a shared secret (protected mode off)")


def security_overrides(args: argparse.Namespace) -> dict:
    """The load_config overrides given by add_common_flags' security flags."""
    return {"secret_file": getattr(args, "secret_file", None), "tls_ca": getattr(args, "tls_ca", None)}

