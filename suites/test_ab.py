"""A/B on one machine: the statistics (`harness/report/stats.py`) held to their exact
distributions and to planted shifts, and `llava-harness ab` on two venvs and on two checkpoint
folders, each catching a planted 2x slowdown and never calling A against A a change at
p < 0.001. Bad sides are one line and exit 2, with nothing written.

These tests measure real processes on a busy CI machine, so each asserts only what holds
there every time: a planted 2x is far beyond the noise (measured: 15-30% between processes),
and A against itself is exchangeable, so a false alarm at p < 0.001 is a 1-in-1000 event.
"""

from __future__ import annotations

import itertools
import json
import random
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.bench.ab_power import ARMS, power_table
from harness.cli.app import main
from harness.report import stats
from harness.report.results import load_results
from harness.report.stats import (_rank_sum_counts, _u_counts, mann_whitney_p, min_pairs,
                                  paired_shift, shift, signed_rank_p)

# --- the statistics -------------------------------------------------------------------------


@pytest.mark.parametrize("m, n", [(1, 1), (2, 3), (4, 4), (3, 6), (5, 2)])
def test_the_exact_u_distribution_is_the_count_of_orderings(m, n):
    counts = [0] * (m * n + 1)
    for places in itertools.combinations(range(m + n), m):
        # U of B: pairs with the B element above the A element.
        counts[sum(sum(1 for p in places if p < i) for i in range(m + n)
                   if i not in places)] += 1
    assert _u_counts(m, n) == counts


@pytest.mark.parametrize("n", range(1, 9))
def test_the_exact_signed_rank_distribution_is_the_count_of_sign_patterns(n):
    counts = [0] * (n * (n + 1) // 2 + 1)
    for signs in itertools.product((0, 1), repeat=n):
        counts[sum(rank for rank, s in zip(range(1, n + 1), signs) if s)] += 1
    assert _rank_sum_counts(n) == counts


def test_textbook_p_values():
    # Complete separation: the most extreme of C(10, 5) = 252 orderings, both tails.
    assert mann_whitney_p([1, 2, 3, 4, 5], [6, 7, 8, 9, 10]) == pytest.approx(2 / 252)
    # Every difference positive: the most extreme of 2**6 sign patterns, both tails.
    assert signed_rank_p([1, 2, 3, 4, 5, 6]) == pytest.approx(2 / 64)
    # Identical samples: nothing differs.
    assert mann_whitney_p([1.0] * 10, [1.0] * 10) == 1.0
    assert signed_rank_p([0.0] * 10) == 1.0


def test_the_normal_approximation_is_close_to_the_exact_p():
    """Past EXACT_PAIRS the p-value is the normal approximation's: within 0.003 of the exact
    one at 41 against 40 values, over every U."""
    assert 41 * 40 > stats.EXACT_PAIRS >= 40 * 40
    rng = random.Random(3)
    for shift_by in (0.0, 0.3, 0.6, 1.0):
        a = [rng.gauss(0, 1) for _ in range(41)]
        b = [rng.gauss(shift_by, 1) for _ in range(40)]
        exact = stats._exact_p(stats.u_statistic(a, b)[0], 41, 40)
        assert mann_whitney_p(a, b) == pytest.approx(exact, abs=0.003)


def test_the_fewest_pairs_that_can_show_a_change():
    assert (min_pairs(0.05), min_pairs(0.01), min_pairs(0.001)) == (6, 8, 11)
    up = [1.0 + i / 100 for i in range(8)]
    doubled = [v * (2 + i / 100) for i, v in enumerate(up)]
    assert paired_shift(up, doubled).p == pytest.approx(2 / 2 ** 8)
    assert paired_shift(up, doubled).significant
    assert not paired_shift(up[:7], doubled[:7]).significant


def test_a_planted_shift_is_found_and_sized():
    rng = random.Random(7)
    # A VM's phases: the speed jumps between two levels; a pair shares its phase.
    phase = [1.0 if (i // 4) % 2 else 1.7 for i in range(30)]
    a = [p * rng.lognormvariate(0, 0.03) for p in phase]
    b = [p * 1.10 * rng.lognormvariate(0, 0.03) for p in phase]
    paired = paired_shift(a, b)
    assert paired.significant and paired.low < 1.10 < paired.high
    assert paired.detectable < 0.05
    # Without the pairing the phases widen the interval: the pairs are worth having.
    unpaired = shift(a, b)
    assert paired.detectable < unpaired.detectable / 2
    same = paired_shift(a, [p * rng.lognormvariate(0, 0.03) for p in phase])
    assert not same.significant and same.low < 1 < same.high


def test_too_little_or_non_positive_data_gives_no_statement():
    assert shift([1, 2, 3, 4], [1, 2, 3, 4, 5]) is None
    assert shift([0, 1, 2, 3, 4], [1, 2, 3, 4, 5]) is None
    assert paired_shift([1, 2, 3, 4], [1, 2, 3, 4]) is None
    with pytest.raises(ValueError, match="paired samples of 5 and 6"):
        paired_shift([1] * 5, [1] * 6)


samples = st.lists(st.floats(0.001, 1000, allow_nan=False), min_size=5, max_size=25)


@settings(max_examples=60, deadline=None)
@given(samples, samples, st.floats(0.01, 100))
def test_the_ratio_inverts_and_scales(a, b, scale):
    forward, backward = shift(a, b), shift(b, a)
    assert forward.ratio * backward.ratio == pytest.approx(1, rel=1e-9)
    assert forward.p == pytest.approx(backward.p)
    assert forward.low <= forward.ratio <= forward.high
    scaled = shift([v * scale for v in a], [v * scale for v in b])
    assert scaled.ratio == pytest.approx(forward.ratio, rel=1e-6)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(0.001, 1000), st.floats(0.5, 2)), min_size=5,
                max_size=40))
