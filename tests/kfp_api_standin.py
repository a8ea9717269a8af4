"""A local stand-in for the KFP v2beta1 REST API: just the calls ``kfp.Client`` 2.17 makes to
submit and schedule (endpoints from ``kfp_server_api/api/*_service_api.py``).

It serves on 127.0.0.1, keeps experiments in memory and records every request body so tests can
check what the client actually sent.
"""

from __future__ import annotations

import json
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

API = "/apis/v2beta1"


@dataclass
class Request:
    """One request as the stand-in received it."""

    method: str
    path: str
    query: dict[str, list[str]]
    body: dict[str, Any] | None


@dataclass
class KfpApiStandIn:
    """Context manager running the stand-in in a thread; ``url`` is its base address."""

    requests: list[Request] = field(default_factory=list)
    experiments: dict[str, dict[str, Any]] = field(default_factory=dict)
    # path -> (HTTP status, message) to answer instead of the normal response
    failures: dict[str, tuple[int, str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                standin._handle(self, "GET")

            def do_POST(self) -> None:
                standin._handle(self, "POST")

            def log_message(self, format: str, *args: object) -> None:
                """Keep test output quiet."""

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> KfpApiStandIn:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def bodies(self, method: str, path: str) -> list[dict[str, Any]]:
        """Bodies of the recorded requests to ``path`` (relative to /apis/v2beta1)."""
        return [r.body or {} for r in self.requests if r.method == method and r.path == API + path]

    # -- routing ------------------------------------------------------------------------------

    def _handle(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        parts = urlsplit(handler.path)
        length = int(handler.headers.get("Content-Length") or 0)
        body = json.loads(handler.rfile.read(length)) if length else None
        self.requests.append(Request(method, parts.path, parse_qs(parts.query), body))
        status, payload = self._route(method, parts.path, parse_qs(parts.query), body or {})
        data = json.dumps(payload).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    def _route(
        self, method: str, path: str, query: dict[str, list[str]], body: dict[str, Any]
    ) -> tuple[int, dict[str, Any]]:
        if path in self.failures:
            status, message = self.failures[path]
            return status, {"error": message, "code": status, "message": message}
        if (method, path) == ("GET", f"{API}/healthz"):
            return 200, {"multi_user": False}
        if (method, path) == ("GET", f"{API}/experiments"):
            return 200, self._list_experiments(query)
        if (method, path) == ("POST", f"{API}/experiments"):
            experiment = {**body, "experiment_id": uuid.uuid4().hex, "storage_state": "AVAILABLE"}
            self.experiments[experiment["experiment_id"]] = experiment
            return 200, experiment
        if method == "GET" and path.startswith(f"{API}/experiments/"):
            found = self.experiments.get(path.rsplit("/", 1)[1])
            return (200, found) if found else (404, {"message": "experiment not found"})
        if (method, path) == ("POST", f"{API}/runs"):
            return 200, {**body, "run_id": uuid.uuid4().hex, "state": "PENDING"}
        if (method, path) == ("POST", f"{API}/recurringruns"):
            return 200, {**body, "recurring_run_id": uuid.uuid4().hex, "status": "ENABLED"}
        return 404, {"message": f"stand-in does not implement {method} {path}"}

    def _list_experiments(self, query: dict[str, list[str]]) -> dict[str, Any]:
        found = list(self.experiments.values())
        for predicate in json.loads(query.get("filter", ["{}"])[0]).get("predicates", []):
            if predicate.get("key") == "display_name":
                found = [e for e in found if e.get("display_name") == predicate["stringValue"]]
        return {"experiments": found, "total_size": len(found)}
