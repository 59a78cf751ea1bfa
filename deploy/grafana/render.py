"""Draw deploy/grafana/inferbridge.json from a short real load, without Grafana.

    .venv/bin/pip install matplotlib        # once: not a dependency of inferbridge
    .venv/bin/python deploy/grafana/render.py [--seconds 25] [--out docs/img/dashboard.png]

It starts `python -m inferbridge serve --workers 2` on a free port with the echo backend
(models `mistral` and `llama`, one of `llama`'s deployments pointing at a closed port so it
fails and cools down, `qwen` whose only deployment fails, an alias, an API key), sends a
mixed load for `--seconds` (streamed and whole chat completions, `/v1/models`, a wrong key,
an unknown model, an invalid body, more requests than `mistral`'s slots and queues so some
wait or get a 429), scrapes `/metrics` every second, and draws every panel of the dashboard
by evaluating the panel's own PromQL `expr` on the scrapes (`$model` is all models,
`$__rate_interval` is `--window`). Only the PromQL the dashboard uses is understood:
`sum`/`max` `by (...)`, `rate(...[w])`, `histogram_quantile(q, ...)`, `* number` and `+`
between vectors; anything else fails loudly, so the picture cannot show another query than
the dashboard's. `rate` is the plain increase over the window (no extrapolation).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "inferbridge.json"
KEY = "sk-render"

Labels = frozenset  # of (name, value) pairs
Vector = dict  # Labels -> float


# -- the server and its load ---------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_config() -> dict[str, Any]:
    dead = f"http://127.0.0.1:{free_port()}/v1"
    return {
        "server": {"access_log": False, "log_level": "warning"},
        "auth": {"api_keys": [KEY]},
        "model_aliases": {"gpt-4o": "mistral"},
        "router": {"allowed_fails": 2, "cooldown": 6, "retry_backoff": 0.01},
        "models": [
            {"name": "mistral", "backend": "echo", "delay": 0.02, "max_concurrent": 3,
             "max_queue": 2, "queue_timeout": 2},
            {"name": "mistral", "backend": "echo", "delay": 0.03, "max_concurrent": 3,
             "max_queue": 2, "queue_timeout": 2, "id": "mistral-b"},
            {"name": "llama", "backend": "echo", "delay": 0.05, "mode": "chat"},
            {"name": "llama", "backend": "vllm", "url": dead, "connect_timeout": 1,
             "id": "llama-gpu2"},
            {"name": "qwen", "backend": "vllm", "url": dead, "connect_timeout": 1},
        ],
    }  # fmt: skip


WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "tokens"]


def words(n: int) -> str:
    return " ".join(random.choice(WORDS) for _ in range(n))


async def one_request(client: httpx.AsyncClient, base: str) -> None:
    auth = {"authorization": f"Bearer {KEY}"}
    roll = random.random()
    chat = base + "/v1/chat/completions"
    text = words(random.randint(5, 40))
    if roll < 0.45:
        body = {"model": random.choice(["mistral", "gpt-4o"]), "stream": True,
                "messages": [{"role": "user", "content": text}]}  # fmt: skip
        async with client.stream("POST", chat, json=body, headers=auth) as r:
            async for _ in r.aiter_bytes():
                pass
    elif roll < 0.65:
        body = {"model": "mistral", "messages": [{"role": "user", "content": text}]}
        await client.post(chat, json=body, headers=auth)
    elif roll < 0.83:
        body = {"model": "llama", "messages": [{"role": "user", "content": text}]}
        await client.post(chat, json=body, headers=auth)
    elif roll < 0.86:  # its only deployment refuses connections: 502
        body = {"model": "qwen", "messages": [{"role": "user", "content": text}]}
        await client.post(chat, json=body, headers=auth)
    elif roll < 0.90:
        await client.get(base + "/v1/models", headers=auth)
    elif roll < 0.93:
        await client.post(chat, json={"model": "mistral", "messages": []}, headers={})
    elif roll < 0.96:
        body = {"model": "gpt-5", "messages": [{"role": "user", "content": text}]}
        await client.post(chat, json=body, headers=auth)
    else:
        await client.post(chat, json={"model": "mistral", "messages": "hi"}, headers=auth)


async def load_and_scrape(base: str, seconds: float) -> list[tuple[float, str]]:
    """Load for `seconds` (concurrency ramping 3 -> 16 -> 6), scraping every second."""
    scrapes: list[tuple[float, str]] = []
    start = time.monotonic()
    stop = start + seconds
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)

    def concurrency(t: float) -> int:
        share = t / seconds
        return 3 if share < 0.25 else 16 if share < 0.7 else 6

    async with httpx.AsyncClient(timeout=30, limits=limits) as client:

        async def worker(i: int) -> None:
            while (now := time.monotonic()) < stop:
                if i >= concurrency(now - start):
                    await asyncio.sleep(0.1)
                    continue
                with contextlib.suppress(httpx.HTTPError):
                    await one_request(client, base)

        async def scraper() -> None:
            while time.monotonic() < stop + 3:  # a few more after the load: the tail
                r = await client.get(base + "/metrics")
                scrapes.append((time.monotonic() - start, r.text))
                await asyncio.sleep(1.0)

        await asyncio.gather(scraper(), *(worker(i) for i in range(16)))
    return scrapes


def run_server(workers: int) -> tuple[subprocess.Popen, str, tempfile.TemporaryDirectory]:
    folder = tempfile.TemporaryDirectory(prefix="inferbridge-render-")
    config = Path(folder.name) / "inferbridge.yaml"
    config.write_text(yaml.safe_dump(server_config()))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERBRIDGE_")}
    env["PROMETHEUS_MULTIPROC_DIR"] = str(Path(folder.name) / "metrics")
    os.makedirs(env["PROMETHEUS_MULTIPROC_DIR"])
    process = subprocess.Popen(
        [sys.executable, "-m", "inferbridge", "serve", "--config", str(config),
         "--port", str(port), "--workers", str(workers)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return process, base, folder
        except httpx.HTTPError:
            pass
        if process.poll() is not None:
            break
        time.sleep(0.2)
    process.kill()
    raise SystemExit("the server did not start")


# -- the PromQL the dashboard uses ---------------------------------------------------------
class Series:
    """Every scrape, as sample name -> labels -> [(t, value)]."""

    def __init__(self, scrapes: list[tuple[float, str]]) -> None:
        self.times = [t for t, _ in scrapes]
        self.data: dict[str, dict[Labels, list[tuple[float, float]]]] = defaultdict(
            lambda: defaultdict(list)
        )
        for t, text in scrapes:
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    self.data[sample.name][frozenset(sample.labels.items())].append(
                        (t, sample.value)
                    )


TOKEN = re.compile(
    r'\s*(?:(?P<num>\d+(?:\.\d+)?)|(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)|(?P<str>"[^"]*")'
    r"|(?P<dur>\[\d+[smh]\])|(?P<op>=~|!=|[(){},=*+]))"
)


def tokenize(expr: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    expr = expr.strip()
    while pos < len(expr):
        m = TOKEN.match(expr, pos)
        if not m or m.end() == pos:
            raise ValueError(f"cannot read {expr[pos:]!r}")
        kind = m.lastgroup
        out.append((kind, m.group(kind)))
        pos = m.end()
    return out


class Parser:
    """expr := term ('+' term)*; term := atom ('*' number)?;
    atom := histogram_quantile(number, expr) | (sum|max) [by (labels)] (expr)
          | rate(selector[duration]) | selector."""

    def __init__(self, expr: str) -> None:
        self.tokens = tokenize(expr)
        self.i = 0

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self, value: str | None = None) -> tuple[str, str]:
        token = self.peek()
        if token is None or (value is not None and token[1] != value):
            raise ValueError(f"expected {value!r}, got {token!r}")
        self.i += 1
        return token

    def parse(self) -> Any:
        node = self.expr()
        if self.peek() is not None:
            raise ValueError(f"unexpected {self.peek()!r}")
        return node

    def expr(self) -> Any:
        node = self.term()
        while self.peek() == ("op", "+"):
            self.take("+")
            node = ("add", node, self.term())
        return node

    def term(self) -> Any:
        node = self.atom()
        if self.peek() == ("op", "*"):
            self.take("*")
            node = ("scale", node, float(self.take()[1]))
        return node

    def atom(self) -> Any:
        kind, value = self.take()
        if kind != "name":
            raise ValueError(f"unexpected {value!r}")
        if value == "histogram_quantile":
            self.take("(")
            q = float(self.take()[1])
            self.take(",")
            inner = self.expr()
            self.take(")")
            return ("quantile", q, inner)
        if value in ("sum", "max"):
            by: list[str] = []
            if self.peek() == ("name", "by"):
                self.take("by")
                self.take("(")
                while self.peek() != ("op", ")"):
                    by.append(self.take()[1])
                    if self.peek() == ("op", ","):
                        self.take(",")
                self.take(")")
            self.take("(")
            inner = self.expr()
            self.take(")")
            return ("agg", value, tuple(by), inner)
        if value == "rate":
            self.take("(")
            selector = self.selector(self.take()[1])
            kind, window = self.take()
            if kind != "dur":
                raise ValueError("rate() needs a [window]")
            self.take(")")
            unit = {"s": 1, "m": 60, "h": 3600}[window[-2]]
            return ("rate", selector, float(window[1:-2]) * unit)
        return ("select", self.selector(value))

    def selector(self, name: str) -> tuple[str, list[tuple[str, str, str]]]:
        matchers = []
        if self.peek() == ("op", "{"):
            self.take("{")
            while self.peek() != ("op", "}"):
                label = self.take()[1]
                op = self.take()[1]
                matchers.append((label, op, self.take()[1][1:-1]))
                if self.peek() == ("op", ","):
                    self.take(",")
            self.take("}")
        return name, matchers


def matches(labels: Labels, matchers: list[tuple[str, str, str]]) -> bool:
    found = dict(labels)
    for label, op, value in matchers:
        have = found.get(label, "")
        ok = have == value if op == "=" else re.fullmatch(value, have) is not None
        if ok == (op == "!="):
            return False
    return True


def evaluate(node: Any, series: Series, t: float) -> Vector:
    kind = node[0]
    if kind == "select":
        name, matchers = node[1]
        out = {}
        for labels, points in series.data.get(name, {}).items():
            if matches(labels, matchers):
                past = [v for at, v in points if at <= t]
                if past:
                    out[labels] = past[-1]
        return out
    if kind == "rate":
        (name, matchers), window = node[1], node[2]
        out = {}
        for labels, points in series.data.get(name, {}).items():
            if not matches(labels, matchers):
                continue
            inside = [(at, v) for at, v in points if t - window < at <= t]
            if len(inside) >= 2 and inside[-1][0] > inside[0][0]:
                out[labels] = max(0.0, inside[-1][1] - inside[0][1]) / (
                    inside[-1][0] - inside[0][0]
                )
        return out
    if kind == "agg":
        _, how, by, inner = node
        groups: dict[Labels, list[float]] = defaultdict(list)
        for labels, value in evaluate(inner, series, t).items():
            groups[frozenset((k, v) for k, v in labels if k in by)].append(value)
        return {k: (sum(v) if how == "sum" else max(v)) for k, v in groups.items()}
    if kind == "scale":
        return {k: v * node[2] for k, v in evaluate(node[1], series, t).items()}
    if kind == "add":
        left, right = evaluate(node[1], series, t), evaluate(node[2], series, t)
        return {k: v + right[k] for k, v in left.items() if k in right}
    if kind == "quantile":
        q, buckets = node[1], evaluate(node[2], series, t)
        groups: dict[Labels, list[tuple[float, float]]] = defaultdict(list)
        for labels, value in buckets.items():
            le = dict(labels)["le"]
            groups[frozenset((k, v) for k, v in labels if k != "le")].append((float(le), value))
        return {k: v for k, b in groups.items() if not math.isnan(v := quantile(q, b))}
    raise ValueError(kind)


def quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """Prometheus's histogram_quantile on (upper bound, cumulative count) pairs."""
    buckets.sort()
    total = buckets[-1][1] if buckets else 0
    if total <= 0:
        return math.nan
    rank = q * total
    lower, below = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower
            if count == below:
                return bound
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower


