"""The OpenAI layer: request schemas, response assembly, SSE, and the HTTP handlers."""
