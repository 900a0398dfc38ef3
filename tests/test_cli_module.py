"""``python -m spdkernels`` is the ``spdkernels`` command: same parser, same exit status on bad input."""
import subprocess
import sys


def _run(*args):
    return subprocess.run([sys.executable, "-m", "spdkernels", *args], capture_output=True, text=True, timeout=300)


def test_module_help():
    p = _run("--help")
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("usage: spdkernels")
    for cmd in ("generate", "demo", "train-pdm"):
        assert cmd in p.stdout


def test_module_bad_input_exits_2():
    # a model file that does not exist: a one-line error, status 2, no traceback
    p = _run("generate", "--model", "/nonexistent/model.gguf", "--prompt", "hi")
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert "error:" in p.stderr and "Traceback" not in p.stderr


def test_module_dispatches_to_the_console_script_entry_point():
    import importlib
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    scripts = text.split("[project.scripts]", 1)[1].split("\n[", 1)[0]  # that table only (vLLM's plugin is named alike)
    target = re.search(r'^spdkernels\s*=\s*"([\w.]+):(\w+)"', scripts, flags=re.M)
    assert target, "pyproject.toml declares the spdkernels console script"
    entry = getattr(importlib.import_module(target.group(1)), target.group(2))
    main_module = importlib.import_module("spdkernels.__main__")
    assert main_module.main is entry
