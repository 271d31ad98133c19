"""The parts of ``mmfl flower-local`` without a deployment: the flwr CLI wrapper's parsing, the
process command lines, following a run through its files, and the process supervisor on plain
Python processes (no Flower process is started here)."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time

import pytest

from mmfl.flower import flwr_cli, follow, launch, processes
from mmfl.flower.flwr_cli import FlowerRunError, FlwrCli


# -- the flwr CLI wrapper ---------------------------------------------------------------------
def test_json_output_is_parsed_after_a_banner():
    text = 'Loading project...\n{"success": true, "run-id": 42}\n'
    assert FlwrCli.json(text, "flwr run") == {"success": True, "run-id": 42}


@pytest.mark.parametrize("text, match", [
    ("no json here", "flwr ls: unexpected output"),
    ('{"success": false, "error-message": "no such run"}', "flwr ls failed: no such run"),
    ("[1, 2]", "flwr ls: unexpected output"),
])
def test_json_errors_are_flower_run_errors(text, match):
    with pytest.raises(FlowerRunError, match=match):
        FlwrCli.json(text, "flwr ls")


def test_server_traceback_is_the_last_traceback_else_the_tail():
    log_text = "a\nTraceback (most recent call last):\n  x\nValueError: 1\nb\n" \
               "Traceback (most recent call last):\n  y\nKeyError: 2\n"
    assert flwr_cli.server_traceback(log_text).splitlines() == [
        "Traceback (most recent call last):", "  y", "KeyError: 2"]
    assert flwr_cli.server_traceback("\n".join(map(str, range(100))), lines=3) == "97\n98\n99"


def test_connection_file(tmp_path):
    import tomllib

    flwr_cli.write_connection(tmp_path, "127.0.0.1:9300", None)
    conf = tomllib.loads((tmp_path / "config.toml").read_text())
    assert conf["superlink"]["default"] == flwr_cli.CONNECTION
    assert conf["superlink"][flwr_cli.CONNECTION] == {"address": "127.0.0.1:9300",
                                                      "insecure": True}
    ca = tmp_path / 'odd "name".crt'
    flwr_cli.write_connection(tmp_path, "[::1]:9300", ca)
    conf = tomllib.loads((tmp_path / "config.toml").read_text())
    assert conf["superlink"][flwr_cli.CONNECTION] == {"address": "[::1]:9300",
                                                      "root-certificates": str(ca)}


# -- command lines ----------------------------------------------------------------------------
class _Tls:
    ca_cert, server_cert, server_key = "ca.crt", "server.pem", "server.key"


def test_superlink_command():
    argv = launch.superlink_argv("0.0.0.0", 9300, None, False)
    assert argv[1:4] == ["-m", "mmfl.flower.linkguard", "--host"]
    assert "--insecure" in argv and "--enable-supernode-auth" not in argv
    argv = launch.superlink_argv("127.0.0.1", 9300, _Tls, True)
    assert "--insecure" not in argv and argv[-1] == "--enable-supernode-auth"
    assert argv[argv.index("--ssl-certfile") + 1] == "server.pem"


def test_supernode_command(tmp_path):
    pytest.importorskip("flwr")
    shard = tmp_path / "client 1.npz"
    argv = launch.supernode_argv("127.0.0.1:9300", 9400, 1, shard, None, None)
    assert argv[argv.index("--port") + 1] == "9400" and "--insecure" in argv
    config = f"client-id=1 data-file={json.dumps(str(shard))}"
    assert argv[argv.index("--node-config") + 1] == config
    argv = launch.supernode_argv("h:1", 9400, 0, shard, tmp_path / "ca.crt", tmp_path / "k")
    assert "--insecure" not in argv and argv[-2:] == ["--auth-supernode-private-key",
                                                      str(tmp_path / "k")]
    proc = processes.Proc("node1", argv, tmp_path, tmp_path / "n.log", {})
    assert proc.port == 9400 and not proc.alive


# -- following a run --------------------------------------------------------------------------
def test_follower_reads_rounds_summary_and_rejections(tmp_path, caplog):
    f = follow.RunFollower(tmp_path)
    assert f.rounds_done() == [] and f.summary_status(0.0) is None
    (tmp_path / "rounds.csv").write_text("round,slots\n1,3\n2,4\n")
    assert [r["slots"] for r in f.rounds_done()] == ["3", "4"]
    (tmp_path / "summary.json").write_text('{"status": "running"}')
    assert f.summary_status(0.0) == "running"
    assert f.summary_status(time.time() + 60) is None  # written before the submission
    (tmp_path / "flower").mkdir()
    rec = {"what": "discovery", "node": 7, "client": 1, "reason": "sha256 differs"}
    (tmp_path / "flower" / "rejected.jsonl").write_text(json.dumps(rec) + "\n")
    f.skip_rejections()  # an earlier attempt's record: not reported again
    with caplog.at_level(logging.WARNING):
        f.report_rejections()
        assert "rejected" not in caplog.text
        with open(tmp_path / "flower" / "rejected.jsonl", "a") as fh:
            fh.write(json.dumps({**rec, "node": 8}) + "\n")
        f.report_rejections()
        f.report_rejections()
    assert caplog.text.count("Flower: rejected discovery from node 8 (client 1)") == 1


# -- processes --------------------------------------------------------------------------------
def test_processes_stop_a_group_and_a_detached_grandchild(tmp_path):
    """A child and the grandchild it starts in a session of its own (as Flower's superexec
    does) both carry the marker; stop() ends both, and the child's log holds its command."""
    procs = processes.Processes(f"test-{os.getpid()}-{time.time_ns()}", grace=1.0)
    code = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
            "'import time; time.sleep(60)'], start_new_session=True); time.sleep(60)")
    p = processes.Proc("fake", [sys.executable, "-c", code], tmp_path / "cwd", tmp_path / "f.log",
                       {**os.environ, processes.MARKER: procs.token})
    procs.spawn(p)
    try:
        deadline = time.monotonic() + 20
        while len(procs.alive()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(procs.alive()) == 2 and p.alive
        assert (tmp_path / "f.log").read_text().startswith(f"$ {sys.executable} -c")
        assert (tmp_path / "cwd").stat().st_mode & 0o077 == 0
        procs.stop([p])
        assert procs.alive() == [] and not p.alive
    finally:
        for pid in procs.alive():
            os.kill(pid, signal.SIGKILL)


def test_terminate_on_signals_raises_and_restores():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(processes.Terminated) as err, processes.terminate_on_signals():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)
    assert err.value.signum == signal.SIGTERM and isinstance(err.value, KeyboardInterrupt)
    assert signal.getsignal(signal.SIGTERM) is before
    with processes.signals_ignored():
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    assert signal.getsignal(signal.SIGINT) is not signal.SIG_IGN


