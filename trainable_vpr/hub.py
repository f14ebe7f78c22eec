"""Can the Hugging Face hub be reached? Asked the way huggingface_hub itself will download.

A raw socket to huggingface.co:443 says "offline" to users behind a proxy (HTTPS_PROXY, common
on clusters) or with a mirror (HF_ENDPOINT). Here the probe is one HEAD request to the endpoint
huggingface_hub downloads from, through huggingface_hub's own HTTP session (its client library,
proxies from the environment, a client factory the user set), with a short deadline: the
downloads themselves retry a dead connection for about a minute before giving up.
"""
from __future__ import annotations

import os
import socket
import threading
from urllib.parse import urlsplit

TRUE_VALUES = ("1", "ON", "YES", "TRUE")  # what huggingface_hub's constants accept as true


def hub_endpoint() -> str:
    """The hub's base URL: HF_ENDPOINT as set now, else huggingface_hub's (read at its import)."""
    endpoint = os.environ.get("HF_ENDPOINT", "").strip()
    if endpoint:
        return endpoint.rstrip("/")
    from huggingface_hub import constants

    return constants.ENDPOINT


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) set now, or when huggingface_hub was imported
    (its session then refuses every request)."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    if value is not None and value.strip().upper() in TRUE_VALUES:
        return True
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_unreachable_reason(timeout_s: float = 3.0) -> str | None:
    """None when the hub's endpoint answers an HTTP request within timeout_s (any status below
    500: it is there), else a short reason naming the endpoint, e.g.
    "cannot reach http://127.0.0.1:9: connection refused". Returns within about timeout_s + 0.5 s."""
    endpoint = hub_endpoint()
    if hub_offline():
        return f"HF_HUB_OFFLINE is set (not trying {endpoint})"
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"HF_ENDPOINT {endpoint!r} is not an http(s) URL"

    outcome: dict[str, object] = {}

    def probe() -> None:
        from huggingface_hub import get_session

        try:
            outcome["status"] = get_session().head(endpoint, timeout=timeout_s).status_code
        except Exception as exc:  # noqa: BLE001 - each client library (requests, httpx) has its own types
            outcome["error"] = exc

    # A thread with a deadline: the client's timeout covers connect and read, not a hanging DNS lookup.
    thread = threading.Thread(target=probe, name="hub-probe", daemon=True)
    thread.start()
    thread.join(timeout_s + 0.5)
    if thread.is_alive() or ("error" in outcome and _is_timeout(outcome["error"])):  # type: ignore[arg-type]
        return f"cannot reach {endpoint}: timed out after {timeout_s:g} s"
    if "error" in outcome:
        return f"cannot reach {endpoint}: {_describe(outcome['error'])}"  # type: ignore[arg-type]
    status = int(outcome["status"])  # type: ignore[call-overload]
    return None if status < 500 else f"{endpoint} answered HTTP {status}"


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception and the ones it was raised from (client libraries wrap the OSError)."""
    seen: list[BaseException] = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return seen


def _is_timeout(exc: BaseException) -> bool:
    return any(isinstance(e, (TimeoutError, socket.timeout)) or "Timeout" in type(e).__name__ for e in _chain(exc))


def _describe(exc: BaseException) -> str:
    """A few words for a failed request: refused, name not resolved, proxy, or the first line."""
    chain = _chain(exc)
    text = " ".join(str(e) for e in chain).lower()
    if any(isinstance(e, ConnectionRefusedError) for e in chain) or "refused" in text:
        return "connection refused"
    if any(isinstance(e, socket.gaierror) for e in chain) or "name or service not known" in text \
            or "name resolution" in text or "failed to resolve" in text or "nodename nor servname" in text:
        return "host name not resolved"
    if any("Proxy" in type(e).__name__ for e in chain):
        return f"proxy error ({_first_line(exc)})"
    return _first_line(exc)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:160]}" if lines else type(exc).__name__
