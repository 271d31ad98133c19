"""mmfl.supervisor.supervised: the processes started inside a block (and their descendants)
never outlive it, nor the process that opened it, even when that one is killed with SIGKILL;
``mmfl sweep --jobs k`` and engine ``flower`` rely on it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from testkit import ROOT, tiny_config_text

from mmfl.supervisor import SUPERVISED, descendants, processes_with_env, supervised

SLEEP = [sys.executable, "-c", "import time; time.sleep(120)"]
#: a child that starts a grandchild in a session of its own (as Ray and Flower do), then sleeps
DETACHING = [sys.executable, "-c",
             "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
             "'import time; time.sleep(120)'], start_new_session=True); time.sleep(120)"]


def wait_for(cond, timeout: float = 30.0) -> bool:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if cond():
            return True
        time.sleep(0.05)
    return bool(cond())


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def token_of(pid: int) -> str | None:
    """The supervision token in process ``pid``'s environment, or None."""
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    prefix = f"{SUPERVISED}=".encode()
    return next((e[len(prefix):].decode() for e in env if e.startswith(prefix)), None)


def env_with_src() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_block_marks_its_processes_and_kills_leftovers_at_its_end():
    before = os.environ.get(SUPERVISED)
    with supervised() as token:
        assert os.environ[SUPERVISED] == token and len(token) == 16
        child = subprocess.Popen(DETACHING)
        assert wait_for(lambda: len(processes_with_env(SUPERVISED, token)) == 2)
        assert processes_with_env(SUPERVISED, token)[0] != os.getpid()
    assert os.environ.get(SUPERVISED) == before
    assert child.wait(timeout=10) == -signal.SIGKILL
    assert wait_for(lambda: processes_with_env(SUPERVISED, token) == [], 10)


def test_nested_blocks_use_fresh_tokens_and_restore_the_outer_one():
    with supervised() as outer:
        with supervised() as inner:
            assert inner != outer and os.environ[SUPERVISED] == inner
        assert os.environ[SUPERVISED] == outer


def test_block_ends_normally_when_its_processes_have_exited():
    with supervised() as token:
        assert subprocess.run([sys.executable, "-c", "pass"]).returncode == 0
    assert processes_with_env(SUPERVISED, token) == []


OWNER = """
import subprocess, sys, time
from mmfl.supervisor import supervised
with supervised() as token:
    subprocess.Popen({cmd!r})
    print(token, flush=True)
    time.sleep(120)
"""


#: a child that starts a grandchild without the marker (an empty environment), as a process that
#: overwrites its environment with its title looks in /proc; prints the grandchild's pid
UNMARKED = [sys.executable, "-c",
            "import subprocess, sys, time; g = subprocess.Popen([sys.executable, '-c', "
            "'import time; time.sleep(120)'], env={}, start_new_session=True); "
            "print(g.pid, flush=True); time.sleep(120)"]


def test_descendants_of_marked_processes_are_tracked_without_the_marker():
    """A descendant of a marked process whose own environment lacks the marker dies with the
    owner too, once a scan of the watchdog has seen it (every SCAN_EVERY seconds)."""
    from mmfl.supervisor import SCAN_EVERY

    code = OWNER.replace("subprocess.Popen({cmd!r})",
                         "c = subprocess.Popen({cmd!r}, stdout=subprocess.PIPE, text=True)")
    code = code.replace("print(token, flush=True)",
                        "print(token, c.stdout.readline().strip(), flush=True)")
    p = subprocess.Popen([sys.executable, "-c", code.format(cmd=UNMARKED)],
                         stdout=subprocess.PIPE, text=True, env=env_with_src())
    try:
        token, grandchild = p.stdout.readline().split()
        grandchild = int(grandchild)
        assert alive(grandchild) and token_of(grandchild) is None
        assert grandchild not in processes_with_env(SUPERVISED, token)
        time.sleep(3 * SCAN_EVERY)
        _kill_and_check(p, [grandchild])
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_killing_the_owner_kills_the_block_processes_within_two_seconds():
    """SIGKILL to the process that opened the block (no cleanup runs in it): its children,
    also those in sessions of their own that no death signal reaches, are gone in 2 s."""
    p = subprocess.Popen([sys.executable, "-c", OWNER.format(cmd=DETACHING)],
                         stdout=subprocess.PIPE, text=True, env=env_with_src())
    try:
        token = p.stdout.readline().strip()
        assert wait_for(lambda: len(processes_with_env(SUPERVISED, token)) == 2)
        p.kill()
        p.wait(timeout=10)
        t0 = time.monotonic()
        assert wait_for(lambda: processes_with_env(SUPERVISED, token) == [], 5)
        assert time.monotonic() - t0 < 2.0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def _kill_and_check(p: subprocess.Popen, workers: list[int]) -> None:
    """SIGKILL ``p`` and assert that every pid of ``workers`` is gone within 5 s."""
    assert workers, "no worker processes were found"
    p.kill()
    p.wait(timeout=10)
    assert wait_for(lambda: not [w for w in workers if alive(w)], 5), \
        [Path(f"/proc/{w}/cmdline").read_bytes() for w in workers if alive(w)]


@pytest.mark.slow
def test_killing_a_sweep_leaves_no_worker(tmp_path):
    """kill -9 of ``mmfl sweep --jobs 2`` while both runs train: the workers die with it (a
    worker without the supervisor would finish its whole run first)."""
    cfg = tmp_path / "c.toml"
    cfg.write_text(tiny_config_text(rounds=100000), encoding="utf-8")
    out = tmp_path / "sweep"
    p = subprocess.Popen([sys.executable, "-m", "mmfl.cli", "sweep", str(cfg), "--seeds", "1,2",
                          "--jobs", "2", "--out", str(out), "--progress", "none"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env_with_src())
    try:
        assert wait_for(lambda: len(list(out.glob("seed=*/metrics.csv"))) == 2, 120)
        _kill_and_check(p, descendants(p.pid))
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


@pytest.mark.flower
@pytest.mark.slow
def test_killing_a_flower_engine_run_leaves_no_ray_process(tmp_path):
    """kill -9 of ``mmfl run`` with engine ``flower`` once its rounds run: Ray's processes
    (GCS, raylet, workers, which Ray starts partly in sessions of their own) die with it."""
    cfg = tmp_path / "c.toml"
    cfg.write_text(tiny_config_text(rounds=100000), encoding="utf-8")
    out = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-m", "mmfl.cli", "run", str(cfg), "--out", str(out),
                          "--set", "engine=flower", "--set", "clients.count=4"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env_with_src())
    try:
        assert wait_for(lambda: (out / "metrics.csv").exists()
                        and len((out / "metrics.csv").read_text().splitlines()) > 3, 180)
        token = next(filter(None, map(token_of, descendants(p.pid))))
        marked = processes_with_env(SUPERVISED, token)
        assert len(marked) >= 2  # Ray's GCS and raylet at least
        # Ray's workers and agents overwrite their /proc environment with their title: they
        # are found as descendants (some of them orphaned once the raylet dies)
        _kill_and_check(p, sorted(set(marked) | set(descendants(p.pid))))
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
