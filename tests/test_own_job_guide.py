"""docs/own-job.md: its code is the files in docs/examples/, verbatim, and its commands run
as written, in order, in a directory holding those files (the ``python -m
fastcore.train`` lines in this process, as ``main(argv)`` with the directory on
``sys.path`` as ``python -m`` puts it there; ``python FILE.py`` lines with runpy)."""

from __future__ import annotations

import json
import re
import runpy
import shlex
import shutil
import sys
from pathlib import Path

import pytest
import torch

from fastcore.train import checkpoint as ckpt_io
from fastcore.train.cli import main

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "own-job.md"
EXAMPLES = ROOT / "docs" / "examples"
VERBATIM = re.compile(r"<!-- verbatim: (\S+) -->\n```\w+\n(.*?)```\n", re.S)
BASH = re.compile(r"```bash\n(.*?)```", re.S)
CSV_COMMAND = (
    "python -m fastcore.train --config my_job.yaml data.path=points.csv run_dir=runs/my_csv"
)


def example_files() -> list[Path]:
    return sorted(p for p in EXAMPLES.iterdir() if p.is_file())


NUMBER = re.compile(r"[-+]?\d+\.?\d*(?:e[-+]?\d+)?")


def same_line(quoted: str, actual: str) -> bool:
    """``actual`` says what the guide quotes, its numbers to 4 significant digits (another
    CPU may round the last ones differently)."""
    if NUMBER.sub("#", quoted) != NUMBER.sub("#", actual):
        return False
    pairs = zip(NUMBER.findall(quoted), NUMBER.findall(actual), strict=True)
    return all(float(a) == pytest.approx(float(b), rel=1e-4) for a, b in pairs)


def guide_commands() -> list[list[str]]:
    """Every line of the guide's bash blocks, split as a shell would (comments dropped)."""
    lines = [ln for block in BASH.findall(GUIDE.read_text()) for ln in block.splitlines()]
    return [words for words in (shlex.split(ln, comments=True) for ln in lines) if words]


def val_row(run_dir: Path, step: int) -> dict[str, float]:
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["kind"] == "val" and row["step"] == step:
            return {k: v for k, v in row.items() if k.startswith("val_")}
    raise AssertionError(f"no val row at step {step}")


def test_the_guide_shows_the_example_files_verbatim():
    found = dict(VERBATIM.findall(GUIDE.read_text()))
    assert sorted(found) == sorted(f"docs/examples/{p.name}" for p in example_files())
    for path, shown in found.items():
        assert shown == (ROOT / path).read_text(), f"docs/own-job.md's copy of {path} differs"


@pytest.fixture
def project(tmp_path, monkeypatch):
    """An empty directory with the example's files, as the current directory."""
    for f in example_files():
        shutil.copy(f, tmp_path / f.name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))  # what python -m does with the directory
    yield tmp_path
    sys.modules.pop("my_job", None)


def run_command(words: list[str], capsys) -> str:
    """Run one guide command; return what it printed on stdout."""
    capsys.readouterr()
    if words[:3] == ["python", "-m", "fastcore.train"]:
        code = main(words[3:])
        captured = capsys.readouterr()
        assert code == 0, f"{shlex.join(words)}: exit {code}\n{captured.err[-3000:]}"
        return captured.out
    assert len(words) == 2 and words[0] == "python" and words[1].endswith(".py"), words
    runpy.run_path(words[1], run_name="__main__")
    return capsys.readouterr().out


