"""Calculator service: safe arithmetic for the safecracker.

Why an AST walk and not ``eval``: the expression comes from a language model,
so only numbers and arithmetic operators are accepted, and every operation is
bounded (exponent, integer digits, node count) so ``9**9**9**9`` fails at once
instead of freezing the server.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable
from typing import Any

import grpc
from heist.calculator.v1 import calculator_pb2, calculator_pb2_grpc
from pydantic import Field

from heist_common.config import HeistConfig
from servers.runtime import lifecycle
from servers.runtime.lifecycle import ServiceDefinition

Number = int | float

_BINARY_OPERATORS: dict[type[ast.operator], tuple[str, Callable[[Any, Any], Any]]] = {
    ast.Add: ("+", operator.add),
    ast.Sub: ("-", operator.sub),
    ast.Mult: ("*", operator.mul),
    ast.Div: ("/", operator.truediv),
    ast.FloorDiv: ("//", operator.floordiv),
    ast.Mod: ("%", operator.mod),
    ast.Pow: ("**", operator.pow),
}


class Limits(lifecycle.Limits):
    """``services.calculator.limits``: bounds that keep one expression from eating the CPU or memory."""

    max_expression_chars: int = Field(500, ge=1, strict=True, description="Longest expression Evaluate accepts.")
    max_exponent: int = Field(1024, ge=1, strict=True, description="Largest exponent of a power (`**`).")
    max_integer_digits: int = Field(
        300, ge=1, strict=True,
        description="Most digits of any integer along the way, the result included.",
    )
    max_nodes: int = Field(
        200, ge=1, strict=True,
        description="Most parts (numbers and operators) one expression may have.",
    )


class CalculationError(ValueError):
    """The expression is invalid or exceeds a bound; the message says which."""


def _count_nodes(node: ast.AST) -> int:
    """Count the nodes ``ast.walk(node)`` yields, without its generator and deque for plain arithmetic.

    Numbers, unary and binary operators (each operator is a node too) are
    counted directly; any other node falls back to ``ast.walk`` for its subtree.
    """
    if isinstance(node, ast.Constant):
        return 1
    if isinstance(node, ast.BinOp):
        return 2 + _count_nodes(node.left) + _count_nodes(node.right)
    if isinstance(node, ast.UnaryOp):
        return 2 + _count_nodes(node.operand)
    if isinstance(node, ast.Expression):
        return 1 + _count_nodes(node.body)
    return sum(1 for _ in ast.walk(node))


class Evaluator:
    """Evaluates one arithmetic expression within ``Limits``."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self._integer_bound = 10**limits.max_integer_digits

    def evaluate(self, expression: str) -> Number:
        """Return the value of ``expression`` or raise CalculationError."""
        text = expression.strip()
        if not text:
            raise CalculationError("expression is empty")
        if len(text) > self.limits.max_expression_chars:
            raise CalculationError(
                f"expression is {len(text)} characters long; the limit is {self.limits.max_expression_chars}"
            )
        if "\x00" in text:
            raise CalculationError("expression contains a NUL character")
        try:
            tree = ast.parse(text, mode="eval")
        except SyntaxError as exc:
            where = f" at column {exc.offset}" if exc.offset else ""
            raise CalculationError(f"syntax error{where}: {exc.msg}") from None
        except (ValueError, MemoryError, RecursionError) as exc:
            raise CalculationError(f"cannot parse expression: {exc or type(exc).__name__}") from None
        try:
            node_count = _count_nodes(tree)
            if node_count > self.limits.max_nodes:
                raise CalculationError(f"expression has {node_count} parts; the limit is {self.limits.max_nodes}")
            return self._check(self._eval(tree.body))
        except RecursionError:
            raise CalculationError("expression is nested too deeply") from None

    def _check(self, value: Number) -> Number:
        if isinstance(value, float):
            if math.isnan(value) or math.isinf(value):
                raise CalculationError("result is too large (overflow)")
            return value
        if abs(value) >= self._integer_bound:
            raise CalculationError(f"result has more than {self.limits.max_integer_digits} digits")
        return value

    def _eval(self, node: ast.expr) -> Number:
        if isinstance(node, ast.Constant):
            if isinstance(node.value, bool) or not isinstance(node.value, int | float):
                raise CalculationError(f"only numbers are allowed, not {node.value!r}")
            return self._check(node.value)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.UAdd | ast.USub):
            operand = self._eval(node.operand)
            return -operand if isinstance(node.op, ast.USub) else +operand
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPERATORS:
            symbol, function = _BINARY_OPERATORS[type(node.op)]
            left = self._eval(node.left)
            right = self._eval(node.right)
            if symbol == "**":
                self._check_power(left, right)
            try:
                result: Number = function(left, right)
            except ZeroDivisionError:
                raise CalculationError("division by zero") from None
            except OverflowError:
                raise CalculationError("result is too large (overflow)") from None
            if isinstance(result, complex):
                raise CalculationError("result is not a real number (negative base with fractional exponent)")
            return self._check(result)
        raise CalculationError(f"unsupported syntax: {ast.unparse(node)!r} (only numbers, + - * / // % ** and ())")

    def _check_power(self, base: Number, exponent: Number) -> None:
        if abs(exponent) > self.limits.max_exponent:
            raise CalculationError(f"exponent {exponent} exceeds the limit of {self.limits.max_exponent}")
        if isinstance(base, int) and isinstance(exponent, int) and exponent > 0 and abs(base) > 1:
            estimated_digits = exponent * math.log10(abs(base))
            if estimated_digits > self.limits.max_integer_digits:
                raise CalculationError(
                    f"result would have about {int(estimated_digits) + 1} digits; "
                    f"the limit is {self.limits.max_integer_digits}"
                )


def render(expression: str, value: Number) -> str:
    """Return ``"expr = value"`` with integers (and integral floats) shown without a decimal point."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        shown = str(int(value))
    else:
        shown = repr(value) if isinstance(value, float) else str(value)
    return f"{expression.strip()} = {shown}"


class CalculatorServicer(calculator_pb2_grpc.CalculatorServiceServicer):
    """Serves heist.calculator.v1.CalculatorService."""

    def __init__(self, limits: Limits) -> None:
        self._evaluator = Evaluator(limits)

    async def Evaluate(
        self, request: calculator_pb2.EvaluateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> calculator_pb2.EvaluateResponse:
        """Evaluate the expression; every bad input is INVALID_ARGUMENT with the reason."""
        try:
            value = self._evaluator.evaluate(request.expression)
        except CalculationError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        try:
            as_double = float(value)
        except OverflowError:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "result is too large for a double")
        return calculator_pb2.EvaluateResponse(value=as_double, rendered=render(request.expression, value))


def service_definition(config: HeistConfig, limits: Limits) -> ServiceDefinition:
    """Build the calculator's servicer."""
    return ServiceDefinition("calculator", CalculatorServicer(limits))


if __name__ == "__main__":
    raise SystemExit(lifecycle.main(__spec__))
