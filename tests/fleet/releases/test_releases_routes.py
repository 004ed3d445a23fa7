"""The bundle API and the artifact server through real HTTP requests (FastAPI's TestClient)."""

from __future__ import annotations

import os
from dataclasses import replace

import httpx
import pytest
from fastapi.testclient import TestClient
from releases_kit import Api, BundleMaker, FleetKeys, releases_app

from fleet.auth import create_token
from fleet.db import Database
from fleet.releases import ArtifactStore, ReleaseSettings
from fleet.releases.artifacts import RangeNotSatisfiable, parse_range
from sdk.bundle import file_sha256

OCTET = {"Content-Type": "application/octet-stream"}


def _post(api: Api, data: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
    return api.client.post("/api/v1/bundles", content=data, headers={**OCTET, **(headers or api.write)})


def test_upload_list_inspect_retire(api: Api, make_bundle: BundleMaker) -> None:
    path = make_bundle(version=2, label="spring")
    sha = file_sha256(path)
    first = api.client.post("/api/v1/bundles", content=path.read_bytes(), headers={**OCTET, **api.write})
    assert first.status_code == 201, first.text
    body = first.json()
    assert body["sha256"] == sha and body["label"] == "spring" and body["retired_at"] is None
    assert body["url"] == f"http://testserver/artifacts/{sha}.edgebundle"
    again = api.client.post("/api/v1/bundles", content=path.read_bytes(), headers={**OCTET, **api.write})
    assert again.status_code == 200 and again.json()["sha256"] == sha
    int8 = api.client.post("/api/v1/bundles", content=make_bundle(version=2, precision="int8").read_bytes(),
                           headers={**OCTET, **api.write}).json()  # fmt: skip

    listed = api.client.get("/api/v1/bundles", params={"name": "mlp", "version": 2}, headers=api.read)
    assert listed.status_code == 200 and {b["sha256"] for b in listed.json()} == {sha, int8["sha256"]}
    assert api.client.get("/api/v1/bundles", params={"target": "tflite"}, headers=api.read).json() == []
    detail = api.client.get(f"/api/v1/bundles/{sha}", headers=api.read).json()
    assert detail["inputs"] == [{"name": "x", "dtype": "float32", "shape": ["batch", 64]}]
    assert detail["runtime"]["package"] == "onnxruntime" and detail["runtime_facts"]["target"] == "onnxruntime"
    assert detail["files"] == 3 and detail["created"] == "2026-01-01T00:00:00Z"

    retired = api.client.post(f"/api/v1/bundles/{sha}/retire", headers=api.write)
    assert retired.status_code == 200 and retired.json()["retired_at"] is not None
    only = api.client.get("/api/v1/bundles", params={"retired": "false"}, headers=api.read).json()
    assert [b["sha256"] for b in only] == [int8["sha256"]]

    releases = api.client.get("/api/v1/releases", headers=api.read).json()
    assert releases == [{"name": "mlp", "version": 2, "bundles": 2, "active": 1,
                         "first_uploaded_at": body["uploaded_at"]}]  # fmt: skip
    release = api.client.get("/api/v1/releases/mlp/2", headers=api.read).json()
    assert release["targets"] == {"onnxruntime": ["int8"]} and len(release["bundles"]) == 2
    # retired, yet still downloadable by a device mid-deployment, without a token
    assert api.client.get(f"/artifacts/{sha}.edgebundle").content == path.read_bytes()


@pytest.mark.parametrize(
    ("method", "url", "status"),
    [
        ("get", "/api/v1/bundles/" + "0" * 64, 404),
        ("get", "/api/v1/bundles/not-a-hash", 404),
        ("post", "/api/v1/bundles/" + "0" * 64 + "/retire", 404),
        ("get", "/api/v1/releases/mlp/1", 404),
        ("get", "/api/v1/releases/mlp/one", 422),
        ("get", "/api/v1/bundles?version=-1", 422),
        ("get", "/api/v1/bundles?retired=maybe", 422),
    ],
)
def test_unknown_and_malformed_requests(api: Api, method: str, url: str, status: int) -> None:
    response = getattr(api.client, method)(url, headers=api.write)
    assert response.status_code == status, response.text
    assert set(response.json()) == {"error", "detail"}


def test_upload_needs_a_write_token(api: Api, make_bundle: BundleMaker) -> None:
    data = make_bundle().read_bytes()
    assert api.client.post("/api/v1/bundles", content=data, headers=OCTET).status_code == 401
    assert _post(api, data, api.read).status_code == 403
    assert api.client.get("/api/v1/bundles").status_code == 401
    assert api.client.post("/api/v1/bundles/" + "0" * 64 + "/retire", headers=api.read).status_code == 403


def test_refused_uploads_are_422_with_the_reason_and_store_nothing(
    api: Api, make_bundle: BundleMaker, fleet_keys: FleetKeys, store: ArtifactStore
) -> None:
    untrusted = _post(api, make_bundle(key=fleet_keys.stranger).read_bytes())
    assert untrusted.status_code == 422
    detail = untrusted.json()["detail"]
    assert detail.startswith("bundle refused: SignatureError: 0 valid signature(s)"), detail
    garbage = _post(api, os.urandom(5000))
    assert garbage.status_code == 422 and "UnsafeArchiveError" in garbage.json()["detail"]
    empty = _post(api, b"")
    assert empty.status_code == 422
    root = store.root
    assert [p.name for p in root.iterdir()] == [".incoming"] and list((root / ".incoming").iterdir()) == []
    assert api.client.get("/api/v1/bundles", headers=api.read).json() == []


def test_oversized_upload_is_413_declared_or_streamed(api: Api, store: ArtifactStore) -> None:
    big = b"\0" * 1_000_001  # the fixture's cap is 1,000,000 bytes
    declared = _post(api, big)
    assert declared.status_code == 413 and declared.json()["error"] == "too_large"

    def chunks():  # no Content-Length: chunked transfer, refused while reading
        for _ in range(11):
            yield b"\0" * 100_000

    streamed = api.client.post("/api/v1/bundles", content=chunks(), headers={**OCTET, **api.write})
    assert streamed.status_code == 413 and "over the 1000000-byte limit" in streamed.json()["detail"]
    assert list((store.incoming).iterdir()) == []


# ---- the artifact server -------------------------------------------------------------------------


@pytest.fixture
def stored(api: Api, make_bundle: BundleMaker) -> tuple[str, bytes]:
    data = make_bundle(version=8).read_bytes()
    sha = _post(api, data).json()["sha256"]
    return sha, data


def test_artifact_whole_head_and_ranges(api: Api, stored: tuple[str, bytes]) -> None:
    sha, data = stored
    url, size = f"/artifacts/{sha}.edgebundle", len(data)
    whole = api.client.get(url)  # no token: devices verify signatures themselves
    assert whole.status_code == 200 and whole.content == data
    assert whole.headers["etag"] == f'"{sha}"' and whole.headers["accept-ranges"] == "bytes"
    assert whole.headers["content-length"] == str(size)
    head = api.client.head(url)
    assert head.status_code == 200 and head.content == b"" and head.headers["content-length"] == str(size)

    for header, first, last in (
        ("bytes=100-199", 100, 199),
        ("bytes=1000-", 1000, size - 1),
        ("bytes=-10", size - 10, size - 1),
        (f"bytes=5-{size + 100}", 5, size - 1),
    ):
        part = api.client.get(url, headers={"Range": header})
        assert part.status_code == 206, header
        assert part.headers["content-range"] == f"bytes {first}-{last}/{size}"
        assert part.content == data[first : last + 1]
    head_range = api.client.head(url, headers={"Range": "bytes=10-19"})
    assert head_range.status_code == 206 and head_range.headers["content-length"] == "10"

    for bad in (f"bytes={size}-", "bytes=9-3", "items=0-5", "bytes=abc", "bytes=-0", "bytes=-"):
        refused = api.client.get(url, headers={"Range": bad})
        assert refused.status_code == 416, bad
        assert refused.headers["content-range"] == f"bytes */{size}"
    several = api.client.get(url, headers={"Range": "bytes=0-1,5-6"})
    assert several.status_code == 200 and several.content == data
    stale = api.client.get(url, headers={"Range": "bytes=0-1", "If-Range": '"other"'})
    assert stale.status_code == 200 and stale.content == data
    fresh = api.client.get(url, headers={"Range": "bytes=0-1", "If-Range": f'"{sha}"'})
    assert fresh.status_code == 206 and fresh.content == data[:2]


@pytest.mark.parametrize(
    "name",
    ["0" * 64 + ".edgebundle", "0" * 64, "..%2F..%2Fetc%2Fpasswd", "A" * 64 + ".edgebundle", ".incoming"],
)
def test_artifact_unknown_is_404(api: Api, stored: tuple[str, bytes], name: str) -> None:
    response = api.client.get(f"/artifacts/{name}")
    assert response.status_code == 404
    if "%2F" not in name:  # a decoded slash does not even reach the route (Starlette's own 404)
        assert response.json()["error"] == "not_found"


def test_parse_range_unit() -> None:
    assert parse_range(None, 10) is None and parse_range("", 10) is None
    assert parse_range("bytes=0-0", 10) == (0, 0) and parse_range("bytes=-20", 10) == (0, 9)
    assert parse_range(" bytes = 2 - 4 ", 10) == (2, 4)
    for bad in ("bytes=10-", "bytes=0-1-2", "bytes=1.5-2", "bytes=-5"):
        with pytest.raises(RangeNotSatisfiable):
            parse_range(bad, 10 if bad != "bytes=-5" else 0)


def test_artifact_base_url_setting(db: Database, settings: ReleaseSettings, make_bundle: BundleMaker) -> None:
    """Bundles placed on another HTTP server or an object store: the URLs point there."""
    elsewhere = replace(settings, artifact_base_url="https://cdn.example/edge/")
    with db.session() as session:
        token = create_token(session, "ci", "write")
    with TestClient(releases_app(db, elsewhere)) as client:
        response = client.post("/api/v1/bundles", content=make_bundle(version=11).read_bytes(),
                               headers={**OCTET, "Authorization": f"Bearer {token}"})  # fmt: skip
    sha = response.json()["sha256"]
    assert response.json()["url"] == f"https://cdn.example/edge/artifacts/{sha}.edgebundle"
