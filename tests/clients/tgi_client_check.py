"""Checks the fake TGI server (tests/fakes/tgi.py) with Hugging Face's own `text-generation`
client, so the fake stays byte-compatible with what real TGI clients parse.

`text-generation` needs huggingface-hub<1.0, which conflicts with the main environment, so
this is a standalone script (no pytest) run in its own small venv; it exits non-zero on the
first failed check. From the repository root:

    python3 -m venv /tmp/tgi-venv
    /tmp/tgi-venv/bin/pip install text-generation aiohttp
    PYTHONPATH=. /tmp/tgi-venv/bin/python tests/clients/tgi_client_check.py
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable

from tests.fakes.tgi import FakeTGI, tok
from text_generation import Client
from text_generation.errors import GenerationError, ValidationError

CHECKS: list[Callable[[FakeTGI], None]] = []


def check(fn: Callable[[FakeTGI], None]) -> Callable[[FakeTGI], None]:
    CHECKS.append(fn)
    return fn


@check
def generate_with_details(fake: FakeTGI) -> None:
    client = Client(fake.url, timeout=10)
    r = client.generate("My name is", max_new_tokens=10, top_n_tokens=2)
    assert r.generated_text == "Hello world!", r
    d = r.details
    assert d.finish_reason.value == "eos_token", d
    assert d.generated_tokens == 4, d  # three tokens and the EOS
    assert [t.text for t in d.tokens] == ["Hello", " world", "!", "</s>"], d.tokens
    assert d.tokens[-1].special and not d.tokens[0].special
    assert d.prefill == [] and d.seed is None
    assert d.top_tokens is not None and len(d.top_tokens[0]) == 2
    body = fake.generations[-1]
    assert body["stream"] is False and body["parameters"]["details"] is True, body


@check
def generate_length_and_stop(fake: FakeTGI) -> None:
    client = Client(fake.url, timeout=10)
    r = client.generate("x", max_new_tokens=2)
    assert r.generated_text == "Hello world" and r.details.finish_reason.value == "length", r
    r = client.generate("x", max_new_tokens=10, stop_sequences=[" world"], do_sample=True, seed=7)
    assert r.generated_text == "Hello world", r  # TGI keeps the stop string
    assert r.details.finish_reason.value == "stop_sequence" and r.details.seed == 7, r


@check
def generate_stream(fake: FakeTGI) -> None:
    client = Client(fake.url, timeout=10)
    events = list(client.generate_stream("My name is", max_new_tokens=10))
    assert [e.token.text for e in events] == ["Hello", " world", "!", "</s>"], events
    assert all(e.generated_text is None and e.details is None for e in events[:-1])
    last = events[-1]
    assert last.token.special and last.generated_text == "Hello world!", last
    assert last.details.finish_reason.value == "eos_token" and last.details.generated_tokens == 4


@check
def stream_split_at_awkward_boundaries(fake: FakeTGI) -> None:
    fake.set_reply("Hé", "llo", tok("<|x|>", special=True), " ✓")
    fake.behaviour.split_every = 3
    events = list(Client(fake.url, timeout=10).generate_stream("x", max_new_tokens=10))
    assert "".join(e.token.text for e in events if not e.token.special) == "Héllo ✓", events
    assert events[-1].generated_text == "Héllo ✓"


@check
def validation_error_http_and_stream(fake: FakeTGI) -> None:
    client = Client(fake.url, timeout=10)
    try:
        client.generate("x", max_new_tokens=5, top_p=0.5, stop_sequences=list("abcde"))
    except ValidationError as exc:
        assert "stop sequences" in str(exc), exc
    else:
        raise AssertionError("expected a ValidationError from /")
    try:
        list(client.generate_stream("x", max_new_tokens=5, stop_sequences=list("abcde")))
    except ValidationError as exc:
        assert "stop sequences" in str(exc), exc
    else:
        raise AssertionError("expected a ValidationError event on the stream")


@check
def error_event_mid_stream(fake: FakeTGI) -> None:
    fake.error_event = (2, "generation", "Request failed during generation: CUDA OOM")
    seen = []
    try:
        for event in Client(fake.url, timeout=10).generate_stream("x", max_new_tokens=10):
            seen.append(event.token.text)
    except GenerationError as exc:
        assert "CUDA OOM" in str(exc), exc
    else:
        raise AssertionError("expected a GenerationError")
    assert seen == ["Hello", " world"], seen


def main() -> int:
    failed = 0
    for fn in CHECKS:
        with FakeTGI() as fake:
            try:
                fn(fake)
            except Exception:
                failed += 1
                print(f"FAIL {fn.__name__}")
                traceback.print_exc()
            else:
                print(f"ok   {fn.__name__}")
    print(f"{len(CHECKS) - failed}/{len(CHECKS)} checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
