"""The fleet dashboard: a web page served by the fleet server at ``/dashboard/``.

Static HTML, JavaScript and CSS that read the REST API with ``fetch`` and the user's own token (entered in
the page, kept in the browser's ``localStorage``); the charts are drawn with Plotly's JavaScript library,
which the ``plotly`` package ships and this server serves, so the page needs no network but the fleet's.
"""

from fleet.dashboard.routes import PLOTLY_JS, router

__all__ = ["PLOTLY_JS", "router"]
