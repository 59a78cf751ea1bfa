"""The router's parts, one job per module.

- `state`: the `StateStore` interface (in-flight counts, latency, failures, cooldowns) and
  its in-memory implementation;
- `strategies`: how a model's deployments share traffic;
- `breaker`: cooldowns and half-open probes;
- `limits`: per-deployment concurrency limits and their wait queue;
- `health`: active health checks;
- `attempts`: retries, fallbacks and timeouts around one request's event stream;
- `drain`: requests in progress, for graceful shutdown.

`inferbridge.router.Router` ties them together; `inferbridge.gateway.Gateway` owns it.
"""
