"""The docs hold together: the README stays a front door, and no link, file path or section that the docs or the
code's comments cite is missing from the repository."""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README_MAX_LINES = 220
RESULTS = ROOT / "benchmarks" / "results"

# Markdown the checks read: the README, every page of docs/, and the benchmarks' README.
MARKDOWN = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]
# Python whose comments and docstrings are checked for cited paths.
CODE_FOLDERS = ("src", "benchmarks", "recipes", "scripts", "tests")
PYTHON = sorted(p for folder in CODE_FOLDERS for p in (ROOT / folder).rglob("*.py") if p.is_file())

FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"`[^`\n]*`")
# [text](target) links; an image is the same with a leading "!". Targets with spaces are not used here.
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^()\s]+)(?:\s+\"[^\"]*\")?\)")
# A repository path: one of the top-level folders that hold cited files, then path characters. The character
# before must not continue another path (so /tmp/docs/x and my-tests/x are not read as ours).
REPO_PATH = re.compile(
    r"(?<![\w./-])((?:src/cinematic|benchmarks|docs|recipes|scripts|tests)/(?:[\w.-]+/?)*|README\.md|pyproject\.toml)"
    r"(?P<next>.?)"
)
# A path inside the package, as the package's own comments cite files: models/lora_adapters.py, weights/openclip.py.
PACKAGE_PATH = re.compile(
    r"(?<![\w./-])((?:models|diffusion|weights|train|serve|data|eval)/[\w.-]+\.(?:py|html|js|css|json))(?P<next>.?)"
)
# A module cited by its dotted name: cinematic.models.winograd, cinematic.video.read.
MODULE = re.compile(r"(?<![\w.])cinematic((?:\.[A-Za-z_]\w*)+)")
RESULT_FILE = re.compile(r"(?<![\w/-])(results-\w[\w.-]*?\.json)")
# A section cited by name: README or a docs page, then the heading in double quotes.
SECTION = re.compile(r"(README(?:\.md)?|(?:docs|benchmarks)/[\w-]+\.md)(?:'s)?,?\s+(?:section\s+)?\(?\"([^\"\n]+)\"")


def _markdown_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of the lines outside fenced code blocks."""
    lines, fenced = [], False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append((number, line))
    return lines


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text, lowercased, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links and images: their text
    text = text.replace("`", "").replace("*", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a markdown file, with GitHub's -1, -2 ... suffixes for repeated headings."""
    seen: dict[str, int] = {}
    out = set()
    for _, line in _markdown_lines(path):
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        slug = github_slug(match.group(1))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        out.add(slug if count == 0 else f"{slug}-{count}")
    return out


def headings(path: Path) -> set[str]:
    """The heading texts of a markdown file as rendered (no backticks), lowercased."""
    out = set()
    for _, line in _markdown_lines(path):
        match = re.match(r"^#{1,6}\s+(.*?)\s*$", line)
        if match:
            out.add(match.group(1).replace("`", "").strip().lower())
    return out


def _python_prose(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of every comment and docstring of a Python file."""
    source = path.read_text()
    out = [
        (tok.start[0], tok.string)
        for tok in tokenize.generate_tokens(io.StringIO(source).readline)
        if tok.type == tokenize.COMMENT
    ]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                if isinstance(body[0].value.value, str):
                    first = body[0].lineno
                    out += [(first + i, line) for i, line in enumerate(body[0].value.value.splitlines())]
    return out


def _prose(path: Path) -> list[tuple[int, str]]:
    return _python_prose(path) if path.suffix == ".py" else _markdown_lines(path)


def _where(path: Path, number: int) -> str:
    return f"{path.relative_to(ROOT)}:{number}"


def test_readme_is_a_front_door():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; reference material goes in docs/"


def test_github_slug():
    assert github_slug("`bench.py`: a whole generation") == "benchpy-a-whole-generation"
    assert github_slug("Run C: the latest default and low-memory measurement") == (
        "run-c-the-latest-default-and-low-memory-measurement"
    )
    assert github_slug("The allocator setting (Linux)") == "the-allocator-setting-linux"


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: str(p.relative_to(ROOT)))
def test_markdown_links_resolve(path: Path):
    broken = []
    for number, line in _markdown_lines(path):
        for target in LINK.findall(INLINE_CODE.sub("", line)):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            linked = (path.parent / file_part).resolve() if file_part else path
            if not linked.exists():
                broken.append(f"{_where(path, number)}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                broken.append(f"{_where(path, number)}: {target} (no heading #{anchor} in {linked.name})")
    assert not broken, "broken links:\n" + "\n".join(broken)


def _cited_paths(text: str) -> list[str]:
    cited = []
    for match in REPO_PATH.finditer(text):
        if match.group("next") in ("*", "{", "<", "…") or match.group(1).endswith("..."):
            continue  # a pattern (tests/test_*.py, benchmarks/results-{name}.json), not one file
        cited.append(match.group(1).rstrip("."))
    return cited


def _module_exists(dotted: str) -> bool:
    """Whether cinematic.<dotted> names a module, or a name in a package's __init__.py; a name after a module
    (a function, a class) is not checked. One-letter parts are placeholders (cinematic.x.y), not citations."""
    if any(len(part) == 1 for part in dotted.strip(".").split(".")):
        return True
    path = ROOT / "src" / "cinematic"
    for part in dotted.strip(".").split("."):
        if (path / part).is_dir():
            path = path / part
        elif (path / f"{part}.py").is_file():
            return True
        else:
            init = path / "__init__.py"
            return init.is_file() and re.search(rf"\b{re.escape(part)}\b", init.read_text()) is not None
    return True


def _missing(text: str, in_package: bool) -> list[str]:
    """The files and modules that a line of prose cites and the repository lacks."""
    missing = [cited for cited in _cited_paths(text) if not (ROOT / cited).exists()]
    if in_package:  # the package's comments cite its files from src/cinematic/
        for match in PACKAGE_PATH.finditer(text):
            if match.group("next") not in ("*", "{", "<") and not (ROOT / "src/cinematic" / match.group(1)).exists():
                missing.append(f"{match.group(1)} (not in src/cinematic/)")
    missing += [f"cinematic{dotted} (no such module)" for dotted in MODULE.findall(text) if not _module_exists(dotted)]
    missing += [
        f"{name} (not in benchmarks/results/)" for name in RESULT_FILE.findall(text) if not (RESULTS / name).exists()
    ]
    return missing


def test_cited_files_exist():
    """Every repository path or cinematic module named in the docs, or in a comment or docstring of the code, is in
    the repository; a results file named alone, without its folder, is in benchmarks/results/."""
    missing = []
    for path in MARKDOWN + PYTHON:
        in_package = path.is_relative_to(ROOT / "src" / "cinematic")
        for number, text in _prose(path):
            missing += [f"{_where(path, number)}: {cited}" for cited in _missing(text, in_package)]
    assert not missing, "cited files that are not in the repository:\n" + "\n".join(missing)


def test_cited_sections_exist():
    """A section cited by name (a markdown file, then a heading in double quotes) is a heading of that file."""
    missing = []
    for path in MARKDOWN + PYTHON:
        prose = _prose(path)
        # Join each comment block so that a citation broken over two lines is still read.
        text = "\n".join(line.lstrip("# ").rstrip() for _, line in prose)
        for file, section in SECTION.findall(text.replace("\n", " ")):
            target = ROOT / ("README.md" if file.startswith("README") else file)
            if not target.exists() or section.lower() not in headings(target):
                missing.append(f'{path.relative_to(ROOT)}: {file}, "{section}"')
    assert not missing, "cited sections that no heading has:\n" + "\n".join(missing)
