"""Every CLI answers a user's mistake in one line with exit status 2 and no traceback (``wallaroo.cli_errors``):
a missing environment variable (naming it, the recipe and what it must point to), a missing or unreadable
file (naming it), a size outside the model's buckets (listing them). ``--debug`` / ``WALLAROO_DEBUG=1`` show
the traceback; programming errors always do.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from wallaroo.cli_errors import RunStopped, UsageError, run_cli

REPO = Path(__file__).resolve().parents[1]
SIZES = "48x48, 72x48, 48x72"  # the tiny preset's buckets


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    """Random tiny stage-4 weights (with VQ and tokenizer) as a weights directory."""
    from wallaroo.config import get_preset
    from wallaroo.model import WallarooModel
    from wallaroo.tokens import tokenizer_for
    from wallaroo.vq import build_vq
    from wallaroo.weights import export_weights_dir

    torch.manual_seed(0)
    cfg = get_preset("tiny", edit=True)
    tok, _ = tokenizer_for(cfg)
    out = tmp_path_factory.mktemp("ckpt") / "weights"
    return export_weights_dir(WallarooModel(cfg), build_vq(cfg.vq), tok, cfg, out, stage="stages.Stage4")


@pytest.fixture(autouse=True)
def no_debug(monkeypatch):
    monkeypatch.delenv("WALLAROO_DEBUG", raising=False)


def one_line(capsys, prog: str) -> str:
    """The single stderr line of a refused command, without its ``PROG: error:`` prefix."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err
    assert len(lines) == 1, err
    prefix = f"python -m {prog}: error: "
    assert lines[0].startswith(prefix), lines[0]
    return lines[0][len(prefix) :]


# ----------------------------------------------------------------------------------------------------
# The helper
# ----------------------------------------------------------------------------------------------------


def test_run_cli_maps_user_errors_and_keeps_programming_errors(capsys, monkeypatch):
    def raising(exc: BaseException):
        def main(args: list[str]) -> None:
            raise exc

        return main

    cases = [
        (UsageError("size 1x1 is not one of the sizes"), 2, "size 1x1 is not one of the sizes"),
        (SystemExit("give exactly one of --prompt or --prompts-file"), 2, "give exactly one of --prompt or"),
        (FileNotFoundError(2, "No such file or directory", "/x/y.ckpt"), 2, "No such file or directory: /x/y.ckpt"),
        (PermissionError(13, "Permission denied", "/root/z"), 2, "Permission denied: /root/z"),
        (FileNotFoundError("weights not found: /x"), 2, "weights not found: /x"),
        (RunStopped("stopped at global step 9: ...\nsecond line"), 1, "stopped at global step 9: ...; second line"),
    ]
    for exc, status, text in cases:
        assert run_cli(raising(exc), [], prog="python -m tool") == status
        assert one_line(capsys, "tool").startswith(text)
    with pytest.raises(KeyError):  # a programming error keeps its traceback
        run_cli(raising(KeyError("bug")), [], prog="python -m tool")
    with pytest.raises(UsageError):  # --debug shows the traceback of a user error too ...
        run_cli(raising(UsageError("x")), ["--debug"], prog="python -m tool")
    monkeypatch.setenv("WALLAROO_DEBUG", "1")
    with pytest.raises(FileNotFoundError):  # ... and so does WALLAROO_DEBUG=1
        run_cli(raising(FileNotFoundError("nope")), [], prog="python -m tool")
    monkeypatch.delenv("WALLAROO_DEBUG")
    seen = []
    assert run_cli(lambda args: seen.append(args) or 3, ["a", "--debug", "b"], prog="p") == 3
    assert seen == [["a", "b"]]  # --debug never reaches the tool's own parser
    assert run_cli(lambda args: Path("."), [], prog="p") == 0
    with pytest.raises(SystemExit) as info:  # argparse's own errors (usage + message, status 2) are untouched
        run_cli(lambda args: __import__("argparse").ArgumentParser().parse_args(args), ["--nope"], prog="p")
    assert info.value.code == 2


