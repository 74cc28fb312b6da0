"""``python -m wallaroo.convert official``: the released key layout, the tiny official checkpoint through a
weights directory, and the safety rules of every loader."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

from tests.conftest import REFERENCE, REPO, need_reference
from tests.test_golden import RTOL, TASKS, case_batch
from wallaroo.checkpoints import official_key_to_ours


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The official tiny checkpoint converted with the CLI and loaded back with ``build_from_weights``."""
    from wallaroo.convert import main
    from wallaroo.weights import build_from_weights

    ref = need_reference()
    out = tmp_path_factory.mktemp("convert") / "official_tiny"
    written = main(
        ["official", "--ckpt", str(ref / "checkpoint.ckpt"), "--qwen", str(ref), "--out", str(out)]
    )
    assert written == out
    return out, build_from_weights(out)


def test_weights_directory_layout(converted):
    out, (model, vq, _, ids) = converted
    meta = json.loads((out / "wallaroo.json").read_text())
    assert (
        meta["format"] == "wallaroo-weights" and meta["format_version"] == 1 and meta["stage"] == "official"
    )
    cfg = meta["config"]
    # Official ids are kept: <|endoftext|> 960 in the tiny vocabulary, <|generate_image_pad|> 987.
    assert cfg["special_base"] == 960 and cfg["edit"] is True and cfg["codebook_size"] == 16384
    assert ids.generate_image_pad == 987 and ids.eol == 986
    for name in ("config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"):
        assert (out / "understanding" / name).is_file(), name
    gen = json.loads((out / "generation" / "config.json").read_text())
    assert gen["modules"] == ["gen_adapter", "gen_head", "pixel_adapter", "edit_adapter", "edit_head"]
    assert vq is None  # no --vq given: the tiny case has only a codebook
    assert model.has_edit


def test_converted_weights_are_the_official_ones(converted):
    from wallaroo.checkpoints import convert_official_state_dict, load_weights_file

    _, (model, *_) = converted
    official = convert_official_state_dict(load_weights_file(str(need_reference() / "model.safetensors")))
    ours = model.state_dict()
    assert set(ours) == set(official)
    for k, v in official.items():
        assert torch.equal(ours[k], v), k


def test_official_safetensors_loads_directly(converted):
    """The official key layout in a ``.safetensors`` file is recognised too (config from the Qwen dir)."""
    from wallaroo.weights import SOURCE_OFFICIAL, build_from_weights, load_any

    ref = need_reference()
    assert load_any(ref / "model.safetensors").source == SOURCE_OFFICIAL
    model, _, _, _ = build_from_weights(ref / "model.safetensors", qwen_dir=ref)
    _, (converted_model, *_) = converted
    expected = converted_model.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("name", ["a", "b", "c"])
def test_converted_model_reproduces_golden_losses(converted, golden_cases, golden_codebook, name):
    _, (model, *_) = converted
    c = golden_cases
    with torch.no_grad():
        out = model(case_batch(c, name), TASKS[name], golden_codebook, pixel_mask_ratio=0.0)
    expected = c[f"{name}.expected.loss"].item()
    assert abs(out.loss.item() - expected) <= RTOL * abs(expected)


def test_converted_model_reproduces_golden_codes(converted, golden_cases, golden_codebook):
    try:
        from wallaroo.sampling import SamplingConfig, generate_images
    except ImportError:
        pytest.skip("wallaroo.sampling.generate_images is not available yet")
    from tests.test_sampling import prompt

    _, (model, *_) = converted
    c = golden_cases
    codes = generate_images(
        model, golden_codebook, prompt(c["d.input_ids"]), prompt(c["d.null_input_ids"]), (3, 4), "t2i",
        SamplingConfig(cfg_scale=3.0, top_k=1),
    )  # fmt: skip
    assert codes.flatten().tolist() == c["d.expected.codes"].tolist()


