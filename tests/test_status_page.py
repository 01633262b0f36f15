"""Health, /api/status, /metrics and the status page, with real processes and a real browser.

One cluster goes through the transitions an operator cares about: a node
dies (HEALTH_WARN: NODE_DOWN, CHUNKS_DEGRADED), its chunks are re-copied
(HEALTH_OK again, the node still dead), then both copies of a chunk rot
(HEALTH_ERR: DATA_LOST), checked through `client.py health --json` and its
exit status, /api/status and /metrics.  The page is loaded in headless
Chromium (Debian's chromium and chromedriver; .ci/run installs them) and
must show the nodes, the banner, and a node's death without a reload.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import urllib.error
import urllib.request

import pytest
from prometheus_client import parser as prometheus_parser  # test-only (requirements-dev.txt)

from conftest import FAST_MASTER, FAST_TIMING, flip_byte, payload_locations, random_bytes, wait_until

import client as client_module


MIB = 1024 * 1024
# Repair at 1 MiB/s: the dead node's ~4 batches take ~3 s to re-copy, long
# enough to see HEALTH_WARN, short enough for the suite.
HEALTH_MASTER = [*FAST_MASTER, "--safe-mode", "1", "--repair-rate", "1"]
# No scrubbing: the test decides when corruption is found (by a read).
HEALTH_NODE = [*FAST_TIMING, "--scrub-rate", "0"]
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def health_cli(cluster) -> tuple[int, dict]:
    result = cluster.cli("health", "--json")
    assert result.stdout, result
    return result.returncode, json.loads(result.stdout)


def codes(document: dict) -> list[str]:
    return [check["code"] for check in document["checks"]]


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def scrape(url: str) -> dict:
    """/metrics parsed by prometheus_client: {(sample name, sorted labels): value}."""
    with urllib.request.urlopen(url + "metrics", timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = response.read().decode("utf-8")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in prometheus_parser.text_string_to_metric_families(text) for s in family.samples}


def upload(cluster, name: str, data: bytes, tmp_path):
    path = tmp_path / "upload.bin"
    path.write_bytes(data)
    c = cluster.client()
    try:
        return c.upload_file(str(path), name)
    finally:
        c.close()
        path.unlink()


def test_health_follows_node_death_repair_and_lost_data(make_cluster, tmp_path):
    """OK -> kill a node -> WARN (NODE_DOWN, CHUNKS_DEGRADED; exit 1) -> re-replicated -> OK -> both copies rot -> ERR (DATA_LOST; exit 2)."""
    seed = 1414
    cluster = make_cluster(nodes=3, master_args=HEALTH_MASTER, node_args=HEALTH_NODE, http_port="any")
    url = cluster.http_url
    assert url and url.startswith("http://127.0.0.1:"), url
    wait_until(lambda: health_cli(cluster) == (0, {"status": "HEALTH_OK", "checks": []}), 10.0, message="HEALTH_OK")
    assert cluster.cli("status").stdout.decode().splitlines()[0] == "HEALTH_OK"
    upload(cluster, "big/data", random_bytes(seed, 5 * MIB + 1), tmp_path)  # 6 batches, ~4 on each node
    listing = json.loads(cluster.cli("list", "--json").stdout)
    assert [(f["name"], f["size"]) for f in listing["files"]] == [("big/data", 5 * MIB + 1)], listing
    assert listing["files"][0]["mtime_iso"].endswith("Z") and listing["total_bytes"] == 5 * MIB + 1
    assert json.loads(cluster.cli("locks", "--json").stdout) == {"locks": []}
    status = json.loads(cluster.cli("status", "--json").stdout)
    assert status["health"]["status"] == "HEALTH_OK" and [n["state"] for n in status["nodes"]] == ["alive"] * 3

    cluster.nodes[0].kill()
    code, warn = wait_until(lambda: (lambda r: r if "NODE_DOWN" in codes(r[1]) else None)(health_cli(cluster)),
                            10.0, interval_s=0.1, message="NODE_DOWN")
    assert code == 1 and warn["status"] == "HEALTH_WARN", warn
    assert codes(warn) == ["NODE_DOWN", "CHUNKS_DEGRADED"], warn
    assert "repairing" in warn["checks"][1]["summary"] and warn["checks"][1]["count"] > 0, warn
    status = get_json(url + "api/status")
    dead = [n for n in status["nodes"] if n["state"] == "dead"]
    assert len(dead) == 1 and dead[0]["last_heard_iso"].endswith("Z"), status["nodes"]
    assert status["health"]["status"] in ("HEALTH_WARN", "HEALTH_OK")  # the repair may have finished meanwhile
    assert any(e["kind"] == "node_down" for e in status["events"]), status["events"]
    samples = scrape(url)
    assert samples[("backup_nodes", (("state", "dead"),))] == 1
    assert samples[("backup_node_up", (("node", dead[0]["id"]),))] == 0

    code, ok = wait_until(lambda: (lambda r: r if r[0] == 0 else None)(health_cli(cluster)), 20.0,
                          message="HEALTH_OK after re-replication")
    assert ok == {"status": "HEALTH_OK", "checks": []}
    samples = scrape(url)
    assert samples[("backup_health_status", ())] == 0
    assert samples[("backup_chunks", (("copies", "1"),))] == 0 and samples[("backup_chunks", (("copies", "2"),))] > 0
    assert samples[("backup_repaired_chunks_total", ())] > 0 and samples[("backup_repaired_bytes_total", ())] > 0
    assert samples[("backup_nodes", (("state", "dead"),))] == 1  # still dead, but nothing depends on it
    assert samples[("backup_last_success_timestamp_seconds", (("prefix", "big"),))] > 0

    reply = upload(cluster, "doomed", random_bytes(seed + 1, 3000), tmp_path)
    for index in (1, 2):  # the same chunk, on both of its nodes
        (path, _, offset, _), = payload_locations(cluster, index, reply.version)
        flip_byte(path, offset + 100)
    # Relayed: the master itself answers ERROR DATA_LOST (counted in backup_errors_total); a direct
    # read finds the loss at the client, and the master learns it from READ_END.
    result = cluster.cli("download", "doomed", str(tmp_path / "doomed"), "--via-master")
    assert result.returncode == client_module.EXIT_DATA_LOST, result
    code, err = wait_until(lambda: (lambda r: r if r[0] == 2 else None)(health_cli(cluster)), 10.0,
                           message="HEALTH_ERR")
    assert err["status"] == "HEALTH_ERR" and codes(err)[0] == "DATA_LOST", err
    assert err["checks"][0]["detail"] == ["doomed"] and err["checks"][0]["count"] >= 1, err
    assert "SCRUB_ERRORS" in codes(err), err
    detail = cluster.cli("health", "--detail")
    assert detail.returncode == 2 and "    doomed" in detail.stdout.decode().splitlines(), detail.stdout
    samples = scrape(url)
    assert samples[("backup_health_status", ())] == 2
    assert samples[("backup_health_check", (("check", "DATA_LOST"),))] == 2
    assert samples[("backup_chunks", (("copies", "0"),))] >= 1
    assert samples[("backup_errors_total", (("code", "DATA_LOST"),))] >= 1
    status = get_json(url + "api/status")
    assert {"name": "doomed", "reason": "lost"} in status["damaged_files"]
    assert any(e["kind"] == "data_lost" for e in status["events"]), status["events"]


def test_page_beyond_loopback_needs_the_token_derived_from_the_secret(make_cluster, tmp_path):
    """[http] host 0.0.0.0 with a secret: /api/status and /metrics answer 401 without `client.py http-token`'s token, 200 with it."""
    secret = tmp_path / "secret"
    secret.write_text("correct horse battery staple\n")
    secret.chmod(0o600)
    ini = tmp_path / "http.ini"
    ini.write_text("[http]\nhost = 0.0.0.0\n")
    log_file = tmp_path / "master-json.log"
    cluster = make_cluster(nodes=0, master_args=["--log-file", str(log_file), "--log-format", "json"],
                           config_path=str(ini), secret_file=str(secret), http_port="any")
    assert cluster.http_url.startswith("http://0.0.0.0:"), cluster.http_url
    local = "http://127.0.0.1:" + cluster.http_url.rstrip("/").rpartition(":")[2] + "/"  # loopback traffic only
    token = cluster.cli("--secret-file", str(secret), "http-token").stdout.decode().strip()
    assert len(token) == 64 and "horse" not in token
    for path in ("api/status", "metrics"):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(local + path, timeout=10)
        assert refused.value.code == 401, path
        request = urllib.request.Request(local + path, headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200, path
    with urllib.request.urlopen(local, timeout=10) as response:  # the page itself carries no data
        assert b"app.js" in response.read()
    lines = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert any(line["message"].startswith("status page on http://0.0.0.0:") for line in lines), lines[:5]
    assert all(line["process"] == "master" and line["time_iso"].endswith("Z") for line in lines)
    assert "horse" not in log_file.read_text() and token not in log_file.read_text()


# --- the page in a real browser ------------------------------------------------------------------
@pytest.fixture
def browser(tmp_path):
    """Headless Chromium driven by Debian's chromedriver, with a fresh profile in tmp; quit after the test."""
    from selenium import webdriver  # test-only (requirements-dev.txt)
    from selenium.webdriver.chrome.service import Service
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    chromedriver = shutil.which("chromedriver")
    if not chromium or not chromedriver:
        pytest.skip("chromium and chromedriver are not installed "
                    "(apt-get install chromium chromium-driver; .ci/run installs them)")
    profile = tempfile.mkdtemp(prefix="chromium-", dir=tmp_path)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--window-size=1280,1400"]:
        options.add_argument(flag)
    os.environ.setdefault("SE_AVOID_STATS", "true")
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    try:
        yield driver
    finally:
        driver.quit()


PAGE_STATE = """
const rows = [...document.querySelectorAll('#nodes tbody tr')];
return {
  health: document.getElementById('health-status').textContent,
  checks: [...document.querySelectorAll('#checks > li')].map((li) => li.dataset.code),
  nodes: rows.map((tr) => [tr.dataset.node, tr.dataset.state, tr.querySelector('.state').textContent]),
  files: [...document.querySelectorAll('#files tbody tr')].map((tr) => tr.cells[0].textContent),
};
"""


def test_status_page_shows_nodes_and_a_node_death_without_reload(make_cluster, tmp_path, browser):
    """In Chromium the page shows the banner, the nodes and the files; after a kill, NODE_DOWN and a DEAD row appear by themselves."""
    cluster = make_cluster(nodes=2, master_args=[*FAST_MASTER, "--safe-mode", "1"], node_args=HEALTH_NODE,
                           http_port="any")
    upload(cluster, "photos/cat.jpg", random_bytes(7, 5000), tmp_path)
    browser.get(cluster.http_url + "?refresh=0.3")
    # The file browser is a fetch of its own (/api/files), so it may fill a
    # moment after the status part: wait for both before checking either.
    page = wait_until(lambda: (lambda s: s if s["health"] == "HEALTH_OK" and len(s["nodes"]) == 2 and s["files"]
                               else None)(browser.execute_script(PAGE_STATE)), 15.0,
                      message="the page with two live nodes and its files")
    assert [state for _, state, _ in page["nodes"]] == ["alive", "alive"], page
    assert page["files"] == ["photos/"], page

    cluster.nodes[0].kill()
    page = wait_until(lambda: (lambda s: s if "NODE_DOWN" in s["checks"] and
                               any(state == "dead" for _, state, _ in s["nodes"]) else None)(
        browser.execute_script(PAGE_STATE)), 15.0, message="NODE_DOWN and a dead row on the page")
    assert page["health"] in ("HEALTH_WARN", "HEALTH_ERR"), page
    assert sorted(text for _, _, text in page["nodes"]) == ["ALIVE", "DEAD"], page
    banner = browser.find_element("id", "banner").get_attribute("class")
    assert banner in ("banner warn", "banner err"), banner
