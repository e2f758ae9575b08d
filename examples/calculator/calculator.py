"""The example's tool: a calculator for + - * / and parentheses on integers and decimals.

tracerl builds it from `env.tools` (a class is built with no arguments) and hands it to the environment as
`tools["calculator"]`. It evaluates the expression's syntax tree itself (no `eval`), so model text can do
nothing but arithmetic, and answers every input with a string: a number or an error message.
"""

from __future__ import annotations

import ast
import operator

OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
MAX_CHARS = 80  # longer expressions are refused (a model can write anything)


class Calculator:
    name = "calculator"

    def __call__(self, expression: str) -> str:
        """The value of `expression` ("37 * 12 - 5" -> "439"), or "error: ..." for anything else."""
        if len(expression) > MAX_CHARS:
            return "error: expression too long"
        try:
            value = self._value(ast.parse(expression.strip(), mode="eval").body)
        except (SyntaxError, ValueError, ZeroDivisionError, OverflowError) as e:
            return f"error: {type(e).__name__}"
        return str(int(value)) if float(value).is_integer() else f"{value:.6g}"

    def _value(self, node: ast.AST) -> float:
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -self._value(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in OPERATORS:
            left, right = self._value(node.left), self._value(node.right)
            if abs(left) > 1e12 or abs(right) > 1e12:
                raise OverflowError
            return OPERATORS[type(node.op)](left, right)
        raise ValueError("not arithmetic")
