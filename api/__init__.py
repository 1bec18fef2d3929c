"""promptq's HTTP API (aiohttp): the app factory and its routes."""
