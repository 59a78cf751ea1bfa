"""How OpenAI request parameters become TGI's: the `parameters` object of `/generate`.

`translate_params` maps the sampling settings and TGI's own extras to what TGI accepts,
turning every value TGI would reject with a 422 into what it means (temperature 0 ->
greedy, top_p 1 -> no nucleus, ...); `response_format` becomes a `grammar`
(`response_grammar`; "any JSON object" is `JSON_OBJECT_REGEX`, TGI's json grammar needing
`properties`). `stops_for_tgi` picks the stop strings sent within the router's limit
(`TGIInfo`, read from `GET /info` by the adapter) and those only inferbridge can enforce.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from inferbridge.errors import InvalidRequest
from inferbridge.request import InferenceRequest
from inferbridge.stops import covering_stops

DEFAULT_MAX_STOP_SEQUENCES = 4
"""TGI's own default for `--max-stop-sequences`, used while /info cannot be read."""

# A JSON object, nested up to three levels (TGI's json grammar needs a schema with
# `properties`, so "any object" for response_format json_object is sent as a regex).
_WS = r"[ ]?"
_STRING = r'"([^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})*"'
_SCALAR = rf"({_STRING}|-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?|true|false|null)"


def _json_value(depth: int) -> str:
    if depth == 0:
        return _SCALAR
    inner = _json_value(depth - 1)
    array = rf"\[{_WS}({inner}({_WS},{_WS}{inner})*)?{_WS}\]"
    return rf"({_SCALAR}|{array}|{_json_object(depth)})"


def _json_object(depth: int) -> str:
    member = rf"{_STRING}{_WS}:{_WS}{_json_value(depth - 1)}"
    return rf"\{{{_WS}({member}({_WS},{_WS}{member})*)?{_WS}\}}"


JSON_OBJECT_REGEX = _json_object(3)


@dataclass(frozen=True)
class TGIInfo:
    """The router limits inferbridge needs from `GET /info`."""

    max_stop_sequences: int = DEFAULT_MAX_STOP_SEQUENCES
    max_input_tokens: int | None = None

    @classmethod
    def parse(cls, data: Any) -> TGIInfo:
        if not isinstance(data, dict):
            return cls()
        stops = data.get("max_stop_sequences")
        inputs = data.get("max_input_tokens", data.get("max_input_length"))
        return cls(
            stops if isinstance(stops, int) and stops >= 0 else DEFAULT_MAX_STOP_SEQUENCES,
            inputs if isinstance(inputs, int) and inputs > 0 else None,
        )


def _extra(x: dict[str, Any], key: str, kind: type | tuple[type, ...], what: str) -> Any:
    value = x.get(key)
    if value is not None and (
        isinstance(value, bool) is not (kind is bool) or not isinstance(value, kind)
    ):
        raise InvalidRequest(f"Invalid value for '{key}': expected {what}.", param=key)
    return value


def _check(ok: bool, key: str, rule: str) -> None:
    if not ok:
        raise InvalidRequest(f"Invalid value for '{key}': {rule}.", param=key)


def response_grammar(fmt: Any) -> dict[str, Any] | None:
    """TGI's `grammar` for an OpenAI `response_format`."""
    if not isinstance(fmt, dict) or fmt.get("type") in (None, "text"):
        return None
    spec = fmt.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, dict) else None
    if fmt["type"] == "json_schema" and schema:
        return {"type": "json", "value": schema}
    return {"type": "regex", "value": JSON_OBJECT_REGEX}


def translate_params(request: InferenceRequest, info: TGIInfo) -> dict[str, Any]:
    """TGI `parameters` for the request's sampling settings (stops and flags excluded)."""
    p, x = request.params, request.extras
    top_k = _extra(x, "top_k", int, "an integer")
    typical_p = _extra(x, "typical_p", (int, float), "a number")
    repetition = _extra(x, "repetition_penalty", (int, float), "a number")
    truncate = _extra(x, "truncate", int, "an integer")
    do_sample = _extra(x, "do_sample", bool, "true or false")
    watermark = _extra(x, "watermark", bool, "true or false")
    adapter_id = _extra(x, "adapter_id", str, "a string")
    _check(top_k is None or top_k >= -1, "top_k", "must be > 0 (0 or -1: disabled)")
    _check(typical_p is None or typical_p > 0, "typical_p", "must be > 0 (1.0: disabled)")
    _check(repetition is None or repetition > 0, "repetition_penalty", "must be > 0")
    _check(truncate is None or truncate > 0, "truncate", "must be a positive token count")

    out: dict[str, Any] = {}
    if p.get("max_tokens") is not None:
        out["max_new_tokens"] = p["max_tokens"]
    temperature, top_p = p.get("temperature"), p.get("top_p")
    if temperature == 0 or top_p == 0:
        out["do_sample"] = False  # greedy; sampling filters cannot change the argmax
    else:
        if temperature is not None:  # TGI decodes greedily at 1.0 unless told to sample
            out.update(temperature=temperature, do_sample=True)
        if top_p is not None and top_p < 1:
            out["top_p"] = top_p
        if top_k is not None and top_k > 0:
            out["top_k"] = top_k
        if typical_p is not None and typical_p < 1:
            out["typical_p"] = typical_p
        if do_sample is not None:
            out["do_sample"] = do_sample
    if p.get("frequency_penalty"):
        out["frequency_penalty"] = p["frequency_penalty"]
    if repetition is not None:
        out["repetition_penalty"] = repetition
    seed = p.get("seed")
    if isinstance(seed, int) and seed >= 0:
        out["seed"] = seed % 2**64
    if truncate is not None:
        limit = info.max_input_tokens
        out["truncate"] = min(truncate, limit) if limit else truncate
    if watermark is not None:
        out["watermark"] = watermark
    if adapter_id is not None:
        out["adapter_id"] = adapter_id
    grammar = response_grammar(p.get("response_format"))
    if x.get("grammar") is not None:
        g = x["grammar"]
        if grammar is not None:
            raise InvalidRequest("Set 'response_format' or 'grammar', not both.", param="grammar")
        _check(
            isinstance(g, dict) and g.get("type") in ("json", "regex", "json_schema"),
            "grammar",
            'expected {"type": "json"|"regex"|"json_schema", "value": ...}',
        )
        grammar = g
    if grammar is not None:
        out["grammar"] = grammar
    top = _top_logprobs(request)
    if top:
        out["top_n_tokens"] = top
    return out


def _top_logprobs(request: InferenceRequest) -> int:
    """How many alternatives per token the client wants (0: none)."""
    p = request.params
    if request.kind == "completion":
        return int(p.get("logprobs") or 0)
    if p.get("top_logprobs") and not p.get("logprobs"):
        raise InvalidRequest("'top_logprobs' requires 'logprobs': true.", param="top_logprobs")
    return int(p.get("top_logprobs") or 0) if p.get("logprobs") else 0


def stops_for_tgi(
    stops: list[str], client: list[str], eos: str | None, limit: int
) -> tuple[list[str], list[str]]:
    """`(sent, unsent)`: the covering set of `stops` (see `covering_stops`) ordered the
    client's first, then the template's, the template's EOS last; the first `limit` are
    sent to TGI. `unsent` are the others but the EOS (TGI stops on it by itself): those only
    inferbridge can enforce. All of `stops` are cut here anyway."""
    ordered = [s for s in client if s in stops]
    ordered += [s for s in stops if s != eos]
    ordered += [s for s in stops if s == eos]
    covering = covering_stops(ordered)
    limit = max(limit, 0)
    return covering[:limit], [s for s in covering[limit:] if s != eos]
