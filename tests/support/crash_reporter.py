"""A real Sentry client set up alike on sentry-sdk 2.x and 3.x: every frame's locals, log
records as breadcrumbs from DEBUG and as events of their own from WARNING (with the stack,
and its frames' locals, where the record was logged), HTTP breadcrumbs.

The two majors spell this differently, and 3.x refuses 2.x's options outright (``TypeError:
Unknown option``); the test extra allows both (pyproject.toml says why), so the options are
picked by the major version installed.
"""

from __future__ import annotations

from importlib.metadata import version
from logging import DEBUG, WARNING
from typing import Any

from sentry_sdk.integrations.logging import LoggingIntegration

SENTRY_MAJOR = int(version("sentry-sdk").split(".")[0])


def logging_integration(**levels: int) -> LoggingIntegration:
    """Records at WARNING and above as events of their own, and ``levels``: keywords that
    only one major knows, passed untyped so mypy passes whichever is installed."""
    return LoggingIntegration(event_level=WARNING, **levels)


def sentry_options() -> dict[str, Any]:
    """The keyword arguments of ``sentry_sdk.init`` that collect the most a crash reporter
    can: whatever leaks through one of them must show in the events."""
    # 3.x's default: an event from a log record carries the stack it was logged from, with
    # every frame's locals. 2.x's default is off; on here so both majors are held to it.
    common: dict[str, Any] = {"attach_stacktrace": True}
    if SENTRY_MAJOR >= 3:
        return {
            **common,
            # Frame locals moved under data_collection. True (the default, said outright)
            # sends every local as it is; a dict would mean "filtered by name", and a
            # filter that blanks `refresh_token` would hide a leak instead of proving none.
            "data_collection": {"stack_frame_variables": True},
            # No longer a default integration, so named here. Its `level` now means Sentry
            # Logs (sent too: more for the test to search) and breadcrumbs have their own.
            "integrations": [logging_integration(level=DEBUG, breadcrumb_level=DEBUG)],
        }
    return {
        **common,
        # The default, said outright. (2.x's default scrubber still blanks locals with
        # names such as `token`: the 3.x run is the stricter one.)
        "include_local_variables": True,
        # `level` is the breadcrumbs' level in 2.x.
        "integrations": [logging_integration(level=DEBUG)],
    }