def legend(template: str, labels: Labels) -> str:
    found = dict(labels)
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: found.get(m.group(1), ""), template).strip()


def panel_series(panel: dict, series: Series, window: float) -> dict[str, list[tuple]]:
    """legend -> [(t, value)] for every target of the panel."""
    lines: dict[str, list[tuple]] = defaultdict(list)
    for target in panel.get("targets", []):
        expr = target["expr"].replace("$__rate_interval", f"{window:g}s")
        expr = expr.replace("$model|", ".*").replace("$model", ".*")
        node = Parser(expr).parse()
        for t in series.times:
            for labels, value in evaluate(node, series, t).items():
                lines[legend(target.get("legendFormat", ""), labels)].append((t, value))
    return lines


# -- drawing ----------------------------------------------------------------------------------
UNITS = {"s": ("ms", 1000.0), "reqps": ("req/s", 1.0), "short": ("", 1.0)}
STATE_COLORS = ["#56a64b", "#f2cc0c", "#ff9830", "#e02f44"]
STATE_NAMES = ["ok", "half_open", "cooling_down", "unhealthy"]


def draw(dashboard: dict, series: Series, window: float, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    panels = dashboard["panels"]
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    fig = plt.figure(figsize=(20, rows * 0.55), facecolor="#111217")
    grid = fig.add_gridspec(
        rows, 24, hspace=2.4, wspace=1.2, top=0.96, bottom=0.03, left=0.04, right=0.99
    )
    end = series.times[-1] if series.times else 1
    for panel in panels:
        pos = panel["gridPos"]
        ax = fig.add_subplot(
            grid[pos["y"] : pos["y"] + pos["h"] - 1, pos["x"] : pos["x"] + pos["w"]]
        )
        ax.set_facecolor("#181b1f")
        for spine in ax.spines.values():
            spine.set_color("#2c3235")
        ax.tick_params(colors="#ccccdc", labelsize=7)
        ax.set_title(panel["title"], color="#ccccdc", fontsize=9, loc="left")
        lines = panel_series(panel, series, window)
        kind = panel["type"]
        if kind == "stat":
            ax.axis("off")
            text = "\n".join(lines) or "no data"
            ax.text(0.02, 0.5, text, color="#ccccdc", fontsize=10, va="center")
            continue
        if kind == "state-timeline":
            names = sorted(lines)
            for row, name in enumerate(names):
                points = lines[name]
                for (t0, v), nxt in zip(points, [*points[1:], (end + 1, None)], strict=True):
                    color = STATE_COLORS[round(v)]
                    ax.barh(row, nxt[0] - t0, left=t0, height=0.8, color=color)
            ax.set_yticks(range(len(names)), names)
            ax.set_xlim(0, end)
            states = zip(STATE_COLORS, STATE_NAMES, strict=True)
            handles = [Patch(color=color, label=name) for color, name in states]
            ax.legend(handles=handles, fontsize=6, ncol=4, loc="upper center",
                      bbox_to_anchor=(0.5, -0.12), frameon=False, labelcolor="#ccccdc")  # fmt: skip
            ax.set_xlabel("seconds", color="#8e8e8e", fontsize=7)
            continue
        unit, scale = UNITS.get(panel["fieldConfig"]["defaults"].get("unit", "short"), ("", 1))
        for name in sorted(lines):
            points = lines[name]
            ax.plot([t for t, _ in points], [v * scale for _, v in points], lw=1.2, label=name)
        ax.set_xlim(0, end)
        ax.set_ylim(bottom=0)
        ax.set_ylabel(unit, color="#8e8e8e", fontsize=7)
        ax.grid(color="#2c3235", lw=0.5)
        if lines:
            ax.legend(fontsize=6, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.12),
                      frameon=False, labelcolor="#ccccdc")  # fmt: skip
        else:
            ax.text(0.5, 0.5, "no data", color="#8e8e8e", ha="center", transform=ax.transAxes)
    fig.suptitle(
        "inferbridge (deploy/grafana/inferbridge.json), drawn from a real "
        f"{end:.0f}-s load with render.py; rates over {window:g} s",
        color="#ccccdc",
        fontsize=11,
        x=0.01,
        ha="left",
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80, facecolor=fig.get_facecolor(), bbox_inches="tight")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=25.0, help="length of the load")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--window", type=float, default=5.0, help="$__rate_interval, seconds")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "dashboard.png")
    parser.add_argument("--save-scrapes", type=Path, help="also write the scrapes as JSON")
    args = parser.parse_args()
    random.seed(7)
    dashboard = json.loads(DASHBOARD.read_text())
    process, base, folder = run_server(args.workers)
    try:
        scrapes = asyncio.run(load_and_scrape(base, args.seconds))
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
        folder.cleanup()
    if args.save_scrapes:
        args.save_scrapes.write_text(json.dumps(scrapes))
    draw(dashboard, Series(scrapes), args.window, args.out)
    print(f"{len(scrapes)} scrapes -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
