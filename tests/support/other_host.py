"""Another host on loopback for the redirect tests: it records the Authorization header each
request brings and answers 401."""

from __future__ import annotations

import http.server
from typing import Any


class AuthorizationRecorder(http.server.BaseHTTPRequestHandler):
    """Another host: records the Authorization header it gets and answers 401."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.server.seen.append(self.headers.get("Authorization"))  # type: ignore[attr-defined]
        body = b'{"message":"invalid_token","status":401}'
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass
