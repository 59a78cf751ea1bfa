"""Upstream URLs and TLS settings: user info taken out of a base URL (as Basic
credentials), paths joined to a base URL that keeps its query string, URLs made fit for
logs, and the `ssl` context of an entry's `tls:`."""

from __future__ import annotations

import base64
import ssl
from urllib.parse import unquote, urlsplit, urlunsplit

from yarl import URL

from inferbridge.config import TLSConfig


def split_user_info(url: str) -> tuple[str, str | None]:
    """`http://user:pass@host/...` -> the URL without them and a Basic `Authorization`
    value (None when the URL has no user info)."""
    parts = urlsplit(url)
    if parts.username is None:
        return url, None
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port else "")
    plain = urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    user, password = unquote(parts.username), unquote(parts.password or "")
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return plain, f"Basic {token}"


def join_url(base: str, path: str, *, strip: str = "") -> str:
    """`path` (which may carry a query of its own) appended to the path of the URL `base`,
    whose query string is kept (before `path`'s): `http://h/v1?api-version=1` and
    `/chat/completions` make `http://h/v1/chat/completions?api-version=1`. `strip` is a
    suffix taken off `base`'s path first (vLLM's `/tokenize` is beside `/v1`, not in it).
    `path` is used as given, percent-encoding included."""
    url = URL(base)
    route, _, query = path.partition("?")
    root = url.raw_path.rstrip("/")
    if strip:
        root = root.removesuffix(strip.rstrip("/"))
    joined = url.with_path(root + route, encoded=True, keep_query=False, keep_fragment=False)
    query = "&".join(q for q in (url.raw_query_string, query) if q)
    return str(joined) + ("?" + query if query else "")


def without_query(url: str) -> str:
    """`url` without its query string, fragment and user info (for logs)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(an invalid URL)"
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def ssl_context(tls: TLSConfig | None) -> ssl.SSLContext | bool:
    """The TLS settings of an entry's connections (True: the system's CAs, verified)."""
    if tls is None:
        return True
    ctx = ssl.create_default_context(cafile=tls.ca_file)
    if not tls.verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if tls.client_cert is not None:
        ctx.load_cert_chain(tls.client_cert, tls.client_key)
    return ctx
