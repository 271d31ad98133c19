"""``mmfl flower-local``: real Flower processes (SuperLink + 3 SuperNodes) on loopback.

Every test checks that no process of its deployment survives; the ``reaper`` fixture kills
whatever a failing test leaves behind (by the FLWR_HOME inside the test's tmp_path), so a
failure never leaks processes or ports into later tests.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from testkit import ROOT, default_sigint, tampered_shard

pytest.importorskip("flwr")

from mmfl.flower import flwr_cli, local, processes
from mmfl.flower.local import FlowerRunError, LocalDeployment
from mmfl.supervisor import processes_with_env

pytestmark = [pytest.mark.flower]

TINY3 = """
name = "flower_local_tiny"
seed = 1
rounds = {rounds}
engine = "vectorized"

[clients]
count = 3
active_rate = 1.0
processors = 1

[sampler]
name = "full"

[[tasks]]
name = "digits"
dataset = "digits"
model = "logreg"
lr = 0.1
local_epochs = 1
batch_size = 64
[tasks.partition]
kind = "iid"
"""


def write_config(folder: Path, rounds: int = 2) -> Path:
    p = folder / "tiny3.toml"
    p.write_text(TINY3.format(rounds=rounds), encoding="utf-8")
    return p


def survivors(out: Path) -> list[int]:
    """Live processes started for the run directory ``out`` (their FLWR_HOME is inside it)."""
    return processes_with_env("FLWR_HOME", str(Path(out).absolute() / "flower" / "home"))


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return "?"


def assert_no_survivors(out: Path, wait: float = 5.0) -> None:
    deadline = time.monotonic() + wait
    while (left := survivors(out)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, "processes survived: " + "; ".join(f"{p}: {cmdline(p)}" for p in left)


@pytest.fixture
def reaper(tmp_path):
    """Kills, after the test, the CLI subprocesses it registered and every process whose
    FLWR_HOME lies in tmp_path (a failing test must not leave Flower running)."""
    procs: list[subprocess.Popen] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=10)
    for _ in range(3):
        left = [pid for d in tmp_path.iterdir() if d.is_dir() for pid in survivors(d)]
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if not left:
            break
        time.sleep(0.5)


def start_cli(*args: str) -> subprocess.Popen:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.Popen([sys.executable, "-m", "mmfl.cli", "flower-local", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=default_sigint)  # noqa: PLW1509 - one signal() call


def finish(p: subprocess.Popen, timeout: float = 240) -> tuple[int, str, str]:
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out, err


def rounds_csv(out: Path) -> list[dict[str, str]]:
    import csv

    with open(out / "rounds.csv", newline="") as f:
        return list(csv.DictReader(f))


def check_run_dir(out: Path, rounds: int) -> dict:
    for name in ("config.toml", "metrics.csv", "rounds.csv", "summary.json"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["engine"] == "flower"
    assert 0.0 <= summary["mean_accuracy"] <= 1.0 and "digits" in summary["tasks"]
    assert [int(r["round"]) for r in rounds_csv(out)] == list(range(1, rounds + 1))
    dep = json.loads((out / "flower" / "deployment.json").read_text())
    assert dep["status"] == "finished:completed"
    assert len(dep["nodes"]) == 3
    return dep


# -- real deployments ----------------------------------------------------------------------------
@pytest.mark.timeout(300)
def test_loopback_three_supernodes(tmp_path, reaper):
    """3 SuperNodes as real processes over real gRPC, 2 rounds, the usual run directory, and no
    process left afterwards; the working files are cleaned, the logs kept (--keep-logs)."""
    out = tmp_path / "run"
    p = start_cli(str(write_config(tmp_path)), "--out", str(out), "--round-timeout", "60",
                  "--keep-logs")
    reaper.append(p)
    rc, stdout, stderr = finish(p)
    assert rc == 0, stderr
    assert "done:" in stdout
    # mmfl run's header and round lines (relayed from the ServerApp), what it waited for, and
    # where the logs are and that they stay
    assert re.search(r"round 2/2  slots \d+ \(m=\d+\)  [\d.]+s  ETA \d+s  digits=0\.\d{3}",
                     stderr), stderr
    assert "budget m=" in stderr and "ServerApp: 3 Flower nodes serve 3 of 3 clients" in stderr
    assert f"logs in {out / 'flower' / 'logs'} (kept)" in stderr
    dep = check_run_dir(out, 2)
    assert dep["tls"] is False and dep["superlink"].startswith("127.0.0.1:")
    assert len({n["port"] for n in dep["nodes"]}) == 3  # one runtime port per SuperNode
    logs = out / "flower" / "logs"
    assert {f"node{i}.log" for i in range(3)} <= {f.name for f in logs.iterdir()}
    assert (logs / "serverapp.log").read_text().strip()
    assert not (out / "flower" / "shards").exists() and not (out / "flower" / "home").exists()
    assert all(int(r["missing"]) == 0 for r in rounds_csv(out))
    assert_no_survivors(out)


@pytest.mark.timeout(300)
def test_fault_killed_supernode_run_finishes(tmp_path, reaper):
    """SIGKILL one SuperNode right after round 1: round 2 completes after the round timeout
    with the replies it has (the missing slot recorded); the node, restarted at once, joins
    under a new node id, is discovered and trains again in round 3; the run finishes."""
    from mmfl.experiment.config import load_config

    out = tmp_path / "run"
    cfg = load_config(write_config(tmp_path, rounds=3))
    with LocalDeployment(cfg, out, round_timeout=25, node_wait=90, keep_logs=True) as dep:
        dep.prepare()
        (dep.dir / "notes.txt").write_text("mine", encoding="utf-8")  # a user's file
        dep.start()
        dep.submit()
        dep.wait_round(1, timeout=180)
        killed = dep.nodes[2].popen.pid
        dep.kill_node(2)
        assert dep.nodes[2].popen.poll() is not None
        assert killed not in dep.processes()
        dep.restart_node(2)
        summary = dep.wait(timeout=180)
        assert dep.nodes[2].alive
    assert summary["status"] == "completed" and summary["rounds_completed"] == 3
    rows = rounds_csv(out)
    assert [int(r["missing"]) for r in rows] == [0, 1, 0], rows
    assert [int(r["model_uploads"]) for r in rows] == [3, 2, 3]
    assert "missing" in rows[1]["note"]
    # the completed run's cleanup removed mmfl's working files only
    assert (dep.dir / "notes.txt").read_text() == "mine"
    assert not (dep.dir / "shards").exists() and (dep.dir / "logs").is_dir()
    assert dep.processes() == []
    assert_no_survivors(out)


@pytest.mark.timeout(300)
def test_tls_run(tmp_path, reaper):
    """--tls: certificates generated for the run; SuperNodes and flwr verify the SuperLink."""
    out = tmp_path / "run"
    p = start_cli(str(write_config(tmp_path, rounds=1)), "--out", str(out), "--tls",
                  "--keep-logs", "--round-timeout", "60")
    reaper.append(p)
    rc, _, stderr = finish(p)
    assert rc == 0, stderr
    dep = check_run_dir(out, 1)
    assert dep["tls"] is True and dep["auth"] is False
    assert "--insecure" not in (out / "flower" / "logs" / "node0.log").read_text().splitlines()[0]
    assert not (out / "flower" / "tls").exists()  # throw-away keys are removed after success
    assert_no_survivors(out)


@pytest.mark.timeout(300)
def test_auth_run(tmp_path, reaper):
    """--auth: one ECDSA key per SuperNode, registered with `flwr supernode register`; the
    SuperLink only admits registered nodes (FLOWER-NOTES s. 6), and the ServerApp accepts
    client i only from the node with key i."""
    out = tmp_path / "run"
    p = start_cli(str(write_config(tmp_path, rounds=1)), "--out", str(out), "--auth",
                  "--keep-logs", "--round-timeout", "60")
    reaper.append(p)
    rc, _, stderr = finish(p)
    assert rc == 0, stderr
    dep = check_run_dir(out, 1)
    assert dep["tls"] is True and dep["auth"] is True
    ids = [n["node_id"] for n in dep["nodes"]]
    assert all(isinstance(i, int) for i in ids) and len(set(ids)) == 3
    assert not (out / "flower" / "keys").exists()
    # identity.json bound every client to its key; Flower showed the ServerApp the registered
    # keys (NodeInfo.public_key) and all three matched: no node was refused
    assert not (out / "flower" / "rejected.jsonl").exists()
    assert_no_survivors(out)


@pytest.mark.timeout(420)
def test_sigint_stops_every_process(tmp_path, reaper):
    """Ctrl-C (SIGINT to `mmfl flower-local`) while the ServerApp runs: exit 130, nothing left,
    logs kept for diagnosis."""
    out = tmp_path / "run"
    p = start_cli(str(write_config(tmp_path, rounds=20)), "--out", str(out))
    reaper.append(p)
    deployment = out / "flower" / "deployment.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and p.poll() is None:
        if deployment.exists():
            try:
                if json.loads(deployment.read_text()).get("run_id"):
                    break
            except json.JSONDecodeError:
                pass
        time.sleep(0.3)
    assert p.poll() is None, p.communicate()[1]
    time.sleep(4)  # the ServerApp and SuperNodes are busy now
    assert len(survivors(out)) >= 5  # SuperLink + 3 SuperNodes + superexecs/apps
    p.send_signal(signal.SIGINT)
    rc, _, stderr = finish(p, timeout=180)  # cleanup waits 8 s per stage; slow under load
    assert rc == 130, stderr
    assert "interrupted" in stderr
    assert (out / "flower" / "logs" / "superlink.log").exists()
    assert_no_survivors(out)


@pytest.mark.timeout(240)
def test_failing_serverapp_exit_1(tmp_path, reaper, monkeypatch, capsys):
    """A ServerApp that raises (here: its experiment file is broken after the deployment was
    prepared) ends the Flower run ``finished:failed``: `mmfl flower-local` exits 1 with the
    ServerApp traceback, keeps the logs, and nothing is left running."""
    from mmfl import cli

    prepare = LocalDeployment.prepare

    def broken_prepare(self):
        prepare(self)
        (self.dir / "experiment.toml").write_text("rounds = [\n", encoding="utf-8")

    monkeypatch.setattr(LocalDeployment, "prepare", broken_prepare)
    out = tmp_path / "run"
    rc = cli.main(["flower-local", str(write_config(tmp_path)), "--out", str(out),
                   "--round-timeout", "30"])
    err = capsys.readouterr().err
    assert rc == 1, err
    assert "finished:failed" in err
    assert "Traceback" in err and "experiment.toml" in err
    assert "Traceback" in (out / "flower" / "logs" / "serverapp.log").read_text()
    assert json.loads((out / "flower" / "deployment.json").read_text())["status"] == \
        "finished:failed"
    assert_no_survivors(out)


def _non_loopback_address() -> str | None:
    """An IPv4 address of this machine that is not loopback (None where there is none)."""
    import socket

    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.1", 9))  # UDP: nothing is sent, the kernel picks the interface
        ip = s.getsockname()[0]
        if not ip.startswith("127.") and ip != "0.0.0.0":
            return ip
    return None


def _post_status(host: str, port: int, path: str) -> int:
    import http.client

    conn = http.client.HTTPConnection(host, port, timeout=30)
    try:
        conn.request("POST", path, body=b"", headers={"content-type": "application/protobuf"})
        return conn.getresponse().status
    finally:
        conn.close()


@pytest.mark.timeout(420)
def test_rogue_supernodes_are_refused_and_control_api_is_loopback_only(tmp_path, reaper,
                                                                      caplog):
    """--host 0.0.0.0 (insecure). The Control API answers 403 to a peer on this machine's
    non-loopback address (a `flwr run` through it fails; only the deployment's run exists),
    while the Fleet API serves it: two rogue SuperNodes connect through that address, one
    claiming client 1 with a modified copy of its shard (labels shifted, metadata lr 1e6),
    one claiming client 2 with a sample fewer. Both are refused and recorded, the run never
    waits for them, and its metrics equal the sequential engine's."""
    import mmfl
    from mmfl.experiment.config import load_config
    from mmfl.supervisor import ONE_THREAD

    cfg = load_config(write_config(tmp_path, rounds=2))
    out = tmp_path / "run"
    ip = _non_loopback_address()
    with LocalDeployment(cfg, out, host="0.0.0.0", round_timeout=60, node_wait=150,
                         keep_logs=True) as dep:
        dep.prepare()
        dep.start()
        attack = None
        if ip is not None:
            assert _post_status(ip, dep.port, "/v1/control/list-runs") == 403
            assert _post_status(ip, dep.port, "/v1/runtime/get-nodes") == 403
            assert _post_status(ip, dep.port, "/v1/fleet/../control/list-runs") == 403
            assert _post_status("127.0.0.1", dep.port, "/v1/control/list-runs") != 403
            home = tmp_path / "attacker"
            home.mkdir()
            (home / "config.toml").write_text(
                f'[superlink]\ndefault = "x"\n\n[superlink.x]\naddress = "{ip}:{dep.port}"\n'
                'insecure = true\n', encoding="utf-8")
            attack = subprocess.run(
                [flwr_cli.flower_executable("flwr"), "run", str(dep.dir / "app"), "x",
                 "--format", "json"], env={**os.environ, **flwr_cli.FLOWER_ENV,
                                            "FLWR_HOME": str(home)},
                capture_output=True, text=True, timeout=120)
        rogue = {1: tampered_shard(dep.shards[1], tmp_path / "rogue" / "r1.npz",
                                   shift_labels=True, lr=1e6),
                 2: tampered_shard(dep.shards[2], tmp_path / "rogue" / "r2.npz", drop=1)}
        for client, shard in rogue.items():
            argv = [flwr_cli.flower_executable("flower-supernode"), "--insecure",
                    "--superlink", f"{ip or '127.0.0.1'}:{dep.port}",
                    "--port", str(processes.free_port()),
                    "--node-config", f"client-id={client} data-file='{shard}'"]
            dep.procs.spawn(processes.Proc(f"rogue{client}", argv,
                                           tmp_path / "rogue" / f"n{client}",
                                           dep.logs / f"rogue{client}.log",
                                           {**dep.env, **ONE_THREAD}))
        dep.submit()
        summary = dep.wait(timeout=300)
        runs = dep.cli.runs()
    if attack is not None:
        assert attack.returncode != 0 or '"success": false' in attack.stdout, attack.stdout
    assert [str(r["run-id"]) for r in runs] == [dep.run_id]
    assert summary["status"] == "completed"
    assert all(int(r["missing"]) == 0 for r in rounds_csv(out))
    mmfl.run(cfg.replace(engine="sequential"), tmp_path / "seq")
    assert (out / "metrics.csv").read_text() == (tmp_path / "seq" / "metrics.csv").read_text()
    rejected = out / "flower" / "rejected.jsonl"
    recs = {r["client"]: r for r in map(json.loads, rejected.read_text().splitlines())}
    assert set(recs) == {1, 2}, recs
    assert "sha256" in recs[1]["reason"] and "n = " in recs[2]["reason"]
    assert rejected.stat().st_mode & 0o077 == 0
    assert "node refused" in (out / "flower" / "logs" / "serverapp.log").read_text()
    assert caplog.text.count("Flower: rejected discovery") == 2  # flower-local's own log
    assert_no_survivors(out)


def _wait_for_round(p: subprocess.Popen, out: Path, timeout: float = 240) -> None:
    """Until summary.json says ``running`` after a round (the ServerApp is mid-run)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert p.poll() is None, p.communicate()[1]
        with contextlib.suppress(OSError, ValueError):
            if json.loads((out / "summary.json").read_text()).get("status") == "running":
                return
        time.sleep(0.3)
    raise AssertionError("no round finished in time")


@pytest.mark.timeout(360)
def test_superlink_death_fails_the_run(tmp_path, reaper):
    """The SuperLink is SIGKILLed mid-run: one line "flower-superlink exited (code -9)", exit
    1, summary.json ``failed`` with that reason (not ``running``), no process left."""
    out = tmp_path / "run"
    p = start_cli(str(write_config(tmp_path, rounds=40)), "--out", str(out),
                  "--round-timeout", "60")
    reaper.append(p)
    _wait_for_round(p, out)
    (link,) = [pid for pid in survivors(out) if "mmfl.flower.linkguard" in cmdline(pid)]
    os.kill(link, signal.SIGKILL)
    rc, _, stderr = finish(p, timeout=120)
    assert rc == 1, stderr
    lines = [x for x in stderr.strip().splitlines() if x.startswith("mmfl: error")]
    assert lines == [f"mmfl: error: flower-superlink exited (code -9); see "
                     f"{out / 'flower' / 'logs' / 'superlink.log'}"], stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed", summary
    assert "flower-superlink exited (code -9)" in summary["error"]
    assert_no_survivors(out)


@pytest.mark.timeout(360)
def test_killing_mmfl_leaves_no_flower_process(tmp_path, reaper):
    """`mmfl flower-local` SIGKILLed mid-run (no cleanup code runs): the SuperLink, the
    SuperNodes and what Flower started in sessions of their own (superexec, flwr-serverapp,
    ClientApps) are all gone within 2 s."""
    out = tmp_path / "run"
    p = start_cli(str(write_config(tmp_path, rounds=40)), "--out", str(out),
                  "--round-timeout", "60")
    reaper.append(p)
    _wait_for_round(p, out)
    assert any("flwr-serverapp" in cmdline(pid) for pid in survivors(out))
    p.kill()
    p.wait(timeout=10)
    t0 = time.monotonic()
    while survivors(out) and time.monotonic() - t0 < 10:
        time.sleep(0.05)
    assert_no_survivors(out, wait=0)
    assert time.monotonic() - t0 < 2.0


# -- cheap checks --------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, key", [
    (["--round-timeout", "-1"], "--round-timeout"),
    (["--round-timeout", "nan"], "--round-timeout"),
    (["--round-timeout", "inf"], "--round-timeout"),
    (["--node-wait", "0"], "--node-wait"),
    (["--node-wait", "nan"], "--node-wait"),
    (["--node-wait=-inf"], "--node-wait"),
    (["--port", "70000"], "--port"),
    (["--host", "not a host"], "--host"),
    (["--host", ""], "--host"),
    (["--host", "a..b"], "--host"),
    (["--host", "x" * 300], "--host"),
    (["--set", "rounds=0"], "rounds"),
])
def test_invalid_options_exit_2(tmp_path, capsys, extra, key):
    """Invalid values (NaN and infinities included, which once meant "no limit") are one
    line naming the option, exit 2, and nothing is written or started."""
    from mmfl import cli

    out = tmp_path / "x"
    rc = cli.main(["flower-local", str(write_config(tmp_path)), "--out", str(out), *extra])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith(f"mmfl: error: {key}") and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_valid_hosts_are_accepted(tmp_path):
    from mmfl.experiment.config import load_config

    cfg = load_config(write_config(tmp_path))
    for host in ("127.0.0.1", "0.0.0.0", "::", "fd00::2", "localhost", "server-1.example.org."):
        assert LocalDeployment(cfg, tmp_path / "run", host=host).host == host


def _modes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mode & 0o777
            for p in [folder, *folder.rglob("*")]}


def test_deployment_files_are_private(tmp_path):
    """Every folder under OUT/flower is 0700 and every file 0600 (commands.sh 0700), created
    so: the shards, identity file, CA, certificate, keys and FLWR_HOME included; the
    process's umask is restored afterwards."""
    from mmfl.experiment.config import load_config

    before = os.umask(0o022)
    try:
        dep = LocalDeployment(load_config(write_config(tmp_path)), tmp_path / "run", auth=True)
        dep.commands()  # prepare + commands.sh
        assert os.umask(0o022) == 0o022
    finally:
        os.umask(before)
    modes = _modes(dep.dir)
    for name in ("shards/client-0.npz", "identity.json", "tls/ca.crt", "tls/server.key",
                 "keys/node0", "keys/node0.pub", "home/config.toml", "experiment.toml",
                 "app/pyproject.toml", "run-config.toml", "deployment.json"):
        assert name in modes, name
    bad = {n: oct(m) for n, m in modes.items()
           if m & 0o077 or (dep.dir / n).is_dir() and m != 0o700}
    assert not bad, bad
    assert modes["commands.sh"] == 0o700


def test_prepare_only_keeps_the_users_files(tmp_path, capsys):
    """--prepare-only on an existing OUT/flower removes only what mmfl created there: a user's
    file beside them survives a second preparation, and a user's file where mmfl needs to
    write is an input error (one line, exit 2) that leaves it untouched."""
    from mmfl import cli

    cfg = str(write_config(tmp_path))
    out = tmp_path / "run"
    assert cli.main(["flower-local", cfg, "--out", str(out), "--prepare-only"]) == 0
    notes = out / "flower" / "notes.txt"
    notes.write_text("mine", encoding="utf-8")
    (out / "flower" / "shards" / "client-9.npz").write_text("stale")  # inside mmfl's folder
    assert cli.main(["flower-local", cfg, "--out", str(out), "--prepare-only"]) == 0
    assert notes.read_text() == "mine"
    assert sorted(p.name for p in (out / "flower" / "shards").iterdir()) == [
        "client-0.npz", "client-1.npz", "client-2.npz"]
    capsys.readouterr()
    other = tmp_path / "other"
    (other / "flower").mkdir(parents=True)
    users = other / "flower" / "commands.sh"
    users.write_text("echo mine\n", encoding="utf-8")
    assert cli.main(["flower-local", cfg, "--out", str(other), "--prepare-only"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "commands.sh" in err, err
    assert users.read_text() == "echo mine\n"
    assert sorted(p.name for p in (other / "flower").iterdir()) == ["commands.sh"]


def test_port_in_use_is_an_input_error(tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        p = start_cli(str(write_config(tmp_path)), "--out", str(tmp_path / "run"), "--port",
                      str(port))
        rc, _, stderr = finish(p, timeout=120)
    assert rc == 2 and "--port: is in use" in stderr, stderr
    assert not survivors(tmp_path / "run")


def test_existing_run_is_an_input_error(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.csv").write_text("round,task,accuracy,loss\n")
    p = start_cli(str(write_config(tmp_path)), "--out", str(out))
    rc, _, stderr = finish(p, timeout=120)
    # "already holds a run", or, for a folder without mmfl's run marker, "not written by mmfl"
    assert rc == 2 and len(stderr.strip().splitlines()) == 1, stderr
    assert "metrics.csv" in stderr or "already holds a run" in stderr, stderr
    assert not (out / "flower").exists()


def test_generated_certificates(tmp_path):
    from cryptography import x509

    from mmfl.flower.certs import make_node_key, make_tls_files

    files = make_tls_files(tmp_path / "tls", ("10.1.2.3", "server.example"))
    cert = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(a) for a in san.get_values_for_type(x509.IPAddress)} >= {"127.0.0.1", "10.1.2.3"}
    assert {"localhost", "server.example"} <= set(san.get_values_for_type(x509.DNSName))
    assert cert.issuer == ca.subject
    cert.verify_directly_issued_by(ca)
    assert files.server_key.stat().st_mode & 0o077 == 0
    priv, pub = make_node_key(tmp_path / "keys" / "node0")
    assert pub.read_text().startswith("ecdsa-sha2-nistp384 ")
    assert priv.stat().st_mode & 0o077 == 0


def test_app_directory_is_shipped():
    import tomllib

    conf = tomllib.loads((local.APP_DIR / "pyproject.toml").read_text())
    flwr = conf["tool"]["flwr"]["app"]
    assert flwr["components"] == {"serverapp": "mmfl.flower.server:server_app",
                                  "clientapp": "mmfl.flower.client:client_app"}
    assert set(flwr["config"]) == {"config-file", "out-dir", "round-timeout", "nodes",
                                   "node-wait", "resume", "identity-file"}


def test_stop_kills_detached_grandchildren(tmp_path):
    """Processes that leave the process group (as Flower's superexec does) are still found by
    the marker and stopped."""
    from mmfl.experiment.config import load_config

    cfg = load_config(write_config(tmp_path))
    dep = LocalDeployment(cfg, tmp_path / "run", grace=1.0)
    env = {**os.environ, processes.MARKER: dep.token}
    code = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
            "'import time; time.sleep(60)'], start_new_session=True); time.sleep(60)")
    proc = processes.Proc("fake", [sys.executable, "-c", code], tmp_path, tmp_path / "fake.log",
                          env)
    dep.procs.spawn(proc)
    dep.superlink = proc
    deadline = time.monotonic() + 20
    while len(dep.processes()) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(dep.processes()) == 2
    dep.stop()
    assert dep.processes() == []


def test_flower_run_error_without_app(tmp_path):
    from mmfl.experiment.config import load_config

    cfg = load_config(write_config(tmp_path))
    with pytest.raises(Exception, match="without pyproject.toml"):
        LocalDeployment(cfg, tmp_path / "run", app_dir=tmp_path / "none").prepare()
    assert issubclass(FlowerRunError, Exception)


def test_prepare_only_writes_commands(tmp_path):
    """--prepare-only: every file of the deployment and the command of every process; nothing
    is started."""
    out = tmp_path / "run"
    p = start_cli(str(write_config(tmp_path)), "--out", str(out), "--prepare-only", "--tls",
                  "--host", "0.0.0.0", "--port", "9399")
    rc, stdout, stderr = finish(p, timeout=120)
    assert rc == 0, stderr
    fl = out / "flower"
    for name in ("experiment.toml", "run-config.toml", "app/pyproject.toml", "home/config.toml",
                 "tls/ca.crt", "commands.sh"):
        assert (fl / name).is_file(), name
    assert sorted(f.name for f in (fl / "shards").iterdir()) == [
        "client-0.npz", "client-1.npz", "client-2.npz"]
    text = (fl / "commands.sh").read_text()
    assert text.strip() in stdout
    assert "-m mmfl.flower.linkguard --host 0.0.0.0 --port 9399" in text
    assert text.count("flower-supernode --superlink 127.0.0.1:9399") == 3
    assert "client-id=2" in text and "--root-certificates" in text and "flwr run" in text
    assert 'address = "127.0.0.1:9399"' in (fl / "home" / "config.toml").read_text()
    import tomllib

    rc_keys = tomllib.loads((fl / "run-config.toml").read_text())
    assert rc_keys["out-dir"] == str(out) and rc_keys["nodes"] == 3
    assert not survivors(out)


SIGTERM_SCRIPT = """
import os, sys, time
from mmfl.experiment.config import load_config
from mmfl.flower import local, processes

dep = local.LocalDeployment(load_config(sys.argv[1]), sys.argv[2], grace=1.0)
env = {**os.environ, processes.MARKER: dep.token}
code = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
        "'import time; time.sleep(60)'], start_new_session=True); time.sleep(60)")
try:
    with dep:
        proc = processes.Proc("fake", [sys.executable, "-c", code], dep.out, dep.out / "f.log", env)
        dep.out.mkdir(parents=True, exist_ok=True)
        dep.procs.spawn(proc)
        dep.superlink = proc
        while len(dep.processes()) < 2:
            time.sleep(0.1)
        print(dep.token, flush=True)
        time.sleep(60)
except processes.Terminated as e:
    sys.exit(128 + e.signum)
"""


def _start_deployment_script(tmp_path):
    """A Python process running SIGTERM_SCRIPT (a deployment that waits); its first stdout
    line is the deployment's process marker."""
    script = tmp_path / "deployment.py"
    script.write_text(SIGTERM_SCRIPT, encoding="utf-8")
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.Popen([sys.executable, str(script), str(write_config(tmp_path)),
                             str(tmp_path / "run")], stdout=subprocess.PIPE, text=True, env=env)


def test_sigterm_stops_every_process(tmp_path):
    """SIGTERM to a process running a deployment raises Terminated in it; leaving the ``with``
    block stops the children, also those in sessions of their own."""
    p = _start_deployment_script(tmp_path)
    try:
        token = p.stdout.readline().strip()
        assert len(processes.marked_processes(token)) == 2
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=30) == 128 + signal.SIGTERM
        assert processes.marked_processes(token) == []
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_children_die_when_the_parent_is_killed(tmp_path):
    """SIGKILL to a process running a deployment (no cleanup runs): its children, also those
    in sessions of their own that no death signal reaches (as Flower's superexec and apps),
    are gone within 2 s (the watchdog)."""
    p = _start_deployment_script(tmp_path)
    try:
        token = p.stdout.readline().strip()
        assert len(processes.marked_processes(token)) == 2
        p.kill()
        p.wait(timeout=10)
        t0 = time.monotonic()
        while processes.marked_processes(token) and time.monotonic() - t0 < 5:
            time.sleep(0.05)
        assert processes.marked_processes(token) == []
        assert time.monotonic() - t0 < 2.0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
