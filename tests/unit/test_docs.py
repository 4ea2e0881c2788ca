"""The ```python blocks of README.md and docs/*.md run as written.

Each block runs in a fresh module of its own (registered in ``sys.modules`` while it runs, so
dataclasses and ``typing.get_type_hints`` see a real module). Blocks that contain the marker
comment ``# needs-redis`` are written for a Redis server at 127.0.0.1:6379, which the test suite
never touches: they run against the suite's own throwaway redis-server, with that URL swapped
in. A failing block's traceback points at its line in the Markdown.
"""

from __future__ import annotations

import re
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import RedisServer

ROOT = Path(__file__).resolve().parents[2]
MARKER = "# needs-redis"
DOCS_URL = "redis://127.0.0.1:6379/0"  # the URL the needs-redis blocks are written with
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the block's first code line in the Markdown file
    code: str

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    def compile(self, code: str | None = None) -> types.CodeType:
        # Pad with newlines so that line numbers in tracebacks are the Markdown file's.
        return compile("\n" * (self.line - 1) + (self.code if code is None else code), str(self.path), "exec")


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def blocks() -> list[Block]:
    found = []
    for path in markdown_files():
        if not path.exists():
            continue
        text = path.read_text(encoding="utf-8")
        for match in FENCE.finditer(text):
            line = text.count("\n", 0, match.start(1)) + 1
            found.append(Block(path, line, match.group(1)))
    return found


BLOCKS = blocks()
RUNNABLE = [pytest.param(b, id=b.where) for b in BLOCKS if MARKER not in b.code]
NEEDS_REDIS = [pytest.param(b, id=b.where) for b in BLOCKS if MARKER in b.code]


def test_the_docs_are_there() -> None:
    missing = [str(p.relative_to(ROOT)) for p in markdown_files() if not p.exists()]
    assert (ROOT / "README.md").exists() and len(markdown_files()) > 1, missing
    assert RUNNABLE, "no runnable ```python blocks found: did the fence syntax change?"


def run_block(block: Block, code: types.CodeType) -> None:
    name = "tiercache_docs_" + re.sub(r"\W", "_", block.where)
    module = types.ModuleType(name)
    module.__file__ = str(block.path)
    sys.modules[name] = module
    try:
        exec(code, module.__dict__)  # running the docs is the point
    finally:
        del sys.modules[name]


@pytest.mark.parametrize("block", RUNNABLE)
def test_block_runs(block: Block) -> None:
    run_block(block, block.compile())


@pytest.mark.parametrize("block", NEEDS_REDIS)
def test_redis_block_compiles(block: Block) -> None:
    assert DOCS_URL in block.code, f"{block.where}: a needs-redis block must use {DOCS_URL}"
    block.compile()


@pytest.mark.redis
@pytest.mark.parametrize("block", NEEDS_REDIS)
def test_redis_block_runs(block: Block, redis_server: RedisServer) -> None:
    """The blocks that need Redis run against the suite's own throwaway redis-server."""
    run_block(block, block.compile(block.code.replace(DOCS_URL, redis_server.url)))
