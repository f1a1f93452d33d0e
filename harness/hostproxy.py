"""FaultProxy as a process of its own, so that it can run inside a host's network namespace
(`ip netns exec NAME python -m harness.hostproxy --listen ADDR:PORT --upstream ADDR:PORT`).

It prints `ready <port>` once listening, then reads one command a line on stdin and answers
`ok` once it is in effect (or `error <text>`): `delay MS`, `blackhole`, `reset`, `heal`,
`quit`. End of input closes it too, so it never outlives the harness that started it.
"""

from __future__ import annotations

import argparse
import sys

from harness.faultproxy import FaultProxy


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.hostproxy")
    parser.add_argument("--listen", type=_address, required=True)
    parser.add_argument("--upstream", type=_address, required=True)
    args = parser.parse_args(argv)
    with FaultProxy(args.upstream, listen=args.listen) as proxy:
        print(f"ready {proxy.port}", flush=True)
        for line in sys.stdin:
            words = line.split()
            if not words:
                continue
            try:
                if words[0] == "delay":
                    proxy.delay(float(words[1]))
                elif words[0] == "blackhole":
                    proxy.blackhole()
                elif words[0] == "reset":
                    proxy.reset_all()
                elif words[0] == "heal":
                    proxy.heal()
                elif words[0] == "quit":
                    print("ok", flush=True)
                    break
                else:
                    raise ValueError(f"unknown command {words[0]!r}")
            except Exception as exc:  # the caller reads the reason
                print(f"error {exc}", flush=True)
            else:
                print("ok", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
