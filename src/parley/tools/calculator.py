"""Safe arithmetic: parses an expression with `ast` and evaluates a strict whitelist of its nodes (never `eval`).
Owns the limits that keep a hostile expression cheap: input length, exponent size and result magnitude.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Callable
from dataclasses import dataclass

MAX_EXPRESSION_CHARS = 200
# Results (and every intermediate value) beyond ±1e100 are refused, so no expression can build a huge integer.
MAX_MAGNITUDE = 10**100
MAX_EXPONENT = 1000
SIGNIFICANT_DIGITS = 12
# Integers beyond this lose precision in JavaScript clients (and beyond 2**63 orjson refuses them),
# so `json_number` gives them as exact decimal strings.
JSON_SAFE_INT = 2**53 - 1

Number = int | float

# The multiplication, division and minus signs people paste, which Python does not know; `^` is a power here,
# as on a calculator.
_TRANSLATIONS = str.maketrans({"\u00d7": "*", "\u00f7": "/", "\u2212": "-", "^": "**"})


class CalculatorError(ValueError):
    """The expression cannot be evaluated; the message is plain enough to show to a user."""


@dataclass(frozen=True, slots=True)
class _Function:
    implementation: Callable[..., Number]
    min_args: int
    max_args: int


def _sqrt(value: Number) -> Number:
    if value < 0:
        raise CalculatorError("cannot take the square root of a negative number")
    if isinstance(value, int):
        root = math.isqrt(value)
        if root * root == value:
            return root
    return math.sqrt(value)


def _round(value: Number, digits: Number = 0) -> Number:
    if not isinstance(digits, int) or abs(digits) > 15:
        raise CalculatorError("round() takes a whole number of digits between -15 and 15")
    return round(value, digits)


def _abs(value: Number) -> Number:
    return abs(value)


def _min(*values: Number) -> Number:
    return min(values)


def _max(*values: Number) -> Number:
    return max(values)


_FUNCTIONS: dict[str, _Function] = {
    "sqrt": _Function(_sqrt, 1, 1),
    "abs": _Function(_abs, 1, 1),
    "round": _Function(_round, 1, 2),
    "min": _Function(_min, 1, 20),
    "max": _Function(_max, 1, 20),
}
_CONSTANTS: dict[str, float] = {"pi": math.pi, "e": math.e}
_OPERATORS = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow)


def evaluate(expression: str) -> Number:
    """The exact value of `expression`: an int when the arithmetic is exact, else a float. Raises CalculatorError."""
    text = expression.strip()
    if not text:
        raise CalculatorError("the expression is empty")
    if len(text) > MAX_EXPRESSION_CHARS:
        raise CalculatorError(f"the expression is longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(text.translate(_TRANSLATIONS), mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError) as exc:
        raise CalculatorError("that is not an arithmetic expression I can read") from exc
    try:
        return _eval(tree.body)
    except ZeroDivisionError as exc:
        raise CalculatorError("division by zero") from exc
    except OverflowError as exc:
        raise CalculatorError("the result is too large") from exc
    except RecursionError as exc:
        raise CalculatorError("the expression is nested too deeply") from exc


def calculate(expression: str) -> Number:
    """`evaluate`, with floats rounded to 12 significant digits and whole floats shown as ints (for display)."""
    return display_value(evaluate(expression))


def display_value(value: Number) -> Number:
    if isinstance(value, int):
        return value
    rounded = float(f"{value:.{SIGNIFICANT_DIGITS}g}")
    if rounded.is_integer() and abs(rounded) < 10**SIGNIFICANT_DIGITS:
        return int(rounded)
    return rounded


def json_number(value: Number) -> int | float | str:
    """`value` as JSON can carry it without losing digits: big integers become exact decimal strings."""
    if isinstance(value, int) and abs(value) > JSON_SAFE_INT:
        return str(value)
    return value


def _eval(node: ast.expr) -> Number:
    if isinstance(node, ast.Constant):
        # bool is an int subclass: `True + 1` is not arithmetic anyone means to ask for.
        if isinstance(node.value, bool) or not isinstance(node.value, int | float):
            raise CalculatorError("only numbers are allowed")
        return _checked(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.UAdd | ast.USub):
        operand = _eval(node.operand)
        return operand if isinstance(node.op, ast.UAdd) else _checked(-operand)
    if isinstance(node, ast.BinOp) and isinstance(node.op, _OPERATORS):
        return _checked(_binary(node.op, _eval(node.left), _eval(node.right)))
    if isinstance(node, ast.Name):
        if node.id in _CONSTANTS:
            return _CONSTANTS[node.id]
        raise CalculatorError(f"unknown name {node.id!r} (known constants: pi, e)")
    if isinstance(node, ast.Call):
        return _checked(_call(node))
    raise CalculatorError("only numbers, + - * / // % **, parentheses and sqrt/abs/round/min/max are allowed")


def _binary(op: ast.operator, left: Number, right: Number) -> Number:
    if isinstance(op, ast.Add):
        return left + right
    if isinstance(op, ast.Sub):
        return left - right
    if isinstance(op, ast.Mult):
        return left * right
    if isinstance(op, ast.Div):
        # Exact quotients of integers stay integers (6 / 3 is 2, not 2.0).
        if isinstance(left, int) and isinstance(right, int) and right != 0 and left % right == 0:
            return left // right
        return left / right
    if isinstance(op, ast.FloorDiv):
        return left // right
    if isinstance(op, ast.Mod):
        return left % right
    return _power(left, right)


def _power(base: Number, exponent: Number) -> Number:
    if abs(exponent) > MAX_EXPONENT:
        raise CalculatorError(f"exponents are limited to ±{MAX_EXPONENT}")
    # Refuse before computing: 9 ** 999 is cheap to predict and wasteful to build.
    if abs(base) > 1 and exponent > 0 and exponent * math.log10(abs(base)) > math.log10(MAX_MAGNITUDE):
        raise CalculatorError("the result is too large")
    if base == 0 and exponent < 0:
        raise ZeroDivisionError
    result: object = base**exponent
    if not isinstance(result, int | float):  # a negative base to a fractional power is complex
        raise CalculatorError("the result is not a real number")
    return result


def _call(node: ast.Call) -> Number:
    if not isinstance(node.func, ast.Name) or node.func.id not in _FUNCTIONS:
        raise CalculatorError("the only functions are sqrt, abs, round, min and max")
    if node.keywords or any(isinstance(arg, ast.Starred) for arg in node.args):
        raise CalculatorError("functions take plain numbers as arguments")
    function = _FUNCTIONS[node.func.id]
    if not function.min_args <= len(node.args) <= function.max_args:
        raise CalculatorError(f"{node.func.id}() takes {_arity(function)}")
    return function.implementation(*(_eval(arg) for arg in node.args))


def _arity(function: _Function) -> str:
    if function.min_args == function.max_args:
        return f"{function.min_args} argument" + ("s" if function.min_args != 1 else "")
    return f"{function.min_args} to {function.max_args} arguments"


def _checked(value: Number) -> Number:
    if isinstance(value, float) and not math.isfinite(value):
        raise CalculatorError("the result is too large" if math.isinf(value) else "the result is not a number")
    if abs(value) > MAX_MAGNITUDE:
        raise CalculatorError("the result is too large")
    return value
