"""`complexity-dist compare-runs` (complexity_dist/train/compare.py) on metrics files with known answers."""
import json
import random

import pytest

from complexity_dist.cli import main


def write_run(path, losses, skipped=()):
    path.mkdir()
    rows = [{"step": s, "loss": None if s in skipped else loss, "skipped": s in skipped}
            for s, loss in enumerate(losses, 1)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def curve(steps=100, noise=0.05, seed=0):
    """A decaying loss with per-step batch noise, as a pretraining curve looks."""
    rng = random.Random(seed)
    return [2.0 + 8.0 * 0.97 ** s + rng.gauss(0, noise) for s in range(steps)]


def test_same_batches_with_numeric_differences_are_within_noise(tmp_path, capsys):
    a = curve()
    rng = random.Random(1)
    b = [x * (1 + rng.gauss(0, 1e-4)) for x in a]  # another layout: same batches, other rounding
    assert main(["compare-runs", write_run(tmp_path / "a", a), write_run(tmp_path / "b", b)]) == 0
    out = capsys.readouterr().out
    assert "within noise" in out and "100 common steps (1-100)" in out


def test_a_shifted_curve_is_not_within_noise(tmp_path, capsys):
    a = curve()
    b = [x + (0.1 if s >= 60 else 0.0) for s, x in enumerate(a)]  # 2 per-step noise units, from step 61
    assert main(["compare-runs", write_run(tmp_path / "a", a), write_run(tmp_path / "b", b)]) == 1
    out = capsys.readouterr().out
    assert "NOT within noise: 2 of 5 windows" in out
    assert [line.split()[0] for line in out.splitlines() if line.endswith("outside")] == ["61-80", "81-100"]


def test_skipped_steps_and_a_trailing_part_window(tmp_path, capsys):
    a = curve(steps=45)
    b = list(a)
    b[9] = float("nan")  # a skipped step in B: left out, not compared
    code = main(["compare-runs", write_run(tmp_path / "a", a), write_run(tmp_path / "b", b, skipped={10}),
                 "--window", "20"])
    out = capsys.readouterr().out
    assert code == 0 and "44 common steps" in out
    assert [line.split()[0] for line in out.splitlines() if "-" in line.split()[0]] == ["1-21", "22-45"]


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("short", "share 10 logged steps from step 0, fewer than one window of 20"),
    ("not json", "holds no metrics records"),
])
def test_unusable_input_exits_2(tmp_path, capsys, case, message):
    a = write_run(tmp_path / "a", curve(steps=10))
    b = {"missing": str(tmp_path / "nowhere"), "short": write_run(tmp_path / "b", curve(steps=10))}.get(case)
    if case == "not json":
        (tmp_path / "b.jsonl").write_text("step,loss\n")
        b = str(tmp_path / "b.jsonl")
    assert main(["compare-runs", a, b]) == 2
    assert message in capsys.readouterr().err
