"""Benchmark of the backup system against the floor of its own architecture.

``python bench/bench.py [--quick] [--large] [--only SECTIONS] [--json FILE]`` starts a fresh
local cluster (master + 3 nodes on 127.0.0.1, data in a temp dir under
/tmp), runs every workload ``--reps`` times *interleaved with its
baselines*, and prints median/min/max with the ratio to the baseline, so
the result is a ratio that holds on a noisy machine rather than a number
that only holds on this one.

Workloads and their baselines:

1. Upload / download of a random file (256 MiB; 1 GiB with ``--large``),
   MiB/s.  Upload baselines: ``bench/relay.py`` (the same processes and
   durable work with no protocol and no metadata, its master only
   forwarding and its nodes computing the CRCs: the floor) and copying
   the file into two local directories with an fsync of each copy.
   Download baselines: one local copy with fsync (a download to a file),
   and reading the file and hashing it with SHA-256 (a download to stdout
   sent to /dev/null, the floor of any verifying restore; issue 15), with
   the relayed path (``--via-master``) beside it.  Downloads are checked by
   SHA-256 against the original (the client's own check).
2. Small files: a directory of 4 KiB files uploaded with ``client.py
   upload DIR NAME`` and restored with ``client.py download NAME/ DIR``,
   files/s; baseline: the relay sending the same files one by one, each
   fsynced on both nodes and acknowledged.  Restored bytes are compared.
3. Peak memory (VmHWM) of master and nodes during the upload phase (the
   high-water mark is reset through /proc/PID/clear_refs just before it
   when the kernel allows), and of the client (``ru_maxrss`` of the child,
   from wait4: exact, no polling).
4. Metadata: bytes of metadata.json + oplog-*.jsonl in the master's data
   dir per GiB stored, after a checkpoint that the bench takes offline
   (master stopped, ``MetadataLog.checkpoint()``); node VmRSS growth per
   GiB stored on that node.
5. Start-up: ``python client.py --help`` and ``python client.py list``
   (the cluster holding the warm-up file only), spawn to exit, against a
   bare ``python -c pass`` interleaved with them, ms.
6. Namespace scale: a master whose checkpoint holds 100,000 file entries,
   generated directly (metadata_log.atomic_write_json, format of
   namespace.py) next to one holding 100: restart time until it serves
   ``list``, time of a full ``list``, and the commit latency of a real
   1-byte upload, interleaved between the two clusters.

Product client runs are subprocesses (``python client.py ...``), timed
from spawn to exit, so interpreter start-up (~50 ms) is in the product's
time, as it is in the relay client's.  Local copies run in this process.
Every child runs with bytecode caching on, as an installed program does
(into a cache in the temp dir, whatever PYTHONDONTWRITEBYTECODE says), so
no run pays for compiling the product's modules; ``--no-bytecode-cache``
leaves the environment as it is.

Exit status: 0 unless the product failed a correctness check (bytes
restored differ from the original, a listing misses files, a download is
refused as corrupt or lost); a workload that fails or is not implemented
yet is reported as such in its row and the run goes on.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH_DIR)
sys.path.insert(0, ROOT)

import client as client_module  # noqa: E402
import cluster as cluster_module  # noqa: E402
import metadata_log  # noqa: E402
import namespace as namespace_module  # noqa: E402
import protocol  # noqa: E402

EXIT_OK = 0
EXIT_CORRECTNESS = 1
EXIT_USAGE = 2
EXIT_SETUP_FAILED = 3

MiB = 1 << 20
GiB = 1 << 30
PIECE_BYTES = MiB
SMALL_FILE_BYTES = 4096
NODES = 3
# Nodes heartbeat often so they re-register quickly after the bench restarts a master.
NODE_ARGS = ["--heartbeat-interval", "0.5"]
CLIENT_TIMEOUT_S = 600.0
# Client exit statuses that mean the product lost or corrupted data, not just failed.
CORRUPTION_EXITS = {client_module.EXIT_CHECKSUM, client_module.EXIT_DATA_LOST}
TINY_UPLOADS = 20


class WorkloadFailed(Exception):
    """A workload could not be measured; its row says why and the run goes on."""


class NotAvailable(WorkloadFailed):
    """The product does not implement this yet."""


# --- results -------------------------------------------------------------------------
class Row:
    """One line of the table: a measured workload, its baseline, its target."""

    def __init__(self, key: str, label: str, unit: str, *, higher_is_better: bool = True,
                 baseline: str | None = None, target: str = "", check=None, note: str = ""):
        self.key = key
        self.label = label
        self.unit = unit
        self.higher_is_better = higher_is_better
        self.values: list[float] = []
        self.baseline = baseline  # key of the baseline row
        self.target = target
        self.check = check  # (median, ratio) -> bool
        self.note = note
        self.status = "ok"
        self.evaluate = True  # False: target defined for another size (quick run, 256 MiB instead of 1 GiB)

    def median(self):
        return statistics.median(self.values) if self.values else None

    def fail(self, status: str) -> None:
        self.status = status


class Results:
    def __init__(self):
        self.rows: dict[str, Row] = {}
        self.order: list[str] = []
        self.correctness_failures: list[str] = []

    def add(self, row: Row) -> Row:
        self.rows[row.key] = row
        self.order.append(row.key)
        return row

    def get(self, key: str) -> Row | None:
        return self.rows.get(key)

    def corrupt(self, what: str) -> None:
        print(f"bench: CORRECTNESS FAILURE: {what}", file=sys.stderr, flush=True)
        self.correctness_failures.append(what)

    def ratio(self, row: Row):
        base = self.rows.get(row.baseline) if row.baseline else None
        if base is None or row.median() is None or not base.median():
            return None
        return row.median() / base.median()

    def met(self, row: Row):
        """True / False / None (no target or no value)."""
        if row.check is None or row.median() is None or row.status != "ok":
            return None
        ratio = self.ratio(row)
        if row.baseline and ratio is None:
            return None
        return bool(row.check(row.median(), ratio))

    def to_json(self) -> list[dict]:
        out = []
        for key in self.order:
            row = self.rows[key]
            base = self.rows.get(row.baseline) if row.baseline else None
            values = row.values
            out.append({
                "key": key, "label": row.label, "unit": row.unit, "values": values,
                "median": row.median(), "min": min(values) if values else None,
                "max": max(values) if values else None,
                "baseline": row.baseline, "baseline_median": base.median() if base else None,
                "ratio": self.ratio(row), "target": row.target, "met": self.met(row),
                "target_applies": row.evaluate, "status": row.status, "note": row.note,
            })
        return out


def fmt(value) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def print_table(results: Results) -> None:
    header = ["workload", "median", "min", "max", "unit", "baseline median", "ratio", "target", "met?"]
    lines = []
    for key in results.order:
        row = results.rows[key]
        base = results.rows.get(row.baseline) if row.baseline else None
        ratio = results.ratio(row)
        met = results.met(row)
        if row.status != "ok":
            met_text = row.status
        elif met is None:
            met_text = ""
        else:
            met_text = ("met" if met else "NOT MET") + ("" if row.evaluate else "*")
        values = row.values
        lines.append([row.label, fmt(row.median()), fmt(min(values) if values else None),
                      fmt(max(values) if values else None), row.unit,
                      fmt(base.median()) if base else "", f"{ratio:.2f}x" if ratio is not None else "",
                      row.target, met_text])
    widths = [max(len(str(line[i])) for line in [header, *lines]) for i in range(len(header) - 1)]
    def render(cells):
        text = " | ".join(str(c).rjust(w) if i in (1, 2, 3, 5, 6) else str(c).ljust(w)
                          for i, (c, w) in enumerate(zip(cells[:-1], widths)))
        return f"{text} | {cells[-1]}"
    print(render(header))
    print("-" * (sum(widths) + 3 * len(widths) + 8))
    for line in lines:
        print(render(line))
    notes = [(results.rows[k].label, results.rows[k].note) for k in results.order if results.rows[k].note]
    if notes:
        print("\nnotes:")
        for label, note in notes:
            print(f"  {label}: {note}")
    if any(not results.rows[k].evaluate for k in results.order):
        print("  * measured at a reduced size: the target is defined for the full size (indicative only)")


# --- machine -------------------------------------------------------------------------
def machine_info(path: str) -> dict:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_total = None
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem_total = int(line.split()[1]) * 1024
    except OSError:
        pass
    fs = "unknown"
    try:
        best = ""
        real = os.path.realpath(path)
        with open("/proc/mounts", encoding="utf-8") as f:
            for line in f:
                device, mount, fstype = line.split()[:3]
                if (real == mount or real.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best):
                    best, fs = mount, f"{fstype} ({device} on {mount})"
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu": cpu, "mem_total_bytes": mem_total,
            "python": platform.python_version(), "platform": platform.platform(), "temp_dir": path,
            "temp_fs": fs}


# --- processes and /proc -------------------------------------------------------------
def proc_kib(pid: int, field: str) -> int | None:
    """A ``kB`` field of /proc/PID/status (VmHWM, VmRSS), or None if unreadable."""
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds a live process has used (/proc/PID/stat), 0.0 if unreadable."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def servers_cpu_s(pids) -> float:
    return sum(proc_cpu_s(pid) for pid in pids)


def reset_hwm(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0, same user); False if not allowed."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def run_timed(argv: list[str], timeout_s: float = CLIENT_TIMEOUT_S) -> tuple[float, int, int, str, float]:
    """Run ``argv``; returns (seconds from spawn to exit, exit status, peak RSS KiB, stderr, CPU seconds).

    The child is reaped with ``os.wait4``, whose ``ru_maxrss`` is the child's
    exact peak resident set (its VmHWM at exit) and whose user + system time
    is the CPU it used, so nothing is polled.
    """
    err = tempfile.TemporaryFile()
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT)
    timer = threading.Timer(timeout_s, _kill_pid, args=(proc.pid,))
    timer.start()
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    finally:
        timer.cancel()
    elapsed = time.monotonic() - started
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    err.seek(0)
    stderr = err.read().decode("utf-8", "replace").strip()
    err.close()
    return elapsed, proc.returncode, usage.ru_maxrss, stderr, usage.ru_utime + usage.ru_stime


def _kill_pid(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def client_argv(master: str, *args: str) -> list[str]:
    return [sys.executable, os.path.join(ROOT, "client.py"), "--master", master, "-q", *args]


def relay_argv(*args: str) -> list[str]:
    return [sys.executable, os.path.join(BENCH_DIR, "relay.py"), *args]


def product_client(master: str, *args: str) -> tuple[float, int, float]:
    """Run the product CLI; returns (seconds, peak RSS KiB, CPU seconds); raises WorkloadFailed on failure."""
    elapsed, code, maxrss, stderr, cpu_s = run_timed(client_argv(master, *args))
    if code != 0:
        line = stderr.splitlines()[-1] if stderr else f"exit status {code}"
        if "not supported" in stderr:
            raise NotAvailable(f"not available ({line})")
        error = WorkloadFailed(f"client.py {args[0]} exited {code}: {line}")
        error.exit_code = code
        raise error
    return elapsed, maxrss, cpu_s


class Relay:
    """The bare relay of bench/relay.py: a master and two nodes, as processes."""

    def __init__(self, base_dir: str):
        self.base_dir = base_dir
        self.servers: list[cluster_module.Server] = []
        self.node_dirs = [os.path.join(base_dir, f"node{i}") for i in range(2)]
        self.address = None

    def start(self) -> "Relay":
        os.makedirs(self.base_dir, exist_ok=True)
        addresses = []
        for i, node_dir in enumerate(self.node_dirs):
            server = cluster_module.Server(f"relay-node{i}", relay_argv("node", "--port", "0", "--dir", node_dir),
                                           os.path.join(self.base_dir, f"node{i}.log"))
            self.servers.append(server)
            addresses.append(server.start())
        master = cluster_module.Server("relay-master",
                                       relay_argv("master", "--port", "0", "--nodes", ",".join(addresses)),
                                       os.path.join(self.base_dir, "master.log"))
        self.servers.append(master)
        self.address = master.start()
        return self

    def send(self, *paths: str) -> tuple[float, int, float]:
        """Relay ``paths``; returns (seconds, client peak RSS KiB, client CPU seconds), then drops what the nodes stored."""
        elapsed, code, maxrss, stderr, cpu_s = run_timed(relay_argv("client", *paths, "--master", self.address))
        self.clear()
        if code != 0:
            raise WorkloadFailed(f"relay client exited {code}: {stderr}")
        return elapsed, maxrss, cpu_s

    def pids(self) -> list[int]:
        return [server.pid for server in self.servers]

    def clear(self) -> None:
        for node_dir in self.node_dirs:
            for name in os.listdir(node_dir):
                os.unlink(os.path.join(node_dir, name))

    def stop(self) -> None:
        for server in self.servers:
            server.kill()


# --- files ---------------------------------------------------------------------------
def make_random_file(path: str, size_bytes: int) -> str:
    """Write ``size_bytes`` of os.urandom in 1 MiB pieces; returns its SHA-256."""
    sha = hashlib.sha256()
    with open(path, "wb") as f:
        left = size_bytes
        while left:
            piece = os.urandom(min(left, PIECE_BYTES))
            sha.update(piece)
            f.write(piece)
            left -= len(piece)
    return sha.hexdigest()


def sha256_file(path: str) -> str:
    sha = hashlib.sha256()
    buffer = bytearray(PIECE_BYTES)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            sha.update(view[:n])
    return sha.hexdigest()


def copy_with_fsync(source: str, destinations: list[str]) -> float:
    """Copy ``source`` to each destination in turn, fsync each copy; returns seconds."""
    buffer = bytearray(PIECE_BYTES)
    view = memoryview(buffer)
    started = time.monotonic()
    for destination in destinations:
        with open(source, "rb", buffering=0) as src, open(destination, "wb", buffering=0) as dst:
            while n := src.readinto(buffer):
                dst.write(view[:n])
            os.fsync(dst.fileno())
    elapsed = time.monotonic() - started
    for destination in destinations:
        os.unlink(destination)
    return elapsed


def tree_bytes(path: str) -> int:
    total = 0
    for root, _, names in os.walk(path):
        for name in names:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                pass
    return total


# --- the product, in process (status, list, tiny uploads) ----------------------------
def make_client(address: str) -> client_module.Client:
    host, _, port = address.rpartition(":")
    return client_module.Client((host, int(port)), CLIENT_TIMEOUT_S, PIECE_BYTES, show_progress=False)


def poll(condition, timeout_s: float, interval_s: float = 0.1):
    """``condition()``'s first truthy value within ``timeout_s``; an exception counts as not yet (a
    master (re)starting); TimeoutError after."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            result = condition()
        except Exception:  # noqa: BLE001 -- the master is (re)starting
            result = None
        if result:
            return result
        time.sleep(interval_s)
    raise TimeoutError("condition not reached in time")


