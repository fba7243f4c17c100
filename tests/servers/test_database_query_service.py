import sqlite3

import grpc
import pytest
from heist.database_query.v1 import database_query_pb2 as pb
from heist.database_query.v1 import database_query_pb2_grpc

from servers.database_query.bank_fixture import bank_db_path

TABLES = ["access_levels", "cameras", "employees", "guards", "shifts", "vaults"]


@pytest.fixture
async def db(mesh):
    stub = database_query_pb2_grpc.DatabaseQueryServiceStub(await mesh.channel("database_query"))
    metadata = mesh.auth("database_query:use")

    async def query(sql: str) -> pb.QueryResponse:
        return await stub.Query(pb.QueryRequest(sql=sql), metadata=metadata)

    query.tables = lambda: stub.ListTables(pb.ListTablesRequest(), metadata=metadata)
    return query


async def test_lists_the_tables_named_in_the_contract(db):
    response = await db.tables()
    assert [table.name for table in response.tables] == TABLES
    guards = next(table for table in response.tables if table.name == "guards")
    assert ("shift_start", "TEXT") in [(column.name, column.type) for column in guards.columns]


async def test_select_returns_typed_values(db):
    response = await db("SELECT name, shift_start, armed, NULL, 1.5, x'00ff' FROM guards ORDER BY id LIMIT 2")
    assert list(response.columns) == ["name", "shift_start", "armed", "NULL", "1.5", "x'00ff'"]
    first = response.rows[0].values
    assert first[0].text_value == "Bruno Castellano" and first[1].text_value == "22:00"
    assert first[2].int_value == 1 and first[3].WhichOneof("kind") == "null_value"
    assert first[4].real_value == 1.5 and first[5].blob_value == b"\x00\xff"
    assert len(response.rows) == 2


async def test_trailing_semicolon_and_joins_are_fine(db):
    response = await db(
        "SELECT g.name, count(*) FROM shifts s JOIN guards g ON g.id = s.guard_id "
        "WHERE s.day_of_week = 'Sun' AND s.post = 'interior_rounds' GROUP BY g.name;"
    )
    assert [(row.values[0].text_value, row.values[1].int_value) for row in response.rows] == [("Yusuf Demir", 1)]


async def test_database_is_built_once_and_opened_read_only(mesh, db, fails_with):
    path = bank_db_path(mesh.config)
    assert path.exists()
    await fails_with(db("SELECT writefile('/tmp/x', 'y')"), grpc.StatusCode.INVALID_ARGUMENT, "no such function")
    with sqlite3.connect(path) as connection:
        assert connection.execute("SELECT count(*) FROM guards").fetchone()[0] == 8


@pytest.mark.parametrize(
    ("sql", "fragment"),
    [
        ("DELETE FROM guards", "only a single SELECT statement is allowed: DELETE"),
        ("UPDATE guards SET armed = 0", "only a single SELECT statement is allowed: UPDATE"),
        ("INSERT INTO guards(name) VALUES ('x')", "only a single SELECT statement is allowed: INSERT"),
        ("DROP TABLE guards", "only a single SELECT statement is allowed"),
        ("CREATE TABLE t(x)", "only a single SELECT statement is allowed"),
        ("PRAGMA table_info(guards)", "only a single SELECT statement is allowed: PRAGMA"),
        ("ATTACH DATABASE '/tmp/other.db' AS other", "only a single SELECT statement is allowed: ATTACH"),
        ("BEGIN", "only a single SELECT statement is allowed: TRANSACTION"),
        ("SELECT 1; DELETE FROM guards", "only a single SELECT statement is allowed"),
        ("SELECT 1; SELECT 2", "only a single SELECT statement is allowed"),
        ("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT x FROM c", "RECURSIVE"),
        ("SELEC name FROM guards", "syntax error"),
        ("SELECT nope FROM guards", "no such column"),
        ("SELECT * FROM vault_codes", "no such table"),
        ("SELECT zeroblob(500000000)", "function zeroblob() is not permitted"),
        ("", "required"),
        ("SELECT 1 -- \x00", "NUL"),
        ("SELECT " + "1 + " * 2000 + "1", "limit"),
    ],
)
async def test_rejects_everything_but_one_select(db, fails_with, sql, fragment):
    await fails_with(db(sql), grpc.StatusCode.INVALID_ARGUMENT, fragment)


async def test_too_many_rows_is_resource_exhausted(db, fails_with):
    await fails_with(
        db("SELECT * FROM shifts a, shifts b"),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "query returned more than 200 rows; add a LIMIT",
    )
    assert len((await db("SELECT * FROM shifts a, shifts b LIMIT 200")).rows) == 200


async def test_slow_query_is_deadline_exceeded(db, fails_with):
    await fails_with(
        db("SELECT count(*) FROM shifts a, shifts b, shifts c, shifts d, shifts e, shifts f"),
        grpc.StatusCode.DEADLINE_EXCEEDED,
        "query took longer than 0.3 s",
    )
