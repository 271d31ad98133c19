"""The command line of every process of a deployment, and ``commands.sh``, the same commands
as a shell script (``mmfl flower-local --prepare-only``; the starting point for running a
deployment on several machines, docs/flower.md "Several machines").

* the SuperLink: Flower's ``flower-superlink`` started through :mod:`mmfl.flower.linkguard`
  (Control and Runtime APIs for loopback peers only), over TLS with the run's certificate or
  ``--insecure``, with ``--enable-supernode-auth`` under SuperNode authentication;
* one ``flower-supernode`` per client i: node config ``client-id=i`` and ``data-file`` (the
  client's shard), its own runtime ``--port``, the CA certificate or ``--insecure``, and its
  private key under authentication;
* ``flwr run APP mmfl-local --run-config FILE``.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from mmfl.flower.flwr_cli import CONNECTION, FLOWER_ENV, flower_executable, toml_str

__all__ = ["commands_script", "superlink_argv", "supernode_argv"]


def superlink_argv(host: str, port: int, tls_files, auth: bool) -> list[str]:
    """The SuperLink's command: listening on ``host:port``, TLS with ``tls_files``
    (:class:`mmfl.flower.certs.TlsFiles`) or insecure (None), node authentication (``auth``)."""
    argv = [sys.executable, "-m", "mmfl.flower.linkguard", "--host", host,
            "--port", str(port), "--disable-runtime-dependency-installation"]
    if tls_files is not None:
        argv += ["--ssl-ca-certfile", str(tls_files.ca_cert),
                 "--ssl-certfile", str(tls_files.server_cert),
                 "--ssl-keyfile", str(tls_files.server_key)]
    else:
        argv.append("--insecure")
    if auth:
        argv.append("--enable-supernode-auth")
    return argv


def supernode_argv(address: str, port: int, client: int, shard: Path, ca_cert: Path | None,
                   key: Path | None) -> list[str]:
    """Client ``client``'s SuperNode: connecting to the SuperLink at ``address``, its runtime
    API on ``port``, its data in ``shard``; verifying the SuperLink with ``ca_cert`` (None:
    insecure); authenticating with the private ``key`` (None: no authentication)."""
    argv = [flower_executable("flower-supernode"), "--superlink", address, "--port", str(port),
            "--node-config", f"client-id={client} data-file={toml_str(str(shard))}"]
    if ca_cert is not None:
        argv += ["--root-certificates", str(ca_cert)]
    else:
        argv.append("--insecure")
    if key is not None:
        argv += ["--auth-supernode-private-key", str(key)]
    return argv


def commands_script(name: str, home: Path, link, nodes, public_keys: list[Path], *, tls: bool,
                    app: Path, run_config: Path) -> str:
    """``commands.sh`` of a deployment of experiment ``name``: the environment (FLWR_HOME =
    ``home``), the SuperLink (``link``, a :class:`~mmfl.flower.processes.Proc`), the key
    registrations (``public_keys``, empty without authentication), the SuperNodes (``nodes``)
    and ``flwr run APP --run-config FILE``."""
    envs = " ".join(f"{k}={v}" for k, v in FLOWER_ENV.items() if k != "PYTHONUNBUFFERED")
    flwr = flower_executable("flwr")
    lines = [
        "#!/bin/sh",
        (f"# Flower deployment of {name} ({len(nodes)} clients), written "
         "by mmfl flower-local --prepare-only."),
        "# Start each process in its own terminal (or append ' &'), in this order.",
        f"export FLWR_HOME={shlex.quote(str(home))} {envs}",
        "# the SuperLink and SuperNodes start flower-superexec from PATH: the same environment",
        f"export PATH={shlex.quote(str(Path(flwr).parent))}:\"$PATH\"",
        "",
        ("# 1. SuperLink (the server machine); the ServerApp runs in its working directory."
         "\n#    mmfl.flower.linkguard is flower-superlink with the Control and Runtime APIs "
         "for loopback peers only"),
        f"cd {shlex.quote(str(link.cwd))} && {shlex.join(link.argv)}",
    ]
    if public_keys:
        lines += ["", "# 2. register every SuperNode's public key (SuperLink running)"]
        lines += [shlex.join([flwr, "supernode", "register", str(pub), CONNECTION])
                  for pub in public_keys]
    lines += ["", "# 3. one SuperNode per client (client i's machine needs only its shard"
              + (", ca.crt" if tls else "") + (" and key" if public_keys else "") + ")"]
    lines += [f"OMP_NUM_THREADS=1 {shlex.join(p.argv)}" for p in nodes]
    lines += ["", "# 4. submit the experiment and follow it",
              shlex.join([flwr, "run", str(app), CONNECTION, "--run-config", str(run_config),
                          "--stream"]),
              (f"# then: flwr ls {CONNECTION}   flwr log RUN_ID {CONNECTION} --show   "
               f"flwr stop RUN_ID {CONNECTION}"), ""]
    return "\n".join(lines)
