"""Side-by-side A/B of two versions of inferbridge: proxy CPU per request, both loaded at once.

`run.py` compares a version with "direct" round by round; two versions run one after the
other differ by as much as the machine's speed moves between minutes on this VM (20-40%).
This tool loads two proxies at the same moment instead: both pinned to the proxy core (they
share it), each with its own wrk on the load core for the same seconds, so each version's
CPU per request is measured in the same machine state and their ratio holds still. A
process's own layout (hash seed, addresses) moves its speed by a few percent too, so every
pair of processes is fresh, and the two swap ports and start order every other pair.

    .venv/bin/python bench/ab.py --base HEAD~3                 # working tree vs a commit
    .venv/bin/python bench/ab.py --base v1 --new v2 --pairs 6 --mode stream
    .venv/bin/python bench/ab.py --base HEAD --new HEAD --new-python /other/venv/bin/python

Prints each round's CPU per request and the ratio new/base, then the geometric mean of the
ratios with their range (below 1.000: the new version costs less).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import tempfile
from pathlib import Path

from run import (
    CHAT_BODY,
    HOST,
    WRK_SCRIPT,
    Children,
    cpu_seconds,
    process_tree,
    run_wrk,
    source_tree,
    start_proxy,
    start_upstream,
    stop_on_signals,
    stream_body,
    wait_ready,
    write_config,
)

CONNECTIONS = 64


async def one_pair(
    children: Children,
    tmp: Path,
    config: Path,
    script: Path,
    versions: dict[str, Path],
    order: list[str],
    args: argparse.Namespace,
) -> list[float]:
    """Start both versions (in `order`), load them at once `args.rounds` times; the
    ratios new/base of CPU per request."""
    procs, urls = {}, {}
    for name in order:
        python = getattr(args, f"{name}_python")
        proc, port, log = start_proxy(
            children, tmp, config, 1, versions[name], name=name, python=python
        )
        await wait_ready(f"http://{HOST}:{port}/health", proc, log)
        procs[name], urls[name] = proc, f"http://{HOST}:{port}/v1/chat/completions"
    try:
        await asyncio.gather(*(run_wrk(script, urls[n], CONNECTIONS, 1) for n in order))
        ratios = []
        for _ in range(args.rounds):
            before = {n: cpu_seconds(process_tree(procs[n].pid)) for n in order}
            results = await asyncio.gather(
                *(run_wrk(script, urls[n], CONNECTIONS, args.seconds) for n in order)
            )
            per = {}
            for name, result in zip(order, results, strict=True):
                used = cpu_seconds(process_tree(procs[name].pid)) - before[name]
                if result["errors"] or not result["requests"]:
                    raise SystemExit(f"{name}: {result['errors']} errors in {result}")
                per[name] = used / result["requests"] * 1e6
            ratios.append(per["new"] / per["base"])
            print(
                f"  base {per['base']:7.1f} µs/req   new {per['new']:7.1f} µs/req   "
                f"new/base {ratios[-1]:.3f}   (started first: {order[0]})",
                flush=True,
            )
        return ratios
    finally:
        for proc in procs.values():
            children.stop(proc)


async def compare(args: argparse.Namespace, children: Children, tmp: Path) -> int:
    _, fast_port, slow_port = await start_upstream(children, tmp, 64, 3600)
    config = write_config(tmp, fast_port, slow_port, [])
    body = stream_body("bench") if args.mode == "stream" else CHAT_BODY
    script = tmp / "ab.lua"
    lua = WRK_SCRIPT % body.decode()
    if args.mode == "connect":  # a new connection for every request
        lua += 'wrk.headers["Connection"] = "close"\n'
    script.write_text(lua, encoding="utf-8")
    versions, labels = {}, {}
    for name, rev in (("base", args.base), ("new", args.new)):
        where = tmp / name
        where.mkdir()
        versions[name], labels[name] = source_tree(argparse.Namespace(commit=rev), where)
        python = getattr(args, f"{name}_python")
        if python:
            labels[name] += f" under {python}"
    print(f"base: {labels['base']}   new: {labels['new']}   mode: {args.mode}", flush=True)
    ratios: list[float] = []
    for pair in range(args.pairs):
        order = ["base", "new"] if pair % 2 == 0 else ["new", "base"]
        print(f"pair {pair + 1}/{args.pairs} (fresh processes)", flush=True)
        ratios += await one_pair(children, tmp, config, script, versions, order, args)
    mean = math.exp(sum(map(math.log, ratios)) / len(ratios))
    print(
        f"new/base CPU per request: geometric mean {mean:.3f} "
        f"(rounds {min(ratios):.3f}-{max(ratios):.3f}, n={len(ratios)})"
    )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, metavar="REV", help="the version to compare to")
    parser.add_argument("--new", metavar="REV", help="default: the working tree's src/")
    parser.add_argument("--pairs", type=int, default=4, help="fresh process pairs (default 4)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per pair (default 2)")
    parser.add_argument("--seconds", type=float, default=4.0, help="per round (default 4)")
    parser.add_argument(
        "--mode",
        choices=["nonstream", "stream", "connect"],
        default="nonstream",
        help="non-streamed requests on kept-alive connections (default), 64-chunk streams, "
        "or non-streamed requests each on a new connection (connect)",
    )
    for name in ("base", "new"):
        parser.add_argument(
            f"--{name}-python",
            metavar="PATH",
            help=f"the interpreter the {name} version runs under, with inferbridge's "
            "dependencies installed (default: this one)",
        )
    args = parser.parse_args()
    children = Children()
    try:
        with tempfile.TemporaryDirectory(prefix="inferbridge-ab-") as tmp:
            return asyncio.run(stop_on_signals(compare(args, children, Path(tmp))))
    finally:
        children.stop_all()


if __name__ == "__main__":
    sys.exit(main())
