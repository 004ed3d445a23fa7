"""The CLI's HTTP client for the fleet server's REST API (``/api/v1``, bearer token), on httpx.

Every failure becomes one ``EdgeshipError`` whose message is the line the CLI prints after ``error:``:
an HTTP error shows the server's ``detail`` (bodies are ``{"error", "detail"}``) and the status; a refused
connection or a timeout names the URL tried, so a wrong ``--server`` is obvious. httpx is imported when
a client is built, so ``edgeship`` without the ``fleet`` extra still runs every other command.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sdk.errors import EdgeshipError, InputError, TransportError

__all__ = ["DEFAULT_URL", "ApiError", "FleetClient"]

DEFAULT_URL = "http://127.0.0.1:8800"  # where `edgeship fleet serve` listens by default
URL_ENV = "EDGESHIP_FLEET_URL"
TOKEN_ENV = "EDGESHIP_FLEET_TOKEN"
API = "/api/v1"


class ApiError(EdgeshipError):
    """The server answered with an error status; ``status``, ``kind`` and ``detail`` are its body's fields."""

    def __init__(self, status: int, kind: str, detail: str, hint: str = "") -> None:
        self.status, self.kind, self.detail = status, kind, detail
        super().__init__(f"{detail} (HTTP {status}{' ' + kind if kind else ''}){hint}")


def _detail(response: Any) -> tuple[str, str]:
    """The ``(error, detail)`` of an error body, or the start of a body that is not ours (a proxy's page)."""
    try:
        body = response.json()
    except ValueError:
        text = " ".join(response.text.split())[:200]
        return "", text or response.reason_phrase or "no body"
    if isinstance(body, dict) and "detail" in body:
        detail = body["detail"]
        return str(body.get("error", "")), detail if isinstance(detail, str) else str(detail)
    return "", str(body)[:200]


class FleetClient:
    """Calls the fleet API at ``url`` (``--server`` or ``EDGESHIP_FLEET_URL``) with ``token``.

    Args:
        url: the server's base URL (``http://host:port``), without ``/api/v1``.
        token: the API token (``--token`` or ``EDGESHIP_FLEET_TOKEN``); None sends none (reads get 401).
        timeout_s: seconds per request (connect and each read).
    """

    def __init__(self, url: str | None = None, token: str | None = None, *, timeout_s: float = 30.0) -> None:
        import httpx

        self.url = (url or os.environ.get(URL_ENV) or DEFAULT_URL).rstrip("/")
        if not self.url.startswith(("http://", "https://")):
            raise InputError(f"server URL must start with http:// or https://, got {self.url!r}")
        self.token = token or os.environ.get(TOKEN_ENV) or None
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        self._http = httpx.Client(base_url=self.url + API, headers=headers, timeout=timeout_s)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> FleetClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """One call; the decoded JSON body (None for an empty one).

        Raises:
            ApiError: the server answered 4xx/5xx.
            TransportError: the server could not be reached, or the answer was not JSON.
        """
        import httpx

        where = f"{self.url}{API}{path}"
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.ConnectError as e:
            reason = "connection refused" if "refused" in str(e).lower() else str(e) or "cannot connect"
            raise TransportError(f"cannot reach the fleet server at {self.url}: {reason}") from e
        except httpx.TimeoutException as e:
            raise TransportError(f"the fleet server at {self.url} did not answer {method} {path} in time") from e
        except httpx.HTTPError as e:
            raise TransportError(f"{method} {where} failed: {e}") from e
        if response.status_code >= 400:
            kind, detail = _detail(response)
            hint = ""
            if response.status_code == 401 and not self.token:
                hint = f"; give a token with --token or {TOKEN_ENV}"
            raise ApiError(response.status_code, kind, detail, hint)
        if not response.content:
            return None
        try:
            return response.json()
        except ValueError as e:
            raise TransportError(
                f"{method} {where} answered {response.status_code} with a body that is not JSON"
            ) from e

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params={k: v for k, v in params.items() if v is not None})

    def post(self, path: str, body: Any = None) -> Any:
        return self.request("POST", path, json=body)

    def put(self, path: str, body: Any) -> Any:
        return self.request("PUT", path, json=body)

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)

    def upload(self, path: str, file: Path, chunk_bytes: int = 1 << 20) -> Any:
        """POST a file as ``application/octet-stream``, streamed (a bundle may be larger than memory allows).

        Raises:
            InputError: the file cannot be read.
        """
        try:
            size = file.stat().st_size
            handle = file.open("rb")
        except OSError as e:
            raise InputError(f"cannot read {file}: {e.strerror or e}") from e

        def chunks() -> Iterator[bytes]:
            with handle:
                while block := handle.read(chunk_bytes):
                    yield block

        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
        try:
            return self.request("POST", path, content=chunks(), headers=headers)
        finally:
            handle.close()