# ----------------------------------------------------------------------------------------------------
# wallaroo.fit
# ----------------------------------------------------------------------------------------------------

SEVEN_B = {"WALLAROO_QWEN_DIR": "/models/qwen", "WALLAROO_VQ": "/models/vq_ds16_t2i.pt", "WALLAROO_DATA": "/data"}


def test_fit_names_missing_environment_variables(monkeypatch, capsys):
    from wallaroo.fit import cli

    for name in SEVEN_B:
        monkeypatch.delenv(name, raising=False)
    assert cli(["--stage", "stage1.yaml", "--print_config"]) == 2
    line = one_line(capsys, "wallaroo.fit")
    assert line.startswith(f"the recipe {REPO / 'stages' / 'stage1.yaml'} reads the environment variables ")
    assert "WALLAROO_QWEN_DIR (a local Qwen2.5-VL-7B-Instruct directory" in line
    assert "WALLAROO_VQ (LlamaGen's VQ tokenizer weights, vq_ds16_t2i.pt)" in line
    assert "WALLAROO_DATA (the shard root" in line and "WALLAROO_RUNS" not in line  # that one has a default
    # With the first two set, the one still missing is named alone.
    monkeypatch.setenv("WALLAROO_QWEN_DIR", "/models/qwen")
    monkeypatch.setenv("WALLAROO_VQ", "/models/vq.pt")
    assert cli(["--stage", "stage2.yaml", "--print_config"]) == 2
    line = one_line(capsys, "wallaroo.fit")
    assert "stage2.yaml reads the environment variable WALLAROO_DATA (the shard root, one folder per task" in line
    assert line.endswith("not set: export WALLAROO_DATA=...")
    with pytest.raises(UsageError, match="WALLAROO_DATA"):
        cli(["--debug", "--stage", "stage2.yaml", "--print_config"])


def test_every_variable_the_recipes_read_is_described():
    from wallaroo.fit import ENV_VARS, STAGES_DIR, required_env

    for recipe in STAGES_DIR.rglob("*.yaml"):
        assert set(required_env(str(recipe))) <= set(ENV_VARS), recipe
    assert required_env(str(STAGES_DIR / "stage4.yaml")) == ["WALLAROO_QWEN_DIR", "WALLAROO_VQ", "WALLAROO_DATA"]


@pytest.fixture
def quiet_lightning():
    """Lightning's INFO lines ("GPU available: ...") go to a handler of its own, on the stderr of the moment it
    was imported (another test's capture): not what these tests check."""
    import logging

    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    yield
    for logger, level in zip(loggers, levels, strict=True):
        logger.setLevel(level)


def test_fit_names_a_missing_recipe_shard_folder_and_weights_file(monkeypatch, tmp_path, capsys, quiet_lightning):
    from datamodules.shapes import write_shapes_shards
    from wallaroo.fit import cli

    assert cli(["--stage", "stage9.yaml"]) == 2
    line = one_line(capsys, "wallaroo.fit")
    assert line.startswith("stage config 'stage9.yaml' not found") and "shapes/stage1.yaml" in line

    monkeypatch.setenv("WALLAROO_SHAPES", str(tmp_path))
    tiny = ["--stage", "shapes/stage1.yaml", "--model.init_args.preset", "tiny", "--trainer.max_steps", "1",
            "--data.init_args.num_workers", "0", "--trainer.enable_progress_bar", "false"]  # fmt: skip
    assert cli(tiny) == 2  # no shards under WALLAROO_SHAPES yet
    assert one_line(capsys, "wallaroo.fit").startswith(f"shard '{tmp_path}/data/t2i'")
    write_shapes_shards(str(tmp_path / "data"), 8, seed=0, tasks=("t2i",), workers=1)
    assert cli([*tiny, "--model.init_args.overrides.vq_path", "null"]) == 2  # nor the pre-trained weights
    assert one_line(capsys, "wallaroo.fit") == f"weights not found: {tmp_path}/pretrain/last.ckpt"


