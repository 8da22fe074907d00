"""python -m segops_sync.klaviyo_sim --port 8765 [--time-scale 10]"""

from __future__ import annotations

import argparse
import contextlib

from segops_sync.klaviyo_sim.server import serve


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run the Klaviyo simulator on 127.0.0.1.")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--time-scale", type=float, default=1.0)
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        serve(args.port, time_scale=args.time_scale)


if __name__ == "__main__":
    main()
