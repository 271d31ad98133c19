"""The ``flwr`` command line as ``mmfl flower-local`` uses it: submit a run, ask its status,
read the ServerApp's log, register SuperNode keys.

Every call runs this environment's ``flwr`` (:func:`flower_executable`) with the
deployment's private ``FLWR_HOME``, whose ``config.toml`` names one SuperLink connection,
:data:`CONNECTION` (:func:`write_connection`). Each call's command line and output are
appended to ``logs/<name>.log``; a failing call raises :class:`FlowerRunError` naming that
file. Calls with ``--format json`` are parsed by :meth:`FlwrCli.json`.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

from mmfl.errors import MmflError
from mmfl.flower.workdir import UMASK, private_files

__all__ = ["CONNECTION", "FLOWER_ENV", "FlowerRunError", "FlwrCli", "flower_executable",
           "server_traceback", "toml_str", "write_connection"]

#: Name of the SuperLink connection written into the private FLWR_HOME/config.toml.
CONNECTION = "mmfl-local"
#: Environment of every Flower process and ``flwr`` call: no telemetry, no update check, no
#: dependency installation at run time, unbuffered output (for the logs).
FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "PYTHONUNBUFFERED": "1",
}
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class FlowerRunError(MmflError):
    """The Flower run failed (ServerApp raised, a process died, or it did not start).

    Attributes:
        details: the ServerApp log tail or the process log tail that explains it ('' if none).
    """

    def __init__(self, message: str, details: str = ""):
        super().__init__(message)
        self.details = details


def flower_executable(name: str) -> str:
    """Path of a Flower console script (``flwr``, ``flower-superlink``...) of *this*
    interpreter's environment, so every process imports the same mmfl, flwr and torch."""
    cand = Path(sys.executable).parent / name
    if cand.exists():
        return str(cand)
    found = shutil.which(name)
    if found:
        return found
    raise MmflError(f"{name}: Flower is not installed in this environment; "
                    "install the flower extra: pip install 'mmfl[flower]'")


def toml_str(s: str) -> str:
    """``s`` as a TOML basic string (a JSON string is one)."""
    return json.dumps(s)


def write_connection(home: Path, address: str, ca_cert: Path | None) -> None:
    """``home/config.toml``: the SuperLink connection :data:`CONNECTION` at ``address``
    (host:port), verified with ``ca_cert`` (TLS) or insecure (None)."""
    lines = ["[superlink]", f'default = "{CONNECTION}"', "",
             f"[superlink.{CONNECTION}]", f'address = "{address}"']
    if ca_cert is not None:
        lines.append(f"root-certificates = {toml_str(str(ca_cert))}")
    else:
        lines.append("insecure = true")
    (home / "config.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")


def server_traceback(text: str, lines: int = 40) -> str:
    """The last traceback in a ServerApp log (else its tail)."""
    body = text.rstrip().splitlines()
    for k in range(len(body) - 1, -1, -1):
        if body[k].startswith("Traceback"):
            return "\n".join(body[k:k + 200][-lines * 2:])
    return "\n".join(body[-lines:])


class FlwrCli:
    """``flwr`` calls of one deployment.

    Args:
        cwd: working directory of the calls (``OUT/flower``).
        logs: folder of the call logs (``OUT/flower/logs``).
        env: the environment of the calls (FLWR_HOME and :data:`FLOWER_ENV` included).
    """

    def __init__(self, cwd: Path, logs: Path, env: dict[str, str]):
        self.cwd = cwd
        self.logs = logs
        self.env = env

    def __call__(self, *args: str, timeout: float = 120.0, log_name: str = "flwr",
                 check: bool = True) -> str:
        """Run ``flwr ARGS``; returns stdout. Its output is appended to
        ``logs/<log_name>.log``; a non-zero exit raises FlowerRunError (``check``)."""
        argv = [flower_executable("flwr"), *args]
        try:
            r = subprocess.run(argv, check=False, cwd=self.cwd, env={**self.env, "COLUMNS": "200"},
                               capture_output=True, text=True, timeout=timeout,
                               start_new_session=True, umask=UMASK)
        except subprocess.TimeoutExpired:
            raise FlowerRunError(
                f"`flwr {' '.join(args)}` did not answer within {timeout:.0f}s") from None
        with contextlib.suppress(OSError), private_files(), \
                open(self.logs / f"{log_name}.log", "a") as f:
            f.write(f"$ flwr {' '.join(args)}  (exit {r.returncode})\n{r.stdout}{r.stderr}\n")
        if check and r.returncode != 0:
            raise FlowerRunError(f"`flwr {' '.join(args[:2])}` failed (exit {r.returncode}); "
                                 f"see {self.logs / (log_name + '.log')}",
                                 (r.stdout + r.stderr).strip()[-3000:])
        return r.stdout

    @staticmethod
    def json(text: str, what: str) -> dict:
        """The JSON object in the output of a ``--format json`` call; FlowerRunError when
        there is none or it reports ``success: false``."""
        start = text.find("{")
        try:
            obj = json.loads(text[start:]) if start >= 0 else None
        except json.JSONDecodeError:
            obj = None
        if not isinstance(obj, dict):
            raise FlowerRunError(f"{what}: unexpected output", text.strip()[-2000:])
        if obj.get("success") is False:
            raise FlowerRunError(f"{what} failed: {obj.get('error-message', obj)}")
        return obj

    def submit(self, app: Path, run_config: Path) -> str:
        """``flwr run APP`` with the run config file; returns the run id."""
        out = self("run", str(app), CONNECTION, "--run-config", str(run_config), "--format",
                   "json", log_name="flwr-run")
        return str(self.json(out, "flwr run")["run-id"])

    def status(self, run_id: str) -> str:
        """The run's status from ``flwr ls``: ``pending``, ``starting``, ``running`` or
        ``finished:completed|failed|stopped``."""
        out = self("ls", CONNECTION, "--run-id", str(run_id), "--format", "json",
                   log_name="flwr-ls", timeout=60.0)
        for r in self.json(out, "flwr ls").get("runs") or []:
            if str(r.get("run-id")) == str(run_id):
                return str(r.get("status"))
        raise FlowerRunError(f"flwr ls: run {run_id} not found", out[-2000:])

    def runs(self) -> list[dict]:
        """Every run the SuperLink knows (``flwr ls``)."""
        return self.json(self("ls", CONNECTION, "--format", "json", log_name="flwr-ls"),
                         "flwr ls").get("runs") or []

    def server_log(self, run_id: str) -> str:
        """The ServerApp's captured output (``flwr log --show``), colour codes removed."""
        out = self("log", str(run_id), CONNECTION, "--show", log_name="flwr-log", check=False,
                   timeout=60.0)
        return _ANSI.sub("", out)

    def register(self, public_key: Path, name: str) -> int:
        """``flwr supernode register``: the node id Flower gives the key."""
        out = self("supernode", "register", str(public_key), CONNECTION, "--name", name,
                   "--format", "json", log_name="flwr-register")
        return int(self.json(out, "flwr supernode register")["node-id"])