def test_the_guide_commands_run_as_written(project, capsys):
    commands = guide_commands()
    assert [shlex.join(c) for c in commands] == [
        "python -m fastcore.train --describe my_job",
        "python -m fastcore.train --config my_job.yaml",
        "python -m fastcore.train evaluate --run runs/my_job",
        "python -m fastcore.train evaluate --run runs/my_job --split test",
        "python predict_my_job.py",
        "python -m fastcore.train --config my_job.yaml --resume latest train.patience=null",
        "python -m fastcore.train evaluate --run runs/my_job --split test",
    ]
    text = GUIDE.read_text()
    outputs = [run_command(words, capsys) for words in commands[:5]]
    run_dir = project / "runs" / "my_job"

    # --describe: the job's own fields, with their ranges
    assert "  hidden: 64  # an int >= 1; width of each hidden layer" in outputs[0]
    assert "  points: 1000  # an int >= 10; points to generate" in outputs[0]

    # training stopped early; the guide quotes the log (on the CPU it was written on)
    stops = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    stops = [r for r in stops if r["kind"] == "stop"]
    best = ckpt_io.load(run_dir / "checkpoints" / "best.pt")
    newest = ckpt_io.step_checkpoints(run_dir / "checkpoints")[-1]
    if not torch.cuda.is_available():
        (stop,) = stops
        assert (stop["step"], stop["best_step"], best["step"]) == (240, 180, 180)
        assert ckpt_io.load(newest)["step"] == 240
        quoted = re.search(r"INFO (\[STOP\] step 240: .*)\n", text).group(1)
        (logged,) = re.findall(r"INFO (\[STOP\] .*)\n", (run_dir / "train.log").read_text())
        assert same_line(quoted, logged), (quoted, logged)
        quoted = re.search(r"(evaluate: runs/my_job/checkpoints/best\.pt .* on test .*)\n", text)
        printed = outputs[3].splitlines()[0]
        assert same_line(quoted.group(1), printed), (quoted.group(1), printed)

    # evaluate: best.pt's validation is exactly the logged one; the test split's files
    report = json.loads((run_dir / "eval" / "val-best.json").read_text())
    assert report["step"] == best["step"]
    assert report["metrics"] == val_row(run_dir, best["step"]) == best["metrics"]
    test = json.loads((run_dir / "eval" / "test-best.json").read_text())
    assert set(test["metrics"]) == {"test_loss", "test_accuracy", "test_balanced_accuracy"}
    assert test["samples"] == 200 and test["metrics"]["test_accuracy"] > 0.9
    predictions = torch.load(run_dir / "eval" / "test-best.pt", weights_only=True)
    assert set(predictions) == {"probability", "label", "index"}

    # the script: load_run's model is the one evaluate used
    assert "runs/my_job/checkpoints/best.pt: step" in outputs[4]
    assert f"test accuracy {test['metrics']['test_accuracy']:.3f}" in outputs[4]

    # train on, to the config's 40 epochs of 12 steps, and evaluate the new best.pt
    for words in commands[5:]:
        run_command(words, capsys)
    steps = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in steps if r["kind"] == "train") == 480
    best = ckpt_io.load(run_dir / "checkpoints" / "best.pt")
    assert json.loads((run_dir / "eval" / "test-best.json").read_text())["step"] == best["step"]


def test_the_guide_csv_command(project, capsys):
    # "Your own data": the CSV format the guide shows, and its command as written
    assert f"`{CSV_COMMAND}`" in " ".join(GUIDE.read_text().split())
    g = torch.Generator().manual_seed(1)
    xy = torch.randn(100, 2, generator=g)
    rows = [f"{x:.4f},{y:.4f},{int(x * y > 0)}" for x, y in xy.tolist()]
    (project / "points.csv").write_text("x,y,label\n" + "\n".join(rows) + "\n")
    run_command(shlex.split(CSV_COMMAND), capsys)
    log = (project / "runs" / "my_csv" / "train.log").read_text()
    assert "[SANITY] points: 60 train, 20 val, 20 test" in log
    (project / "bad.csv").write_text("x,y,label\n0.1,0.2,2\n")
    assert main(["--config", "my_job.yaml", "data.path=bad.csv", "run_dir=runs/bad"]) == 2
    assert capsys.readouterr().err == (
        "fastcore.train: error: ValueError: data.path 'bad.csv': expected x,y,label rows with "
        "labels 0 or 1\n"
    )
