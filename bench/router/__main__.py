"""`python -m fleetwise.bench.router backend --port N`: a stand-in backend of the router benchmark;
`... floor --port N --backend URL...`: its reference proxy (floor.py)."""

import argparse
import sys

from fleetwise.bench.router.backend import Behaviour, serve_backend


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m fleetwise.bench.router",
                                 description="Pieces of `fleetwise bench router`.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("backend", help="A stand-in OpenAI completions server that answers at once.")
    b.add_argument("--host", default="127.0.0.1")
    b.add_argument("--port", type=int, required=True)
    b.add_argument("--itl-ms", type=float, default=0.0, help="Milliseconds between a stream's events (0: at once).")
    b.add_argument("--fail-every", type=int, default=0, help="Answer 429 to every k-th completion (0: never).")
    b.add_argument("--role", choices=("mixed", "prefill", "decode"), default="mixed")
    f = sub.add_parser("floor", help="The reference proxy: protocol callbacks only, no routing (floor.py).")
    f.add_argument("--host", default="127.0.0.1")
    f.add_argument("--port", type=int, required=True)
    f.add_argument("--backend", action="append", required=True, help="A backend's URL (repeat for more).")
    f.add_argument("--ids", action="store_true", help="Ask for a stream with token ids, keep them, assemble.")
    args = ap.parse_args(argv)
    if args.cmd == "backend":
        serve_backend(args.host, args.port, Behaviour(args.itl_ms / 1e3, args.fail_every, args.role))
    elif args.cmd == "floor":
        from fleetwise.bench.router.floor import serve_floor
        serve_floor(args.host, args.port, args.backend, args.ids)


if __name__ == "__main__":
    main(sys.argv[1:])
