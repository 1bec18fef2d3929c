"""API-key authentication: a middleware that lets no request past without a valid key.

Deny by default: every path needs `Authorization: Bearer <key>` except those in PUBLIC_PATHS,
so a route added later is protected without anyone remembering to protect it. A key that was
found valid is trusted for `api_key_cache_s` (30 s by default): revoking a key takes effect
within that window in every running API process.

Browsers (the dashboard) may send the key in the KEY_COOKIE cookie instead, which the login
page sets HttpOnly and SameSite=Strict. Such a request that changes something must also carry
the CSRF_HEADER: another site's page can neither send the cookie nor set that header. A page
route (named PAGE_ROUTE_PREFIX...) answers a browser without a valid key with a redirect to the
login page instead of a 401.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from urllib.parse import urlencode

from aiohttp import web

from api.errors import Handler, error_response
from promptq.errors import Unauthorized
from promptq.keys import LOCAL_OPERATOR, KeyStore, Principal, hash_key, looks_like_key

logger = logging.getLogger(__name__)

#: Paths anyone may call without a key.
PUBLIC_PATHS = frozenset({"/healthz", "/metrics", "/openapi.json", "/login", "/logout"})
#: Path prefixes anyone may call without a key: the dashboard's CSS and JavaScript.
PUBLIC_PREFIXES = ("/static/",)
#: The cookie that carries a browser's key (the key itself: nothing is kept server-side).
KEY_COOKIE = "promptq_key"
#: A cookie-authenticated request with an unsafe method must send this header, with value "1".
CSRF_HEADER = "X-PromptQ-CSRF"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
#: Routes whose name starts with this are HTML pages: without a key they redirect to LOGIN_PATH.
PAGE_ROUTE_PREFIX = "page:"
LOGIN_PATH = "/login"
#: Most keys one API process remembers; past it the cache starts over.
CACHE_MAX_ENTRIES = 10_000
#: How often a response that stays open (an event stream) asks again whether its key is valid.
KEY_RECHECK_S = 5.0

MISSING = "this API needs a key: send `Authorization: Bearer <key>` (see `promptq keys create`)"
CSRF_MISSING = (
    f"a request authenticated by the {KEY_COOKIE} cookie must send the header `{CSRF_HEADER}: 1`"
)
MALFORMED = "the Authorization header must be `Bearer <key>`"
REJECTED = "the API key is not valid or has been revoked"


class Authenticator:
    """Turns a presented key into a Principal, remembering valid keys for `ttl_s`."""

    def __init__(
        self,
        keys: KeyStore,
        *,
        ttl_s: float,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._keys = keys
        self._ttl_s = ttl_s
        self._monotonic = monotonic
        #: key hash -> (principal, monotonic time it stops being trusted). Valid keys only.
        self._cache: dict[str, tuple[Principal, float]] = {}

    async def authenticate(self, key: str) -> Principal | None:
        """The key's principal, or None for an unknown or revoked key."""
        if not looks_like_key(key):
            return None
        digest = hash_key(key)
        now = self._monotonic()
        cached = self._cache.get(digest)
        if cached is not None and cached[1] > now:
            return cached[0]
        principal = await self._keys.authenticate(key)
        if principal is None:
            self._cache.pop(digest, None)
        elif self._ttl_s > 0:
            if len(self._cache) >= CACHE_MAX_ENTRIES:
                self._cache.clear()
            self._cache[digest] = (principal, now + self._ttl_s)
        return principal


class KeyCheck:
    """Asks again whether a request's key is still valid: for responses that stay open.

    The middleware checks a key once, when the request arrives; a stream that runs for hours
    calls `still_valid` as it goes, which asks again at most every KEY_RECHECK_S (and the
    Authenticator trusts a valid key for its cache window), so a revoked key stops the stream.
    """

    def __init__(self, authenticator: Authenticator | None, key: str) -> None:
        self._authenticator = authenticator
        self._key = key
        self._checked_at = time.monotonic()

    async def still_valid(self) -> bool:
        """False once the key is unknown or revoked; always True when auth is off."""
        if self._authenticator is None or time.monotonic() - self._checked_at < KEY_RECHECK_S:
            return True
        self._checked_at = time.monotonic()
        return await self._authenticator.authenticate(self._key) is not None


AUTHENTICATOR = web.AppKey("authenticator", Authenticator)
PRINCIPAL = web.RequestKey("principal", Principal)
KEY_CHECK = web.RequestKey("key_check", KeyCheck)


def bearer_token(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None if it is not one."""
    if header is None:
        return None
    parts = header.split()
    if len(parts) != 2 or parts[0].lower() != "bearer":
        return None
    return parts[1]


def unauthorized(message: str, *, invalid_token: bool) -> web.Response:
    """A 401 in the one error shape, with the WWW-Authenticate challenge."""
    challenge = 'Bearer realm="promptq"'
    if invalid_token:
        challenge += ', error="invalid_token"'
    return error_response(
        Unauthorized.http_status, Unauthorized.code, message, {"WWW-Authenticate": challenge}
    )


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Attach the caller's Principal to the request, or answer 401."""
    if request.path in PUBLIC_PATHS or request.path.startswith(PUBLIC_PREFIXES):
        return await handler(request)
    authenticator = request.app.get(AUTHENTICATOR)
    if authenticator is None:  # auth disabled: everyone is the local operator
        request[PRINCIPAL] = LOCAL_OPERATOR
        request[KEY_CHECK] = KeyCheck(None, "")
        return await handler(request)
    header = request.headers.get("Authorization")
    cookie = request.cookies.get(KEY_COOKIE)
    if header is None and cookie is not None:
        if request.method not in SAFE_METHODS and request.headers.get(CSRF_HEADER) != "1":
            logger.info("403 %s %s: cookie without %s", request.method, request.path, CSRF_HEADER)
            return error_response(403, "csrf_check_failed", CSRF_MISSING)
        token: str | None = cookie
    elif header is None:
        return _refuse(request, MISSING, "no Authorization header", invalid_token=False)
    else:
        token = bearer_token(header)
    if token is None:
        return _refuse(request, MALFORMED, "malformed Authorization header", invalid_token=True)
    principal = await authenticator.authenticate(token)
    if principal is None:
        return _refuse(request, REJECTED, "unknown or revoked key", invalid_token=True)
    request[PRINCIPAL] = principal
    request[KEY_CHECK] = KeyCheck(authenticator, token)
    return await handler(request)


def _refuse(
    request: web.Request, message: str, reason: str, *, invalid_token: bool
) -> web.Response:
    # Never log the header: it may be a real key sent to the wrong place.
    logger.info("401 %s %s from %s: %s", request.method, request.path, request.remote, reason)
    if request.method == "GET" and (request.match_info.route.name or "").startswith(
        PAGE_ROUTE_PREFIX
    ):
        # Back to the whole page after the login, not to the live part its script fetched.
        page = request.rel_url.without_query_params("partial")
        raise web.HTTPFound(f"{LOGIN_PATH}?{urlencode({'next': str(page)})}")
    return unauthorized(message, invalid_token=invalid_token)


def principal(request: web.Request) -> Principal:
    """The authenticated caller of a request that passed the auth middleware."""
    return request[PRINCIPAL]


def key_check(request: web.Request) -> KeyCheck:
    """The re-check of the key of a request that passed the auth middleware."""
    return request[KEY_CHECK]
