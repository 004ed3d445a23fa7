"""``/dashboard/``: the page, its script and style, and Plotly's JavaScript from the ``plotly`` package.

Nothing here reads the database: the files hold no fleet data, so they are served without a token, and
the page asks the API (``/api/v1``, a read token; operator actions a write token) for everything it shows.
``/`` redirects here.
"""

from __future__ import annotations

import gzip
import importlib.util
from functools import cache
from pathlib import Path

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import RedirectResponse, Response

__all__ = ["PLOTLY_JS", "STATIC_DIR", "router"]

STATIC_DIR = Path(__file__).resolve().parent / "static"
PLOTLY_JS = "plotly.min.js"
_OWN = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
        "app.css": "text/css; charset=utf-8"}  # fmt: skip
# The page loads scripts and styles from this server only; Plotly adds <style> elements of its own.
_CSP = "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'"
_PLOTLY_MAX_AGE_S = 3600  # the library changes only with the installed package

router = APIRouter(include_in_schema=False)


@cache
def _plotly_path() -> Path | None:
    """Where the installed ``plotly`` package keeps its JavaScript (found without importing the package)."""
    spec = importlib.util.find_spec("plotly")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "package_data" / PLOTLY_JS
        if path.is_file():
            return path
    return None


@cache
def _gzipped(path: Path) -> bytes:
    return gzip.compress(path.read_bytes(), compresslevel=6)  # 4.8 MB of JavaScript to about 1.4 MB, once


def _accepts_gzip(request: Request) -> bool:
    return "gzip" in request.headers.get("accept-encoding", "").lower()


@router.get("/")
def root() -> RedirectResponse:
    return RedirectResponse("/dashboard/", status_code=307)


@router.get("/dashboard")
def dashboard_slash() -> RedirectResponse:
    return RedirectResponse("/dashboard/", status_code=307)


@router.get("/dashboard/")
def page() -> Response:
    return _own("index.html")


@router.get("/dashboard/static/{name}")
def static(name: str, request: Request) -> Response:
    """The page's own files, and Plotly's library (gzip-encoded when the browser accepts it)."""
    if name != PLOTLY_JS:
        if name == "index.html" or name not in _OWN:
            raise HTTPException(404, f"no dashboard file {name!r}")
        return _own(name)
    path = _plotly_path()
    if path is None:
        raise HTTPException(404, "the plotly package is not installed: pip install 'edgeship[fleet]'")
    headers = {"Cache-Control": f"public, max-age={_PLOTLY_MAX_AGE_S}", "Vary": "Accept-Encoding"}
    if _accepts_gzip(request):
        headers["Content-Encoding"] = "gzip"
        return Response(_gzipped(path), media_type=_OWN["app.js"], headers=headers)
    return Response(path.read_bytes(), media_type=_OWN["app.js"], headers=headers)


def _own(name: str) -> Response:
    headers = {"Cache-Control": "no-cache", "Content-Security-Policy": _CSP, "X-Content-Type-Options": "nosniff"}
    return Response((STATIC_DIR / name).read_bytes(), media_type=_OWN[name], headers=headers)
