"""Serve a bench baseline app exactly as `filefeed serve` serves filefeed: uvicorn + httptools + uvloop, the same
workers with their own SO_REUSEPORT sockets (filefeed/server.py), so a ratio compares the apps and nothing else.

    python -m bench.serve_bare bench.bare_app:create_app --host 127.0.0.1 --port 8081 --workers 2
"""

from __future__ import annotations

import argparse

import uvicorn

from filefeed import server


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("factory", help="module:function returning the ASGI app")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    server.run(uvicorn.Config(args.factory, factory=True, host=args.host, port=args.port, workers=args.workers,
                              loop="uvloop", http=server.HTTP_PROTOCOL, access_log=False, proxy_headers=False, log_level="warning",
                              timeout_graceful_shutdown=10))


if __name__ == "__main__":
    main()
