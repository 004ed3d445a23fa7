"""HttpDownloader against a real HTTP server misbehaving in each way a network or server can."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import BinaryIO

import pytest
from agent_parts import HttpServer

from device_runtime.agent.download import Downloader, FetchResponse, HostPolicy, HttpDownloader
from sdk.errors import IntegrityError, StateError, TransportError

pytestmark = pytest.mark.timeout(60)

BODY = os.urandom(300_000)
SHA = hashlib.sha256(BODY).hexdigest()


def downloader(**kwargs: object) -> HttpDownloader:
    options: dict[str, object] = {"backoff_base_s": 0.01, "backoff_cap_s": 0.05, "read_timeout_s": 5.0}
    options["hosts"] = HostPolicy(allow=("127.0.0.1",), public=False)  # the test servers' address
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


# -- issue 14, item 5: what a deploy URL may reach; item 8: a full disk ------------------------------------


class _Listener:
    """A bare TCP listener that records whether anything connected to it (an FTP server stand-in)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.connected = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        self.connected.set()
        conn.sendall(b"220 ftp ready\r\n")
        conn.close()

    def close(self) -> None:
        self.sock.close()


def _redirecting_server(location: str) -> tuple[str, Callable[[], None]]:
    """An HTTP server answering every GET with a 302 to ``location``; returns its URL and a stop function."""

    class Redirect(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            self.send_response(302)
            self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def stop() -> None:
        server.shutdown()
        server.server_close()

    return f"http://127.0.0.1:{server.server_address[1]}/bundle", stop


def test_redirect_to_ftp_is_refused_without_connecting(tmp_path: Path) -> None:
    listener = _Listener()
    url, stop = _redirecting_server(f"ftp://127.0.0.1:{listener.port}/bundle")
    try:
        with pytest.raises(TransportError, match="redirect"):
            downloader(attempts=3).download_file(url, tmp_path / "b", max_length=10)
        assert not listener.connected.wait(0.3), "the FTP listener was reached through a redirect"
    finally:
        stop()
        listener.close()


def test_redirect_to_another_scheme_is_refused(server: HttpServer, tmp_path: Path) -> None:
    url, stop = _redirecting_server(server.url.replace("http://", "https://"))
    try:
        with pytest.raises(TransportError, match="redirect"):
            downloader().download_file(url, tmp_path / "b", max_length=len(BODY))
    finally:
        stop()


def test_redirect_within_the_scheme_and_allowed_hosts_is_followed(server: HttpServer, tmp_path: Path) -> None:
    url, stop = _redirecting_server(server.url)
    try:
        got = downloader().download_file(url, tmp_path / "b", max_length=len(BODY), expected_sha256=SHA)
        assert got.read_bytes() == BODY
    finally:
        stop()


def test_loopback_host_is_refused_unless_allowed(server: HttpServer, tmp_path: Path) -> None:
    from agent_parts import free_port

    public_only = HostPolicy(allow=(), public=True)
    with pytest.raises(TransportError, match="not allowed") as refused_open:
        downloader(hosts=public_only, attempts=3).download_file(server.url, tmp_path / "b", max_length=len(BODY))
    assert server.state.requests == [], "a refused host must not be connected to"
    assert not part_of(tmp_path / "b").exists()
    # The same answer for a closed port: no oracle for which ports listen there.
    closed = server.url.rsplit(":", 1)[0] + f":{free_port()}/bundle"
    with pytest.raises(TransportError, match="not allowed") as refused_closed:
        downloader(hosts=public_only).download_file(closed, tmp_path / "b", max_length=10)
    assert str(refused_open.value).replace(server.url, "URL") == str(refused_closed.value).replace(closed, "URL")
    by_network = HostPolicy(allow=("127.0.0.0/8",), public=False)
    got = downloader(hosts=by_network).download_file(server.url, tmp_path / "b", max_length=len(BODY))
    assert got.read_bytes() == BODY


def test_redirect_from_an_allowed_host_to_a_refused_one_is_refused(server: HttpServer, tmp_path: Path) -> None:
    url, stop = _redirecting_server(server.url)  # to 127.0.0.1, which only the name "localhost" may reach
    try:
        only_the_name = HostPolicy(allow=("localhost",), public=False)
        with pytest.raises(TransportError, match="not allowed"):
            downloader(hosts=only_the_name).download_file(
                url.replace("127.0.0.1", "localhost"), tmp_path / "b", max_length=len(BODY)
            )
        assert server.state.requests == []
    finally:
        stop()


def test_host_policy_rules() -> None:
    policy = HostPolicy(allow=("fleet.lan", "10.1.0.0/16"), public=True)
    assert policy.refusal("example.org", ["93.184.216.34"]) is None
    assert policy.refusal("fleet.lan", ["192.168.1.5"]) is None  # named: whatever it resolves to
    assert policy.refusal("x", ["10.1.2.3"]) is None
    for address in ("127.0.0.1", "169.254.169.254", "192.168.1.5", "::1", "fe80::1", "0.0.0.0", "10.2.0.1"):
        assert policy.refusal("x", [address]) is not None, address
    assert policy.refusal("x", ["93.184.216.34", "127.0.0.1"]) is not None  # every address must pass
    assert HostPolicy(allow=(), public=False).refusal("example.org", ["93.184.216.34"]) is not None


def test_free_space_is_checked_before_anything_is_written(server: HttpServer, tmp_path: Path) -> None:
    dest = tmp_path / "b"
    tight = downloader(free_space=lambda path: len(BODY) + 1000, reserve_bytes=4096)
    with pytest.raises(StateError, match="free"):
        tight.download_file(server.url, dest, max_length=len(BODY), expected_size=len(BODY))
    assert server.state.requests == [] and not part_of(dest).exists()
    # Without an announced size, the server's Content-Length is checked before the body is read.
    with pytest.raises(StateError, match="free"):
        tight.download_file(server.url, dest, max_length=2 * len(BODY))
    assert not part_of(dest).exists()
    roomy = downloader(free_space=lambda path: 10 * len(BODY), reserve_bytes=4096)
    assert roomy.download_file(server.url, dest, max_length=len(BODY), expected_size=len(BODY)).exists()


def test_a_write_error_deletes_the_part_file_and_is_a_state_error(
    server: HttpServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class FullDisk(io.BytesIO):
        def write(self, data: object) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

    def open_part(self: Downloader, path: Path, mode: str) -> BinaryIO:
        open(path, mode).close()  # the file exists, as a real open leaves it
        return FullDisk()

    monkeypatch.setattr(Downloader, "_open_part", open_part)
    dest = tmp_path / "b"
    with pytest.raises(StateError, match="No space left"):
        downloader().download_file(server.url, dest, max_length=len(BODY))
    assert not part_of(dest).exists() and not dest.exists()


def test_error_messages_do_not_show_url_credentials(server: HttpServer, tmp_path: Path) -> None:
    with pytest.raises(IntegrityError) as caught:
        downloader().download_file(
            server.url + "?X-Amz-Signature=s3cr3t&token=t0k3n",
            tmp_path / "b",
            max_length=10**6,
            expected_sha256="0" * 64,
        )
    assert "s3cr3t" not in str(caught.value) and "t0k3n" not in str(caught.value)
    assert "X-Amz-Signature=REDACTED" in str(caught.value)
