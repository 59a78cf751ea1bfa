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


def test_pending_metrics_flush_equals_direct_prometheus_calls():
    """Counting in plain dicts then flushing gives the exposition that calling
    prometheus_client directly gives: same counters, bucket counts, sums and gauge."""
    from prometheus_client import CollectorRegistry, generate_latest

    from inferbridge.observability import Metrics

    values = [0.00005, 0.0001, 0.0003, 0.002, 0.07, 0.5, 3.0, 400.0]
    pending_side = Metrics(CollectorRegistry())
    direct = Metrics(CollectorRegistry())
    p = pending_side.pending
    for v in values:
        p.observe(pending_side.latency, ("m",), v)
        p.observe(pending_side.overhead, ("m",), v)
        direct.latency.labels("m").observe(v)
        direct.overhead.labels("m").observe(v)
    p.inc(pending_side.requests, ("m", "d", "echo", "200"))
    p.inc(pending_side.requests, ("m", "d", "echo", "200"))
    p.inc(pending_side.tokens, ("m", "prompt"), 7)
    direct.requests.labels("m", "d", "echo", "200").inc(2)
    direct.tokens.labels("m", "prompt").inc(7)
    p.in_flight["m"] = 3
    direct.in_flight.labels("m").set(3)
    p.flush()
    p.observe(pending_side.latency, ("m",), 0.01)  # after a flush: added to what is there
    direct.latency.labels("m").observe(0.01)
    p.flush()

    def lines(m: Metrics) -> list[str]:
        text = generate_latest(m.registry).decode()
        return [line for line in text.splitlines() if "_created" not in line]

    assert lines(pending_side) == lines(direct)
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
        assert obs.metrics.pending.in_flight["m"] == 0
        assert not obs.metrics.pending.counts  # counted at the drain, not yet
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
        obs.metrics.pending.flush()
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
    obs.metrics.pending.flush()
    assert _requests_total(obs) == 1