def wait_for_nodes(address: str, count: int = NODES, timeout_s: float = 30.0) -> None:
    """Poll the master's status until ``count`` nodes are alive."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        client = make_client(address)
        try:
            if client.status().totals["nodes_alive"] >= count:
                return
        except (protocol.BackupError, OSError) as exc:
            last = exc
        finally:
            client.close()
        time.sleep(0.05)
    raise WorkloadFailed(f"fewer than {count} nodes alive at {address} after {timeout_s:.0f} s ({last})")


def list_all(address: str, prefix: str = "") -> list[dict]:
    client = make_client(address)
    try:
        return client.list(prefix)
    finally:
        client.close()


def start_cluster(data_dir: str) -> cluster_module.LocalCluster:
    cluster = cluster_module.LocalCluster(data_dir, nodes=NODES, node_args=NODE_ARGS)
    cluster.start()
    try:
        wait_for_nodes(cluster.master_address)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def guarded(results: Results, name: str, workload, *args) -> None:
    """Run one workload; if it crashes (e.g. the product's API moved), mark its rows failed and go on.

    The one broad ``except`` of the bench: a workload's top level, where the
    alternative is losing every other row.  The traceback goes to stderr.
    """
    known = set(results.order)
    try:
        workload(results, *args)
    except Exception as exc:  # noqa: BLE001 - top level of a workload, logged with its traceback
        traceback.print_exc()
        print(f"bench: {name} crashed: {exc!r}", file=sys.stderr, flush=True)
        new = [results.rows[k] for k in results.order if k not in known]
        if not new:
            new = [results.add(Row(name, name, ""))]
        for row in new:
            if row.status == "ok":
                row.fail(f"crashed: {type(exc).__name__}: {exc}")


# --- workload 1 and 3: throughput and memory -----------------------------------------
def throughput(results: Results, cluster, relay: Relay, work: str, size_mib: int, reps: int) -> None:
    """Upload and download ``size_mib`` MiB, interleaved with the relay and local copies."""
    tag = f"{size_mib} MiB" if size_mib < 1024 else f"{size_mib // 1024} GiB"
    key = f"{size_mib}mib"
    up = results.add(Row(f"upload_{key}", f"upload {tag}", "MiB/s", baseline=f"relay_upload_{key}",
                         target=">= 0.9x relay", check=lambda m, r: r >= 0.9))
    relay_row = results.add(Row(f"relay_upload_{key}", f"  baseline: relay upload {tag}", "MiB/s"))
    copy2 = results.add(Row(f"copy2_{key}", f"  baseline: 2 local copies + fsync {tag}", "MiB/s"))
    up_cpu = results.add(Row(f"upload_cpu_{key}", f"upload {tag}: CPU of all processes", "ms/MiB",
                             higher_is_better=False, baseline=f"relay_cpu_{key}"))
    relay_cpu = results.add(Row(f"relay_cpu_{key}", f"  baseline: relay upload {tag}: CPU", "ms/MiB",
                                higher_is_better=False))
    up_cpu.note = ("user + system time of client, master and nodes (relay: client, master, 2 nodes) per MiB "
                   "uploaded; on a saturated machine throughput follows it")
    down = results.add(Row(f"download_{key}", f"download {tag}", "MiB/s", baseline=f"copy1_{key}",
                           target=">= 0.5x copy, > 581 MiB/s", check=lambda m, r: r >= 0.5 and m > 581))
    copy1 = results.add(Row(f"copy1_{key}", f"  baseline: 1 local copy + fsync {tag}", "MiB/s"))
    # Issue 15: to stdout (/dev/null), against the floor of any verifying restore here.
    stream = results.add(Row(f"download_stdout_{key}", f"download {tag} to stdout (/dev/null)", "MiB/s",
                             baseline=f"read_sha_{key}", target=">= 0.5x read+SHA-256",
                             check=lambda m, r: r >= 0.5))
    read_sha = results.add(Row(f"read_sha_{key}", f"  baseline: read local file + SHA-256 {tag}", "MiB/s"))
    relayed = results.add(Row(f"download_relayed_{key}", f"  download {tag} to stdout, --via-master", "MiB/s",
                              baseline=f"read_sha_{key}"))
    relayed.note = "the relayed path (every byte through the master), for comparison; no target"
    stream_cpu = results.add(Row(f"download_cpu_{key}", f"download {tag} to stdout: CPU of all processes", "ms/MiB",
                                 higher_is_better=False, baseline=f"relayed_cpu_{key}"))
    relayed_cpu = results.add(Row(f"relayed_cpu_{key}", f"  download {tag} to stdout, --via-master: CPU", "ms/MiB",
                                  higher_is_better=False))
    stream_cpu.note = "user + system time of client, master and nodes per MiB read; direct reads vs relayed"
    down_mem = {role: results.add(Row(f"mem_{role}_download_{key}", f"peak memory {role} during {tag} downloads",
                                      "MiB", higher_is_better=False, target=limit,
                                      check=lambda m, r, cap=cap: m <= cap))
                for role, limit, cap in (("master", "<= 100 MiB", 100), ("node (max)", "<= 64 MiB", 64),
                                         ("client", "<= 40 MiB", 40))}
    up.evaluate = down.evaluate = stream.evaluate = size_mib >= 256  # targets set for 256 MiB (hold for 1 GiB)
    mem_target = size_mib >= 1024
    mem_label = f"during {tag} upload"
    mem_master = results.add(Row(f"mem_master_{key}", f"peak memory master {mem_label}", "MiB",
                                 higher_is_better=False, target="1 GiB: <= 100 MiB", check=lambda m, r: m <= 100))
    mem_node = results.add(Row(f"mem_node_{key}", f"peak memory node (max) {mem_label}", "MiB",
                               higher_is_better=False, target="1 GiB: <= 64 MiB", check=lambda m, r: m <= 64))
    mem_client = results.add(Row(f"mem_client_{key}", f"peak memory client {mem_label}", "MiB",
                                 higher_is_better=False, target="1 GiB: <= 40 MiB", check=lambda m, r: m <= 40))
    for row in (mem_master, mem_node, mem_client):
        row.evaluate = mem_target
        if not mem_target:
            row.note = f"the 1 GiB target was not measured (run with --large); these are the {tag} peaks"
    growth = results.add(Row(f"node_growth_{key}", f"node RSS growth per GiB stored ({tag} uploads)", "MiB/GiB",
                             higher_is_better=False, target="<= 8 MiB/GiB", check=lambda m, r: m <= 8))
    growth.evaluate = size_mib >= 256  # below that, fixed buffers dominate the growth
    mem_master.note = (mem_master.note + "; " if mem_master.note else "") + \
        "VmHWM of the master/nodes over the whole upload phase (product uploads only, HWM reset just before)"

    source = os.path.join(work, f"random-{size_mib}mib")
    print(f"bench: writing {tag} of random data", flush=True)
    original_sha = make_random_file(source, size_mib * MiB)
    copy_dirs = [os.path.join(work, "copy-a"), os.path.join(work, "copy-b")]
    for d in copy_dirs:
        os.makedirs(d, exist_ok=True)
    nbytes = size_mib * MiB
    pids = {"master": cluster.master.pid, **{f"node{i}": n.pid for i, n in enumerate(cluster.nodes)}}
    node_dirs = [cluster.node_data_dir(i) for i in range(NODES)]

    rss_before = {i: proc_kib(n.pid, "VmRSS") for i, n in enumerate(cluster.nodes)}
    stored_before = {i: tree_bytes(d) for i, d in enumerate(node_dirs)}
    reset = all(reset_hwm(pid) for pid in pids.values())
    if not reset:
        mem_master.note += "; could not reset VmHWM: peaks include everything since start"
    client_peaks = []
    print(f"bench: upload {tag} x{reps} (product, relay, 2 copies)", flush=True)
    uploaded = []
    for rep in range(reps):
        name = f"bench/{key}-{rep}"
        if up.status == "ok":
            try:
                servers = servers_cpu_s(pids.values())
                elapsed, maxrss, client_cpu_s = product_client(cluster.master_address, "upload", source, name)
                up_cpu.values.append((servers_cpu_s(pids.values()) - servers + client_cpu_s) * 1000 / (nbytes / MiB))
                up.values.append(nbytes / MiB / elapsed)
                client_peaks.append(maxrss / 1024)
                uploaded.append(name)
            except WorkloadFailed as exc:
                up.fail(f"failed: {exc}")
                print(f"bench: upload {tag}: {exc}", file=sys.stderr, flush=True)
        if relay_row.status == "ok":
            try:
                servers = servers_cpu_s(relay.pids())
                elapsed, _, client_cpu_s = relay.send(source)
                relay_cpu.values.append((servers_cpu_s(relay.pids()) - servers + client_cpu_s) * 1000 / (nbytes / MiB))
                relay_row.values.append(nbytes / MiB / elapsed)
            except WorkloadFailed as exc:
                relay_row.fail(f"failed: {exc}")
        copy2.values.append(nbytes / MiB / copy_with_fsync(source, [os.path.join(d, "copy") for d in copy_dirs]))
    hwm = {label: proc_kib(pid, "VmHWM") for label, pid in pids.items()}
    if uploaded and None not in hwm.values():
        mem_master.values.append(hwm["master"] / 1024)
        mem_node.values.append(max(hwm[f"node{i}"] for i in range(NODES)) / 1024)
        mem_node.note = "per node: " + ", ".join(f"{hwm[f'node{i}'] / 1024:.1f}" for i in range(NODES)) + " MiB"
        mem_client.values.extend(client_peaks)
        mem_client.note = (mem_client.note + "; " if mem_client.note else "") + \
            "ru_maxrss of each client process (exact peak)"
    else:
        for row in (mem_master, mem_node, mem_client):
            row.fail("failed: no upload")
    growths = []
    for i, node in enumerate(cluster.nodes):
        stored = (tree_bytes(node_dirs[i]) - stored_before[i]) / GiB
        after = proc_kib(node.pid, "VmRSS")
        if stored > 0 and after is not None and rss_before[i] is not None:
            growths.append(((after - rss_before[i]) / 1024 / stored, (after - rss_before[i]) / 1024, stored))
    if growths and uploaded:
        growth.values.append(max(g for g, _, _ in growths))
        growth.note = "per node (MiB over GiB stored on it): " + ", ".join(
            f"{d:+.1f}/{s:.2f}" for _, d, s in growths) + "; VmRSS after vs before the uploads"
    else:
        growth.fail("failed: nothing stored")

    print(f"bench: download {tag} x{reps} (product to a file, 1 copy; to stdout, read + SHA-256, relayed)",
          flush=True)
    target = os.path.join(work, "downloaded")
    hwm_reset = all(reset_hwm(pid) for pid in pids.values())
    download_peaks = []
    for rep in range(reps):
        if stream.status == "ok" and uploaded:
            try:
                servers = servers_cpu_s(pids.values())
                elapsed, maxrss, client_cpu_s = product_client(cluster.master_address, "download",
                                                               uploaded[rep % len(uploaded)], "-")
                cpu_s = servers_cpu_s(pids.values()) - servers + client_cpu_s
                stream_cpu.values.append(cpu_s * 1000 / (nbytes / MiB))
                stream.values.append(nbytes / MiB / elapsed)
                download_peaks.append(maxrss / 1024)
            except WorkloadFailed as exc:
                if getattr(exc, "exit_code", None) in CORRUPTION_EXITS:
                    results.corrupt(f"download to stdout: {exc}")
                stream.fail(f"failed: {exc}")
        started = time.monotonic()
        if sha256_file(source) != original_sha:
            raise RuntimeError("the local source changed")
        read_sha.values.append(nbytes / MiB / (time.monotonic() - started))
        if relayed.status == "ok" and uploaded:
            try:
                servers = servers_cpu_s(pids.values())
                elapsed, _, client_cpu_s = product_client(cluster.master_address, "download",
                                                          uploaded[rep % len(uploaded)], "-", "--via-master")
                cpu_s = servers_cpu_s(pids.values()) - servers + client_cpu_s
                relayed_cpu.values.append(cpu_s * 1000 / (nbytes / MiB))
                relayed.values.append(nbytes / MiB / elapsed)
            except WorkloadFailed as exc:
                relayed.fail(f"failed: {exc}")
        if down.status == "ok" and uploaded:
            name = uploaded[rep % len(uploaded)]
            try:
                elapsed, _, _ = product_client(cluster.master_address, "download", name, target)
                if sha256_file(target) != original_sha:
                    results.corrupt(f"download of {name} differs from the uploaded file")
                    down.fail("failed: bytes differ")
                else:
                    down.values.append(nbytes / MiB / elapsed)
            except WorkloadFailed as exc:
                if getattr(exc, "exit_code", None) in CORRUPTION_EXITS:
                    results.corrupt(f"download of {name}: {exc}")
                down.fail(f"failed: {exc}")
            finally:
                if os.path.exists(target):
                    os.unlink(target)
        elif not uploaded:
            down.fail("failed: nothing uploaded")
        copy1.values.append(nbytes / MiB / copy_with_fsync(source, [os.path.join(copy_dirs[0], "copy")]))
    hwm = {label: proc_kib(pid, "VmHWM") for label, pid in pids.items()}
    if download_peaks and None not in hwm.values():
        down_mem["master"].values.append(hwm["master"] / 1024)
        down_mem["node (max)"].values.append(max(hwm[f"node{i}"] for i in range(NODES)) / 1024)
        down_mem["client"].values.extend(download_peaks)
        down_mem["master"].note = ("VmHWM over all the downloads (to stdout, to a file, relayed)"
                                   + ("" if hwm_reset else "; could not reset VmHWM: peaks since start"))
        down_mem["client"].note = "ru_maxrss of each direct download to stdout"
    else:
        for row in down_mem.values():
            row.fail("failed: no download")
    os.unlink(source)


# --- workload 5: start-up -------------------------------------------------------------
def startup(results: Results, cluster, reps: int) -> None:
    """Spawn-to-exit of ``client.py --help`` and ``client.py list`` against ``python -c pass``, interleaved.

    The CPU rows (user + system time of the process, from wait4) say the
    same without the time spent waiting for a CPU, which on a shared
    machine is most of the spread of the wall-clock rows.
    """
    rows = {}
    for key, label, target, limit in (("pass", "python -c pass", "", None),
                                      ("help", "client.py --help", "<= 2x bare python", 2.0),
                                      ("list", "client.py list (1 file, 3 nodes)", "<= 2.5x bare python", 2.5)):
        for kind, unit_label in (("", "start-up"), ("_cpu", "start-up CPU")):
            if key == "pass":
                row = Row(f"startup_pass{kind}", f"  baseline: {unit_label}: {label}", "ms", higher_is_better=False)
            else:
                row = Row(f"startup_{key}{kind}", f"{unit_label}: {label}", "ms", higher_is_better=False,
                          baseline=f"startup_pass{kind}", target=target if not kind else "",
                          check=(lambda m, r, limit=limit: r <= limit) if not kind else None)
            rows[key + kind] = row
    for key in ("pass", "help", "list", "pass_cpu", "help_cpu", "list_cpu"):
        results.add(rows[key])
    rows["pass"].note = (f"{reps} runs of each, interleaved after one untimed run; spawn to exit, output discarded; "
                         "CPU = user + system time of the process")
    commands = [("pass", [sys.executable, "-c", "pass"]),
                ("help", [sys.executable, os.path.join(ROOT, "client.py"), "--help"]),
                ("list", client_argv(cluster.master_address, "list"))]
    print(f"bench: start-up x{reps} (bare python, --help, list)", flush=True)
    for _, argv in commands:  # untimed: fills the bytecode cache, warms the page cache
        run_timed(argv, timeout_s=60)
    for _ in range(reps):
        for key, argv in commands:
            row, cpu_row = rows[key], rows[key + "_cpu"]
            if row.status != "ok":
                continue
            elapsed, code, _, stderr, cpu_s = run_timed(argv, timeout_s=60)
            if code != 0:
                row.fail(f"failed: exit {code}: {stderr.splitlines()[-1] if stderr else ''}")
                cpu_row.fail(row.status)
            else:
                row.values.append(elapsed * 1000)
                cpu_row.values.append(cpu_s * 1000)


# --- workload 4: metadata ------------------------------------------------------------
def offline_checkpoint(master_dir: str) -> tuple[int, dict]:
    """Checkpoint a stopped master's metadata with its own code; returns (index, state snapshot)."""
    state = namespace_module.Namespace()
    log = metadata_log.MetadataLog(master_dir, state)
    log.open()
    try:
        log.checkpoint()
        return log.index, state.snapshot()
    finally:
        log.close()


def metadata_bytes(master_dir: str) -> int:
    total = 0
    for name in os.listdir(master_dir):
        if name == metadata_log.CHECKPOINT_NAME or metadata_log.LOG_NAME.fullmatch(name):
            total += os.path.getsize(os.path.join(master_dir, name))
    return total


def metadata(results: Results, cluster) -> None:
    row = results.add(Row("metadata_per_gib", "master metadata per GiB stored", "KiB/GiB", higher_is_better=False,
                          target="<= 64 KiB/GiB", check=lambda m, r: m <= 64))
    try:
        entries = list_all(cluster.master_address)
        stored = sum(e["size"] for e in entries)
        if not stored:
            raise WorkloadFailed("nothing stored")
        cluster.master.terminate()
        master_dir = os.path.join(cluster.data_dir, "master")
        offline_checkpoint(master_dir)
        size = metadata_bytes(master_dir)
        row.values.append(size / 1024 / (stored / GiB))
        row.note = (f"{size:,} bytes of metadata.json + oplog-*.jsonl in the master data dir for {len(entries)} "
                    f"files, {stored / GiB:.2f} GiB, after an offline checkpoint (master stopped)")
    except (WorkloadFailed, protocol.BackupError, OSError, metadata_log.MetadataCorrupt) as exc:
        row.fail(f"failed: {exc}")
    finally:
        if not cluster.master.running():
            cluster.start_master()
            wait_for_nodes(cluster.master_address)


# --- workload 2: small files ---------------------------------------------------------
def small_files(results: Results, cluster, relay: Relay, work: str, count: int, reps: int, full_size: bool) -> None:
    up = results.add(Row("small_upload", f"upload dir {count:,} x 4 KiB", "files/s", baseline="relay_small",
                         target=">= 3000/s, >= 0.6x relay", check=lambda m, r: m >= 3000 and r >= 0.6))
    relay_row = results.add(Row("relay_small", f"  baseline: relay {count:,} files one by one", "files/s"))
    down = results.add(Row("small_download", f"restore dir {count:,} x 4 KiB", "files/s", baseline="local_small",
                           target=">= 3000/s", check=lambda m, r: m >= 3000))
    local_row = results.add(Row("local_small", f"  baseline: write {count:,} x 4 KiB files here, one process",
                                "files/s"))
    local_row.note = ("what a restore does per file (temporary file, bytes, mode, mtime, rename) and nothing else: "
                      "this disk's floor")
    relayed_down = results.add(Row("small_download_relayed", f"  restore dir {count:,} x 4 KiB, --via-master",
                                   "files/s"))
    relayed_down.note = "the relayed path, for comparison; no target"
    # Where a restore's CPU goes (utime + stime of each process during it).
    cpu_rows = [results.add(Row(f"small_download_cpu_{who}", f"  restore dir {count:,} x 4 KiB: CPU {label}", "s",
                                higher_is_better=False))
                for who, label in (("client", "client"), ("master", "master"), ("nodes", f"{NODES} nodes"))]
    up.evaluate = down.evaluate = full_size
    source = os.path.join(work, "small")
    os.makedirs(source)
    originals = {}
    for i in range(count):
        name = f"f{i:05d}"
        data = os.urandom(SMALL_FILE_BYTES)
        originals[name] = data
        with open(os.path.join(source, name), "wb") as f:
            f.write(data)
    print(f"bench: small files x{reps} ({count} x 4 KiB: product, relay)", flush=True)
    uploaded = []
    for rep in range(reps):
        name = f"small-{rep}"
        if up.status == "ok":
            try:
                elapsed, _, _ = product_client(cluster.master_address, "upload", source, name)
                up.values.append(count / elapsed)
                uploaded.append(name)
            except WorkloadFailed as exc:
                up.fail(str(exc) if isinstance(exc, NotAvailable) else f"failed: {exc}")
        if relay_row.status == "ok":
            try:
                elapsed, _, _ = relay.send(source)
                relay_row.values.append(count / elapsed)
            except WorkloadFailed as exc:
                relay_row.fail(f"failed: {exc}")
    if not uploaded:
        down.fail(up.status if up.status.startswith("not available") else "failed: nothing uploaded")
    for rep, name in enumerate(uploaded):
        out = os.path.join(work, f"restored-{rep}")
        os.makedirs(out)
        try:
            node_pids = [node.pid for node in cluster.nodes]
            master_cpu, nodes_cpu = proc_cpu_s(cluster.master.pid), servers_cpu_s(node_pids)
            elapsed, _, client_cpu = product_client(cluster.master_address, "download", name + "/", out)
            cpu = (client_cpu, proc_cpu_s(cluster.master.pid) - master_cpu, servers_cpu_s(node_pids) - nodes_cpu)
            bad = compare_tree(out, originals)
            if bad:
                results.corrupt(f"restore of {name}/: {bad}")
                down.fail("failed: restored files differ")
                break
            down.values.append(count / elapsed)
            for row, seconds in zip(cpu_rows, cpu):
                row.values.append(seconds)
            shutil.rmtree(out, ignore_errors=True)
            local_row.values.append(count / write_tree_locally(out, originals))
            shutil.rmtree(out, ignore_errors=True)
            os.makedirs(out)
            elapsed, _, _ = product_client(cluster.master_address, "download", name + "/", out, "--via-master")
            if not compare_tree(out, originals):
                relayed_down.values.append(count / elapsed)
        except WorkloadFailed as exc:
            if getattr(exc, "exit_code", None) in CORRUPTION_EXITS:
                results.corrupt(f"restore of {name}/: {exc}")
            down.fail(str(exc) if isinstance(exc, NotAvailable) else f"failed: {exc}")
            break
        finally:
            shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(source)


def write_tree_locally(directory: str, originals: dict[str, bytes]) -> float:
    """Seconds to write ``originals`` into ``directory`` as a restore writes each file, in this process.

    A temporary file, its bytes, mode and mtime, a rename: the file system's
    part of a restore and nothing else (no network, hashing or start-up).
    Creating files costs very different amounts on different disks (an
    inode allocation took 0.02 ms in one directory of this machine's ext4
    and 0.7 ms in another), so a restore is read against this.
    """
    os.makedirs(directory, exist_ok=True)
    started = time.monotonic()
    for name, data in originals.items():
        temp = os.path.join(directory, f".{name}.part")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        os.chmod(temp, 0o644)
        os.utime(temp, ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))
        os.replace(temp, os.path.join(directory, name))
    return time.monotonic() - started


