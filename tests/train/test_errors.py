"""Library errors name fields; the CLI says them as flags, the API as its JSON field names."""

from __future__ import annotations

import pickle
import re

import pytest

from styleinject.errors import FieldError, api_message, option_names
from styleinject.names import ARCHIVE_SUFFIXES, TRAIN_KINDS
from styleinject.train.cli import field_flags, main
from styleinject.train.config import TrainConfig, TrainingError, resume_fixed_fields
from styleinject.train.data import DatasetError, is_archive, load_dataset
from tests.train.helpers import image_folder


def _cfg(**kw) -> TrainConfig:
    kw = {"kind": "finetune", "base_model": "b", "data": "d", "output_dir": "o", "steps": 1, **kw}
    return TrainConfig(**kw)


def test_field_error_renders_fields_and_keeps_user_text_verbatim():
    exc = FieldError("{path}: {learning_rate} must be > 0 (got {got!r})", path="we{ir}d {x}.png", got=-1.0)
    assert exc.fields == ("learning_rate",)
    assert str(exc) == "we{ir}d {x}.png: learning_rate must be > 0 (got -1.0)"
    assert exc.render({"learning_rate": "--lr"}) == "we{ir}d {x}.png: --lr must be > 0 (got -1.0)"
    assert exc.render(str.upper).startswith("we{ir}d {x}.png: LEARNING_RATE")
    assert isinstance(exc, ValueError)
    copy = pickle.loads(pickle.dumps(TrainingError.joined([exc, TrainingError("{data} {{literal}}")])))
    assert type(copy) is TrainingError and copy.fields == ("learning_rate", "data")
    assert str(copy) == "we{ir}d {x}.png: learning_rate must be > 0 (got -1.0); data {literal}"


def test_train_config_error_for_the_api_names_fields_without_flags():
    with pytest.raises(TrainingError) as info:
        _cfg(learning_rate=-1.0, gradient_accumulation_steps=0).check()
    message = api_message(info.value)
    assert "--" not in message
    assert "learning_rate must be > 0 (got -1.0)" in message
    assert "gradient_accumulation_steps must be >= 1" in message
    with pytest.raises(TrainingError) as info:
        _cfg(kind="distill").check()
    assert api_message(info.value) == str(info.value) == \
        "distill needs teacher_model (a diffusers pipeline folder or hub id)"


def test_dataset_error_for_the_api_uses_the_api_field_names(tmp_path):
    with pytest.raises(DatasetError) as info:
        load_dataset(tmp_path / "missing{0}", "finetune")
    assert api_message(info.value) == f"{tmp_path / 'missing{0}'}: dataset not found; check the dataset_id path"
    folder = image_folder(tmp_path / "we{ir}d", n=1)
    (folder / "img0.txt").unlink()
    with pytest.raises(DatasetError) as info:
        load_dataset(folder, "finetune")
    message = api_message(info.value)
    assert "--" not in message and message.endswith("or pass skip_bad to leave it out")
    assert info.value.fields == ("skip_bad",)


def test_cli_prints_the_flags(tmp_path, capsys):
    data = image_folder(tmp_path / "data", n=1)
    argv = ["finetune", "--base-model", str(tmp_path), "--data", str(data), "--output", str(tmp_path / "out"),
            "--steps", "1", "--lr", "-1", "--grad-accum", "0"]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "--lr must be > 0 (got -1.0)" in err and "--batch-size and --grad-accum must be >= 1" in err
    assert "learning_rate" not in err


def test_flag_map_comes_from_the_parser():
    flags = field_flags("distill")
    assert flags["learning_rate"] == "--lr" and flags["gradient_accumulation_steps"] == "--grad-accum"
    assert flags["output_dir"] == "--output" and flags["skip_bad"] == "--skip-bad"
    assert flags["teacher_model"] == "--teacher-model" and flags["validation_prompts"] == "--validation-prompt"
    config_fields = set(TrainConfig.__dataclass_fields__)
    cli_only = {"lora", "no_dma", "no_sta", "random_crop", "rank", "num_styles", "alpha", "target_modules",
                "style_modules", "conv_target_modules", "preset", "a_init"}  # adapter settings and switches
    assert set(flags) - config_fields <= cli_only
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--clip-model")
    assert option_names(parser) == {"clip_model": "--clip-model"}


def test_names_live_in_one_place():
    assert TRAIN_KINDS == ("finetune", "distill", "dreambooth")
    assert all(is_archive(f"data{suffix.upper()}") for suffix in ARCHIVE_SUFFIXES)
    fixed = resume_fixed_fields()
    assert "seed" in fixed and "adapter" in fixed and "learning_rate" in fixed
    assert not {"steps", "checkpoint_every", "mixed_precision", "resume", "output_dir"} & set(fixed)


def test_every_library_message_mentioning_an_option_uses_a_placeholder():
    """No command-line flag is written into library text outside the CLI modules."""
    from pathlib import Path

    import styleinject

    root = Path(styleinject.__file__).parent
    offenders = []
    for path in [*root.glob("train/*.py"), *root.glob("eval/*.py"), *root.glob("eval/scorers/*.py")]:
        if path.name == "cli.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if re.search(r"[\"'][^\"']*\s--[a-z]", code) and "``" not in code:
                offenders.append(f"{path.name}:{number}: {line.strip()}")
    assert not offenders, offenders
