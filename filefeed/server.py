"""Serving: uvicorn workers, each listening on its own SO_REUSEPORT socket.

uvicorn's own multi-worker mode shares one listening socket among the workers: whichever worker wakes first accepts
a whole burst of new connections. The platform (and every load generator) keeps a few long-lived connections, so
they can all land on one worker while the other idles: measured under wrk, one worker at 96 % of a core and the
other at 0 %, half the machine unused. With SO_REUSEPORT each worker listens on a socket of its own and the kernel
spreads connections over them by address hash. uvicorn's supervisor still runs the workers (health checks, restart
of a dead worker, signals); only the socket each worker serves on changes. Because reuse-port would also let a second
instance join the port and take half the connections, `run` refuses to start when something already answers there.
"""

from __future__ import annotations

import gc
import socket
import sys

import uvicorn
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors import multiprocess

# The cyclic GC's youngest generation is collected every GC_GEN0_THRESHOLD container allocations (Python's default:
# 700). Requests waiting for their group commit keep a few thousand such objects alive, and at 700 the collector walks
# them again every dozen requests. Those objects are freed by reference counting, never by the collector, so a larger
# threshold only lets rare cyclic garbage wait a little longer.
GC_GEN0_THRESHOLD = 10_000

# uvicorn's httptools protocol writing each answer in one send (filefeed/hotpath.py), with a read deadline per request
# and a connection cap (filefeed/guard.py, a subclass of it)
HTTP_PROTOCOL = "filefeed.guard:GuardedHttpToolsProtocol"


def settle_gc() -> None:
    """Once a worker has loaded everything it needs: freeze those objects out of the collector, raise gen0's threshold.

    Everything loaded at start-up (pyarrow, boto3, ... hundreds of thousands of objects) lives as long as the worker;
    unfrozen, every full collection walks it and stalls a busy worker for tens of ms.
    """
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)


def reuseport_socket(host: str, port: int, backlog: int, *, listen: bool = True) -> socket.socket:
    """A TCP socket bound to (host, port) in the port's SO_REUSEPORT group; listening unless `listen=False`."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        if listen:
            sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


class _ReusePortWorker(multiprocess.Process):
    """A uvicorn worker process that binds its own listening socket instead of using the parent's."""

    def target(self, sockets: list[socket.socket] | None = None) -> None:  # runs in the child
        config = self.config
        try:
            sock = reuseport_socket(config.host, config.port, config.backlog)
        except OSError as e:
            print(f"filefeed: cannot listen on {config.host}:{config.port}: {e.strerror or e}", file=sys.stderr)
            sys.exit(STARTUP_FAILURE)  # the supervisor stops instead of restarting a worker that cannot bind
        super().target([sock])


def _answers(host: str, port: int) -> bool:
    target = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    try:
        socket.create_connection((target, port), timeout=1).close()
    except OSError:
        return False
    return True


def run(config: uvicorn.Config) -> None:
    """Serve `config` in the foreground: one process when config.workers <= 1, else supervised reuse-port workers."""
    if config.workers <= 1:
        server = uvicorn.Server(config)
        server.run()
        if not server.started:  # the app or its lifespan failed to start: say so in the exit code, as uvicorn.run
            sys.exit(STARTUP_FAILURE)
        return
    if not hasattr(socket, "SO_REUSEPORT"):  # pragma: no cover - not Linux: uvicorn's shared socket
        multiprocess.Multiprocess(config, sockets=[config.bind_socket()]).run()
        return
    # Fail here, with one clear message, when the address is taken: by a plain socket (the bind fails), or by
    # another reuse-port server of this user, which the bind would let us join silently (the connect answers).
    try:
        reuseport_socket(config.host, config.port, config.backlog, listen=False).close()
    except OSError as e:
        raise SystemExit(f"filefeed: cannot listen on {config.host}:{config.port}: {e.strerror or e}") from None
    if _answers(config.host, config.port):
        raise SystemExit(f"filefeed: cannot listen on {config.host}:{config.port}: another server listens there")
    # The supervisor builds its workers (at start and on every restart) through this module-level name.
    multiprocess.Process = _ReusePortWorker  # type: ignore[misc]
    multiprocess.Multiprocess(config, sockets=[]).run()
