"""bench/compare_builds.py's summary (no build, no bench: synthetic rounds): the ratio is the median over rounds
of new / old, only rows present in every round of both builds are compared and the others are named, the SPD
lines divide the PDM by the same round's stage, bad arguments and missing rounds exit 2 with the reason."""
import argparse
import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def cb():
    spec = importlib.util.spec_from_file_location("compare_builds", ROOT / "bench" / "compare_builds.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(case, backend, ms, op="verify_greedy"):
    return dict(op=op, case=case, backend=backend, median_ms=ms, frac_copy_bw=0.5, check="ok")


def _args(**kw):
    return argparse.Namespace(**dict(dict(forward=False, spd=False, max_tokens=32, rounds=3, repeats=30, json=None),
                                     **kw))


def test_ratio_is_the_median_of_per_round_ratios(cb, tmp_path, capsys):
    old = [[_row("a", "cpp", 2.0), _row("b", "cpp", 1.0)], [_row("a", "cpp", 4.0), _row("b", "cpp", 1.0)],
           [_row("a", "cpp", 2.0), _row("b", "cpp", 1.0)]]
    new = [[_row("a", "cpp", 1.0), _row("b", "cpp", 3.0)], [_row("a", "cpp", 3.0), _row("b", "cpp", 1.0)],
           [_row("a", "cpp", 1.6), _row("b", "cpp", 2.0)]]
    out = tmp_path / "cmp.json"
    assert cb.summarise(dict(old=old, new=new), _args(json=str(out)), "aaa", "bbb") == 0
    got = {r["case"]: r for r in json.loads(out.read_text())["rows"]}
    # a: per-round ratios 0.5, 0.75, 0.8 -> 0.75 (the ratio of medians would be 1.6 / 2.0 = 0.8)
    assert got["a"]["ratio_new_old"] == pytest.approx(0.75)
    assert (got["a"]["old_ms"], got["a"]["new_ms"]) == (2.0, 1.6)
    assert got["b"]["ratio_new_old"] == pytest.approx(2.0)  # 3, 1, 2
    text = capsys.readouterr().out
    assert "old aaa vs new bbb: 3 alternating rounds" in text and "not compared" not in text


def test_rows_missing_from_a_round_or_a_build_are_named_not_compared(cb, tmp_path, capsys):
    old = [[_row("a", "cpp", 1.0), _row("gone", "cpp", 1.0)], [_row("a", "cpp", 1.0), _row("gone", "cpp", 1.0)]]
    new = [[_row("a", "cpp", 2.0), _row("flaky", "cpp", 1.0), _row("new", "cpp", 1.0)],
           [_row("a", "cpp", 2.0), _row("new", "cpp", 1.0)]]
    out = tmp_path / "cmp.json"
    assert cb.summarise(dict(old=old, new=new), _args(rounds=2, json=str(out)), "o", "n") == 0
    assert [r["case"] for r in json.loads(out.read_text())["rows"]] == ["a"]
    text = capsys.readouterr().out
    assert "not compared: verify_greedy / gone / cpp (in old 2/2 rounds, new 0/2 rounds)" in text
    assert "not compared: verify_greedy / flaky / cpp (in old 0/2 rounds, new 1/2 rounds)" in text
    assert "not compared: verify_greedy / new / cpp (in old 0/2 rounds, new 2/2 rounds)" in text
    with pytest.raises(ValueError, match="runs: need the same number"):
        cb.summarise(dict(old=old, new=new[:1]), _args(), "o", "n")
    # nothing in common (e.g. --spd rows whose acceptance differs between the builds): exit status 1
    assert cb.summarise(dict(old=[[_row("x", "cpp", 1.0)]], new=[[_row("y", "cpp", 1.0)]]), _args(rounds=1),
                        "o", "n") == 1
    assert "nothing compared" in capsys.readouterr().err


def test_spd_summary_divides_the_pdm_by_the_same_rounds_stage(cb, capsys):
    def rnd(pdm, stage, pdm8=None):
        rows = [_row("n=4 (acceptance 0.350)", "pdm", pdm, "spd"),
                _row("n=4 (acceptance 0.350)", "stage", stage, "spd")]
        if pdm8 is not None:  # a case whose stage row is missing: no PDM / stage line, no crash
            rows.append(_row("n=8 (acceptance 0.330)", "pdm", pdm8, "spd"))
        return rows

    old = [rnd(2.0, 4.0, 3.0), rnd(3.0, 3.0, 3.0)]  # PDM / stage 0.5, 1.0
    new = [rnd(1.0, 4.0, 2.0), rnd(3.0, 4.0, 2.0)]  # 0.25, 0.75 -> per round 0.5, 0.75
    assert cb.summarise(dict(old=old, new=new), _args(spd=True, rounds=2), "o", "n") == 0
    text = capsys.readouterr().out
    assert ("# n=4 (acceptance 0.350): PDM / stage forward 0.750 old, 0.500 new; new/old per round 0.500, 0.750 "
            "(median 0.625)") in text
    assert "# n=8" not in text and re.search(r"^spd +n=8 \(acceptance 0.330\) +pdm +3.0000 +2.0000 +0.667", text, re.M)


def test_bad_arguments_and_missing_rounds_exit_2(cb, tmp_path, monkeypatch, capsys):
    for argv, msg in ((["--old", "HEAD", "--forward", "--spd"], "one at a time"),
                      (["--old", "HEAD", "--rounds", "0"], "--rounds and --repeats must be at least 1")):
        with pytest.raises(SystemExit) as e:
            cb.main(argv)
        assert e.value.code == 2 and msg in capsys.readouterr().err
    monkeypatch.setattr(cb, "ROOT", tmp_path)
    with pytest.raises(SystemExit) as e:
        cb.main(["--old", "HEAD", "--reuse", "--rounds", "2"])
    assert e.value.code == 2 and "--reuse: no 2 complete rounds of this kind" in capsys.readouterr().err
    # complete rounds are summarised
    for name, ms in (("old", 2.0), ("new", 1.0)):
        for i in range(2):
            (tmp_path / "build" / "compare" / name).mkdir(parents=True, exist_ok=True)
            (tmp_path / "build" / "compare" / name / f"round{i}.json").write_text(
                json.dumps(dict(rows=[_row("a", "cpp", ms)])))
    assert cb.main(["--old", "o", "--new", "n", "--reuse", "--rounds", "2"]) == 0
    assert re.search(r"^verify_greedy +a +cpp +2.0000 +1.0000 +0.500", capsys.readouterr().out, re.M)
    # rounds of another kind (--spd's own JSON read as spd-bench rows): exit 2, not a traceback
    (tmp_path / "build" / "compare" / "new" / "round1.json").write_text(json.dumps(dict(rows=[dict(n=4)])))
    with pytest.raises(SystemExit) as e:
        cb.main(["--old", "o", "--new", "n", "--reuse", "--rounds", "2"])
    assert e.value.code == 2 and "KeyError" in capsys.readouterr().err
