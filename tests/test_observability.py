"""Metrics, request ids, the overhead header, and private-by-default access logs."""

from __future__ import annotations

import json
import platform
import time

import httpx
import openai
import pytest

USER = [{"role": "user", "content": "secret words here"}]


def _access_lines(capfd) -> list[dict]:
    time.sleep(0.2)  # the access log is written by a background thread
    err = capfd.readouterr().err
    lines = [json.loads(line) for line in err.splitlines() if line.startswith('{"ts"')]
    return [line for line in lines if "request_id" in line]  # not process-log lines


def test_metrics_count_requests_tokens_and_latency(serve):
    srv = serve({"models": [{"name": "e", "backend": "echo"}]})
    client = srv.openai()
    client.chat.completions.create(model="e", messages=USER)
    list(client.chat.completions.create(model="e", messages=USER, stream=True))
    text = httpx.get(srv.url + "/metrics").text
    assert 'inferbridge_requests_total{backend="echo"' in text
    assert 'status="200"} 2.0' in text
    assert 'inferbridge_tokens_total{kind="completion",model="e"} 6.0' in text
    assert "inferbridge_proxy_overhead_seconds_bucket" in text
    assert "inferbridge_time_to_first_token_seconds_count" in text
    assert 'inferbridge_requests_in_flight{model="e"} 0.0' in text
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="missing", messages=USER)
    text = httpx.get(srv.url + "/metrics").text
    assert 'inferbridge_rejected_requests_total{status="404"} 1.0' in text


def test_overhead_and_request_id_headers(serve):
    srv = serve({"models": [{"name": "e", "backend": "echo"}]})
    raw = srv.openai().chat.completions.with_raw_response.create(model="e", messages=USER)
    assert float(raw.headers["x-inferbridge-overhead-ms"]) >= 0
    assert raw.headers["x-request-id"]
    assert raw.headers["x-inferbridge-model"] == "e"


def test_access_log_is_json_and_private_by_default(serve, capfd):
    srv = serve({"server": {"access_log": True}, "models": [{"name": "e", "backend": "echo"}]})
    srv.openai().chat.completions.create(model="e", messages=USER)
    lines = _access_lines(capfd)
    assert lines, "no access log line"
    line = lines[-1]
    assert line["model"] == "e" and line["status"] == 200 and line["completion_tokens"] == 3
    assert "secret" not in json.dumps(line)
    assert "messages" not in line


def test_access_log_includes_prompts_when_enabled(serve, capfd):
    srv = serve(
        {
            "server": {"log_prompts": True, "access_log": True},
            "models": [{"name": "e", "backend": "echo"}],
        }
    )
    list(srv.openai().chat.completions.create(model="e", messages=USER, stream=True))
    line = _access_lines(capfd)[-1]
    assert line["messages"] == USER
    assert "".join(line["completion"]) == "secret words here"


def test_collector_exposition_equals_prometheus_client_metrics():
    """Counting in plain dicts and exporting through the collector gives the exposition that
    prometheus_client's own Counter/Histogram/Gauge give: names, labels, cumulative bucket
    counts, sums (without the `_created` samples, which the collector leaves out)."""
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

    from inferbridge import __version__
    from inferbridge.observability import Metrics

    ours = Metrics()
    direct = CollectorRegistry()

    def real(family):
        kind = {"counter": Counter, "gauge": Gauge, "histogram": Histogram}[family.kind]
        extra = {"buckets": family.bounds} if family.kind == "histogram" else {}
        return kind(family.name, family.help, family.labels, registry=direct, **extra)

    reals = {family: real(family) for family in ours.families}
    values = [0.00005, 0.0001, 0.0003, 0.002, 0.005, 0.07, 0.5, 3.0, 400.0]
    for v in values:
        for family in (ours.latency, ours.overhead):
            ours.observe(family, ("m", "m[0]", "ok"), v)
            reals[family].labels("m", "m[0]", "ok").observe(v)
    ours.observe(ours.ttft, ("n", "n[0]", "upstream_error"), 0.01)
    reals[ours.ttft].labels("n", "n[0]", "upstream_error").observe(0.01)
    for _ in range(2):
        ours.inc(ours.requests, ("m", "d", "echo", "200"))
        reals[ours.requests].labels("m", "d", "echo", "200").inc()
    ours.inc(ours.tokens, ("m", "prompt"), 7)
    reals[ours.tokens].labels("m", "prompt").inc(7)
    ours.in_flight["m"] = 3
    reals[ours.requests_in_flight].labels("m").set(3)
    about = "inferbridge's version and the Python running it (always 1)"
    build = Gauge("inferbridge_build_info", about, ("version", "python"), registry=direct)
    build.labels(__version__, platform.python_version()).set(1)

    def lines(registry) -> list[str]:
        text = generate_latest(registry).decode()
        return [line for line in text.splitlines() if "_created" not in line]

    assert lines(ours.registry) == lines(direct)
    assert any('le="0.0005"' in x for x in lines(direct))


