"""`styleinject eval` on the tiny pipeline, and its one-line errors."""

from __future__ import annotations

import json

import pytest

from styleinject.cli import main


def test_eval_command_writes_the_report(tiny_pipeline_path, tiny_clip_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"text": "a red fox", "category": "animals"}\n{"text": "a cake", "category": "food"}\n'
                       '{"text": "a tower", "category": "cities"}\n')
    out = tmp_path / "report"
    code = main(["eval", "--base-model", str(tiny_pipeline_path), "--prompts", str(prompts),
                 "--categories", "animals", "food", "--limit", "2", "--seeds", "0", "--steps", "2",
                 "--resolution", "64", "--scorer", "clipscore", "--clip-model", str(tiny_clip_dir),
                 "--device", "cpu", "--output", str(out)])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert [s["category"] for s in report["samples"]] == ["animals", "food"]
    assert report["settings"]["width"] == 64 and report["settings"]["steps"] == 2
    assert (out / "report.csv").is_file() and (out / "summary.csv").is_file()
    assert not (out / "images").exists()
    assert "clipscore:" in capsys.readouterr().out


@pytest.mark.parametrize(("extra", "message"), [
    (["--base-model", "./no/such/pipe"], "--base-model ./no/such/pipe: no such folder"),
    (["--adapter", "/no/adapter"], "--adapter /no/adapter: not an adapter folder"),
    (["--prompts", "/no/prompts.jsonl"], "--prompts /no/prompts.jsonl: no such file"),
    (["--clip-model", "/no/clip"], "--clip-model /no/clip: no such folder"),
    (["--pickscore-processor", "~/no/proc"], "--pickscore-processor ~/no/proc: no such folder"),
    (["--categories", "dogs"], "unknown category dogs"),
    (["--resolution", "60"], "--resolution 60: give a multiple of 8"),
])
def test_errors_are_one_line_with_exit_2(tiny_pipeline_path, tmp_path, capsys, extra, message):
    args = ["eval", "--base-model", str(tiny_pipeline_path), "--output", str(tmp_path / "out"), *extra]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_missing_scorer_weights_exit_2(tiny_pipeline_path, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    args = ["eval", "--base-model", str(tiny_pipeline_path), "--limit", "1", "--seeds", "0", "--steps", "1",
            "--resolution", "64", "--clip-model", str(empty), "--device", "cpu", "--output", str(tmp_path / "o")]
    assert main(args) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
    assert last.startswith("styleinject eval: error: could not load the CLIP model") and "--clip-model" in last
