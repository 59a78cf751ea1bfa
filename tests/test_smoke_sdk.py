"""The official openai SDK against the built-in echo model."""

import openai
import pytest


def test_chat_non_stream(echo_server):
    client = echo_server.openai()
    r = client.chat.completions.create(
        model="echo", messages=[{"role": "user", "content": "hello big world"}]
    )
    assert r.choices[0].message.content == "hello big world"
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == 3


def test_chat_stream(echo_server):
    client = echo_server.openai()
    chunks = list(
        client.chat.completions.create(
            model="echo",
            messages=[{"role": "user", "content": "one two three"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "one two three"
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == 6
    assert len({c.id for c in chunks}) == 1


def test_unknown_model(echo_server):
    with pytest.raises(openai.NotFoundError):
        echo_server.openai().chat.completions.create(
            model="nope", messages=[{"role": "user", "content": "x"}]
        )