class _Sink:
    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> int:
        self.data += data
        return len(data)

    def flush(self) -> None:
        pass


def _finished_request(obs, status: int = 200):
    from inferbridge.api.protocol import build_request
    from inferbridge.observability import RequestTimer
    from inferbridge.request import RouteInfo

    request = build_request("chat", {"model": "m", "messages": USER})
    request.request_id = "rid"
    route = RouteInfo()
    route.model, route.deployment, route.backend, route.attempts = "m", "m[0]", "echo", 1
    timer = RequestTimer()
    timer.status = status
    obs.started("m")
    return request, route, timer


def _requests_total(obs) -> float:
    value = obs.metrics.registry.get_sample_value(
        "inferbridge_requests_total",
        {"model": "m", "deployment": "m[0]", "backend": "echo", "status": "200"},
    )
    return value or 0.0


async def test_finished_requests_are_drained_in_batches():
    """`record` leaves the gauge exact at once and the rest to a drain: after
    DRAIN_DELAY, at DRAIN_MAX requests, or when the metrics are read."""
    import asyncio

    from inferbridge import observability
    from inferbridge.observability import AccessLogWriter, Observability

    obs = Observability()
    sink = _Sink()
    obs.access = AccessLogWriter(sink, interval=0.01)
    obs.start()
    try:
        obs.record(*_finished_request(obs), {"prompt_tokens": 3, "completion_tokens": 4})
        assert obs.metrics.in_flight["m"] == 0
        assert not obs.metrics.counts  # counted at the drain, not yet
        await asyncio.sleep(observability.DRAIN_DELAY + 0.1)
        assert not obs._finished
        lines = [json.loads(x) for x in sink.data.splitlines()]
        assert [(x["request_id"], x["status"], x["prompt_tokens"]) for x in lines] == [
            ("rid", 200, 3)
        ]
        assert abs(lines[0]["ts"] - time.time()) < 5

        for _ in range(observability.DRAIN_MAX):
            obs.record(*_finished_request(obs), None)
        assert not obs._finished  # the DRAIN_MAX-th drained them all at once
        assert _requests_total(obs) == observability.DRAIN_MAX + 1

        obs.record(*_finished_request(obs), None)
        assert b"inferbridge_requests_total" in obs.exposition()
        assert _requests_total(obs) == observability.DRAIN_MAX + 2  # read: drained first
    finally:
        obs.stop()


def test_record_outside_a_serving_loop_drains_at_once():
    from inferbridge.observability import AccessLogWriter, Observability

    obs = Observability(access_log=False)
    obs.access = AccessLogWriter(_Sink())
    obs.record(*_finished_request(obs), None)
    assert not obs._finished
    assert _requests_total(obs) == 1


def _record(obs, overhead: float, latency: float, ttft: float | None = None) -> None:
    """A finished request with the given overhead, duration and time to first batch."""
    from inferbridge import observability

    request, route, timer = _finished_request(obs)
    timer.overhead = overhead
    timer.start = observability._now() - latency
    if ttft is not None:
        timer.first = timer.start + ttft
    obs.record(request, route, timer, {"prompt_tokens": 2, "completion_tokens": 5})