def test_free_port_avoids_and_port_open():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        assert processes.port_open("127.0.0.1", busy)
        port = processes.free_port(avoid={busy})
        assert port != busy and not processes.port_open("127.0.0.1", port)


# -- the ServerApp's progress, relayed ----------------------------------------------------------
def _record(round_=2):
    import numpy as np

    from mmfl.core.metrics import RoundCost
    from mmfl.experiment.recording import RoundRecord, TaskRound

    tasks = (TaskRound("digits", 0.5, 1.25, 3, 4, 4, 12, 0.75),
             TaskRound("wave", None, None, 0, 1, 0, 0, None))
    return RoundRecord(round_, 6, ("digits", "wave"), np.array([0.5, np.nan]),
                       np.array([1.25, 2.0]), 4, 0.125, tasks=tasks, available=5, budget=3.0,
                       expected_slots=2.5, slots_assigned=5, cost=RoundCost(4, 2, 2, 3),
                       local_steps=np.int64(12), stale_bytes=0, sim_seconds=1.5, sim_time=3.0,
                       stragglers=1, missing=np.int64(1), note="1 pairs missing (no reply)",
                       train_seconds=0.1, eval_seconds=0.02)


def _same(a, b) -> bool:
    return json.dumps(follow.record_to_json(a)) == json.dumps(follow.record_to_json(b))


