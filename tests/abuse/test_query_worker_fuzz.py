"""Random token soup straight into the query worker's code: every answer is a status a caller can act on.

Breadth the process tests cannot afford: a few thousand seeded, bounded
inputs through ``query_worker.answer`` (the function each worker runs per
request) in this process, checking that none ends in INTERNAL and that every
message stays short.
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest

from servers.database_query.bank_fixture import build
from servers.database_query.worker import BankQueries, WorkerLimits, answer

pytestmark = pytest.mark.abuse

TOKENS = (
    "SELECT", "FROM", "guards", "shifts", "g", "s", ",", ";", "(", ")", "'", '"', "x'ff'", "1", "-1", "1e999", "*",
    "WHERE", "name", "post", "id", "guard_id", "LIKE", "GLOB", "'%a%'", "ORDER BY", "GROUP BY", "HAVING", "count(*)",
    "UNION", "UNION ALL", "WITH", "AS", "--", "/*", "*/", "\n", "?", ":a", "CAST(", "AS TEXT)", "AS BLOB)", "replace(",
    "trim(", "substr(", "instr(", "group_concat(", "zeroblob(", "printf(", "json_each(", "pragma_table_info(", "||",
    "NULL", "LIMIT", "OFFSET", "9223372036854775807", "JOIN", "ON", "=", "<", "IN", "EXISTS", "VALUES", "CASE", "WHEN",
    "THEN", "END", "ELSE", "ATTACH", "PRAGMA", "INSERT", "DELETE", "RECURSIVE", "OVER", "PARTITION BY", "'a'", "x'00'",
    "\x00", "é", "\U0001f600", "DISTINCT", "NOT", "AND", "OR", "BETWEEN", "COLLATE NOCASE", "date('now')", "round(",
)
CASES = 3000


def test_random_sql_never_gets_internal(tmp_path: Path) -> None:
    database = tmp_path / "bank.db"
    build(database)
    queries = BankQueries(database, WorkerLimits(200, 4000, 64 * 1024, 1 << 20, 256 << 20))
    rng = random.Random(20261121)
    seen: Counter[str] = Counter()
    for _ in range(CASES):
        sql = " ".join(rng.choice(TOKENS) for _ in range(rng.randint(1, 30)))
        if rng.random() < 0.5:
            sql = "SELECT " + sql
        reply = answer(queries, sql, 0.2)
        status = "OK" if reply[0] == "ok" else str(reply[1])
        seen[status] += 1
        assert status != "INTERNAL", (sql, reply)
        if reply[0] == "error":
            assert len(str(reply[2])) <= 700, (sql, reply)
    print(f"\n{CASES} random queries: {dict(seen)}")
    assert seen["OK"] > 0