def _families(obs) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    return {f.name: f for f in text_string_to_metric_families(obs.exposition().decode())}


def _histogram(family, **labels) -> tuple[list[tuple[float, float]], float, float]:
    """(le, cumulative count) per bucket, _count and _sum of one label set."""
    samples = [s for s in family.samples if all(s.labels.get(k) == v for k, v in labels.items())]
    buckets = [(float(s.labels["le"]), s.value) for s in samples if s.name.endswith("_bucket")]
    (count,) = [s.value for s in samples if s.name.endswith("_count")]
    (total,) = [s.value for s in samples if s.name.endswith("_sum")]
    return buckets, count, total


def test_exposition_parses_and_histograms_are_cumulative():
    from inferbridge.observability import OVERHEAD_BUCKETS, Observability

    obs = Observability(access_log=False)
    overheads = [0.00005, 0.0002, 0.0025, 0.003, 0.2]  # 0.0025: a bound is in its own bucket
    for overhead in overheads:
        _record(obs, overhead, latency=0.3, ttft=0.02)
    obs.started("m")  # one still in flight
    families = _families(obs)

    requests = families["inferbridge_requests"]
    assert requests.type == "counter"
    assert [(s.name, s.labels, s.value) for s in requests.samples] == [
        (
            "inferbridge_requests_total",
            {"model": "m", "deployment": "m[0]", "backend": "echo", "status": "200"},
            5.0,
        )
    ]
    tokens = {s.labels["kind"]: s.value for s in families["inferbridge_tokens"].samples}
    assert tokens == {"prompt": 10.0, "completion": 25.0}
    (in_flight,) = families["inferbridge_requests_in_flight"].samples
    assert (in_flight.labels, in_flight.value) == ({"model": "m"}, 1.0)

    overhead = families["inferbridge_proxy_overhead_seconds"]
    assert overhead.type == "histogram"
    buckets, count, total = _histogram(overhead, model="m")
    assert [le for le, _ in buckets] == [*OVERHEAD_BUCKETS, float("inf")]
    expected = [sum(1 for o in overheads if o <= le) for le, _ in buckets]
    assert [n for _, n in buckets] == expected == [1, 2, 2, 2, 3, 4, 4, 4, 4, 4, 5]
    assert count == len(overheads) == buckets[-1][1]
    assert total == pytest.approx(sum(overheads))

    buckets, count, total = _histogram(families["inferbridge_request_duration_seconds"])
    assert dict(buckets)[0.25] == 0 and dict(buckets)[0.5] == count == 5
    assert total == pytest.approx(5 * 0.3, abs=0.05)
    buckets, count, total = _histogram(families["inferbridge_time_to_first_token_seconds"])
    assert dict(buckets)[0.01] == 0 and dict(buckets)[0.025] == count == 5
    assert total == pytest.approx(5 * 0.02)


async def test_several_processes_sum_through_the_shared_folder(tmp_path, monkeypatch):
    """With PROMETHEUS_MULTIPROC_DIR, each process publishes its totals there (every
    FLUSH_INTERVAL while serving, at stop, at each scrape it answers) and any process's
    exposition sums them all."""
    import asyncio

    from inferbridge import observability
    from inferbridge.observability import Observability

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    monkeypatch.setattr(observability, "FLUSH_INTERVAL", 0.05)
    first = Observability(access_log=False)
    second = Observability(access_log=False)
    assert first.multiprocess and second.multiprocess
    first.start()
    second.start()
    try:
        for overhead in (0.0002, 0.003):
            _record(first, overhead, latency=0.3)
        for overhead in (0.00005, 0.003, 0.2):
            _record(second, overhead, latency=0.3)
        second.started("m")  # in flight in the second process
        await asyncio.sleep(observability.DRAIN_DELAY + 0.2)  # drained, then published
        for obs in (first, second):
            families = _families(obs)
            (requests,) = families["inferbridge_requests"].samples
            assert requests.value == 5
            tokens = {s.labels["kind"]: s.value for s in families["inferbridge_tokens"].samples}
            assert tokens == {"prompt": 10.0, "completion": 25.0}
            (in_flight,) = families["inferbridge_requests_in_flight"].samples
            assert in_flight.value == 1
            buckets, count, total = _histogram(families["inferbridge_proxy_overhead_seconds"])
            assert [n for _, n in buckets] == [1, 2, 2, 2, 2, 4, 4, 4, 4, 4, 5]
            assert count == 5
            assert total == pytest.approx(0.0002 + 0.003 + 0.00005 + 0.003 + 0.2)
        assert len(list(tmp_path.glob("inferbridge_*.json"))) == 2
    finally:
        first.stop()
        second.stop()

    # A stopped process's counts stay in the sums.
    third = Observability(access_log=False)
    _record(third, 0.001, latency=0.3)
    (requests,) = _families(third)["inferbridge_requests"].samples
    assert requests.value == 6