def test_round_records_survive_the_progress_file(tmp_path):
    """What the ServerApp's callback writes is the record flower-local's callbacks get, field
    for field (arrays, per-task rows, costs, NaN included)."""
    import numpy as np

    rec = _record()
    back = follow.record_from_json(json.loads(json.dumps(follow.record_to_json(rec))))
    assert _same(rec, back) and back.tasks == rec.tasks and back.cost == rec.cost
    np.testing.assert_array_equal(back.accuracy, rec.accuracy)
    assert back.loss.dtype == np.float64 and back.task_names == ("digits", "wave")
    unknown = {**follow.record_to_json(rec), "added_later": 1}
    assert _same(follow.record_from_json(unknown), rec)


class _Seen:
    def __init__(self):
        self.calls = []

    def on_start(self, cfg, federation, start_round):
        self.calls.append(("start", cfg, federation, start_round))

    def on_round(self, record):
        self.calls.append(("round", record))

    def on_end(self, summary):
        self.calls.append(("end", summary))


def test_relay_hands_the_servers_events_to_the_callbacks(tmp_path, caplog):
    writer = follow.ProgressWriter(tmp_path / "flower" / follow.PROGRESS)
    f = follow.RunFollower(tmp_path)
    seen = _Seen()
    assert f.relay([seen], "cfg", "fed") == 0  # no file yet
    writer.write({"event": "nodes", "phase": "discover", "have": 4, "want": 6, "seconds": 12.3})
    writer.on_start("server's cfg", "server's federation", 2)
    records = [_record(3), _record(4)]
    for r in records:
        writer.on_round(r)
    with open(tmp_path / "flower" / follow.PROGRESS, "a") as fh:
        fh.write('{"event": "round", "rec')  # a line being written: left for the next look
    with caplog.at_level(logging.INFO, logger="mmfl.flower.follow"):
        assert f.relay([seen], "cfg", "fed") == 4
    assert "ServerApp: waiting for Flower nodes to answer discovery: 4 of 6 (12 s)" in caplog.text
    assert seen.calls[0] == ("start", "cfg", "fed", 2)  # flower-local's own config
    assert [c[0] for c in seen.calls] == ["start", "round", "round"]
    assert all(_same(c[1], r) for c, r in zip(seen.calls[1:], records))
    writer.on_end({"status": "completed"})
    assert f.relay([seen], "cfg", "fed") == 0  # the broken line is never complete
    assert len(seen.calls) == 3  # on_end is flower-local's own, with the summary


@pytest.mark.parametrize("event, line", [
    ({"phase": "connect", "have": 0, "want": 6, "seconds": 0.04},
     "waiting for Flower nodes to connect: 0 of 6 (0 s)"),
    ({"phase": "ready", "have": 5, "want": 6, "seconds": 31.6, "nodes": 7},
     "7 Flower nodes serve 5 of 6 clients (32 s)"),
])
def test_nodes_messages(event, line):
    assert follow.nodes_message(event) == line


def test_the_round_line_is_mmfl_runs(caplog):
    """flower-local's CLI hands relayed records to mmfl run's own log formatter: a relayed
    record gives the same line as the record itself."""
    from mmfl.cli import _LogProgress

    import re

    lines = []
    for rec in (_record(), follow.record_from_json(follow.record_to_json(_record()))):
        cb = _LogProgress()
        cb.start, cb.t0 = 0, time.perf_counter()
        with caplog.at_level(logging.INFO, logger="mmfl"):
            caplog.clear()
            cb.on_round(rec)
        lines.append(re.sub(r"ETA \d+s", "ETA", caplog.records[-1].getMessage()))
    assert lines[0] == lines[1] == "round 2/6  slots 4 (m=3)  0.12s  ETA  digits=0.500 wave=nan"
