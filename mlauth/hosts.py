"""Which requests may carry the token: host names, ports, and the https rule."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from urllib.parse import urlsplit

__all__ = ["HostRules", "is_loopback"]

_DEFAULT_PORTS = {"https": 443, "http": 80}


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_host(entry: str) -> tuple[str, int | None]:
    """``"host"`` or ``"host:port"`` (``"[::1]:8080"`` for IPv6) -> (lower-case name, port)."""
    text = entry.strip().lower()
    if not text or "/" in text or "@" in text or " " in text:
        raise ValueError(f"{entry!r} is not a host name (write it as host or host:port)")
    if text.startswith("["):
        name, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else (None if not rest else "x")
    elif text.count(":") == 1:
        name, port_text = text.split(":")
    else:
        name, port_text = text, None
    if not name:
        raise ValueError(f"{entry!r} has no host name")
    if port_text is None:
        return name, None
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"{entry!r} has a bad port")
    return name, int(port_text)


class HostRules:
    """The allowed hosts. A name without a port matches any port.

    The token goes only over https, except to loopback hosts (so tests and the demo can use
    a plain-http fake server); a plain-http URL for any other allowed host gets no token.
    """

    def __init__(self, hosts: Iterable[str]) -> None:
        entries = [parse_host(h) for h in hosts]
        if not entries:
            raise ValueError("at least one allowed host is needed")
        self._any_port = frozenset(name for name, port in entries if port is None)
        self._with_port = frozenset((name, port) for name, port in entries if port is not None)
        self.entries = tuple(entries)

    def __repr__(self) -> str:
        shown = [name if port is None else f"{name}:{port}" for name, port in self.entries]
        return f"HostRules({shown!r})"

    def allows(self, url: str | None) -> bool:
        if not url:
            return False
        try:
            parts = urlsplit(url)
            name = parts.hostname
            port = parts.port
        except ValueError:
            return False
        if name is None or parts.scheme not in _DEFAULT_PORTS:
            return False
        if parts.scheme != "https" and not is_loopback(name):
            return False
        if name in self._any_port:
            return True
        return (name, port or _DEFAULT_PORTS[parts.scheme]) in self._with_port
