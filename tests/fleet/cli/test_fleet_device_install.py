"""The device install stays free of the fleet's libraries: by import, and by the `device` extra's list."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

FLEET_LIBRARIES = ["fastapi", "sqlalchemy", "alembic", "psycopg", "uvicorn", "httpx", "starlette", "pydantic", "plotly"]
ROOT = Path(__file__).resolve().parents[3]


def test_importing_the_device_side_loads_no_fleet_library() -> None:
    script = (
        "import json, sys\n"
        "import device_runtime, device_runtime.cli, device_runtime.agent.agent, device_runtime.agent.linkproc\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {FLEET_LIBRARIES!r} + ['fleet'])))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []


def _device_extra() -> list[str]:
    """The `device` extra of pyproject.toml, read with tomllib (3.11+) or from its one line."""
    text = (ROOT / "pyproject.toml").read_text()
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        match = re.search(r"^device\s*=\s*\[(.*?)\]", text, re.M | re.S)
        assert match, "no device extra in pyproject.toml"
        return re.findall(r'"([^"]+)"', match.group(1))
    extras: dict[str, list[str]] = tomllib.loads(text)["project"]["optional-dependencies"]
    return extras["device"]


def test_the_device_extra_names_no_fleet_library() -> None:
    names = {re.split(r"[\[<>=!~; ]", req, maxsplit=1)[0].lower() for req in _device_extra()}
    assert "paho-mqtt" in names  # the agent's MQTT client: the one library both sides share
    assert names.isdisjoint({*FLEET_LIBRARIES, "psycopg-binary", "edgeship"}), names
