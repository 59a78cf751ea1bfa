"""Model name -> deployment.

Config entries that share a `name` are deployments of one model. For now a deployment is
picked at random, weighted by each entry's `weight:`.
"""

from __future__ import annotations

import random

from inferbridge.backends.base import Backend
from inferbridge.errors import ModelNotFound


class Router:
    def __init__(self, backends: list[Backend]) -> None:
        self.models: dict[str, list[Backend]] = {}
        for backend in backends:
            self.models.setdefault(backend.config.name, []).append(backend)
        self._weights = {
            name: [b.config.weight for b in group] for name, group in self.models.items()
        }

    def deployments(self, model: str) -> list[Backend]:
        try:
            return self.models[model]
        except KeyError:
            raise ModelNotFound(model) from None

    def pick(self, model: str) -> Backend:
        group = self.deployments(model)
        if len(group) == 1:
            return group[0]
        return random.choices(group, weights=self._weights[model])[0]
