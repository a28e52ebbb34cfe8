"""Row filters written as Python-style expressions, compiled to pyarrow compute expressions (on
the cluster; the DAG parser uses ``columns_in`` to check column names).

    "l_shipdate >= '1995-01-01' and l_quantity < 24"
    "o_orderstatus in ('F', 'O') and o_comment is not None"

String literals compared with a date or timestamp column are cast to the column's type, so
dates read naturally. As in SQL, a null passes no comparison or membership test: use
``col is None`` to select nulls. Unknown names raise ``ValueError`` naming the column.
"""

from __future__ import annotations

import ast
import operator
from functools import lru_cache

import pyarrow as pa
import pyarrow.compute as pc

from ..contracts import DataError

_COMPARE = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
}
_ARITH = {ast.Add: pc.add, ast.Sub: pc.subtract, ast.Mult: pc.multiply, ast.Div: pc.divide, ast.Mod: None}


@lru_cache(maxsize=256)
def parse(expression: str) -> ast.expr:
    try:
        return ast.parse(expression, mode="eval").body
    except SyntaxError as exc:
        raise DataError(f"Invalid expression {expression!r}: {exc.msg}") from None


def columns_in(expression: str) -> set[str]:
    return {node.id for node in ast.walk(parse(expression)) if isinstance(node, ast.Name)} - {
        "True",
        "False",
        "None",
    }


def compile_expression(expression: str, schema: pa.Schema) -> pc.Expression:
    """Compile ``expression`` against ``schema``; raise ``ValueError`` for unknown columns."""
    unknown = sorted(columns_in(expression) - set(schema.names))
    if unknown:
        raise DataError(
            f"Unknown column {unknown[0]!r} in expression {expression!r}; available columns: {', '.join(schema.names)}"
        )
    return _Compiler(expression, schema).visit(parse(expression))


class _Compiler:
    def __init__(self, expression: str, schema: pa.Schema):
        self.expression, self.schema = expression, schema

    def fail(self, node: ast.AST) -> ValueError:
        return ValueError(f"Unsupported syntax {ast.unparse(node)!r} in expression {self.expression!r}")

    def visit(self, node: ast.AST, like: pa.DataType | None = None):
        if isinstance(node, ast.BoolOp):
            parts = [self.visit(v) for v in node.values]
            combine = operator.and_ if isinstance(node.op, ast.And) else operator.or_
            result = parts[0]
            for part in parts[1:]:
                result = combine(result, part)
            return result
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            return ~self.visit(node.operand)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return pc.negate(self.visit(node.operand))
        if isinstance(node, ast.Compare):
            return self.compare(node)
        if isinstance(node, ast.BinOp) and type(node.op) in _ARITH:
            left, right = self.visit(node.left), self.visit(node.right)
            if isinstance(node.op, ast.Mod):
                return pc.subtract(left, pc.multiply(pc.floor(pc.divide(left, right)), right))
            return _ARITH[type(node.op)](left, right)
        if isinstance(node, ast.Name):
            return pc.field(node.id)
        if isinstance(node, ast.Constant):
            return pc.scalar(self.literal(node.value, like))
        raise self.fail(node)

    def literal(self, value, like: pa.DataType | None):
        if isinstance(value, str) and like is not None and (pa.types.is_date(like) or pa.types.is_timestamp(like)):
            return pa.scalar(value).cast(like)
        return value

    def column_type(self, node: ast.AST) -> pa.DataType | None:
        return self.schema.field(node.id).type if isinstance(node, ast.Name) else None

    def compare(self, node: ast.Compare):
        result, left = None, node.left
        for op, right in zip(node.ops, node.comparators, strict=True):
            like = self.column_type(left) or self.column_type(right)
            if isinstance(op, (ast.Is, ast.IsNot)):
                if not (isinstance(right, ast.Constant) and right.value is None):
                    raise self.fail(node)
                term = self.visit(left).is_null()
                term = term if isinstance(op, ast.Is) else ~term
            elif isinstance(op, (ast.In, ast.NotIn)):
                if not isinstance(right, (ast.Tuple, ast.List, ast.Set)):
                    raise self.fail(node)
                values = [self.literal(ast.literal_eval(v), like) for v in right.elts]
                column = self.visit(left)
                term = column.isin(values)
                term = term if isinstance(op, ast.In) else ~term & column.is_valid()
            elif type(op) in _COMPARE:
                term = _COMPARE[type(op)](self.visit(left, like), self.visit(right, like))
            else:
                raise self.fail(node)
            result = term if result is None else result & term
            left = right
        return result
