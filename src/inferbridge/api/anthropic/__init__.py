"""Anthropic's Messages API (`POST /v1/messages`, `/v1/messages/count_tokens`), inbound.

A Messages request is translated into an OpenAI chat request (`schema.to_chat`) and served
by the same path as `/v1/chat/completions` (`CompletionService.answer`): models, aliases,
keys, routing, retries, fallbacks, limits, metrics and logs are the chat path's. The answer
is rendered from the normalized events in Anthropic's shapes (`render.MessagesRenderer`);
every error on these paths uses Anthropic's envelope (`errors`). See docs/anthropic.md.

Modules: `errors` (the envelope; imported by the gate, so it imports nothing of the API),
`schema` (request schemas and their translation), `render` (answers, whole or streamed),
`routes` (the APIRouter).
"""
