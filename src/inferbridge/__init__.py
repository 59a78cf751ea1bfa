"""inferbridge: one OpenAI-compatible API in front of many LLM serving backends."""

__version__ = "0.1.0"
