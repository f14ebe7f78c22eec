"""trainable_vpr.hub against local servers: the probe goes where HF_ENDPOINT says, through the proxy the
environment names, answers within seconds when nobody listens, and never touches the network
when HF_HUB_OFFLINE is set."""
from __future__ import annotations

import http.server
import socket
import threading
import time

import pytest

from trainable_vpr import hub

PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")


@pytest.fixture(autouse=True)
def clean_hub_environment(monkeypatch):
    """No proxy, offline flag or endpoint from the machine running the tests, and a fresh
    huggingface_hub session (it reads the proxies from the environment when it is created)."""
    import huggingface_hub
    from huggingface_hub import constants

    for name in PROXY_VARIABLES + ("HF_ENDPOINT", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    huggingface_hub.close_session()
    yield
    huggingface_hub.close_session()


class LocalServer:
    """An HTTP server on 127.0.0.1 in a thread, answering every request with `status`; it records
    the request lines it saw."""

    def __init__(self, status: int = 200):
        seen = self.requests = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_HEAD(self):  # noqa: N802 - http.server's naming
                seen.append(f"{self.command} {self.path}")
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_HEAD  # noqa: N815

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def local_server():
    servers = []

    def start(status: int = 200) -> LocalServer:
        servers.append(LocalServer(status))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def free_port() -> int:
    """A port nobody listens on (bound, read, released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_endpoint_that_refuses_names_itself_within_seconds(monkeypatch):
    endpoint = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("HF_ENDPOINT", endpoint + "/")
    start = time.monotonic()
    reason = hub.hub_unreachable_reason(timeout_s=3.0)
    assert time.monotonic() - start < 5.0
    assert reason == f"cannot reach {endpoint}: connection refused"


def test_endpoint_that_answers_is_reachable(monkeypatch, local_server):
    server = local_server(200)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    assert hub.hub_unreachable_reason() is None
    assert server.requests == ["HEAD /"]


def test_endpoint_with_a_server_error_is_not_reachable(monkeypatch, local_server):
    server = local_server(503)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    assert hub.hub_unreachable_reason() == f"{server.url} answered HTTP 503"


def test_the_proxy_from_the_environment_is_used(monkeypatch, local_server):
    """hub.invalid cannot be resolved (RFC 2606): only the proxy can answer for it."""
    proxy = local_server(200)
    monkeypatch.setenv("HF_ENDPOINT", "http://hub.invalid")
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    assert hub.hub_unreachable_reason() is None
    assert proxy.requests == ["HEAD http://hub.invalid/"]


def test_endpoint_that_never_answers_times_out(monkeypatch):
    with socket.socket() as silent:  # accepts connections (kernel backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        start = time.monotonic()
        reason = hub.hub_unreachable_reason(timeout_s=0.5)
        assert time.monotonic() - start < 2.0
    assert reason == f"cannot reach {endpoint}: timed out after 0.5 s"


@pytest.mark.parametrize("variable", ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"])
def test_offline_flag_gives_its_reason_without_any_request(monkeypatch, variable):
    import huggingface_hub

    def no_network():
        raise AssertionError("the probe made a request although offline mode is set")

    monkeypatch.setattr(huggingface_hub, "get_session", no_network)
    monkeypatch.setenv(variable, "1")
    assert hub.hub_offline()
    assert hub.hub_unreachable_reason() == "HF_HUB_OFFLINE is set (not trying https://huggingface.co)"


def test_offline_from_huggingface_hub_import_time(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert hub.hub_offline()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert not hub.hub_offline()


def test_endpoint_read_at_call_time_else_huggingface_hub_constant(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "https://mirror.example.org")
    assert hub.hub_endpoint() == "https://mirror.example.org"
    monkeypatch.setenv("HF_ENDPOINT", "https://hf-mirror.example.com/")
    assert hub.hub_endpoint() == "https://hf-mirror.example.com"


def test_endpoint_that_is_not_a_url(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "huggingface.co")
    assert hub.hub_unreachable_reason() == "HF_ENDPOINT 'huggingface.co' is not an http(s) URL"
