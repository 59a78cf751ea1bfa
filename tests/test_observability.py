"""Metrics, request ids, the overhead header, and private-by-default access logs."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

USER = [{"role": "user", "content": "secret words here"}]


def _access_lines(capfd) -> list[dict]:
    time.sleep(0.2)  # the access log is written by a background thread
    err = capfd.readouterr().err
    return [json.loads(line) for line in err.splitlines() if line.startswith('{"ts"')]


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
            ours.observe(family, ("m",), v)
            reals[family].labels("m").observe(v)
    ours.observe(ours.ttft, ("n",), 0.01)
    reals[ours.ttft].labels("n").observe(0.01)
    for _ in range(2):
        ours.inc(ours.requests, ("m", "d", "echo", "200"))
        reals[ours.requests].labels("m", "d", "echo", "200").inc()
    ours.inc(ours.tokens, ("m", "prompt"), 7)
    reals[ours.tokens].labels("m", "prompt").inc(7)
    ours.in_flight["m"] = 3
    reals[ours.requests_in_flight].labels("m").set(3)

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
    route.model, route.deployment, route.backend, route.attempts = "m", "m#0", "echo", 1
    timer = RequestTimer()
    timer.status = status
    obs.started("m")
    return request, route, timer


def _requests_total(obs) -> float:
    value = obs.metrics.registry.get_sample_value(
        "inferbridge_requests_total",
        {"model": "m", "deployment": "m#0", "backend": "echo", "status": "200"},
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
            {"model": "m", "deployment": "m#0", "backend": "echo", "status": "200"},
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