# -- the vocabulary, outcomes, gauges -----------------------------------------------------------
DEPLOYMENT_ID = r"^[A-Za-z0-9._-]+\[\d+\]$|^[A-Za-z0-9._-]+$"


def _closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _mixed_config() -> dict:
    """`e`: two echo deployments; `flaky`: an echo deployment and one whose upstream refuses
    connections (it cools down after one failure); an alias; a model that only fails."""
    dead = f"http://127.0.0.1:{_closed_port()}/v1"
    return {
        "server": {"access_log": False},
        "model_aliases": {"gpt-4o": "e"},
        "router": {"allowed_fails": 1, "cooldown": 60, "retry_backoff": 0.0},
        "models": [
            {"name": "e", "backend": "echo"},
            {"name": "e", "backend": "echo", "id": "e-second"},
            {"name": "flaky", "backend": "echo", "mode": "chat"},
            # weighted so the shuffle picks it first and it cools down (not left to chance)
            {"name": "flaky", "backend": "vllm", "url": dead, "connect_timeout": 2, "weight": 1e6},
            {"name": "down", "backend": "vllm", "url": dead, "connect_timeout": 2},
            {"name": "busy", "backend": "echo", "delay": 0.2, "max_concurrent": 1},
        ],
    }


def _exercise(srv) -> None:
    client = srv.openai()
    client.chat.completions.create(model="e", messages=USER)
    list(client.chat.completions.create(model="gpt-4o", messages=USER, stream=True))
    for _ in range(4):  # the dead deployment fails once, cools down; echo answers
        client.chat.completions.create(model="flaky", messages=USER)
    with pytest.raises(openai.APIStatusError):
        client.chat.completions.create(model="down", messages=USER)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="missing", messages=USER)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="e", messages=[{"role": "nobody"}])
    from concurrent.futures import ThreadPoolExecutor

    def busy(_: int) -> int:  # one gets the only slot, the other a 429 (client_error)
        try:
            client.chat.completions.create(model="busy", messages=USER)
        except openai.RateLimitError:
            return 429
        return 200

    with ThreadPoolExecutor(2) as pool:
        assert sorted(pool.map(busy, range(2))) == [200, 429]