@pytest.mark.parametrize("edit", [True, False], ids=["stage4", "stage1-3"])
def test_official_7b_manifest_maps_onto_our_model(edit):
    """Every key of the released 7B checkpoint maps to one of ours with the same shape, and vice versa."""
    from wallaroo.config import get_preset
    from wallaroo.model import WallarooModel

    manifest = REFERENCE / "wallaroo_official_7b_state_dict.json"
    if not manifest.is_file():
        pytest.skip(f"reference manifest not found at {manifest}")
    rows = json.loads(manifest.read_text())["keys"]
    official = {name: tuple(shape) for name, shape, in_stage1_3 in rows if edit or in_stage1_3}
    assert len(official) == (747 if edit else 736)
    mapped = {official_key_to_ours(k): s for k, s in official.items()}
    assert len(mapped) == len(official)  # the mapping is one-to-one
    with torch.device("meta"):
        model = WallarooModel(get_preset("qwen2.5-vl-7b", edit=edit))
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert mapped == ours


def _official_state() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(need_reference() / "model.safetensors"))


@pytest.mark.parametrize("extra", ["wallaroo.model.extra_gate.weight", "extra_image_head.0.weight"])
def test_unknown_official_key_is_refused_by_name(tmp_path, extra):
    """A key under a known prefix that the model lacks, and a key under no known prefix."""
    import re

    from wallaroo.convert import main

    state = _official_state()
    state[extra] = torch.zeros(2)
    ckpt = tmp_path / "bad.ckpt"
    torch.save({"epoch": 0, "global_step": 0, "state_dict": state}, ckpt)
    with pytest.raises(ValueError, match=re.escape(extra)):
        main(["official", "--ckpt", str(ckpt), "--qwen", str(need_reference()), "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def test_missing_official_key_is_reported_by_name(tmp_path):
    from wallaroo.convert import main

    state = _official_state()
    del state["wallaroo.model.norm.weight"]
    ckpt = tmp_path / "short.ckpt"
    torch.save({"state_dict": state}, ckpt)
    with pytest.raises(ValueError, match=r"missing keys \['wallaroo\.model\.norm\.weight'\]"):
        main(["official", "--ckpt", str(ckpt), "--qwen", str(need_reference()), "--out", str(tmp_path / "o")])


class NotWeights:
    """A class outside the package: a checkpoint holding one must not be unpickled."""

    def __init__(self) -> None:
        self.payload = 1


def test_foreign_pickled_objects_are_refused(tmp_path):
    from wallaroo.weights import load_any

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"model.gen_head.0.weight": torch.zeros(1)}, "extra": NotWeights()}, path)
    with pytest.raises(ValueError, match="evil.ckpt"):
        load_any(path)


def test_missing_file_and_plain_directory_errors_name_the_path(tmp_path):
    from wallaroo.weights import load_any

    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        load_any(tmp_path / "nope.ckpt")
    with pytest.raises(ValueError, match="wallaroo.json"):
        load_any(tmp_path)


def test_torch_load_is_always_weights_only():
    """Every ``torch.load`` in the package passes ``weights_only=True`` (never an unrestricted pickle)."""
    calls = 0
    for folder in ("wallaroo", "stages", "datamodules", "metrics"):
        for path in sorted((REPO / folder).rglob("*.py")):
            tree = ast.parse(Path(path).read_text(encoding="utf-8"), filename=str(path))
            for node in ast.walk(tree):
                if not isinstance(node, ast.Call):
                    continue
                func = node.func
                if (
                    isinstance(func, ast.Attribute)
                    and func.attr == "load"
                    and ast.unparse(func.value) == "torch"
                ):
                    calls += 1
                    flags = {k.arg: k.value for k in node.keywords}
                    value = flags.get("weights_only")
                    assert isinstance(value, ast.Constant) and value.value is True, (
                        f"{path}:{node.lineno}: torch.load without weights_only=True"
                    )
    assert calls > 0
