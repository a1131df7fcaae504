"""stn.runs: the one classification of config keys behind may_resume / is_stale, atomic writes
and which folders a run may use. (fit's use of them, end to end, is in test_train.py and test_faults.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stn.compose import compose
from stn.config import Config, schema_keys, to_dict, to_yaml
from stn.runs import RunFolderError, check_usable, is_stale, key_class, may_resume, write_atomic


def test_every_config_key_has_exactly_one_class() -> None:
    classes = {key: key_class(key) for key in schema_keys()}
    assert set(classes.values()) == {"identity", "outcome", "runtime"}
    # What is trained and how it is optimised:
    for key in ("dataset.name", "dataset.rotation", "model.name", "transformer.type", "seed", "trainer.lr",
                "trainer.batch_size", "trainer.lr_step", "trainer.momentum", "trainer.schedule", "trainer.nesterov",
                "trainer.loc_lr_scale"):
        assert classes[key] == "identity", key
    # Changes the result, but may change between invocations of one run:
    for key in ("trainer.iterations", "trainer.eval_every", "dataset.test_limit", "trainer.channels_last"):
        assert classes[key] == "outcome", key
    # Where and how it runs and logs:
    for key in ("data_dir", "run_dir", "runs_dir", "trainer.device", "trainer.resume", "logger.mode", "logger.tags"):
        assert classes[key] == "runtime", key


@pytest.mark.parametrize(
    ("change", "resumable", "stale"),
    [
        ("trainer.iterations=40", True, True),  # continue longer: fine; a finished 20-step cell is not a 40-step one
        ("dataset.test_limit=50", True, True),
        ("trainer.lr=0.5", False, True),
        ("dataset=RTS", False, True),
        ("seed=1", False, True),
        ("trainer.device=cpu", True, False),
        ("logger.mode=disabled", True, False),
        ("runs_dir=elsewhere", True, False),
    ],
)
def test_may_resume_and_is_stale_answer_different_questions(change: str, resumable: bool, stale: bool) -> None:
    saved = to_dict(compose(["trainer=smoke"]))
    now = compose(["trainer=smoke", change])
    assert (may_resume(saved, now) == []) is resumable
    assert (is_stale(saved, now) != []) is stale
    assert set(may_resume(saved, now)) <= set(is_stale(saved, now))  # what blocks a resume also makes stale
    assert is_stale(saved, compose(["trainer=smoke"])) == []


def test_a_key_added_after_a_run_was_saved_compares_as_its_default() -> None:
    """A checkpoint written before a config key existed resumes when the key keeps its default (the default
    is the old behaviour), and not when it is set to something else."""
    saved = to_dict(compose(["trainer=smoke", "dataset=RTS"]))
    for section, key in (("dataset", "corner_direction"), ("trainer", "schedule"), ("trainer", "nesterov")):
        del saved[section][key]
    assert may_resume(saved, compose(["trainer=smoke", "dataset=RTS"])) == []
    assert is_stale(saved, compose(["trainer=smoke", "dataset=RTS"])) == []
    changed = may_resume(saved, compose(["trainer=smoke", "dataset=RTS", "trainer.schedule=onecycle"]))
    assert changed == ["trainer.schedule: 'step' -> 'onecycle'"]


def test_write_atomic_keeps_the_old_file_when_writing_fails(tmp_path: Path) -> None:
    path = tmp_path / "summary.json"
    write_atomic(path, '{"old": 1}\n')

    def broken(tmp: Path) -> None:
        tmp.write_text('{"new"')  # half written, then the writer dies
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, broken)
    assert json.loads(path.read_text()) == {"old": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]  # no temporary file left


def test_which_folders_a_run_may_use(tmp_path: Path) -> None:
    check_usable(tmp_path / "new")  # missing: created later
    (tmp_path / "empty").mkdir()
    check_usable(tmp_path / "empty")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text(to_yaml(Config()))
    (tmp_path / "run" / "metrics.jsonl").write_text("")
    check_usable(tmp_path / "run")  # an stn run (that never reached its first checkpoint)
    (tmp_path / "thesis").mkdir()
    (tmp_path / "thesis" / "chapter1.tex").write_text("...")
    with pytest.raises(RunFolderError, match="chapter1.tex"):
        check_usable(tmp_path / "thesis")
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunFolderError, match="is a file"):
        check_usable(tmp_path / "file")
