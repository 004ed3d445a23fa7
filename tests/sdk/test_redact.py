"""``redact_url``: credentials never reach a log line, an event or an error message."""

from __future__ import annotations

import pytest

from sdk.redact import REDACTED, redact_url

CASES = {
    "https://user:pw@cdn.example/b.edgebundle": f"https://{REDACTED}@cdn.example/b.edgebundle",
    "https://token@cdn.example:8443/b": f"https://{REDACTED}@cdn.example:8443/b",
    "https://h/b?token=abc&v=2": f"https://h/b?token={REDACTED}&v=2",
    "https://h/b?X-Amz-Algorithm=A&X-Amz-Credential=c&X-Amz-Signature=s&X-Amz-Security-Token=t": (
        f"https://h/b?X-Amz-Algorithm=A&X-Amz-Credential={REDACTED}&X-Amz-Signature={REDACTED}"
        f"&X-Amz-Security-Token={REDACTED}"
    ),
    "https://h/b?sv=2024&sig=abc%2Bdef&se=2030": f"https://h/b?sv=2024&sig={REDACTED}&se=2030",
    "https://h/b?X-Goog-Signature=z": f"https://h/b?X-Goog-Signature={REDACTED}",
    "https://h/b?key=k&api_key=k&access_token=t": f"https://h/b?key={REDACTED}&api_key={REDACTED}&access_token={REDACTED}",
    "https://h/b#access_token=t": f"https://h/b#access_token={REDACTED}",
    "http://h:80/artifacts/ab.edgebundle": "http://h:80/artifacts/ab.edgebundle",
    "https://h/b?v=1&flag": "https://h/b?v=1&flag",
}


@pytest.mark.parametrize(("url", "shown"), list(CASES.items()))
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


@pytest.mark.parametrize("url", ["http://[::1", "", "not a url", 7])
def test_redact_url_never_raises(url: object) -> None:
    assert isinstance(redact_url(url), str)  # type: ignore[arg-type]
    if url == "http://[::1":
        assert redact_url(url) == REDACTED  # type: ignore[arg-type]
