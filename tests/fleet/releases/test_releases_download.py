"""The device agent's downloader against the artifact server on a real uvicorn: whole files, and a resume
with ``Range`` from a partial download (what a device does after losing its connection or power)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from releases_kit import BundleMaker, FleetKeys, releases_app

from device_runtime.agent.download import FetchResponse, HostPolicy, HttpDownloader
from fleet.db import Database
from fleet.releases import ArtifactStore, ReleaseSettings, artifact_url, upload
from sdk.errors import IntegrityError, TransportError

_LOOPBACK = HostPolicy(allow=("127.0.0.1",), public=False)  # the test server (a device allows its fleet's host)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def server(db: Database, settings: ReleaseSettings) -> Iterator[str]:
    """The fleet app on a uvicorn in a thread, on a free loopback port; yields its base URL."""
    port = _free_port()
    config = uvicorn.Config(releases_app(db, settings), host="127.0.0.1", port=port, log_level="warning")
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, name="uvicorn", daemon=True)
    thread.start()
    for _ in range(500):
        if uv.started:
            break
        thread.join(0.01)
    assert uv.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{port}"
    uv.should_exit = True
    thread.join(10)


class _Recorder:
    """The downloader's response hook: notes each response's status and Content-Range."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, str | None]] = []

    def __call__(self, response: FetchResponse) -> FetchResponse:
        self.seen.append((response.status, response.headers.get("content-range")))
        return response


def test_device_downloader_fetches_and_resumes(
    server: str, db: Database, store: ArtifactStore, make_bundle: BundleMaker, fleet_keys: FleetKeys, tmp_path: Path
) -> None:
    source = make_bundle(version=3, hidden=512)  # ~140 KB
    bundle = upload(db, source, fleet_keys.trust, store, now=1.0e9).bundle
    data = source.read_bytes()
    url = artifact_url(server, bundle.sha256)

    whole, hook = tmp_path / "whole.edgebundle", _Recorder()
    HttpDownloader(response_hook=hook, hosts=_LOOPBACK).download_file(
        url, whole, max_length=10 * 2**20, expected_size=bundle.size, expected_sha256=bundle.sha256
    )
    assert whole.read_bytes() == data and hook.seen == [(200, None)]

    # a download cut after 50,000 bytes: the next attempt asks for the rest, gets 206, and the file is whole
    resumed, hook = tmp_path / "resumed.edgebundle", _Recorder()
    (tmp_path / "resumed.edgebundle.part").write_bytes(data[:50_000])
    HttpDownloader(response_hook=hook, hosts=_LOOPBACK).download_file(
        url, resumed, max_length=10 * 2**20, expected_size=bundle.size, expected_sha256=bundle.sha256
    )
    assert resumed.read_bytes() == data
    assert hook.seen == [(206, f"bytes 50000-{len(data) - 1}/{len(data)}")]


def test_device_downloader_meets_404_and_a_stale_part(
    server: str, db: Database, store: ArtifactStore, make_bundle: BundleMaker, fleet_keys: FleetKeys, tmp_path: Path
) -> None:
    bundle = upload(db, make_bundle(version=4), fleet_keys.trust, store, now=1.0e9).bundle
    downloader = HttpDownloader(attempts=2, backoff_base_s=0.01, hosts=_LOOPBACK)
    with pytest.raises(TransportError, match="HTTP 404"):
        downloader.download_file(artifact_url(server, "0" * 64), tmp_path / "x", max_length=2**20)
    # a part file longer than the bundle (left by something else): 416, then a fresh download
    dest, hook = tmp_path / "stale.edgebundle", _Recorder()
    (tmp_path / "stale.edgebundle.part").write_bytes(b"x" * (bundle.size + 10))
    HttpDownloader(response_hook=hook, hosts=_LOOPBACK).download_file(
        artifact_url(server, bundle.sha256), dest, max_length=bundle.size + 100, expected_sha256=bundle.sha256
    )
    assert dest.read_bytes() == store.path(bundle.sha256).read_bytes()
    assert hook.seen[0][0] == 416 and hook.seen[-1] == (200, None)
    # the wrong bytes under a right name: the device refuses them
    with pytest.raises(IntegrityError):
        HttpDownloader(hosts=_LOOPBACK).download_file(
            artifact_url(server, bundle.sha256), tmp_path / "y", max_length=2**20, expected_sha256="f" * 64
        )
