"""Every Python block of README.md marked ``<!-- readme-test -->`` runs as written, on CPU, in a fresh namespace
(the examples carry their own asserts: known answers, reproducibility, a reference computation)."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
MARKER = "<!-- readme-test -->"


def _blocks():
    text = README.read_text()
    blocks = re.findall(re.escape(MARKER) + r"\s*\n```python\n(.*?)\n```", text, flags=re.S)
    assert len(blocks) == text.count(MARKER), "every marker must sit right above a ```python block"
    return blocks


BLOCKS = _blocks()


def test_readme_has_marked_examples():
    # the three ops and the runtime, at least
    assert len(BLOCKS) >= 4
    joined = "\n".join(BLOCKS)
    for name in ("verify_greedy", "rejection_sample", "tree_attention", "Engine("):
        assert name in joined


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_example_runs(code):
    exec(compile(code, f"README.md:{code.splitlines()[0]}", "exec"), {"__name__": "__readme__"})


def test_readme_lists_every_environment_variable():
    root = README.parent
    names = set()
    for folder in ("spdkernels", "triton_kernels", "nki_kernels", "csrc", "bench"):
        for f in (root / folder).rglob("*"):
            if f.suffix in (".py", ".cpp", ".h", ".inc", ".sh"):
                names |= set(re.findall(r"\bSPDKERNELS_[A-Z0-9_]+", f.read_text(errors="replace")))
    names |= set(re.findall(r"\bSPDKERNELS_[A-Z0-9_]+", (root / "setup.py").read_text()))
    text = README.read_text()
    missing = sorted(n for n in names if f"`{n}`" not in text)
    assert not missing, f"README.md does not document {missing}"
