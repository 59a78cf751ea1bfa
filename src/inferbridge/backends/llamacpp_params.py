"""How OpenAI request parameters become llama-server's `/completion` fields.

`RENAMED_PARAMS` are passed on under llama.cpp's name, `NATIVE_EXTRAS` (llama.cpp's own
sampling and control fields, sent by a client as extras) as they are; `logit_bias`,
`top_logprobs` (-> `n_probs`) and `json_schema` (from `response_format`) convert the rest.
The adapter's `LlamaCppBackend.payload` assembles the body from them; the full table is in
docs/backends/llamacpp.md.
"""

from __future__ import annotations

from typing import Any

from inferbridge.errors import InvalidRequest
from inferbridge.request import InferenceRequest

# OpenAI parameter -> /completion field, for values passed on unchanged.
RENAMED_PARAMS = {
    "max_tokens": "n_predict",
    "temperature": "temperature",
    "top_p": "top_p",
    "seed": "seed",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
}

# Native sampling/control fields a client may send as extras; forwarded as they are.
NATIVE_EXTRAS = frozenset(
    {
        "top_k",
        "min_p",
        "typical_p",
        "repeat_penalty",
        "repeat_last_n",
        "mirostat",
        "mirostat_tau",
        "mirostat_eta",
        "n_keep",
        "ignore_eos",
        "grammar",
        "json_schema",
        "dynatemp_range",
        "dynatemp_exponent",
        "dry_multiplier",
        "dry_base",
        "dry_allowed_length",
        "dry_penalty_last_n",
        "dry_sequence_breakers",
        "xtc_probability",
        "xtc_threshold",
        "top_n_sigma",
        "min_keep",
        "samplers",
        "t_max_predict_ms",
        "cache_prompt",
        "id_slot",
    }
)


def top_logprobs(request: InferenceRequest) -> int | None:
    """How many alternatives per token the client wants, or None without logprobs."""
    logprobs = request.params.get("logprobs")
    if request.kind == "chat":
        return int(request.params.get("top_logprobs") or 0) if logprobs else None
    return int(logprobs) if logprobs else None


def logit_bias(bias: Any) -> list[list[Any]]:
    """OpenAI's `{"token id": bias}` as llama.cpp's `[[id, bias]]` (read by every build)."""
    try:
        return [[int(token), value] for token, value in dict(bias).items()]
    except (TypeError, ValueError):
        raise InvalidRequest(
            "logit_bias keys must be token ids (integers as strings).", param="logit_bias"
        ) from None


def json_schema(fmt: Any) -> dict[str, Any]:
    """OpenAI's `response_format` as llama.cpp's `json_schema` (`{"type": "object"}`: any
    JSON object)."""
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "json_object":
        return fmt.get("schema") or {"type": "object"}  # OpenAI: any JSON object
    if kind == "json_schema":
        spec = fmt.get("json_schema") or {}
        return spec.get("schema") or {}
    raise InvalidRequest(
        f"response_format type {kind!r} is not supported by llama.cpp.", param="response_format"
    )
