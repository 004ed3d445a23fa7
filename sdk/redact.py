"""Credentials out of URLs before they are logged, printed or published.

A deploy URL may carry a secret: ``https://user:pass@host/...``, a pre-signed object-store URL
(``X-Amz-Signature``, ``X-Goog-Signature``, an Azure SAS ``sig``), or an ``?token=``. The device needs
the URL as given to download; everything that shows it to someone else (logs, events, error messages)
shows ``redact_url(url)`` instead. Pure string work, no I/O.
"""

from __future__ import annotations

import urllib.parse

__all__ = ["REDACTED", "is_secret_param", "redact_url"]

REDACTED = "REDACTED"

# A query or fragment parameter whose name contains one of these (case-insensitive) is a secret. Broad on
# purpose: hiding a harmless ``?keyframe=`` costs nothing, showing a ``?sig=`` leaks a download right.
_SECRET_PARTS = ("token", "sig", "key", "secret", "pass", "pwd", "cred", "auth", "session", "code")


def is_secret_param(name: str) -> bool:
    """Whether a query parameter called ``name`` is treated as a credential (``token``, ``sig``, ...)."""
    lowered = urllib.parse.unquote_plus(name).lower()
    return any(part in lowered for part in _SECRET_PARTS)


def _redact_params(text: str) -> str:
    out = []
    for item in text.split("&"):
        name, eq, _value = item.partition("=")
        out.append(f"{name}={REDACTED}" if eq and is_secret_param(name) else item)
    return "&".join(out)


def redact_url(url: str) -> str:
    """``url`` with its userinfo and credential-like query and fragment parameters replaced.

    ``https://u:p@h/x?X-Amz-Signature=ab&v=1`` becomes ``https://REDACTED@h/x?X-Amz-Signature=REDACTED&v=1``.
    The scheme, host, port, path and other parameters stay as they were, so the result still says
    where. Something that does not parse as a URL is replaced whole; never raises.
    """
    if not isinstance(url, str):
        return REDACTED
    try:
        parts = urllib.parse.urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            netloc = f"{REDACTED}@{netloc.rpartition('@')[2]}"
        return urllib.parse.urlunsplit(
            (parts.scheme, netloc, parts.path, _redact_params(parts.query), _redact_params(parts.fragment))
        )
    except ValueError:  # e.g. an invalid IPv6 literal: show nothing of it
        return REDACTED
