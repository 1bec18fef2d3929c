"""Typed keys for what the app holds: each resource is opened and closed in cleanup_ctx."""

from __future__ import annotations

from aiohttp import web

from promptq.service import JobService
from promptq.settings import Settings

SETTINGS = web.AppKey("settings", Settings)
SERVICE = web.AppKey("service", JobService)
