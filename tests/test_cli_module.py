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