def test_exposition_labels_outcomes_ids_codes_and_gauges(serve):
    """The exposition parses with prometheus_client's parser; histograms carry the outcome;
    deployments are named by ids, never URLs; error labels come from the vocabulary; the
    deployment gauges and build_info are there."""
    from prometheus_client.parser import text_string_to_metric_families

    from inferbridge import __version__
    from inferbridge.observability import ERROR_CODES, OUTCOMES, STATES

    srv = serve(_mixed_config())
    _exercise(srv)
    text = httpx.get(srv.url + "/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert "://" not in text and "127.0.0.1" not in text

    outcomes = set()
    for name in (
        "inferbridge_request_duration_seconds",
        "inferbridge_time_to_first_token_seconds",
        "inferbridge_proxy_overhead_seconds",
    ):
        family = families[name]
        assert family.type == "histogram"
        for sample in family.samples:
            assert set(sample.labels) - {"le"} == {"model", "deployment", "outcome"}, sample
            assert sample.labels["outcome"] in OUTCOMES
            outcomes.add(sample.labels["outcome"])
    assert {"ok", "upstream_error", "client_error"} <= outcomes

    import re

    deployments = set()
    for family in families.values():
        for sample in family.samples:
            if sample.labels.get("deployment"):
                assert re.match(DEPLOYMENT_ID, sample.labels["deployment"]), sample
                deployments.add(sample.labels["deployment"])
    assert {"e[0]", "e-second", "flaky[0]", "flaky[1]", "down[0]", "busy[0]"} <= deployments

    codes = {s.labels["code"] for s in families["inferbridge_errors"].samples}
    kinds = {s.labels["kind"] for s in families["inferbridge_upstream_errors"].samples}
    assert codes and kinds and codes | kinds <= set(ERROR_CODES)
    assert {"upstream_error", "model_not_found", "invalid_request", "rate_limit_exceeded"} <= codes

    states = families["inferbridge_deployment_state"].samples
    by_deployment: dict[str, dict[str, float]] = {}
    for sample in states:
        assert sample.labels["state"] in STATES
        by_deployment.setdefault(sample.labels["deployment"], {})[sample.labels["state"]] = (
            sample.value
        )
    assert set(by_deployment) == {"e[0]", "e-second", "flaky[0]", "flaky[1]", "down[0]", "busy[0]"}
    assert all(sum(v.values()) == 1 for v in by_deployment.values())
    assert by_deployment["flaky[1]"]["cooling_down"] == 1
    assert by_deployment["e[0]"]["ok"] == 1
    for name in ("inferbridge_deployment_in_flight", "inferbridge_deployment_queue_depth"):
        samples = families[name].samples
        assert {s.labels["deployment"] for s in samples} == set(by_deployment)
        assert all(s.value == 0 for s in samples)
    (info,) = families["inferbridge_build_info"].samples
    assert info.labels == {"version": __version__, "python": platform.python_version()}
    assert info.value == 1


def test_error_codes_come_from_one_vocabulary():
    from inferbridge.errors import (
        AuthenticationFailed,
        DeploymentMisconfigured,
        InferbridgeError,
        InvalidRequest,
        ModelNotFound,
        RateLimited,
        RequestTimeout,
        UnsupportedMediaType,
        UpstreamError,
        UpstreamRejected,
        UpstreamTimeout,
        UpstreamUnavailable,
    )
    from inferbridge.observability import ERROR_CODES, classify

    rate_limited_upstream = UpstreamRejected("slow down", status=429)
    rate_limited_upstream.code, rate_limited_upstream.retryable = "rate_limit_exceeded", True
    cases = [
        (UpstreamError("x"), 502, ("upstream_error", "upstream_error")),
        (UpstreamTimeout("x"), 504, ("upstream_timeout", "upstream_error")),
        (UpstreamUnavailable("x"), 503, ("upstream_unavailable", "upstream_error")),
        (DeploymentMisconfigured("x"), 502, ("deployment_misconfigured", "upstream_error")),
        (UpstreamRejected("no", status=400), 400, ("upstream_rejected", "client_error")),
        (UpstreamRejected("no", status=400, code="content_filter"), 400, None),
        (rate_limited_upstream, 429, ("rate_limit_exceeded", "upstream_error")),
        (RateLimited("full"), 429, ("rate_limit_exceeded", "client_error")),
        (InvalidRequest("bad"), 400, ("invalid_request", "client_error")),
        (ModelNotFound("m"), 404, ("model_not_found", "client_error")),
        (AuthenticationFailed("k"), 401, ("invalid_api_key", "client_error")),
        (UnsupportedMediaType("t"), 415, ("unsupported_media_type", "client_error")),
        (RequestTimeout("t"), 408, ("request_timeout", "client_error")),
        (InferbridgeError("bug"), 500, ("internal_error", "upstream_error")),
        (RuntimeError("bug"), 200, ("internal_error", "upstream_error")),
        (None, 200, (None, "ok")),
        (None, 404, ("not_found", "client_error")),
        (None, 418, ("client_error", "client_error")),
    ]
    for error, status, expected in cases:
        code, outcome = classify(error, status)
        assert code in ERROR_CODES or code is None
        if expected is not None:
            assert (code, outcome) == expected, error
    assert classify(UpstreamRejected("no", status=400, code="content_filter"), 400)[0] == (
        "upstream_rejected"
    )
    assert classify(None, 200, disconnected=True) == ("client_disconnected", "client_error")


def test_rejected_keeps_its_old_signature():
    from inferbridge.observability import AccessLogWriter, Observability

    obs = Observability()
    sink = _Sink()
    obs.access = AccessLogWriter(sink)
    obs.rejected(404)
    obs.access._flush()
    (line,) = [json.loads(x) for x in sink.data.splitlines()]
    assert (line["status"], line["error"]) == (404, "not_found")
    families = _families(obs)
    (sample,) = families["inferbridge_rejected_requests"].samples
    assert (sample.labels, sample.value) == ({"status": "404"}, 1.0)


async def test_deployment_gauges_merge_across_processes(tmp_path, monkeypatch):
    """With several processes, each publishes its deployments' gauges: a scrape sums in
    flight and queued, shows the worst state, and forgets a stopped process's."""
    from inferbridge.config import load_config
    from inferbridge.gateway import Gateway

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    config = load_config(data={"models": [{"name": "m", "backend": "echo"}]}, environ={})
    first, second = Gateway(config), Gateway(config)
    (d1,) = first.router.groups["m"].deployments
    (d2,) = second.router.groups["m"].deployments
    d1.limit.take()
    d2.limit.take()
    d2.limit.take()
    second.router.store.set_unhealthy(d2.id, True)
    first.observability.start()
    second.observability.start()

    def gauges(obs) -> dict:
        families = _families(obs)
        state = {
            s.labels["state"]: s.value for s in families["inferbridge_deployment_state"].samples
        }
        (in_flight,) = families["inferbridge_deployment_in_flight"].samples
        return {"state": state, "in_flight": in_flight.value}

    for obs in (first.observability, second.observability):
        obs.metrics.publish()  # as each does every FLUSH_INTERVAL
    try:
        for obs in (first.observability, second.observability):
            seen = gauges(obs)
            assert seen["in_flight"] == 3
            assert seen["state"] == {"ok": 0, "half_open": 0, "cooling_down": 0, "unhealthy": 1}
    finally:
        second.observability.stop()
    try:
        seen = gauges(first.observability)
        assert seen["in_flight"] == 1
        assert seen["state"]["ok"] == 1
    finally:
        first.observability.stop()


# -- access log: one line per request, whatever its outcome -------------------------------------
def test_access_log_has_a_line_for_every_request(serve, capfd):
    srv = serve(
        {
            "server": {"access_log": True, "max_body_bytes": 4096},
            "auth": {"api_keys": ["sk-test"]},
            "models": [
                {"name": "e", "backend": "echo"},
                {"name": "slow", "backend": "echo", "delay": 0.3, "max_concurrent": 1},
            ],
        }
    )
    key = {"authorization": "Bearer sk-test"}
    chat = srv.url + "/v1/chat/completions"
    body = {"model": "e", "messages": USER}
    calls = {
        "ok": ("POST", chat, key, body, 200),
        "no-key": ("POST", chat, {}, body, 401),
        "unknown-model": ("POST", chat, key, {**body, "model": "nope"}, 404),
        "bad-body": ("POST", chat, key, {"model": "e", "messages": "x"}, 400),
        "too-large": ("POST", chat, key, {**body, "pad": "x" * 5000}, 413),
        "models": ("GET", srv.url + "/v1/models", key, None, 200),
        "one-model": ("GET", srv.url + "/v1/models/nope", key, None, 404),
        "no-path": ("GET", srv.url + "/v1/nothing-here", key, None, 404),
    }
    with httpx.Client(timeout=10) as client:
        for rid, (method, url, headers, data, status) in calls.items():
            r = client.request(method, url, headers={**headers, "x-request-id": rid}, json=data)
            assert r.status_code == status, (rid, r.text)
        r = client.post(
            chat,
            headers={**key, "x-request-id": "not-json", "content-type": "text/plain"},
            content=b"hello",
        )
        assert r.status_code == 415
        slow = {"model": "slow", "messages": USER}

        async def two() -> list[int]:
            async with httpx.AsyncClient(timeout=10) as aclient:
                replies = await asyncio.gather(
                    *(
                        aclient.post(chat, headers={**key, "x-request-id": f"busy-{i}"}, json=slow)
                        for i in range(2)
                    )
                )
            return sorted(r.status_code for r in replies)

        import asyncio

        assert asyncio.run(two()) == [200, 429]
        assert client.get(srv.url + "/health").status_code == 200  # public: no line

    lines = {line["request_id"]: line for line in _access_lines(capfd)}
    expected = {
        "ok": (200, None),
        "no-key": (401, "invalid_api_key"),
        "unknown-model": (404, "model_not_found"),
        "bad-body": (400, "invalid_request"),
        "too-large": (413, "request_too_large"),
        "models": (200, None),
        "one-model": (404, "model_not_found"),
        "no-path": (404, "not_found"),
        "not-json": (415, "unsupported_media_type"),
    }
    for rid, (status, error) in expected.items():
        assert rid in lines, (rid, sorted(lines))
        assert (lines[rid]["status"], lines[rid]["error"]) == (status, error), lines[rid]
    busy = sorted((lines[f"busy-{i}"]["status"], lines[f"busy-{i}"]["error"]) for i in range(2))
    assert busy == [(200, None), (429, "rate_limit_exceeded")]
    assert lines["models"]["path"] == "/v1/models" and lines["models"]["method"] == "GET"
    assert lines["no-key"]["path"] == "/v1/chat/completions"
    assert lines["unknown-model"]["model"] == "nope"
    # the key's name (never its secret) on every line of a request that presented one
    for rid in ("ok", "unknown-model", "bad-body", "models", "one-model", "busy-0", "busy-1"):
        assert lines[rid]["key"] == "api_keys[0]", lines[rid]
    assert lines["no-key"]["key"] is None
    assert "sk-test" not in json.dumps(list(lines.values()))
    assert len([x for x in lines.values() if x.get("path") == "/health"]) == 0
    assert len(lines) == len(expected) + 2  # one line each, no more


# -- process logs from `inferbridge serve` -----------------------------------------------------
def _serve_process(tmp_path, config: dict, *args: str, env: dict | None = None):
    import os
    import subprocess
    import sys

    import yaml

    path = tmp_path / "inferbridge.yaml"
    path.write_text(yaml.safe_dump(config))
    port = _closed_port()
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("INFERBRIDGE_", "PROM"))}
    environ.update(env or {})
    log = tmp_path / "stderr.log"
    command = [sys.executable, "-m", "inferbridge", "serve", "--config", str(path)]
    with log.open("wb") as err:
        process = subprocess.Popen(
            [*command, "--port", str(port), *args],
            env=environ,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    return process, port, log


def _wait_for(log, predicate, process, timeout: float = 40.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text()
        if predicate(text):
            return text
        if process.poll() is not None:
            raise AssertionError(f"server exited:\n{text}")
        time.sleep(0.2)
    raise AssertionError(f"timed out:\n{log.read_text()}")


def _stop(process) -> None:
    import subprocess

    process.terminate()
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)


def test_every_worker_logs_json_lines(tmp_path):
    """`--workers 2` with stderr not a terminal: every line of every process is JSON, and
    each worker writes its start-up line (with the bound address) and its warnings."""
    config = {"models": [{"name": "e", "backend": "echo"}, {"name": "e", "backend": "echo"}]}
    process, port, log = _serve_process(
        tmp_path,
        {**config, "model_aliases": {"fast": "e"}},
        "--workers",
        "2",
        env={"INFERBRIDGE_API_KEYS": ""},  # set but empty: a warning from each process
    )
    try:

        def two_started(text: str) -> bool:
            return text.count('"event":"startup"') >= 2

        _wait_for(log, two_started, process)
        r = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5)
        assert r.status_code == 200
        time.sleep(0.3)
    finally:
        _stop(process)
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    logs = [line for line in lines if "level" in line]
    assert all({"ts", "level", "logger", "message", "pid"} <= set(x) for x in logs)
    startups = [x for x in logs if x.get("event") == "startup"]
    workers = {x["pid"] for x in startups}
    assert len(workers) == 2 and process.pid not in workers
    for line in startups:
        assert line["address"] == f"http://127.0.0.1:{port}"
        assert line["models"] == [
            {"name": "e", "backends": ["echo"], "deployments": 2, "aliases": ["fast"]}
        ]
        assert line["auth"].startswith("off") and line["auth_required"] is False
        assert f"listening on http://127.0.0.1:{port}" in line["message"]
    warned = {x["pid"] for x in logs if x["level"] == "warning" and "API_KEYS" in x["message"]}
    assert workers <= warned
    assert any("Uvicorn running on" in x["message"] for x in logs)  # uvicorn's lines too
    assert any(x.get("path") == "/v1/models" and x["status"] == 200 for x in lines)


