import grpc
import pytest
from heist.calculator.v1 import calculator_pb2, calculator_pb2_grpc


@pytest.fixture
async def calc(mesh):
    stub = calculator_pb2_grpc.CalculatorServiceStub(await mesh.channel("calculator"))
    metadata = mesh.auth("calculator:use")

    async def evaluate(expression: str) -> calculator_pb2.EvaluateResponse:
        return await stub.Evaluate(calculator_pb2.EvaluateRequest(expression=expression), metadata=metadata)

    return evaluate


@pytest.mark.parametrize(
    ("expression", "value", "rendered"),
    [
        ("2 + 3", 5, "2 + 3 = 5"),
        ("(120 - 15) * 3 / 7", 45, "(120 - 15) * 3 / 7 = 45"),
        ("7 / 2", 3.5, "7 / 2 = 3.5"),
        ("7 // 2", 3, "7 // 2 = 3"),
        ("-7 % 3", 2, "-7 % 3 = 2"),
        ("2 ** 10", 1024, "2 ** 10 = 1024"),
        ("-(+4)", -4, "-(+4) = -4"),
        ("1.5 * 4", 6, "1.5 * 4 = 6"),
        ("2 ** -1", 0.5, "2 ** -1 = 0.5"),
    ],
)
async def test_evaluates_arithmetic(calc, expression, value, rendered):
    response = await calc(expression)
    assert response.value == pytest.approx(value)
    assert response.rendered == rendered


@pytest.mark.parametrize(
    ("expression", "fragment"),
    [
        ("1 / 0", "division by zero"),
        ("5 // 0", "division by zero"),
        ("5 % 0", "division by zero"),
        ("9**9**9**9", "exponent"),
        ("10 ** 400", "digits"),
        ("99999999999 ** 999", "digits"),
        ("1e308 * 10", "too large"),
        ("2.0 ** 2000", "exponent"),
        ("10.0 ** 400", "too large"),
        ("1" * 400, "digits"),
        ("1 +" + " 1 +" * 300 + " 1", "limit"),
        ("2 +", "syntax error"),
        ("(1 + 2", "syntax error"),
        ("", "empty"),
        ("   ", "empty"),
        ("__import__('os').system('true')", "unsupported"),
        ("abs(-1)", "unsupported"),
        ("x + 1", "unsupported"),
        ("'a' * 3", "only numbers"),
        ("True + 1", "only numbers"),
        ("1 if 1 else 2", "unsupported"),
        ("[1, 2]", "unsupported"),
        ("1 < 2", "unsupported"),
        ("1j * 2", "only numbers"),
        ("(-8) ** 0.5", "not a real number"),
        ("a\x00b", "nul"),
        ("(" * 240 + "1" + ")" * 240, "nested"),
        ("-" * 400 + "1", "limit"),
    ],
)
async def test_rejects_bad_expressions_with_invalid_argument(calc, fails_with, expression, fragment):
    await fails_with(calc(expression), grpc.StatusCode.INVALID_ARGUMENT, fragment)


async def test_expression_length_is_capped(calc, fails_with):
    await fails_with(calc("1+" * 400 + "1"), grpc.StatusCode.INVALID_ARGUMENT, "characters long")


async def test_node_count_is_capped(calc, fails_with):
    # 100 additions: 1 Expression + 100 BinOps + 100 Add operators + 101 numbers = 302 nodes > 200
    await fails_with(calc("1+" * 100 + "1"), grpc.StatusCode.INVALID_ARGUMENT, "expression has 302 parts")


@pytest.mark.parametrize(
    "expression",
    ["1", "(120-15)*3", "-(+4)**-2", "2 ** 10 // 3 % 7", "x + 1", "f(2) * 3", "[1][0]", "1 if 2 else 3", "-x.y", "~5"],
)
def test_node_count_matches_ast_walk(expression: str) -> None:
    import ast

    from servers.calculator import _count_nodes

    tree = ast.parse(expression, mode="eval")
    assert _count_nodes(tree) == sum(1 for _ in ast.walk(tree))
