"""`srft eval --out`: an output never touches an input, and --overwrite replaces only the command's own files."""

from __future__ import annotations

import argparse

import pytest

from megatron_srft.cli import eval as eval_cli
from megatron_srft.cli import main as cli_main
from megatron_srft.errors import UserError


def _args(model, data, out, overwrite=False):
    p = argparse.ArgumentParser()
    eval_cli.add_arguments(p)
    argv = ["--model", str(model), "--data", str(data), "--out", str(out)] + (["--overwrite"] if overwrite else [])
    return p.parse_args(argv)


def _check(args):
    eval_cli._check_args(args, eval_cli.resolve_settings(args))


@pytest.fixture
def work(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "test.jsonl").write_text('{"prompt": "1+1", "answer": "2"}\n')
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    return tmp_path


def test_out_that_holds_or_is_an_input_is_refused_even_with_overwrite(work, capsys):
    before = sorted(str(p.relative_to(work)) for p in work.rglob("*"))
    for out, words in ((work, "contains the input"), (work / "model", "is the input"),
                       (work / "model" / "eval", "lies inside the input"), (work / "test.jsonl", "is the input")):
        with pytest.raises(UserError, match=words):
            _check(_args(work / "model", work / "test.jsonl", out, overwrite=True))
    rc = cli_main(["eval", "--model", str(work / "model"), "--data", str(work / "test.jsonl"), "--out", str(work),
                   "--overwrite"])
    assert rc == 2 and "contains the input" in capsys.readouterr().err
    assert sorted(str(p.relative_to(work)) for p in work.rglob("*")) == before


def test_overwrite_replaces_only_the_results_files(work):
    out = work / "notes"
    _check(_args(work / "model", work / "test.jsonl", out))  # other files: no --overwrite needed
    eval_cli._write_outputs(out, {"summary": 1}, "| t |\n", [{"a": 1}])
    with pytest.raises(UserError, match="already holds results.json, results.md, samples.jsonl"):
        _check(_args(work / "model", work / "test.jsonl", out))
    _check(_args(work / "model", work / "test.jsonl", out, overwrite=True))
    eval_cli._write_outputs(out, {"summary": 2}, "| u |\n", [])
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt", "results.json", "results.md", "samples.jsonl"]
    assert (out / "keep.txt").read_text() == "mine" and (out / "results.md").read_text() == "| u |\n"
    assert sorted(p.name for p in work.iterdir()) == ["model", "notes", "test.jsonl"]  # no leftovers


@pytest.mark.parametrize("command", ["train", "eval"])
def test_vllm_info_lines_are_quiet_in_training_and_evaluation(tmp_path, monkeypatch, command):
    """vLLM reads VLLM_LOGGING_LEVEL when imported: the commands set it (warnings only) before anything imports
    vLLM, on every rank; a user's own setting wins."""
    import os

    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "placeholder")
    monkeypatch.delenv("VLLM_LOGGING_LEVEL")
    argv = {"train": ["train", "--config", str(tmp_path / "missing.yaml")],
            "eval": ["eval", "--model", str(tmp_path / "none"), "--data", "x.jsonl", "--out", str(tmp_path / "o")]}
    assert cli_main(argv[command]) == 2
    assert os.environ["VLLM_LOGGING_LEVEL"] == "WARNING"
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "DEBUG")
    assert cli_main(argv[command]) == 2 and os.environ["VLLM_LOGGING_LEVEL"] == "DEBUG"


def test_make_toy_overwrite_never_removes_a_directory_it_did_not_write(tmp_path, capsys):
    mine = tmp_path / "project"
    mine.mkdir()
    (mine / "notes.txt").write_text("the user's")
    assert cli_main(["make-toy", "--out", str(mine), "--overwrite"]) == 2
    assert "not a toy written by make-toy" in capsys.readouterr().err
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
