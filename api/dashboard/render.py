"""Rendering a dashboard page: the template, the caller, and headers that lock the page down."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import aiohttp_jinja2
from aiohttp import web

from api.auth import AUTHENTICATOR, CSRF_HEADER, PRINCIPAL

#: Only the dashboard's own scripts, styles and connections; never framed by another site.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def render(
    request: web.Request, template: str, context: Mapping[str, Any], *, status: int = 200
) -> web.Response:
    """Render a template with what every page shows: who is signed in, and how."""
    who = request.get(PRINCIPAL)  # None on public pages (the login page)
    page = {
        "auth_enabled": AUTHENTICATOR in request.app,
        "who": who,
        "csrf_header": CSRF_HEADER,
        "partial_url": str(request.rel_url.update_query(partial="1")),
        **context,
    }
    response = aiohttp_jinja2.render_template(template, request, page, status=status)
    response.headers.update(SECURITY_HEADERS)
    return response


def partial_requested(request: web.Request) -> bool:
    """True when the page's script asks for just the live part of a page (`?partial=1`)."""
    return request.query.get("partial") == "1"
