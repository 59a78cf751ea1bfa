"""The adapter contract every backend implements.

An adapter knows its backend's protocol and nothing about OpenAI response shapes. It gets a
normalized `InferenceRequest` and yields batches of normalized events (`inferbridge.events`):

    class MyBackend(Backend):
        Settings = MySettings                 # a DeploymentConfig subclass: the entry's fields
        supported_params = frozenset({"max_tokens", "temperature", "stop"})
        supported_extras = frozenset({"top_k"})

        async def start(self) -> None: ...    # open pooled clients (inside the event loop)
        async def close(self) -> None: ...
        async def stream(self, request):      # async generator of list[Event]
            yield [TextDelta("Hel")]
            yield [TextDelta("lo"), Finish("stop"), Usage(3, 2)]

Rules an adapter follows:
- Raise `inferbridge.errors.UpstreamError` (or a subclass) for every backend failure, with a
  message that names the backend (`self.label`). Never let a library exception escape:
  `HttpUpstream` does this mapping for HTTP backends.
- Never invent a parameter the client did not send (no silent `max_tokens: 100`): translate
  only what is in `request.params` / `request.extras`.
- Yield text as soon as the backend gives it: one batch per upstream read.
- Yield `Finish` per choice with the normalized reason, and `Usage` when the backend reports
  counts (the OpenAI layer estimates them otherwise).
- Streaming or not is the adapter's choice of upstream call: a non-streaming client request
  may be served with the backend's non-streaming endpoint, yielding the whole answer as one
  batch.

What the shared layer does for every adapter (see `prepare`): merge the entry's `params:`
defaults, reject (400) or drop parameters the adapter does not declare (ignorable ones and
neutral values are accepted and removed from `params`), and fan out `n > 1` and several
prompts when `native_n` is false.

Embeddings (`request.kind == "embedding"`): an adapter that makes them implements
`embed(request)`, returning one `Embeddings` event for `request.input` (a batch of at most
`embedding_batch_size` inputs), and declares `embedding_params` / `embedding_extras`; the
shared layer (`inferbridge.backends.embedding`) applies the parameter policy, splits the
input into batches and merges the answers. What an entry serves is its `mode:`
(`default_mode` without one); see `serves`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any, ClassVar

from inferbridge.api.protocol import IGNORABLE_PARAMS, OPENAI_PARAMS, is_neutral
from inferbridge.backends.embedding import embedding_batches, prepare_embedding
from inferbridge.config import DeploymentConfig
from inferbridge.errors import InvalidRequest, UnsupportedParameter, UpstreamError
from inferbridge.events import Embeddings, Event
from inferbridge.request import InferenceRequest, Kind


class Backend:
    """Base class of every backend adapter; subclasses override the class attributes and
    `stream` (and `start`/`close` when they hold clients)."""

    Settings: ClassVar[type[DeploymentConfig]] = DeploymentConfig
    supported_params: ClassVar[frozenset[str]] = frozenset()
    """OpenAI parameters (see OPENAI_PARAMS) this adapter honours. An ignorable one
    (IGNORABLE_PARAMS) stays in `request.params` only when it is listed here."""
    supported_extras: ClassVar[frozenset[str]] = frozenset()
    """Non-OpenAI fields (top_k, min_p...) this adapter understands."""
    forwards_extras: ClassVar[bool] = False
    """True when unknown fields are passed upstream as they are (OpenAI-compatible servers)."""
    native_n: ClassVar[bool] = False
    """True when the backend itself handles n > 1 and lists of prompts."""
    accepts_token_prompts: ClassVar[bool] = False
    """True when a legacy completion prompt may be a list of token ids."""
    default_mode: ClassVar[str] = "chat"
    """What an entry serves without `mode:`: "chat", "embeddings" or "both"."""
    embedding_params: ClassVar[frozenset[str]] = frozenset()
    """Embeddings parameters (`dimensions`) this adapter honours."""
    embedding_extras: ClassVar[frozenset[str]] = frozenset()
    """Non-OpenAI embeddings fields (`truncate`...) this adapter understands."""
    default_embedding_batch_size: ClassVar[int] = 64
    """Inputs per upstream embeddings call when the entry sets no `embedding_batch_size`."""

    def __init__(self, config: DeploymentConfig) -> None:
        self.config = config
        self.label = config.describe()
        self.secrets = config.secrets()
        """What must be masked in any upstream text relayed to a client."""
        self.drop_unsupported = False

    async def start(self) -> None:
        """Open pooled clients; called once at start-up, inside the serving event loop."""

    async def close(self) -> None:
        """Release what `start` opened; called once at shutdown."""

    # Optional hooks, looked up with getattr by the router's health checks and /v1/models:
    #   async def health(self) -> None        raise an UpstreamError when the backend is not
    #                                         ready (TGI /health, llama.cpp /health, Ollama
    #                                         /api/tags, ...)
    #   async def list_models(self) -> list[str]
    #   async def count_tokens(self, request) -> int | None
    #                                         a chat request's prompt tokens, counted by the
    #                                         backend's tokenizer (TGI, llama.cpp and
    #                                         vLLM /tokenize); None when it cannot say

    async def probe(self) -> dict[str, Any]:
        """What the upstream says about itself, for `inferbridge check --probe`; raises an
        `UpstreamError` when it does not answer on the configured URL as this backend
        should, or does not serve the entry's model. Adapters add what their server
        tells (version, context length)."""
        health = getattr(self, "health", None)
        if health is not None:
            await health()
        found: dict[str, Any] = {}
        list_models = getattr(self, "list_models", None)
        if list_models is not None:
            models = await list_models()
            target = self.config.target_model
            if models and target not in models and f"{target}:latest" not in models:
                shown = ", ".join(models[:5]) + (", ..." if len(models) > 5 else "")
                raise UpstreamError(
                    f"{self.label}: the server does not serve model '{target}' "
                    f"(it serves: {shown})",
                    backend=self.label,
                )
            found["model"] = target
        return found

    def stream(self, request: InferenceRequest) -> AsyncIterator[Sequence[Event]]:
        """Run `request` upstream and yield batches of normalized events (see module doc)."""
        raise NotImplementedError

    # -- embeddings -----------------------------------------------------------------------
    @property
    def mode(self) -> str:
        return self.config.mode or self.default_mode

    def serves(self, kind: Kind) -> bool:
        """Whether this entry answers requests of `kind` (chat and legacy completions, or
        embeddings), by its `mode:`."""
        mode = self.mode
        return mode == "both" or (mode == "embeddings") == (kind == "embedding")

    @classmethod
    def makes_embeddings(cls) -> bool:
        return cls.embed is not Backend.embed

    @property
    def embedding_batch_size(self) -> int:
        return self.config.embedding_batch_size or self.default_embedding_batch_size

    async def embed(self, request: InferenceRequest) -> Embeddings:
        """Embed `request.input` upstream in one call: the vectors in input order and the
        prompt tokens (None when the backend does not count them). See module doc."""
        raise InvalidRequest(
            f"Model '{request.model}' ({self.config.backend}) cannot make embeddings: "
            f"backend '{self.config.backend}' has no embeddings API in inferbridge.",
            param="model",
        )

    def embeddings(self, request: InferenceRequest) -> AsyncIterator[Sequence[Event]]:
        """An embeddings request (prepared) as one batch with one `Embeddings` event."""
        return embedding_batches(self, request)

    # -- shared behaviour -----------------------------------------------------------------
    def prepare(self, request: InferenceRequest) -> InferenceRequest:
        """Apply this deployment's defaults and parameter policy to a request (in place)."""
        if request.kind == "embedding":
            return prepare_embedding(self, request)
        defaults = self.config.params
        if defaults:
            for key, value in defaults.items():
                if key in OPENAI_PARAMS:
                    request.params.setdefault(key, value)
                else:
                    request.extras.setdefault(key, value)
                if key not in request.body:
                    request.body[key] = value
        supported = self.supported_params
        for key in list(request.params):
            if key in supported:
                continue
            if key in IGNORABLE_PARAMS or is_neutral(request.params, key):
                # Accepted, and gone from `params`: an adapter building its upstream body
                # from `params` can not forward it (`body` keeps it for pass-through).
                del request.params[key]
                continue
            self._unsupported(request, key, "params")
        if not self.forwards_extras:
            for key in list(request.extras):
                if key not in self.supported_extras:
                    self._unsupported(request, key, "extras")
        prompt = request.prompt
        if (
            isinstance(prompt, list)
            and prompt
            and not isinstance(prompt[0], str)
            and not self.accepts_token_prompts
        ):
            raise InvalidRequest(
                f"Model '{request.model}' ({self.config.backend}) takes the prompt as text, "
                "not as token ids.",
                param="prompt",
            )
        return request

    def _unsupported(self, request: InferenceRequest, key: str, where: str) -> None:
        if not self.drop_unsupported:
            raise UnsupportedParameter(key, request.model, self.config.backend)
        request.ignored.append(key)
        getattr(request, where).pop(key, None)
        request.body.pop(key, None)
        if key == "max_tokens":
            request.body.pop("max_completion_tokens", None)