# ----------------------------------------------------------------------------------------------------
# wallaroo.generate, wallaroo.evaluate
# ----------------------------------------------------------------------------------------------------


def test_generate_mistakes(tiny_ckpt, tmp_path, capsys):
    from wallaroo.generate import cli

    out = ["--out", str(tmp_path / "out")]
    cases = [
        (["t2i", "--ckpt", str(tmp_path / "nope.ckpt"), "--prompt", "x", "--size", "48x48", *out],
         f"--ckpt {tmp_path}/nope.ckpt: no such file or directory"),
        (["t2i", "--ckpt", str(tiny_ckpt), "--prompt", "x", "--size", "100x100", *out],
         f"--size 100x100: size 100x100 is not one of this model's sizes: {SIZES}"),
        (["t2i", "--ckpt", str(tiny_ckpt), "--prompt", "x", "--size", "big", *out],
         "--size big: cannot parse size 'big': expected WIDTHxHEIGHT, e.g. '704x352'"),
        (["t2i", "--ckpt", str(tiny_ckpt), "--prompts-file", str(tmp_path / "p.txt"), "--size", "48x48", *out],
         f"--prompts-file {tmp_path}/p.txt: no such file"),
        (["edit", "--ckpt", str(tiny_ckpt), "--image", str(tmp_path / "in.png"), "--instruction", "x", *out],
         f"--image {tmp_path}/in.png: no such file"),
        (["understand", "--ckpt", str(tiny_ckpt), "--image", str(tmp_path), "--question", "x"],
         f"--image {tmp_path}: not a file"),
        (["t2i", "--ckpt", str(tiny_ckpt), "--size", "48x48", *out], "give exactly one of --prompt or --prompts-file"),
    ]  # fmt: skip
    for argv, expected in cases:
        assert cli(argv) == 2, argv
        assert one_line(capsys, "wallaroo.generate") == expected
    assert not (tmp_path / "out").exists()


def test_evaluate_mistakes(tiny_ckpt, tmp_path, capsys):
    from wallaroo.evaluate import cli

    prompts = tmp_path / "evaluation_metadata.jsonl"
    prompts.write_text(json.dumps({"tag": "single_object", "prompt": "a red circle"}) + "\n")
    out = ["--out", str(tmp_path / "out")]
    cases = [
        (["shapes", "--ckpt", str(tmp_path / "nope"), *out], f"--ckpt {tmp_path}/nope: no such file or directory"),
        (["geneval", "--ckpt", str(tiny_ckpt), "--prompts", str(prompts), *out],  # the default 512x512
         f"--size 512x512: size 512x512 is not one of this model's sizes: {SIZES}"),
        (["dpg", "--ckpt", str(tiny_ckpt), "--prompts", str(prompts), "--size", "96x96", *out],
         f"--size 96x96: size 96x96 is not one of this model's sizes: {SIZES}"),
        (["geneval", "--ckpt", str(tiny_ckpt), "--prompts", str(tmp_path / "meta.jsonl"), *out],
         f"--prompts {tmp_path}/meta.jsonl: no such file"),
        (["imgedit", "--ckpt", str(tiny_ckpt), "--edits", str(prompts), "--images", str(tmp_path / "imgs"), *out],
         f"--images {tmp_path}/imgs: no such dir"),
        (["fid", "--generated", str(tmp_path / "gen"), "--reference", str(tmp_path)],
         f"--generated {tmp_path}/gen: no such dir"),
    ]  # fmt: skip
    for argv, expected in cases:
        assert cli(argv) == 2, argv
        assert one_line(capsys, "wallaroo.evaluate") == expected
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------
# wallaroo.convert, wallaroo.demo, datamodules.convert
# ----------------------------------------------------------------------------------------------------


