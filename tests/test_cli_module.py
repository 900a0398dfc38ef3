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


def test_spd_bench_refuses_bad_arguments_before_measuring(tmp_path, capsys):
    """spd-bench: a device torch cannot use, a backend name that is none (reported as 'no requested backend can run'
    before), repeat counts below 1 (0 meant the default, a negative count ran and
    failed every row), a negative warm-up, and --json / --plot paths that cannot be written exit 2 with one line
    naming the flag, before any measurement and with no file written (a traceback after the whole run before,
    and --json written before a --plot that then failed)."""
    import pytest
    import torch
    from spdkernels.bench import cli

    afile = tmp_path / "afile"
    afile.write_text("x")
    cases = [(["--device", "cuda:x"], "--device"), (["--device", "nosuch"], "--device"),
             (["--backend", "nosuch"], "--backend: invalid choice: 'nosuch'"),
             (["--repeats", "0"], "--repeats"), (["--repeats", "-3"], "--repeats"), (["--warmup", "-5"], "--warmup"),
             (["--json", ""], "--json"), (["--json", str(tmp_path)], "--json"),
             (["--json", str(afile / "x.json")], "--json"),
             (["--json", str(tmp_path / "ok.json"), "--plot", str(afile / "x.png")], "--plot")]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "--device: cuda needs a CUDA GPU"))
    for argv, needle in cases:
        with pytest.raises(SystemExit) as e:
            cli.main(["--op", "verify_greedy", "--shapes", "tiny", "--no-progress"] + argv)
        assert e.value.code == 2, argv
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err, (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]
