"""`inferbridge check --probe`: connect to every config entry and say what answers there.

Each deployment is started as the server would start it, asked to describe its upstream
(`Backend.probe`: the backend answers on that URL and base path, serves the entry's model,
and whatever the server tells about itself), and closed again. One line per entry.
"""

from __future__ import annotations

import asyncio
import contextlib

from inferbridge.backends import registry
from inferbridge.config import Config
from inferbridge.errors import InferbridgeError

PROBE_TIMEOUT = 15.0


async def probe_entry(config: Config, index: int) -> tuple[bool, str]:
    entry = config.models[index]
    name = f"{entry.name}[{sum(1 for m in config.models[:index] if m.name == entry.name)}]"
    backend = registry.create(entry)
    try:
        async with asyncio.timeout(PROBE_TIMEOUT):
            await backend.start()
            found = await backend.probe()
    except TimeoutError:
        return False, f"{name} ({entry.backend}): no answer within {PROBE_TIMEOUT:g} s"
    except InferbridgeError as exc:
        return False, f"{name} ({entry.backend}): {exc.message}"
    except Exception as exc:  # a library's own failure (credentials, DNS...): say it plainly
        return False, f"{name} ({entry.backend}): {type(exc).__name__}: {exc}"
    finally:
        with contextlib.suppress(Exception):  # a half-started client must not hide the result
            await backend.close()
    details = ", ".join(f"{k} {v}" for k, v in found.items())
    return True, f"{name} ({entry.backend}): ok" + (f" ({details})" if details else "")


async def probe_all(config: Config) -> list[tuple[bool, str]]:
    return list(await asyncio.gather(*(probe_entry(config, i) for i in range(len(config.models)))))
