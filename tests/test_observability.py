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
