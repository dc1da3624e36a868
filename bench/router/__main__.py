"""`python -m fleetwise.bench.router backend --port N`: a stand-in backend of the router benchmark;
`... floor --port N --backend URL...`: its reference proxy (floor.py); `... segments`: where a
request's time goes inside the router (segments.py), whose router is `... traced-router`."""

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
    b.add_argument("--ids-per-token", action="store_true",
                   help="A coalesced stream's token ids in a line per token, as workers of the release before.")
    f = sub.add_parser("floor", help="The reference proxy: protocol callbacks only, no routing (floor.py).")
    f.add_argument("--host", default="127.0.0.1")
    f.add_argument("--port", type=int, required=True)
    f.add_argument("--backend", action="append", required=True, help="A backend's URL (repeat for more).")
    f.add_argument("--ids", action="store_true", help="Ask for a stream with token ids, keep them, assemble.")
    g = sub.add_parser("segments", help="Where a request's time goes inside the router, under load (segments.py).")
    g.add_argument("--rate", type=float, default=500.0, help="Requests per second offered (open loop).")
    g.add_argument("--seconds", type=float, default=10.0)
    g.add_argument("--policy", default="prefix_load")
    g.add_argument("--out", help="Where the JSON result goes.")
    t = sub.add_parser("traced-router", help="The router with segments.py's stamps (what `segments` runs).")
    t.add_argument("--config", required=True)
    t.add_argument("--port", type=int, required=True)
    t.add_argument("--internal-token-file", required=True)
    t.add_argument("--policy", default="prefix_load")
    t.add_argument("--out", required=True, help="Where each request's stamps go (JSON) when it stops.")
    args = ap.parse_args(argv)
    if args.cmd == "backend":
        serve_backend(args.host, args.port,
                      Behaviour(args.itl_ms / 1e3, args.fail_every, args.role, args.ids_per_token))
    elif args.cmd == "floor":
        from fleetwise.bench.router.floor import serve_floor
        serve_floor(args.host, args.port, args.backend, args.ids)
    elif args.cmd == "segments":
        from pathlib import Path

        from fleetwise.bench.harness import write_json
        from fleetwise.bench.router.segments import run_segments
        try:
            report = run_segments(args.rate, args.seconds, args.policy)
        except ValueError as e:
            ap.error(str(e))
        if args.out:
            write_json(Path(args.out), report)
    elif args.cmd == "traced-router":
        from fleetwise.bench.router.segments import serve_traced
        serve_traced(args.config, args.port, args.internal_token_file, args.policy, args.out)


if __name__ == "__main__":
    main(sys.argv[1:])
