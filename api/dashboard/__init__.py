"""The dashboard: server-rendered pages at `/` of the API, with live updates over SSE.

Templates and static files ship inside this package (no CDN, no build step). `setup(app)` is
the one call `api.app.create_app` makes.
"""

from __future__ import annotations

from pathlib import Path

import aiohttp_jinja2
import jinja2
from aiohttp import web

from api.dashboard import events, login, pages

STATIC_DIR = Path(__file__).parent / "static"


def setup(app: web.Application) -> None:
    """Add the dashboard's pages, event stream, login and static files to the API app."""
    aiohttp_jinja2.setup(
        app,
        loader=jinja2.PackageLoader("api.dashboard", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    app.router.add_routes(login.routes)
    app.router.add_routes(pages.routes)
    app.router.add_routes(events.routes)
    app.router.add_static("/static/", STATIC_DIR, name="static")
