"""HttpDownloader against a real HTTP server misbehaving in each way a network or server can."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest
from agent_parts import HttpServer

from device_runtime.agent.download import Downloader, FetchResponse, HttpDownloader
from sdk.errors import IntegrityError, TransportError

pytestmark = pytest.mark.timeout(60)

BODY = os.urandom(300_000)
SHA = hashlib.sha256(BODY).hexdigest()


def downloader(**kwargs: object) -> HttpDownloader:
    options: dict[str, object] = {"backoff_base_s": 0.01, "backoff_cap_s": 0.05, "read_timeout_s": 5.0}
    options.update(kwargs)
    return HttpDownloader(**options)  # type: ignore[arg-type]


def part_of(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


@pytest.fixture
def server(http_server: HttpServer) -> HttpServer:
    http_server.state.body = BODY
    return http_server


def test_normal_download_is_exact_and_atomic(server: HttpServer, tmp_path: Path) -> None:
    dest = tmp_path / "b.edgebundle"
    got = downloader().download_file(
        server.url, dest, max_length=len(BODY), expected_size=len(BODY), expected_sha256=SHA
    )
    assert got == dest and dest.read_bytes() == BODY
    assert not part_of(dest).exists()
    assert server.state.ranges == [None]


def test_dropped_connection_resumes_with_range(server: HttpServer, tmp_path: Path) -> None:
    server.state.mode = "drop"
    dest = tmp_path / "b"
    downloader().download_file(server.url, dest, max_length=10**6, expected_sha256=SHA)
    assert dest.read_bytes() == BODY
    assert server.state.ranges == [None, f"bytes={len(BODY) // 2}-"]


def test_server_ignoring_range_restarts_from_zero(server: HttpServer, tmp_path: Path) -> None:
    server.state.mode = "ignore_range"
    dest = tmp_path / "b"
    part_of(dest).write_bytes(BODY[:1000])  # an earlier, interrupted download
    downloader().download_file(server.url, dest, max_length=10**6, expected_size=len(BODY), expected_sha256=SHA)
    assert dest.read_bytes() == BODY  # the 200 body replaced the part instead of being appended to it
    assert server.state.ranges == ["bytes=1000-"]


def test_range_answer_at_the_wrong_offset_is_refused(server: HttpServer, tmp_path: Path) -> None:
    server.state.mode = "bad_range"
    dest = tmp_path / "b"
    part_of(dest).write_bytes(BODY[:5000])
    downloader().download_file(server.url, dest, max_length=10**6, expected_sha256=SHA)
    assert dest.read_bytes() == BODY
    assert server.state.ranges == ["bytes=5000-", None]


def test_leftover_part_from_a_killed_process_is_resumed(server: HttpServer, tmp_path: Path) -> None:
    dest = tmp_path / "b"
    part_of(dest).write_bytes(BODY[:123_456])
    downloader().download_file(server.url, dest, max_length=10**6, expected_size=len(BODY), expected_sha256=SHA)
    assert dest.read_bytes() == BODY
    assert server.state.ranges == ["bytes=123456-"]


def test_leftover_part_with_foreign_bytes_is_redownloaded_once(server: HttpServer, tmp_path: Path) -> None:
    dest = tmp_path / "b"
    part_of(dest).write_bytes(b"\x00" * 1000)  # same length prefix, wrong content
    downloader().download_file(server.url, dest, max_length=10**6, expected_sha256=SHA)
    assert dest.read_bytes() == BODY
    assert server.state.ranges == ["bytes=1000-", None]


def test_oversized_body_without_length_aborts_and_leaves_no_part(server: HttpServer, tmp_path: Path) -> None:
    server.state.mode = "oversized"
    dest = tmp_path / "b"
    with pytest.raises(TransportError, match="limit"):
        downloader().download_file(server.url, dest, max_length=len(BODY))
    assert not part_of(dest).exists() and not dest.exists()
    assert len(server.state.requests) == 1  # not retried


def test_lying_content_length_aborts_before_reading(server: HttpServer, tmp_path: Path) -> None:
    server.state.mode = "lying_length"
    dest = tmp_path / "b"
    with pytest.raises(TransportError, match="announces"):
        downloader().download_file(server.url, dest, max_length=10**6)
    assert not part_of(dest).exists() and not dest.exists()


def test_expected_size_caps_the_download(server: HttpServer, tmp_path: Path) -> None:
    dest = tmp_path / "b"
    with pytest.raises(TransportError, match="more than the 1000 allowed"):
        downloader().download_file(server.url, dest, max_length=10**6, expected_size=1000)
    assert not part_of(dest).exists()


def test_wrong_body_is_an_integrity_error(server: HttpServer, tmp_path: Path) -> None:
    server.state.body = BODY[::-1]
    dest = tmp_path / "b"
    with pytest.raises(IntegrityError, match="sha256"):
        downloader().download_file(server.url, dest, max_length=10**6, expected_sha256=SHA)
    assert not part_of(dest).exists() and not dest.exists()


def test_trickle_past_the_deadline_is_a_transport_error(server: HttpServer, tmp_path: Path) -> None:
    server.state.mode = "trickle"
    server.state.trickle_s = 0.01
    dest = tmp_path / "b"
    started = time.monotonic()
    with pytest.raises(TransportError, match="deadline"):
        downloader().download_file(server.url, dest, max_length=10**6, deadline_s=0.5)
    assert time.monotonic() - started < 2.0
    assert not dest.exists()


def test_server_error_then_success_is_retried(server: HttpServer, tmp_path: Path) -> None:
    server.state.mode = "error_then_ok"
    server.state.errors = 2
    dest = tmp_path / "b"
    downloader().download_file(server.url, dest, max_length=10**6, expected_sha256=SHA)
    assert dest.read_bytes() == BODY
    assert len(server.state.requests) == 3


def test_persistent_server_errors_give_up_after_the_attempts(server: HttpServer, tmp_path: Path) -> None:
    server.state.mode = "error_then_ok"
    server.state.errors = 100
    with pytest.raises(TransportError, match="after 3 attempts"):
        downloader(attempts=3).download_file(server.url, tmp_path / "b", max_length=10**6)
    assert len(server.state.requests) == 3


def test_not_found_fails_fast_without_retry(server: HttpServer, tmp_path: Path) -> None:
    server.state.mode = "not_found"
    dest = tmp_path / "b"
    part_of(dest).write_bytes(b"old")
    with pytest.raises(TransportError, match="404"):
        downloader().download_file(server.url, dest, max_length=10**6)
    assert len(server.state.requests) == 1
    assert not part_of(dest).exists()


def test_connection_refused_is_retried_then_a_transport_error(tmp_path: Path) -> None:
    from agent_parts import free_port

    with pytest.raises(TransportError, match="after 2 attempts"):
        downloader(attempts=2).download_file(f"http://127.0.0.1:{free_port()}/b", tmp_path / "b", max_length=10)


def test_unsupported_scheme_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TransportError, match="scheme"):
        downloader().download_file("file:///etc/passwd", tmp_path / "b", max_length=10)


class MemoryDownloader(Downloader):
    """The seam the agent's tests can use: an in-memory ``_fetch``."""

    def __init__(self, body: bytes) -> None:
        super().__init__(backoff_base_s=0.0, backoff_cap_s=0.0)
        self.body = body
        self.offsets: list[int] = []

    def _fetch(self, url: str, offset: int, timeout_s: float) -> FetchResponse:
        import io

        self.offsets.append(offset)
        if offset:
            part = self.body[offset:]
            headers = {"content-length": str(len(part)), "content-range": f"bytes {offset}-{len(self.body) - 1}/*"}
            return FetchResponse(206, headers, io.BytesIO(part))
        return FetchResponse(200, {"content-length": str(len(self.body))}, io.BytesIO(self.body))


def test_downloader_seam_works_without_a_network(tmp_path: Path) -> None:
    dest = tmp_path / "b"
    part_of(dest).write_bytes(BODY[:10])
    fetcher = MemoryDownloader(BODY)
    fetcher.download_file("mem://bundle", dest, max_length=len(BODY), expected_sha256=SHA)
    assert dest.read_bytes() == BODY and fetcher.offsets == [10]
