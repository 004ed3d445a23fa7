"""The crash test hook is injected, not inherited: a production download has no hook at all."""

from __future__ import annotations

import io

import pytest

from device_runtime.agent import CRASH_ENV, crash, staging
from device_runtime.agent.download import FetchResponse, HttpDownloader


def test_production_downloads_carry_no_crash_hook(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CRASH_ENV, raising=False)
    assert crash.download_hook() is None
    downloader = staging._downloader(3, 1.0)
    assert type(downloader) is HttpDownloader
    assert downloader._response_hook is None


def test_the_downloading_crash_point_wraps_the_body(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CRASH_ENV, "downloading")
    hook = crash.download_hook()
    assert hook is not None
    assert staging._downloader(3, 1.0)._response_hook is hook
    body = io.BytesIO(b"x" * 10)
    wrapped = hook(FetchResponse(200, {"content-length": "10"}, body))
    assert wrapped.body is not body
    assert wrapped.body.read(3) == b"xxx"  # under half: no kill yet
