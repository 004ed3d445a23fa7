"""The fleet API's bodies: random JSON (and non-JSON) to every POST/PUT route answers 2xx or 4xx, never 5xx."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from conftest import budget
from fastapi.testclient import TestClient
from hypothesis import given
from hypothesis import strategies as st

from fleet.app import create_fleet_app
from fleet.auth import create_token
from fleet.db import Database, migrate
from fleet.rollouts.routes import RolloutWiring, configure
from fleet.settings import FleetSettings

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fleet" / "rollouts"))
from rollout_parts import bundles, resolver

_STATE = Path(tempfile.mkdtemp(prefix="edgeship-fuzz-fleet-"))
_DB = Database(f"sqlite:///{_STATE / 'fleet.db'}")
migrate(_DB)
_APP = create_fleet_app(_DB, FleetSettings(state_dir=_STATE))
configure(_APP, RolloutWiring(resolver(["a1", "a2"]), bundles(), lambda: None))
with _DB.session() as s:
    WRITE = {"Authorization": f"Bearer {create_token(s, 'fuzz', 'write')}"}
CLIENT = TestClient(_APP, raise_server_exceptions=False)

ROUTES = [
    ("put", "/api/v1/devices/a1/tags"),
    ("post", "/api/v1/rollouts"),
    ("post", "/api/v1/rollouts/1/pause"),
    ("post", "/api/v1/rollouts/1/resume"),
    ("post", "/api/v1/rollouts/1/abort"),
    ("post", "/api/v1/bundles/" + "ab" * 32 + "/retire"),
    ("post", "/api/v1/bundles"),
]
KEYS = ["tags", "release", "devices", "waves", "soak", "gates", "name", "reason", "max_failures", "x"]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(KEYS), inner, max_size=4),
    max_leaves=20,
)


@budget(150)
@given(st.sampled_from(ROUTES), json_values | st.dictionaries(st.sampled_from(KEYS), json_values, max_size=6))
def test_json_bodies(route: tuple[str, str], body: object) -> None:
    method, path = route
    response = CLIENT.request(method, path, json=body, headers=WRITE)
    assert response.status_code < 500, (response.status_code, response.text[:300])


@budget(60)
@given(st.sampled_from(ROUTES), st.binary(max_size=500))
def test_raw_bodies(route: tuple[str, str], body: bytes) -> None:
    method, path = route
    response = CLIENT.request(method, path, content=body, headers={**WRITE, "Content-Type": "application/json"})
    assert response.status_code < 500, (response.status_code, response.text[:300])