def test_convert_mistakes(tiny_ckpt, tmp_path, capsys):
    from wallaroo.convert import cli

    cases = [
        (["export", "--ckpt", str(tmp_path / "last.ckpt"), "--out", str(tmp_path / "w")],
         f"--ckpt {tmp_path}/last.ckpt: no such file or directory"),
        (["official", "--ckpt", str(tiny_ckpt), "--qwen", str(tmp_path / "qwen"), "--out", str(tmp_path / "w")],
         f"--qwen {tmp_path}/qwen: no such file or directory"),
        (["export", "--ckpt", str(tiny_ckpt), "--vq", str(tmp_path / "vq.pt"), "--out", str(tmp_path / "w")],
         f"--vq {tmp_path}/vq.pt: no such file or directory"),
        (["consolidate", "--ckpt", str(tiny_ckpt / "wallaroo.json"), "--out", str(tmp_path / "w.safetensors")],
         f"--ckpt {tiny_ckpt}/wallaroo.json: not a directory"),
    ]  # fmt: skip
    for argv, expected in cases:
        assert cli(argv) == 2, argv
        assert one_line(capsys, "wallaroo.convert") == expected
    assert not (tmp_path / "w").exists()


def test_demo_names_an_unusable_run_directory(tmp_path, capsys):
    from wallaroo.demo import cli

    (tmp_path / "file").write_text("not a directory")
    assert cli(["--quick", "--out", str(tmp_path / "file" / "run")]) == 2
    assert one_line(capsys, "wallaroo.demo") == f"Not a directory: {tmp_path}/file/run/data"


def test_data_converter_mistakes(tmp_path, capsys):
    from datamodules.convert import cli

    images = tmp_path / "images"
    images.mkdir()
    records = tmp_path / "records.jsonl"
    records.write_text(json.dumps({"image": "a.png", "caption_en": "a red circle"}) + "\n")
    out = ["--out", str(tmp_path / "shards")]
    cases = [
        (["t2i", "--images", str(images), "--captions", str(tmp_path / "captions.jsonl"), *out],
         f"--captions {tmp_path}/captions.jsonl: no such file"),
        (["t2i", "--images", str(tmp_path / "imgs"), "--captions", str(records), *out],
         f"--images {tmp_path}/imgs: no such dir"),
        (["und", "--json", str(tmp_path / "llava.json"), "--images", str(images), *out],
         f"--json {tmp_path}/llava.json: no such file"),
        (["edit", "--json", str(images), "--images", str(images), *out], f"--json {images}: not a file"),
        (["imagenet", "--root", str(records), "--classes", str(records), *out], f"--root {records}: not a directory"),
        (["t2i", "--images", str(images), "--captions", str(records), "--jpeg-quality", "0", *out],
         "--jpeg-quality must be in 1..100, got 0"),
    ]  # fmt: skip
    for argv, expected in cases:
        assert cli(argv) == 2, argv
        assert one_line(capsys, "datamodules.convert") == expected
    assert not (tmp_path / "shards").exists()


# ----------------------------------------------------------------------------------------------------
# The real command lines
# ----------------------------------------------------------------------------------------------------


def _run(*args: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in (*SEVEN_B, "WALLAROO_DEBUG")}
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env={**base, "OMP_NUM_THREADS": "1", **env},
                          capture_output=True, text=True, timeout=300)  # fmt: skip


@pytest.mark.slow
def test_python_m_fit_and_generate_answer_in_one_line(tiny_ckpt, tmp_path):
    done = _run("wallaroo.fit", "--stage", "stage1.yaml", "--print_config")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("python -m wallaroo.fit: error: the recipe ") and "WALLAROO_QWEN_DIR (a local" in line

    done = _run("wallaroo.generate", "t2i", "--ckpt", str(tiny_ckpt), "--prompt", "x", "--size", "100x100",
                "--out", str(tmp_path))  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip() == (
        f"python -m wallaroo.generate: error: --size 100x100: size 100x100 is not one of this model's sizes: {SIZES}"
    )
    done = _run("wallaroo.generate", "t2i", "--ckpt", str(tmp_path / "nope"), "--prompt", "x", "--size", "48x48",
                "--out", str(tmp_path), WALLAROO_DEBUG="1")  # fmt: skip
    assert done.returncode == 1 and "Traceback" in done.stderr and "UsageError: --ckpt" in done.stderr
