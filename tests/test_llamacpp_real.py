"""inferbridge against a REAL llama.cpp `llama-server` with a tiny random-weight model.

Needs the binary built by `scripts/build-llama-server.sh` (found at $INFERBRIDGE_LLAMA_SERVER,
default ${XDG_CACHE_HOME:-~/.cache}/inferbridge/llama-server) and the `gguf` package, which
writes a 1-layer llama GGUF with a ~300-token SentencePiece vocabulary in the test's
tmp_path. Skipped, with the reason, when either is missing. The weights are random, so the
text is gibberish; tests pin what does not depend on it: counts, finish reasons, stream vs
non-stream agreement under greedy sampling, stop strings cut where they occur.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.fakes.llamacpp import CHATML, FakeLlamaCpp

gguf = pytest.importorskip("gguf", reason="the gguf package writes the test model")
np = pytest.importorskip("numpy")

CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
BINARY = Path(os.environ.get("INFERBRIDGE_LLAMA_SERVER") or CACHE / "inferbridge/llama-server")
if not os.access(BINARY, os.X_OK):
    pytest.skip(
        f"llama-server is not built at {BINARY}: run scripts/build-llama-server.sh",
        allow_module_level=True,
    )

MESSAGES = [{"role": "user", "content": "hello there"}]
GREEDY = {"temperature": 0, "seed": 1}
N_CTX = 256


def write_tiny_llama(path: Path) -> None:
    """A valid llama GGUF: 1 block, 64-dim, SPM vocab (<unk> <s> </s>, 256 bytes, pieces)."""
    pieces = ["▁", *"abcdefghijklmnopqrstuvwxyz", *(f"▁{c}" for c in "abcdefghijklmnopqrstuvwxyz")]
    pieces += ["▁hello", "▁there", "▁the", "▁world", "▁once", "▁upon", "▁time", "."]
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *pieces]
    types = [2, 3, 3, *[6] * 256, *[1] * len(pieces)]
    scores = [0.0, 0.0, 0.0, *[0.0] * 256, *(-float(i) for i in range(len(pieces)))]
    n_vocab, n_embd, n_ff, n_head = len(tokens), 64, 128, 4

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(N_CTX)
    w.add_embedding_length(n_embd)
    w.add_block_count(1)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head)
    w.add_rope_dimension_count(n_embd // n_head)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(0)  # all F32
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.add_chat_template(CHATML)
    rng = np.random.default_rng(0)

    def rand(*shape: int) -> np.ndarray:
        return rng.normal(0, 0.5, shape).astype(np.float32)

    w.add_tensor("token_embd.weight", rand(n_vocab, n_embd))
    w.add_tensor("output_norm.weight", np.ones(n_embd, np.float32))
    # Zero output rows for the control and byte tokens: their logit is 0 while ~60 random
    # word-piece logits compete, so greedy decoding emits whole UTF-8 pieces, never EOS.
    output = rand(n_vocab, n_embd) * 4
    output[: 3 + 256] = 0
    w.add_tensor("output.weight", output)
    w.add_tensor("blk.0.attn_norm.weight", np.ones(n_embd, np.float32))
    for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
        w.add_tensor(f"blk.0.{name}.weight", rand(n_embd, n_embd))
    w.add_tensor("blk.0.ffn_norm.weight", np.ones(n_embd, np.float32))
    w.add_tensor("blk.0.ffn_gate.weight", rand(n_ff, n_embd))
    w.add_tensor("blk.0.ffn_up.weight", rand(n_ff, n_embd))
    w.add_tensor("blk.0.ffn_down.weight", rand(n_embd, n_ff))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(tmp: Path, *extra: str) -> Iterator[str]:
    """llama-server on the tiny model (written into `tmp`) with `extra` arguments; its URL."""
    model = tmp / "tiny-llama.gguf"
    if not model.exists():
        write_tiny_llama(model)
    port = free_port()
    log = (tmp / f"llama-server-{port}.log").open("wb")
    cmd = [
        str(BINARY),
        "-m",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "-c",
        str(N_CTX),
        "-np",
        "1",
        "-t",
        "2",
        "--no-warmup",
        "--no-webui",
        "--no-context-shift",
        "--alias",
        "tiny",
        *extra,
    ]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                log.flush()
                pytest.fail("llama-server exited:\n" + Path(log.name).read_text())
            try:
                with urllib.request.urlopen(url + "/health", timeout=1) as resp:
                    if resp.status == 200:
                        break
            except OSError:  # refused, or 503 while loading
                pass
            if time.monotonic() > deadline:
                pytest.fail("llama-server did not become healthy in 60 s")
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("llama")) as url:
        yield url


@pytest.fixture(scope="module")
def proxy(llama_server):
    from tests.server import InferbridgeServer

    entry = {"backend": "llamacpp", "url": llama_server, "timeout": 30}
    models = [
        {"name": "tiny", "prompt_template": "chatml", **entry},
        {"name": "tiny-props", **entry},  # the model's own template, read from /props
    ]
    with InferbridgeServer({"models": models}) as server:
        yield server


def test_completions_non_stream_and_stream_agree(proxy):
    client = proxy.openai()
    r = client.completions.create(model="tiny", prompt="once upon a time", max_tokens=6, **GREEDY)
    assert r.usage.prompt_tokens > 0 and 0 < r.usage.completion_tokens <= 6
    assert r.choices[0].finish_reason in ("stop", "length")
    chunks = list(
        client.completions.create(
            model="tiny",
            prompt="once upon a time",
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == r.usage.prompt_tokens


def test_max_tokens_gives_length(proxy):
    client = proxy.openai()
    for stream in (False, True):
        kw = {
            "model": "tiny",
            "prompt": "hello",
            "max_tokens": 5,
            "extra_body": {"ignore_eos": True},
            **GREEDY,
        }
        if not stream:
            r = client.completions.create(**kw)
            assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5
            continue
        chunks = list(
            client.completions.create(stream=True, stream_options={"include_usage": True}, **kw)
        )
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
        assert chunks[-1].usage.completion_tokens == 5


def test_chat_with_prompt_template(proxy):
    client = proxy.openai()
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4, **GREEDY)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 10 and r.usage.completion_tokens > 0  # rendered ChatML
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=MESSAGES,
            max_tokens=4,
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == r.choices[0].message.content
    assert chunks[-1].usage.prompt_tokens == r.usage.prompt_tokens


def test_chat_with_the_servers_own_template(proxy):
    ours = proxy.openai().chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=4, **GREEDY
    )
    theirs = proxy.openai().chat.completions.create(
        model="tiny-props", messages=MESSAGES, max_tokens=4, **GREEDY
    )
    # the GGUF carries the same ChatML template: same prompt, same greedy answer
    assert theirs.usage.prompt_tokens == ours.usage.prompt_tokens
    assert theirs.choices[0].message.content == ours.choices[0].message.content


def test_stop_string_is_cut_by_the_server(proxy):
    client = proxy.openai()
    kw = {
        "model": "tiny",
        "prompt": "the world",
        "max_tokens": 12,
        "extra_body": {"ignore_eos": True},
        **GREEDY,
    }
    full = client.completions.create(**kw).choices[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    assert len(stop) == 2, full
    r = client.completions.create(stop=[stop], **kw)
    assert r.choices[0].text == full[: full.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_prompt_over_the_context_is_context_length_exceeded(proxy):
    long_prompt = "hello there " * N_CTX
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as exc:
            r = proxy.openai().completions.create(
                model="tiny", prompt=long_prompt, max_tokens=2, stream=stream
            )
            list(r) if stream else None
        assert exc.value.code == "context_length_exceeded"


def test_fake_speaks_the_same_fields(llama_server):
    """The fake's events carry only fields the real server sends (stop_type dialect)."""

    def events(url: str) -> list[dict]:
        body = json.dumps({"prompt": "hello", "n_predict": 3, "stream": True}).encode()
        req = urllib.request.Request(
            url + "/completion", body, {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            raw = resp.read().decode()
        assert "[DONE]" not in raw
        return [json.loads(line[6:]) for line in raw.split("\n\n") if line.startswith("data: ")]

    real = events(llama_server)
    with FakeLlamaCpp() as fake:
        fake_events = events(fake.url)
    assert set(fake_events[0]) <= set(real[0]) and set(fake_events[-1]) <= set(real[-1])
    assert real[-1]["stop"] is True and real[-1]["stop_type"] == "limit"


def test_chat_logprobs_from_the_server(proxy):
    r = proxy.openai().chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=3, logprobs=True, top_logprobs=2, **GREEDY
    )
    content = r.choices[0].logprobs.content
    assert "".join(t.token for t in content) == r.choices[0].message.content
    assert len(content) == r.usage.completion_tokens
    assert all(t.logprob <= 0 and len(t.top_logprobs) == 2 for t in content)
    assert all(bytes(t.bytes).decode() == t.token for t in content)


# -- the model's own template: /props and /apply-template ------------------------------------
CHAT = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}]
PREFILL = [*CHAT, {"role": "assistant", "content": "Hel"}]


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


