"""Alembic migrations for promptq's schema (shipped as a package so `promptq db` finds them)."""
