"""Token-count estimates, for backends that report no usage.

inferbridge always reports usage. When a backend gives no counts, it estimates them with a
documented heuristic of one token per four characters (rounded up), which is the usual rule
of thumb for English text with BPE tokenizers; responses whose usage is estimated carry
the header `x-inferbridge-usage-estimated: true` (non-streaming responses only).
"""

from __future__ import annotations

from inferbridge.request import InferenceRequest, message_text

CHARS_PER_TOKEN = 4


def estimate_tokens(chars: int) -> int:
    return -(-chars // CHARS_PER_TOKEN)


def estimate_prompt_tokens(request: InferenceRequest) -> int:
    if request.messages is not None:
        chars = sum(len(message_text(m.get("content"))) for m in request.messages)
        # Each message also costs a few tokens of role/formatting overhead.
        return estimate_tokens(chars) + 4 * len(request.messages)
    prompt = request.prompt
    if isinstance(prompt, str):
        return estimate_tokens(len(prompt))
    if isinstance(prompt, list):
        if prompt and isinstance(prompt[0], int):
            return len(prompt)
        return sum(len(p) if isinstance(p, list) else estimate_tokens(len(p)) for p in prompt)
    return 0