def test_log_format_text(tmp_path):
    config = {"server": {"log_format": "text"}, "models": [{"name": "e", "backend": "echo"}]}
    process, port, log = _serve_process(tmp_path, config)
    try:
        text = _wait_for(log, lambda t: "Application startup complete" in t, process)
    finally:
        _stop(process)
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines and not any(line.startswith("{") for line in lines)
    (startup,) = [line for line in lines if "listening on" in line]
    assert " INFO inferbridge: inferbridge " in startup
    assert f"listening on http://127.0.0.1:{port}" in startup
    assert "e (echo, 1 deployment)" in startup and "auth off" in startup


def test_logging_config_resolves_the_format():
    import io
    import logging

    from inferbridge.logs import JsonFormatter, TextFormatter, logging_config, resolve_format

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert resolve_format(None, io.StringIO()) == "json"
    assert resolve_format(None, Terminal()) == "text"
    assert resolve_format("text", io.StringIO()) == "text"
    with pytest.raises(ValueError):
        logging_config("xml")
    config = logging_config("json", "warning")
    assert config["formatters"]["default"]["()"] == "inferbridge.logs.JsonFormatter"
    assert config["loggers"]["uvicorn"]["propagate"] is True
    record = logging.makeLogRecord(
        {"name": "inferbridge", "levelname": "WARNING", "msg": "a %s", "args": ("b",)}
    )
    record.fields = {"event": "x"}
    line = json.loads(JsonFormatter().format(record))
    assert (line["level"], line["message"], line["event"]) == ("warning", "a b", "x")
    assert TextFormatter().format(record).endswith("WARNING inferbridge: a b")


# -- the Grafana dashboard ----------------------------------------------------------------------
def test_grafana_dashboard_uses_only_real_metrics(serve):
    import re
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "inferbridge.json"
    dashboard = json.loads(path.read_text())
    exprs = [
        target["expr"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
        if target.get("expr")
    ]
    assert len(exprs) >= 10
    used = {
        re.sub(r"_(bucket|sum|count)$", "", name)
        for expr in exprs
        for name in re.findall(r"\binferbridge_[a-z_]+", expr)
    }
    srv = serve(_mixed_config())
    _exercise(srv)
    text = httpx.get(srv.url + "/metrics").text
    exposed = set(re.findall(r"^# TYPE (\S+)", text, re.M))
    exposed |= {name + "_total" for name in exposed}
    assert used and used <= exposed, used - exposed
    titles = " ".join(panel["title"].lower() for panel in dashboard["panels"])
    for word in ("requests", "latency", "first token", "overhead", "tokens", "errors"):
        assert word in titles, word
    for word in ("state", "in flight", "queue"):
        assert word in titles, word
