"""The login page: a browser trades an API key for an HttpOnly, SameSite=Strict cookie.

The cookie holds the key itself, so nothing is kept on the server: each request's key is checked
by its hash like a Bearer key, and revoking the key signs every browser using it out. The key is
only ever sent in a POST body or the cookie, never in a URL, and is never logged.
"""

from __future__ import annotations

import logging

from aiohttp import web

from api.auth import AUTHENTICATOR, KEY_COOKIE
from api.dashboard.render import render

logger = logging.getLogger(__name__)

routes = web.RouteTableDef()

#: `Sec-Fetch-Site` values of a login form posted from this site (or typed in).
SAME_SITE_FETCHES = frozenset({"same-origin", "none"})
#: How long a browser keeps the key: a working day. Revoking the key ends it sooner.
COOKIE_MAX_AGE_S = 12 * 3600


@routes.get("/login", name="login")
async def login_page(request: web.Request) -> web.Response:
    """The form; with auth disabled there is nothing to log in to."""
    if AUTHENTICATOR not in request.app:
        raise web.HTTPFound("/")
    return render(request, "login.html", {"next": safe_next(request.query.get("next"))})


@routes.post("/login")
async def login(request: web.Request) -> web.Response:
    """Check the key; on success set the cookie and go where the user was headed."""
    authenticator = request.app.get(AUTHENTICATOR)
    if authenticator is None:
        raise web.HTTPFound("/")
    fetch_site = request.headers.get("Sec-Fetch-Site")
    if fetch_site is not None and fetch_site not in SAME_SITE_FETCHES:
        # Another site posting a key of its choosing would sign this browser in as someone else.
        raise web.HTTPForbidden(text="log in from the dashboard's own login page")
    form = await request.post()
    key = str(form.get("key", "")).strip()
    target = safe_next(str(form.get("next", "")))
    if not key or await authenticator.authenticate(key) is None:
        logger.info("dashboard login refused from %s", request.remote)
        context = {"next": target, "error": "That key is not valid or has been revoked."}
        return render(request, "login.html", context, status=401)
    response = web.HTTPFound(target)
    response.set_cookie(
        KEY_COOKIE,
        key,
        max_age=COOKIE_MAX_AGE_S,
        path="/",
        httponly=True,
        samesite="Strict",
        secure=request.secure,
    )
    raise response


@routes.post("/logout", name="logout")
async def logout(request: web.Request) -> web.Response:
    """Forget the key in this browser."""
    response = web.HTTPFound("/login")
    response.del_cookie(KEY_COOKIE, path="/")
    raise response


def safe_next(target: str | None) -> str:
    """A redirect target on this site only: a path, never `//host` or a full URL. Control
    characters are refused too: browsers drop tabs and newlines from a URL, so `/<TAB>/host`
    would become `//host`."""
    if (
        not target
        or not target.startswith("/")
        or target.startswith("//")
        or "\\" in target
        or any(ord(c) < 0x20 or ord(c) == 0x7F for c in target)
    ):
        return "/"
    return target
