"""Docker tests build the image (minutes of CPU): they run only when a ``-m`` expression names
the ``docker`` marker (``make test-docker``), never in ``make test`` / CI or ``-m "not e2e"``."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if "docker" in (config.getoption("markexpr") or ""):
        return
    deselected = [item for item in items if item.get_closest_marker("docker")]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if not item.get_closest_marker("docker")]
