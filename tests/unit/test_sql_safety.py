"""SQL goes only through parameterized queries: no SQL text is built from runtime values.

Given every module of the package, the worker, the API and the migrations, when a call passes
SQL text to `text()`, `execute()`, `exec_driver_sql()` or `executescript()`, then that text is
a literal, or an f-string that interpolates only module constants (UPPER_CASE names): never a
variable, an attribute or a `%` / `.format()` / `+` built string.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("promptq", "api", "worker", "migrations")
SQL_CALLS = frozenset({"text", "execute", "exec_driver_sql", "executescript", "executemany"})


def _called_name(call: ast.Call) -> str | None:
    func = call.func
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return None


def _built_from_values(node: ast.expr) -> bool:
    """True if `node` is SQL text assembled from something other than literals and constants."""
    if isinstance(node, ast.JoinedStr):
        return any(
            not (isinstance(part.value, ast.Name) and part.value.id.isupper())
            for part in node.values
            if isinstance(part, ast.FormattedValue)
        )
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod | ast.Add):
        return _is_stringy(node.left) or _is_stringy(node.right)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        return node.func.attr == "format" and _is_stringy(node.func.value)
    return False


def _is_stringy(node: ast.expr) -> bool:
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str)
    return isinstance(node, ast.JoinedStr | ast.BinOp)


def unsafe_lines(source: str) -> list[int]:
    """Line numbers of SQL calls in `source` whose text is built from runtime values."""
    return [
        node.lineno
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Call)
        and _called_name(node) in SQL_CALLS
        and node.args
        and _built_from_values(node.args[0])
    ]


def test_no_sql_text_is_built_from_runtime_values() -> None:
    found = [
        f"{path.relative_to(ROOT)}:{line}"
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
        for line in unsafe_lines(path.read_text(encoding="utf-8"))
    ]
    assert found == []


def test_the_check_catches_every_way_of_building_sql() -> None:
    # The checker itself must flag each unsafe form, and pass the safe ones.
    unsafe = [
        'session.execute(text(f"SELECT * FROM jobs WHERE id = {job_id}"))',
        'conn.exec_driver_sql("SELECT * FROM jobs WHERE id = %s" % job_id)',
        'conn.execute("SELECT * FROM jobs WHERE id = {}".format(job_id))',
        'cursor.execute("SELECT * FROM jobs WHERE id = " + job_id)',
        'text(f"SELECT {self.column} FROM jobs")',
    ]
    safe = [
        'session.execute(text("SELECT 1"))',
        'cursor.execute(f"PRAGMA busy_timeout={TIMEOUT_MS}")',
        "session.execute(select(Job).where(Job.id == job_id))",
        'conn.execute(text("SELECT * FROM jobs WHERE id = :id"), {"id": job_id})',
    ]
    for source in unsafe:
        assert unsafe_lines(source) == [1], source
    for source in safe:
        assert unsafe_lines(source) == [], source