def compare_tree(out: str, originals: dict[str, bytes]) -> str:
    """'' if ``out`` holds exactly the original files (matched by base name), else what differs."""
    found = {}
    for root, _, names in os.walk(out):
        for name in names:
            found[name] = os.path.join(root, name)
    missing = sorted(set(originals) - set(found))
    if missing:
        return f"{len(missing)} files missing (e.g. {missing[0]})"
    for name, data in originals.items():
        with open(found[name], "rb") as f:
            if f.read() != data:
                return f"{name} differs"
    return ""


# --- workload 5: namespace scale -----------------------------------------------------
def fake_files(count: int) -> dict:
    """``count`` 4 KiB file entries in namespace.py's format.

    They are placed on node ids that never registered, so reconciliation
    and repair leave them alone (no live copy to repair from; they count
    as damaged in ``status``) and the measurements see no repair traffic.
    """
    files = {}
    ghosts = [["bench-ghost-a", "bench-ghost-b"], ["bench-ghost-b", "bench-ghost-c"],
              ["bench-ghost-c", "bench-ghost-a"]]
    chunks = SMALL_FILE_BYTES // 1024
    for i in range(count):
        name = f"scale/d{i // 1000:04d}/f{i:07d}"
        files[name] = namespace_module.make_entry(SMALL_FILE_BYTES, 1024, hashlib.sha256(name.encode()).hexdigest(),
                                                  uuid.uuid4().hex, [[0, chunks, ghosts[i % 3]]],
                                                  batch_chunks=1024)
    return files


