"""The generation path reads in one sitting: no function of the pipeline, its steps (``cinematic.generation``) or
the CLI's generate command is longer than 60 lines, and ``Pipeline`` stays under 200 (issue 21)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "cinematic"
GENERATION_PATH = [SRC / "pipeline.py", SRC / "settings.py", SRC / "cli.py", *sorted((SRC / "generation").glob("*.py"))]
MAX_FUNCTION, MAX_PIPELINE = 60, 200


def definitions(path: Path) -> list[tuple[str, int, ast.AST]]:
    tree = ast.parse(path.read_text())
    return [
        (node.name, node.end_lineno - node.lineno + 1, node)
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
    ]


def test_no_long_function_in_the_generation_path():
    long = [
        f"{path.relative_to(SRC)}:{name} ({lines} lines)"
        for path in GENERATION_PATH
        for name, lines, node in definitions(path)
        if not isinstance(node, ast.ClassDef) and lines > MAX_FUNCTION
    ]
    assert not long, long


def test_the_pipeline_class_is_short():
    (lines,) = [lines for name, lines, _ in definitions(SRC / "pipeline.py") if name == "Pipeline"]
    assert lines < MAX_PIPELINE
