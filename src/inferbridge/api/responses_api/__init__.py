"""OpenAI's Responses API (`/v1/responses`) on the chat path: any model, any backend.

- `schema`: the request body (TypedDicts FastAPI validates) and its 400s;
- `translate`: a Responses request -> a chat `InferenceRequest`;
- `render`: normalized events -> a `response` object or its typed SSE events;
- `store`: the response store behind `store: true`, GET/DELETE and `previous_response_id`;
- `routes`: the routes, added by `include_responses_api(app)`.

Not to be confused with `inferbridge.api.responses`, the chat completion encoder.
"""

from inferbridge.api.responses_api.routes import include_responses_api

__all__ = ["include_responses_api"]