def test_the_paired_ratio_sits_in_its_interval(pairs):
    a = [x for x, _ in pairs]
    b = [x * r for x, r in pairs]
    found = paired_shift(a, b)
    assert found.low <= found.ratio <= found.high
    assert 0 <= found.p <= 1


def test_the_power_table_counts_hits_and_false_alarms():
    """The analysis on a synthetic pool: 10% and 20% planted under 3% noise are always
    caught, the A/A control about as often as alpha says (1 in 100; seeded, so exactly), and
    the stored-baseline gate (its 30% run-to-run floor) misses 20%."""
    rng = random.Random(11)
    rounds = 60
    phase = [1.0 if (i // 5) % 2 else 1.4 for i in range(rounds)]
    pool = {arm: {"count": [p * (1 + plant) * rng.lognormvariate(0, 0.03) for p in phase]}
            for arm, plant in ARMS}
    rows = {r["planted"]: r for r in power_table(pool, size=20, draws=50)}
    assert rows["A/A"]["ab"].hits <= 2 and rows["+20%"]["ab"].hits == 50
    assert rows["+10%"]["ab"].hits == 50
    assert rows["+20%"]["gate"].hits < 50


# --- the command ------------------------------------------------------------------------------

ROUNDS = "12"  # enough for p < 0.001 (11 pairs), few enough for CI: ~2 s per process


def _venv_sharing_this_one(where: Path) -> Path:
    """A second venv with its own interpreter, seeing this environment's packages through a
    .pth file (a real second stack would have its own; installing one costs minutes)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True)
    purelib = Path(sysconfig.get_paths()["purelib"])
    site = next((where / "lib").glob("python3*/site-packages"))
    paths = [str(purelib)] + [p for p in sys.path if p and Path(p, "harness").is_dir()]
    (site / "this-stack.pth").write_text("\n".join(dict.fromkeys(paths)) + "\n")
    return where


def _ab(capsys, *argv) -> tuple[int, dict, str]:
    code = main(["ab", *argv, "--json"])
    out = capsys.readouterr()
    return code, json.loads(out.out), out.err


def test_ab_on_two_venvs_catches_a_planted_2x(tmp_path, capsys):
    venv = _venv_sharing_this_one(tmp_path / "venv-b")
    code, got, err = _ab(capsys, "--b", str(venv), "--figures", "count", "--rounds", ROUNDS,
                         "--plant-b", "1.0", "--fail", "count_s:+20%", "-o",
                         str(tmp_path / "out"))
    (figure,) = got["figures"]
    assert figure["verdict"] == "slower" and figure["p"] < 0.01, figure
    assert figure["failed_checks"] == ["count_s:+20%"] and code == 1
    assert 1.5 < figure["ratio"] < 3 and figure["method"] == "Wilcoxon signed-rank"
    a, b = (load_results(tmp_path / "out" / f"{s}.json") for s in "ab")
    assert b.settings["python"] == str(venv / "bin" / "python")
    assert a.settings["python"] != b.settings["python"]
    assert b.settings["ab_planted_b"] == "1" and "planted" in (tmp_path / "out" / "ab.md").read_text()
    assert len(a.records[0].metrics["count_s"].sample.values) == int(ROUNDS)


def test_ab_on_two_folders_sees_no_change_between_copies(tmp_path, tiny_checkpoint, capsys):
    import shutil

    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(tiny_checkpoint, a)
    shutil.copytree(tiny_checkpoint, b)
    # count only: it reads, while extract and strip end in an fsync, which waits on whatever
    # the rest of a busy CI machine is writing at that moment (heavy-tailed, bursty noise
    # that is no property of either side).
    code, got, err = _ab(capsys, "--checkpoint-a", str(a), "--checkpoint-b", str(b),
                         "--figures", "count", "--rounds", ROUNDS, "--alpha", "0.001",
                         "--fail", "count_s:+1%", "--fail", "count_s:-1%", "-o",
                         str(tmp_path / "out"))
    assert code == 0 and got["ok"], got
    for figure in got["figures"]:
        assert not figure["significant"] and figure["verdict"].startswith("no change detected")
    assert load_results(tmp_path / "out" / "b.json").settings["checkpoint"] == str(b)
    # The sides are ordinary results files: compare and report read them.
    assert main(["compare", str(tmp_path / "out" / "a.json"), str(tmp_path / "out" / "b.json"),
                 "-o", str(tmp_path / "cmp")]) == 0
    compared = (tmp_path / "cmp" / "compare.md").read_text()
    assert "count_s" in compared and "Wilcoxon signed-rank" in compared


def _projector_only(tmp_path: Path, tiny: Path) -> Path:
    folder = tmp_path / "stage1"
    folder.mkdir()
    assert main(["extract", str(tiny), "-o", str(folder / "mm_projector.bin")]) == 0
    return folder


@pytest.mark.parametrize("argv, says", [
    (["--b", "/nonexistent/python"], "not a Python interpreter or a venv folder"),
    (["--rounds", "5"], "5 rounds can never show a change at alpha 0.01: the test needs at "
                        "least 8"),
    (["--fail", "count_s:<=1"], "use a relative limit"),
    (["--fail", "decode_s:+5%"], "matches none of extract_s, strip_s, count_s"),
    (["--checkpoint", "{tiny}", "--checkpoint-a", "{tiny}"], "not both"),
    (["--checkpoint-b", "{stage1}"], "a projector folder; ab's figures need a full LLaVA"),
    (["--b", "{bare}", "--rounds", "8"], "B: "),
    (["-o", "{existing}"], "exists"),
], ids=["no-python", "too-few-rounds", "absolute-check", "unknown-metric", "both-checkpoints",
        "projector-folder", "venv-without-harness", "output-exists"])
def test_a_bad_side_is_one_line_and_exit_2(tmp_path, tiny_checkpoint, capsys, argv, says):
    fill = {"tiny": str(tiny_checkpoint)}
    if "{stage1}" in argv:
        fill["stage1"] = str(_projector_only(tmp_path, tiny_checkpoint))
    if "{bare}" in argv:
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "bare")],
                       check=True)
        fill["bare"] = str(tmp_path / "bare")
    if "{existing}" in argv:
        fill["existing"] = str(tmp_path / "existing")
        (tmp_path / "existing").mkdir()
    capsys.readouterr()
    out = tmp_path / "out"
    code = main(["ab", "-o", str(out), *(a.format(**fill) for a in argv)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and not out.exists()
    assert says in err[-1] and "Traceback" not in "\n".join(err), err
    if "{bare}" in argv:
        assert "No module named 'harness'" in err[-1]


def _pool(rounds=40, **change):
    rng = random.Random(5)
    pool = {arm: {"count": [(1 + plant) * rng.lognormvariate(0, 0.03) for _ in range(rounds)]}
            for arm, plant in ARMS}
    return {"arms": dict(ARMS), "size": 20, "alpha": 0.01, "wall_s": 60.0, "pool": pool,
            **change}


def test_a_stored_pool_is_analysed_again(tmp_path, capsys):
    path = tmp_path / "pool.json"
    path.write_text(json.dumps(_pool()))
    assert main(["bench", "ab-power", "--pool", str(path), "--size", "20"]) == 0
    table = capsys.readouterr().out
    assert "| count | +20% | 100.0% caught |" in table


@pytest.mark.parametrize("data, says", [
    ({"pool": [1]}, "not a pool written by bench ab-power"),
    (_pool(pool={arm: {"count": [1.0] * 40} for arm, _ in ARMS[:4]}), "not a pool"),
    (_pool(pool={**_pool()["pool"], "A/A": {"other": [1.0] * 40}}), "arm 'A/A' does not hold"),
    (_pool(pool={**_pool()["pool"], "+5%": {"count": [1.0] * 39 + [-1.0]}}),
     "+5% count: expected 40 positive finite values"),
    (_pool(pool={**_pool()["pool"], "+5%": {"count": [1.0] * 12}}),
     "+5% count: expected 40 positive finite values"),
    ("NaN", "bare NaN is not JSON"),
    (_pool(rounds=30), "30 rounds; --size 20 needs 40"),
], ids=["not-a-pool", "missing-arm", "other-figures", "negative", "short", "nan", "too-few"])
def test_a_bad_pool_is_one_line_and_exit_2(tmp_path, capsys, data, says):
    path = tmp_path / "pool.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    assert main(["bench", "ab-power", "--pool", str(path), "--size", "20"]) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and "\n" not in err and "Traceback" not in err, err
