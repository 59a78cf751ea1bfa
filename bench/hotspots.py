"""Summarize a py-spy `--format raw` profile (collapsed stacks): where the time goes.

    python bench/hotspots.py profiles/nonstream.txt [--top 25] [--match inferbridge]

Prints, as a share of the samples where code ran, self time grouped by the package the code
belongs to, then the functions with the most *self* time (the frame on top of the stack)
and the most *inclusive* time (anywhere on the stack, counted once per sample). Samples of
threads blocked in a wait (see IDLE_LEAVES) are left out. Time in C code (orjson, uvloop's
socket calls) is counted for the Python function that called it.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>.*?)(?::(?P<line>\d+))?\)$")


def short(frame: str) -> str:
    """`func (path/to/site-packages/pkg/mod.py:12)` -> `func (pkg/mod.py)`."""
    m = _FRAME.match(frame)
    if not m:
        return frame
    path = m.group("file")
    for marker in ("site-packages/", "/src/", "lib/python3.11/", "lib/python3.12/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{m.group('func')} ({path})"


# Leaf frames of threads blocked in a wait: py-spy may count them as active, but they use no
# CPU (e.g. the access log's listener thread waiting on its queue). Left out of the shares.
IDLE_LEAVES = (
    "QueueListener.dequeue",
    "Condition.wait",
    "Event.wait",
    "Queue.get",
    "Thread.join",
    "select (selectors.py)",
)


def is_idle(frames: list[str]) -> bool:
    return bool(frames) and frames[-1].startswith(IDLE_LEAVES)


def load(path: Path) -> list[tuple[list[str], int]]:
    stacks = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [short(f) for f in stack.split(";")]
        if frames and frames[0].startswith(("process ", "thread ")):
            frames = [f for f in frames if not f.startswith(("process ", "thread "))]
        stacks.append((frames, int(count)))
    return stacks


def package(frame: str) -> str:
    """The package (or stdlib module) a shortened frame's code lives in."""
    m = _FRAME.match(frame)
    where = m.group("file") if m else frame
    if where.startswith("<"):
        return "python startup"
    head = where.split("/", 1)[0]
    if head.endswith(".py"):
        head = head[:-3]
    if head == "inferbridge" and "/" in where:
        head = "inferbridge/" + where.split("/")[1].removesuffix(".py")
    return head


def summarize(path: Path, top: int, match: str | None) -> str:
    stacks = load(path)
    idle = sum(c for frames, c in stacks if is_idle(frames))
    stacks = [(frames, c) for frames, c in stacks if not is_idle(frames)]
    total = sum(c for _, c in stacks) or 1
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for frames, count in stacks:
        if frames:
            self_time[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    by_package: Counter[str] = Counter()
    for frame, count in self_time.items():
        by_package[package(frame)] += count
    out = [f"{path}: {total} samples on CPU ({idle} samples of threads blocked in a wait left out)"]
    out.append("\nself time by package (% of samples):")
    for name, count in by_package.most_common(top):
        out.append(f"  {100 * count / total:5.1f}%  {name}")
    out.append(f"\ntop {top} by self time (% of samples):")
    for frame, count in self_time.most_common(top):
        out.append(f"  {100 * count / total:5.1f}%  {frame}")
    out.append(f"\ntop {top} by inclusive time (% of samples):")
    shown = 0
    for frame, count in inclusive.most_common():
        if match and match not in frame:
            continue
        out.append(f"  {100 * count / total:5.1f}%  {frame}")
        shown += 1
        if shown >= top:
            break
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("profile", type=Path, nargs="+")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--match", help="inclusive list: only frames containing this text")
    args = parser.parse_args(argv)
    for path in args.profile:
        print(summarize(path, args.top, args.match))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
