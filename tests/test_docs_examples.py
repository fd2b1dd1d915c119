"""The Python examples in README.md, docs/index.md, docs/flax_modules.md, docs/root_finding.md and the section
"Bring your own Flax module" of docs/training.md run as written."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def python_blocks(path: Path, section: str | None = None) -> list[str]:
    text = path.read_text()
    if section is not None:
        text = text[text.index(section) :]
        text = text[: text.index("\n## ", 1)]
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


EXAMPLES = [(f"README.md#{i}", block) for i, block in enumerate(python_blocks(ROOT / "README.md"))] + [
    ("training.md#byo", block)
    for block in python_blocks(ROOT / "docs" / "training.md", "## Bring your own Flax module")
]
EXAMPLES += [
    (f"{page}#{i}", block)
    for page in ("index.md", "flax_modules.md", "root_finding.md")
    for i, block in enumerate(python_blocks(ROOT / "docs" / page))
]


@pytest.mark.parametrize("source", [block for _, block in EXAMPLES], ids=[name for name, _ in EXAMPLES])
def test_example_runs(source, standard_promotion):  # user code, written for JAX's default promotion
    exec(compile(source, "<example>", "exec"), {})


def test_the_examples_were_found():
    assert len(EXAMPLES) >= 5