def seed_namespace(cluster, count: int) -> None:
    """Stop the master and give it a checkpoint holding ``count`` files (plus its nodes)."""
    cluster.master.terminate()
    master_dir = os.path.join(cluster.data_dir, "master")
    index, state = offline_checkpoint(master_dir)
    # Everything else (nodes, cluster id, epoch) stays: the nodes must still accept this master.
    state = {**state, "files": fake_files(count)}
    metadata_log.atomic_write_json(os.path.join(master_dir, metadata_log.CHECKPOINT_NAME),
                                   {"format": metadata_log.CHECKPOINT_FORMAT, "index": index, "state": state})


def timed_start(cluster) -> float:
    """Start the (stopped) master; seconds until it answers a ``list``."""
    started = time.monotonic()
    cluster.start_master()
    deadline = started + 120
    while True:
        try:
            list_all(cluster.master_address, "~probe")
            return time.monotonic() - started
        except (protocol.BackupError, OSError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def tiny_upload(client, path: str, name: str) -> float:
    started = time.monotonic()
    client.upload_file(path, name)
    return time.monotonic() - started


def namespace_scale(results: Results, work: str, count: int, reps: int, full_size: bool, clusters: list) -> None:
    """Fill ``clusters`` with the clusters it starts, so the caller stops them whatever happens."""
    label = f"{count:,} files"
    restart_small = Row("restart_100", "  baseline: master restart, 100 files", "s", higher_is_better=False)
    restart = Row("restart_big", f"master restart until list, {label}", "s", higher_is_better=False,
                  baseline="restart_100", target="<= 3 s", check=lambda m, r: m <= 3)
    list_small = Row("list_100", "  baseline: full list, 100 files", "s", higher_is_better=False)
    list_big = Row("list_big", f"full list, {label}", "s", higher_is_better=False, baseline="list_100",
                   target="<= 2 s", check=lambda m, r: m <= 2)
    commit_small = Row("commit_100", "  baseline: commit latency at file 100", "ms", higher_is_better=False)
    commit_big = Row("commit_big", f"commit latency at file {count:,}", "ms", higher_is_better=False,
                     baseline="commit_100", target="<= 1.5x at 100", check=lambda m, r: r <= 1.5)
    for row in (restart, restart_small, list_big, list_small, commit_big, commit_small):
        results.add(row)
    restart.evaluate = list_big.evaluate = commit_big.evaluate = full_size
    restart.note = "spawn of master.py until its first list answers; SIGKILL before each restart"
    list_big.note = "Client.list() in the bench process (no CLI start-up, no printing)"
    commit_big.note = f"Client.upload_file of a 1-byte file, median of {TINY_UPLOADS}, alternating between masters"
    try:
        print(f"bench: namespace scale ({label} vs 100)", flush=True)
        small = start_cluster(os.path.join(work, "scale-100"))
        clusters.append(small)
        big = start_cluster(os.path.join(work, f"scale-{count}"))
        clusters.append(big)
        seed_namespace(small, 100)
        seed_namespace(big, count)
        for rep in range(reps):
            for row, c in ((restart_small, small), (restart, big)):
                if rep:
                    c.master.kill()
                row.values.append(timed_start(c))
        for rep in range(reps):
            for row, c, n in ((list_small, small, 100), (list_big, big, count)):
                started = time.monotonic()
                entries = list_all(c.master_address)
                row.values.append(time.monotonic() - started)
                if len(entries) < n:
                    results.corrupt(f"list returned {len(entries)} of {n} files")
                    row.fail("failed: files missing")
        wait_for_nodes(small.master_address)
        wait_for_nodes(big.master_address)
        tiny = os.path.join(work, "tiny")
        with open(tiny, "wb") as f:
            f.write(b"x")
        clients = [make_client(small.master_address), make_client(big.master_address)]
        try:
            for c in clients:
                tiny_upload(c, tiny, "warm-up")
            for i in range(TINY_UPLOADS):
                for row, c in ((commit_small, clients[0]), (commit_big, clients[1])):
                    row.values.append(tiny_upload(c, tiny, f"tiny/{i}") * 1000)
        finally:
            for c in clients:
                c.close()
    except (WorkloadFailed, protocol.BackupError, OSError, cluster_module.ProcessFailed,
            metadata_log.MetadataCorrupt) as exc:
        print(f"bench: namespace scale: {exc}", file=sys.stderr, flush=True)
        for row in (restart, restart_small, list_big, list_small, commit_big, commit_small):
            if row.status == "ok":
                row.fail(f"failed: {exc}")


# --- main ----------------------------------------------------------------------------
def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Benchmark the backup system against a bare relay and local copies.")
    parser.add_argument("--quick", action="store_true",
                        help="about 30 s: 32 MiB file, 200 small files, 2,000-file namespace, 1 repetition")
    parser.add_argument("--large", action="store_true", help="add the 1 GiB upload/download (and its memory targets)")
    parser.add_argument("--json", metavar="FILE", help="write every raw number to FILE")
    parser.add_argument("--reps", type=int, help="repetitions of each workload (default 3, 1 with --quick)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (data and logs) for inspection")
    parser.add_argument("--no-bytecode-cache", action="store_true",
                        help="leave PYTHONDONTWRITEBYTECODE as it is (children may compile every module each run)")
    parser.add_argument("--only", metavar="SECTIONS",
                        help=f"comma-separated sections to run (default all): {', '.join(SECTIONS)}")
    parser.add_argument("--temp-dir", metavar="DIR", default="/tmp",
                        help="where the temp dir (cluster data, files, restores) goes (default /tmp); creating "
                             "files costs very different amounts in different places, see the small-files baseline")
    return parser


SECTIONS = ("startup", "throughput", "metadata", "small_files", "namespace_scale")


def main(argv=None) -> int:
    parser = build_arg_parser()
    args = parser.parse_args(argv)
    sections = set(SECTIONS) if not args.only else set(args.only.split(","))
    if not sections <= set(SECTIONS):
        parser.error(f"unknown section(s) {', '.join(sorted(sections - set(SECTIONS)))}")
    params = {
        "file_mib": 32 if args.quick else 256,
        "large_mib": 1024 if args.large else None,
        "small_files": 200 if args.quick else 2000,
        "namespace_files": 2000 if args.quick else 100_000,
        "reps": args.reps or (1 if args.quick else 3),
        "startup_reps": 3 if args.quick else max(15, 5 * (args.reps or 3)),
        "quick": args.quick,
        "sections": sorted(sections),
        "bytecode_cache": not args.no_bytecode_cache,
    }
    full = not args.quick
    work = tempfile.mkdtemp(prefix="backup-bench-", dir=args.temp_dir)
    if not args.no_bytecode_cache:
        # Children inherit this: bytecode is compiled once and reused, as
        # for an installed program; the cache goes away with the temp dir.
        os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
        os.environ["PYTHONPYCACHEPREFIX"] = os.path.join(work, "pycache")
    machine = machine_info(work)
    print(f"machine: {machine['nproc']} CPUs, {machine['cpu']}, "
          f"{(machine['mem_total_bytes'] or 0) / GiB:.1f} GiB RAM, Python {machine['python']}, "
          f"temp dir {work} on {machine['temp_fs']}")
    print(f"params: {json.dumps(params)}", flush=True)
    results = Results()
    cluster = relay = None
    scale_clusters = []
    started = time.monotonic()
    try:
        try:
            cluster = start_cluster(os.path.join(work, "cluster"))
            relay = Relay(os.path.join(work, "relay"))
            relay.start()
        except (cluster_module.ProcessFailed, WorkloadFailed) as exc:
            print(f"bench: cannot start: {exc}", file=sys.stderr)
            return EXIT_SETUP_FAILED
        # Warm-up: connections, threads and buffers exist before anything is measured.
        warm = os.path.join(work, "warm-up")
        make_random_file(warm, 4 * MiB)
        try:
            product_client(cluster.master_address, "upload", warm, "bench/warm-up")
        except WorkloadFailed as exc:
            print(f"bench: warm-up upload failed: {exc}", file=sys.stderr)
        try:
            relay.send(warm)
        except WorkloadFailed as exc:
            print(f"bench: warm-up relay failed: {exc}", file=sys.stderr)
        os.unlink(warm)
        if "startup" in sections:
            guarded(results, "startup", startup, cluster, params["startup_reps"])
        if "throughput" in sections:
            guarded(results, "throughput", throughput, cluster, relay, work, params["file_mib"], params["reps"])
            if args.large:
                guarded(results, "throughput_1gib", throughput, cluster, relay, work, 1024, params["reps"])
        if "metadata" in sections:
            guarded(results, "metadata", metadata, cluster)
        if "small_files" in sections:
            guarded(results, "small_files", small_files, cluster, relay, work, params["small_files"],
                    params["reps"], full)
        cluster.stop()
        relay.stop()
        if "namespace_scale" in sections:
            guarded(results, "namespace_scale", namespace_scale, work, params["namespace_files"], params["reps"],
                    full, scale_clusters)
    finally:
        for c in [cluster, *scale_clusters]:
            if c is not None:
                c.stop()
        if relay is not None:
            relay.stop()
        if args.keep:
            print(f"bench: kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    elapsed = time.monotonic() - started
    print()
    print_table(results)
    print(f"\nran in {elapsed:.0f} s; {params['reps']} repetition(s), interleaved with the baselines")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"machine": machine, "params": params, "elapsed_s": elapsed, "rows": results.to_json(),
                       "correctness_failures": results.correctness_failures}, f, indent=2)
    if results.correctness_failures:
        print(f"CORRECTNESS FAILURES: {len(results.correctness_failures)}", file=sys.stderr)
        return EXIT_CORRECTNESS
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
