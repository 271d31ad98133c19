"""The SuperLink of ``mmfl flower-local``: Flower's own, with the Control and Runtime APIs
answering loopback peers only.

Flower 1.42 serves three APIs on the SuperLink's one HTTP(S) port: the Fleet API (SuperNodes
pull messages and push replies), the Control API (``flwr run``, ``ls``, ``log``, ``stop``,
``supernode register``) and the Runtime API (the ServerApp's grid). ``--host 0.0.0.0``, which
SuperNodes on other machines need, would expose all three, and Flower's open-source Control API
does not authenticate users: whoever reaches it can submit a run whose ServerApp and ClientApps
then execute, as the deployment's user, on the SuperLink's machine and on every SuperNode.

This launcher runs Flower's ``flower-superlink`` entry point unchanged except that its HTTP
application is wrapped in :class:`LoopbackOnly`: a request from a peer that is not a loopback
address gets ``403`` unless its path is in the Fleet API (``/v1/fleet/...``), before Flower sees
it. So the Control and Runtime APIs are reachable from this machine only, whatever ``--host``
says; the Fleet API is as exposed as ``--host`` makes it (and guarded by TLS and, with
``--auth``, SuperNode authentication). On Linux the same holds between users of this
machine: a loopback peer's socket must belong to the SuperLink's own user (its owner is read
from ``/proc/net/tcp``), so another local user cannot ``flwr run`` either. Processes of the
same user are trusted: they could read the deployment's files and keys anyway.

Run as ``python -m mmfl.flower.linkguard <flower-superlink arguments>``.
"""

from __future__ import annotations

import ipaddress
import os
import posixpath
import sys

#: Path prefix of the Fleet API: the only one served to non-loopback peers.
FLEET_PREFIX = "/v1/fleet/"

_DENIED = b'{"detail": "only the Fleet API is served to other machines (mmfl linkguard)"}'


def is_loopback(host: str | None) -> bool:
    """Whether ``host`` (a peer address as the server sees it) is a loopback address,
    including IPv4-mapped IPv6 (``::ffff:127.0.0.1``)."""
    if not host:
        return False
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def _hex_address(ip: str, port: int) -> str:
    """``ip:port`` as ``/proc/net/tcp{,6}`` writes a socket address (32-bit words of the
    address in host byte order, the port big-endian)."""
    packed = ipaddress.ip_address(ip).packed
    words = [packed[k:k + 4] for k in range(0, len(packed), 4)]
    addr = "".join(w[::-1].hex() if sys.byteorder == "little" else w.hex() for w in words)
    return f"{addr.upper()}:{port:04X}"


def peer_uid(client: tuple, server: tuple) -> int | None:
    """The user id owning the local socket at ``client`` connected to ``server`` (both
    ``(ip, port)`` as the server sees them), from ``/proc/net/tcp`` and ``tcp6``; None when it
    cannot be found (no ``/proc``, or the connection is gone)."""
    forms = []
    for ip, port in (client, server):
        ip = ip.split("%", 1)[0]
        v6 = ":" in ip
        forms.append((_hex_address(ip, int(port)), v6))
    want = (forms[0][0], forms[1][0])
    table = "/proc/net/tcp6" if forms[0][1] else "/proc/net/tcp"
    try:
        with open(table, encoding="ascii") as f:
            next(f, None)
            for line in f:
                cols = line.split()
                if len(cols) > 7 and (cols[1], cols[2]) == want:
                    return int(cols[7])
    except (OSError, ValueError):
        return None
    return None


def allowed(scope: dict) -> bool:
    """Whether an ASGI ``http``/``websocket`` request may reach Flower: normalized paths under
    :data:`FLEET_PREFIX` from anyone; everything else only from a loopback peer whose socket
    belongs to this process's user (where ``/proc`` tells; elsewhere any loopback peer)."""
    path = str(scope.get("path", ""))
    if path.startswith(FLEET_PREFIX) and posixpath.normpath(path) + (
            "/" if path.endswith("/") else "") == path:
        return True
    client, server = scope.get("client"), scope.get("server")
    if not client or not is_loopback(client[0]):
        return False
    if not server or not os.path.isdir("/proc/net"):
        return True
    return peer_uid(tuple(client), tuple(server)) == os.getuid()


class LoopbackOnly:
    """ASGI middleware: refuse (403; websocket close 1008) what :func:`allowed` refuses,
    pass everything else (and the ``lifespan`` protocol) to ``app`` unchanged."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope.get("type") in ("http", "websocket") and not allowed(scope):
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return
            await send({"type": "http.response.start", "status": 403,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(_DENIED)).encode())]})
            await send({"type": "http.response.body", "body": _DENIED})
            return
        await self.app(scope, receive, send)


def main(argv: list[str] | None = None) -> None:
    """``flower-superlink ARGV`` with its HTTP app wrapped in :class:`LoopbackOnly`.

    Flower starts its server with ``uvicorn.run(app=...)`` (flwr 1.42); that call is the one
    place where the app is wrapped, so everything else is Flower's own code path.
    """
    import uvicorn

    serve = uvicorn.run

    def guarded(*args, **kwargs):
        if "app" in kwargs:
            kwargs["app"] = LoopbackOnly(kwargs["app"])
        else:
            args = (LoopbackOnly(args[0]), *args[1:])
        return serve(*args, **kwargs)

    uvicorn.run = guarded
    from flwr.superlink.cli.flower_superlink import flower_superlink

    sys.argv = ["flower-superlink", *(sys.argv[1:] if argv is None else argv)]
    flower_superlink()


if __name__ == "__main__":
    main()
