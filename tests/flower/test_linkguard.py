"""mmfl.flower.linkguard: what reaches Flower's Control and Runtime APIs (no Flower process
here; the real SuperLink behind the guard is tested in test_local.py)."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess

import pytest

from mmfl.flower.linkguard import LoopbackOnly, allowed, is_loopback, peer_uid

pytestmark = pytest.mark.flower


def _scope(path: str, client=("10.1.2.3", 50000), server=("10.1.2.4", 9300)) -> dict:
    return {"type": "http", "path": path, "client": tuple(client), "server": server}


def test_other_machines_reach_the_fleet_api_only():
    assert allowed(_scope("/v1/fleet/pull-messages"))
    for path in ("/v1/control/start-run", "/v1/control/list-runs", "/v1/runtime/get-nodes",
                 "/health", "/docs", "/v1/fleet/../control/start-run", "/v1/fleet",
                 "/v1/fleet//../runtime/x"):
        assert not allowed(_scope(path)), path
    assert not allowed({"type": "http", "path": "/v1/control/list-runs"})  # no peer address
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("::ffff:127.0.0.2")
    assert not is_loopback("192.0.2.2") and not is_loopback("localhost") and not is_loopback("")


def test_the_guard_answers_403_before_flower_sees_the_request():
    seen = []

    async def app(scope, receive, send):
        seen.append(scope.get("path"))

    async def call(scope):
        sent = []

        async def send(msg):
            sent.append(msg)

        await LoopbackOnly(app)(scope, None, send)
        return sent

    sent = asyncio.run(call(_scope("/v1/control/start-run")))
    assert sent[0]["status"] == 403 and b"Fleet API" in sent[1]["body"] and seen == []
    assert asyncio.run(call(_scope("/v1/fleet/push-messages"))) == []
    assert asyncio.run(call({"type": "lifespan"})) == []
    assert len(seen) == 2  # the fleet request and the lifespan protocol went through


def _connected_peer(server: socket.socket, argv=None, user=None):
    """Accept one connection to ``server``: from this process, or from ``argv`` run as
    ``user``; returns (peer address, server address, the client's socket or process)."""
    port = server.getsockname()[1]
    if argv is None:
        c = socket.create_connection(("127.0.0.1", port))
    else:
        c = subprocess.Popen([*argv, str(port)], user=user)
    conn, peer = server.accept()
    return conn, peer, c


CLIENT = ("import socket, sys, time; s = socket.create_connection(('127.0.0.1', "
          "int(sys.argv[1]))); time.sleep(30)")


def test_a_loopback_peer_must_be_this_user():
    """The peer socket's owner decides: this process's own connection is allowed to the
    Control API; the same connection made by another user (nobody) is refused."""
    if not os.path.isdir("/proc/net"):
        pytest.skip("no /proc/net: any loopback peer is allowed")
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        conn, peer, c = _connected_peer(server)
        with conn, c:
            here = server.getsockname()
            assert peer_uid(peer, here) == os.getuid()
            assert allowed(_scope("/v1/control/list-runs", peer, server=here))
        python = "/usr/bin/python3"
        if os.getuid() != 0 or not os.path.exists(python):
            pytest.skip("needs root and a system python to connect as another user")
        conn, peer, proc = _connected_peer(server, [python, "-c", CLIENT], user=65534)
        try:
            with conn:
                assert peer_uid(peer, here) == 65534
                assert not allowed(_scope("/v1/control/start-run", peer, server=here))
                assert allowed(_scope("/v1/fleet/pull-messages", peer, server=here))
        finally:
            proc.kill()
            proc.wait()