def apply_template(url: str, messages: list[dict]) -> bytes:
    body = json.dumps({"messages": messages}).encode()
    req = urllib.request.Request(
        url + "/apply-template", body, {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.read()


def test_fake_props_and_apply_template_match_the_real_server(llama_server, tmp_path):
    real = get_json(llama_server + "/props")
    with FakeLlamaCpp() as fake:
        props = get_json(fake.url + "/props")
        assert set(props) <= set(real)
        keys = ("chat_template", "bos_token", "eos_token")
        assert [props[k] for k in keys] == [real[k] for k in keys]  # the GGUF's ChatML
        for messages in (CHAT, PREFILL):  # prefill: a trailing assistant message continued
            assert apply_template(fake.url, messages) == apply_template(llama_server, messages)
        fake.chat_template = "llama3"
        with running_server(tmp_path, "--chat-template", "llama3") as url:
            assert get_json(url + "/props")["chat_template"] == "llama3"  # a name, not Jinja
            for messages in (CHAT, PREFILL):
                assert apply_template(fake.url, messages) == apply_template(url, messages)


def test_builtin_template_name_is_rendered_by_the_server(tmp_path):
    from tests.server import InferbridgeServer

    with running_server(tmp_path, "--chat-template", "llama3") as url:
        entry = {"backend": "llamacpp", "url": url, "timeout": 30}
        models = [
            {"name": "named", "prompt_template": "llama3", **entry},  # rendered here
            {"name": "own", **entry},  # /props says "llama3": rendered by /apply-template
        ]
        with InferbridgeServer({"models": models}) as server:
            client = server.openai()
            kw = {"messages": CHAT, "max_tokens": 4, **GREEDY}
            ours = client.chat.completions.create(model="named", **kw)
            theirs = client.chat.completions.create(model="own", **kw)
    assert theirs.usage.prompt_tokens == ours.usage.prompt_tokens
    assert theirs.choices[0].message.content == ours.choices[0].message.content


async def test_jinja_with_a_builtin_name_is_refused_at_start_up(tmp_path):
    from inferbridge.config import load_config
    from inferbridge.errors import DeploymentMisconfigured
    from inferbridge.gateway import Gateway

    # llama-server --jinja takes the name itself as the template: every prompt is "llama3"
    with running_server(tmp_path, "--jinja", "--chat-template", "llama3") as url:
        entry = {"name": "own", "backend": "llamacpp", "url": url}
        gateway = Gateway(load_config(data={"models": [entry]}, environ={}))
        try:
            with pytest.raises(DeploymentMisconfigured, match=r"\(own\[0\]\).*--jinja"):
                await gateway.start()
        finally:
            await gateway.close()
