"""WallarooDataModule on ShapesWorld shards: batch contract, buckets, budgets, determinism, bad data,
codes.npy, resuming (by hand and through a Trainer), workers, images-only mode. CPU, tiny preset."""

from __future__ import annotations

import io
import json
import logging
import re
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from datamodules import TaskData, WallarooDataModule, webdata
from datamodules.shapes import to_record, write_shapes_shards
from datamodules.shapes_world import t2i_samples
from datamodules.webdata import expand_shards
from wallaroo.config import get_preset
from wallaroo.sequences import IGNORE_INDEX, SHAPES_BUCKETS, to_tensor_pm1
from wallaroo.tokens import TokenIds, build_tiny_tokenizer

DS = 8  # tiny-ds8
SIZES = {(b.w, b.h) for b in SHAPES_BUCKETS.values()}
CJK = re.compile(r"[\u4e00-\u9fff]")
CONTRACT = {"input_ids", "attention_mask", "labels", "image_labels", "mm_token_type_ids"}


# ----------------------------------------------------------------------------------------------------
# Fixtures and helpers
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """96 samples per task in 4 shards of 24."""
    root = tmp_path_factory.mktemp("shapes")
    write_shapes_shards(root, samples=96, seed=0, shard_size=24, workers=1)
    return root


@pytest.fixture(scope="module")
def cfg():
    return get_preset("tiny")


@pytest.fixture(scope="module")
def tokenizer(cfg) -> tuple[Any, TokenIds]:
    tok = build_tiny_tokenizer(cfg.indicator_sizes, cfg.backbone.vocab_size)
    return tok, TokenIds.from_tokenizer(tok, cfg.indicator_sizes)


def make_dm(
    cfg,
    tokenizer,
    tasks: tuple[str, ...] | None = None,
    *,
    num_workers: int = 0,
    seed: int = 0,
    **data: TaskData,
) -> WallarooDataModule:
    dm = WallarooDataModule(num_workers=num_workers, seed=seed, **data)
    dm.configure(cfg, tasks, tokenizer=tokenizer)
    return dm


def td(path: Path | str, **kw: Any) -> TaskData:
    kw.setdefault("shuffle_buffer", 32)
    return TaskData(shards=str(path), **kw)


def epoch_batches(loader) -> list[dict[str, dict[str, torch.Tensor]]]:
    return [batch for batch, _, _ in loader]


def same(a: dict[str, dict[str, torch.Tensor]], b: dict[str, dict[str, torch.Tensor]]) -> bool:
    return a.keys() == b.keys() and all(
        a[t].keys() == b[t].keys() and all(torch.equal(a[t][k], b[t][k]) for k in a[t]) for t in a
    )


def tar_records(path: Path, records: list[dict[str, Any]]) -> None:
    with wds.TarWriter(str(path)) as w:
        for r in records:
            w.write(r)


# ----------------------------------------------------------------------------------------------------
# Batch contract
# ----------------------------------------------------------------------------------------------------


def _check_common(sub: dict[str, torch.Tensor], ids: TokenIds) -> None:
    assert CONTRACT <= sub.keys()
    assert "n_skipped" not in sub and "worker_id" not in sub  # bookkeeping stays in the DataModule
    b, n = sub["input_ids"].shape
    for k in CONTRACT:
        assert sub[k].shape == (b, n) and sub[k].dtype == torch.long, k
    mask = sub["attention_mask"].bool()
    lengths = mask.sum(1)
    assert torch.equal(mask, torch.arange(n)[None] < lengths[:, None])  # right padding
    assert int(lengths.max()) == n
    assert (sub["input_ids"][~mask] == ids.pad).all() and (sub["labels"][~mask] == IGNORE_INDEX).all()
    assert ((sub["labels"] != IGNORE_INDEX).sum(1) > 0).all()  # every row trains something
    vit = sub["mm_token_type_ids"] == 1
    assert torch.equal(vit, vit & (sub["input_ids"] == ids.image_pad))


def _check_images(sub: dict[str, torch.Tensor], name: str, b: int) -> tuple[int, int]:
    img = sub[name]
    assert img.dtype == torch.float32 and img.shape[:2] == (b, 3)
    assert img.min() >= -1 and img.max() <= 1
    h, w = img.shape[2:]
    assert (w, h) in SIZES
    return w, h


def test_batch_contract_buckets_languages_sizes(shards, cfg, tokenizer) -> None:
    tok, ids = tokenizer
    dm = make_dm(
        cfg, tokenizer, ("t2i", "und", "edit"),
        t2i=td(shards / "t2i", batch_size=8, epoch_samples=64),
        und=td(shards / "und", batch_size=4, epoch_samples=32),
        edit=td(shards / "edit", batch_size=4, epoch_samples=64),  # the mix takes the shortest epoch
    )  # fmt: skip
    loader = dm.train_dataloader()
    batches = epoch_batches(loader)
    assert len(batches) == len(loader) == 8
    langs: Counter[str] = Counter()
    sizes: Counter[tuple[int, int]] = Counter()
    for batch in batches:
        assert set(batch) == {"t2i", "und", "edit"}
        # t2i: target images of one bucket, codes filled later by the VQ (image_labels all -100).
        t2i = batch["t2i"]
        _check_common(t2i, ids)
        assert set(t2i) == CONTRACT | {"target_images"}
        b = t2i["input_ids"].shape[0]
        assert b <= 8
        w, h = _check_images(t2i, "target_images", b)
        sizes[(w, h)] += b
        gen = t2i["input_ids"] == ids.generate_image_pad
        assert (gen.sum(1) == (w // DS) * (h // DS)).all()
        assert ((t2i["input_ids"] == ids.eol).sum(1) == h // DS - 1).all()  # aspect layout
        assert (t2i["labels"][gen] == IGNORE_INDEX).all() and (t2i["image_labels"] == IGNORE_INDEX).all()
        assert (t2i["mm_token_type_ids"] == 0).all()
        for row, m in zip(t2i["input_ids"], t2i["attention_mask"], strict=True):
            langs["zh" if CJK.search(tok.decode(row[m.bool()])) else "en"] += 1
        # und: one ViT block per sample, all images of a batch in one bucket (same grid).
        und = batch["und"]
        _check_common(und, ids)
        assert set(und) == CONTRACT | {"pixel_values", "image_grid_thw"}
        grid = und["image_grid_thw"]
        assert grid.shape == (und["input_ids"].shape[0], 3) and (grid == grid[0]).all()
        assert und["pixel_values"].shape == (int(grid.prod(-1).sum()), 1176)
        assert int(und["mm_token_type_ids"].sum()) == int(grid.prod(-1).sum()) // 4
        assert (und["image_labels"] == IGNORE_INDEX).all()
        # edit: source and target of the same bucket; pixel block + ViT block + target grid.
        edit = batch["edit"]
        _check_common(edit, ids)
        assert set(edit) == CONTRACT | {"pixel_values", "image_grid_thw", "source_images", "target_images"}
        b = edit["input_ids"].shape[0]
        w, h = _check_images(edit, "target_images", b)
        assert edit["source_images"].shape == edit["target_images"].shape
        cells = (w // DS) * (h // DS)
        assert ((edit["input_ids"] == ids.generate_image_pad).sum(1) == cells).all()
        n_vit = edit["mm_token_type_ids"].sum(1)
        assert ((edit["input_ids"] == ids.image_pad).sum(1) == cells + n_vit).all()
        assert int(n_vit.sum()) == int(edit["image_grid_thw"].prod(-1).sum()) // 4
    assert langs["en"] > 0 and langs["zh"] > 0
    assert set(sizes) == SIZES
    assert dm.skipped_counts() == {"t2i": 0, "und": 0, "edit": 0}


def test_cfg_drop_empties_prompt_and_blackens_source(shards, cfg, tokenizer) -> None:
    tok, _ = tokenizer
    dm = make_dm(
        cfg, tokenizer,
        t2i=td(shards / "t2i", batch_size=4, epoch_samples=8, cfg_drop=1.0),
        edit=td(shards / "edit", batch_size=4, epoch_samples=8, cfg_drop=1.0),
    )  # fmt: skip
    for batch in epoch_batches(dm.train_dataloader()):
        for task in ("t2i", "edit"):
            for row, m in zip(batch[task]["input_ids"], batch[task]["attention_mask"], strict=True):
                text = tok.decode(row[m.bool()])
                assert '""' in text or "“”" in text, text  # the template with an empty prompt
        assert (batch["edit"]["source_images"] == -1).all()
        assert not (batch["edit"]["target_images"] == -1).all()


def test_templates_limits_the_instruction_templates(shards, cfg, tokenizer) -> None:
    from wallaroo.sequences import EDIT_TEMPLATES, GENERATE_TEMPLATES

    tok, _ = tokenizer

    def heads(templates: int | None) -> set[str]:
        dm = make_dm(
            cfg, tokenizer,
            t2i=td(shards / "t2i", batch_size=4, epoch_samples=16, cfg_drop=1.0, templates=templates),
            edit=td(shards / "edit", batch_size=4, epoch_samples=16, cfg_drop=1.0, templates=templates),
        )  # fmt: skip
        found = set()
        for batch in epoch_batches(dm.train_dataloader()):
            for task, table in (("t2i", GENERATE_TEMPLATES), ("edit", EDIT_TEMPLATES)):
                for row, m in zip(batch[task]["input_ids"], batch[task]["attention_mask"], strict=True):
                    text = tok.decode(row[m.bool()])
                    found |= {f"{task}:{lang}:{i}" for lang, ts in table.items() for i, t in enumerate(ts)
                              if t.split("{")[0] and t.split("{")[0] in text}
        return found

    one = heads(1)
    assert one and all(key.endswith(":0") for key in one), one
    assert any(not key.endswith(":0") for key in heads(None))
    with pytest.raises(ValueError, match="templates must be >= 1"):
        make_dm(cfg, tokenizer, t2i=td(shards / "t2i", templates=0)).train_dataloader()


# ----------------------------------------------------------------------------------------------------
# Determinism and epochs
# ----------------------------------------------------------------------------------------------------


def test_seed_determines_order_and_epoch_length(shards, cfg, tokenizer) -> None:
    def run(seed: int, epochs: int = 1) -> list[list[dict[str, dict[str, torch.Tensor]]]]:
        dm = make_dm(cfg, tokenizer, seed=seed, t2i=td(shards / "t2i", batch_size=8, epoch_samples=40))
        loader = dm.train_dataloader()
        out = [epoch_batches(loader) for _ in range(epochs)]
        assert len(loader) == 5
        return out

    first, second = run(0, epochs=2)
    assert len(first) == len(second) == 5
    again = run(0)[0]
    assert all(same(a, b) for a, b in zip(first, again, strict=True))
    other = run(1)[0]
    assert not all(same(a, b) for a, b in zip(first, other, strict=False))
    # The epoch is part of the seed: epoch 2 is a different order.
    assert not all(same(a, b) for a, b in zip(first, second, strict=False))


# ----------------------------------------------------------------------------------------------------
# Bad data
# ----------------------------------------------------------------------------------------------------


def test_bad_samples_are_skipped_counted_and_logged(tmp_path, cfg, tokenizer, caplog, monkeypatch) -> None:
    good = [to_record("t2i", s) for s in t2i_samples(12, seed=3)]
    png = good[0]["png"]
    meta = json.loads(good[0]["json"])
    records = (
        good[:4]
        + [
            {"__key__": "bad-truncated", "png": png[: len(png) // 2], "json": good[0]["json"]},
            {"__key__": "bad-nocaption", "png": png, "json": json.dumps({"lang": "en"}).encode()},
            {"__key__": "bad-json", "png": png, "json": b"{not json"},
            {"__key__": "bad-type", "png": png, "json": json.dumps({"caption_en": 3}).encode()},
            {"__key__": "bad-noimage", "json": json.dumps(meta).encode()},
        ]
        + good[4:]
    )
    data = tmp_path / "data"
    data.mkdir()
    tar_records(data / "mixed.tar", records)
    (data / "garbage.tar").write_bytes(np.random.default_rng(0).bytes(3000))
    cut = (data / "mixed.tar").read_bytes()
    (data / "cut.tar").write_bytes(cut[: len(cut) // 2])

    def run() -> tuple[int, list[logging.LogRecord]]:
        dm = make_dm(cfg, tokenizer, t2i=td(data, batch_size=4, epoch_samples=24, shuffle_buffer=0))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="datamodules.webdata"):
            batches = epoch_batches(dm.train_dataloader())
        assert len(batches) == 6  # the run went on
        return dm.skipped_counts()["t2i"], list(caplog.records)

    skipped, records = run()
    assert skipped >= 10 and len(records) < skipped  # counted, and the warnings are rate-limited
    monkeypatch.setattr(webdata, "_LOG_FIRST", 10_000)
    skipped_again, records = run()
    assert skipped_again == skipped and len(records) == skipped
    text = "\n".join(r.getMessage() for r in records)
    for key in ("bad-truncated", "bad-nocaption", "bad-json", "bad-type", "bad-noimage"):
        assert re.search(rf"'{key}' from shard \S*mixed\.tar", text), key
    assert "garbage.tar" in text and "cannot decode image" in text and "lacks caption_en" in text


def test_unusable_data_raises_instead_of_hanging(tmp_path, cfg, tokenizer) -> None:
    (tmp_path / "garbage.tar").write_bytes(b"\0not a tar" * 100)
    dm = make_dm(cfg, tokenizer, t2i=td(tmp_path, batch_size=4, epoch_samples=8, shuffle_buffer=0))
    with pytest.raises(RuntimeError, match="no usable sample"):
        epoch_batches(dm.train_dataloader())


# ----------------------------------------------------------------------------------------------------
# Token budget, codes.npy
# ----------------------------------------------------------------------------------------------------


def test_token_budget_and_small_padding(shards, cfg, tokenizer) -> None:
    budget = 1200
    dm = make_dm(
        cfg, tokenizer, t2i=td(shards / "t2i", batch_size=32, max_tokens=budget, epoch_samples=32 * 20)
    )
    real = total = 0
    for batch in epoch_batches(dm.train_dataloader()):
        sub = batch["t2i"]
        b, n = sub["input_ids"].shape
        assert b * n <= budget
        real += int(sub["attention_mask"].sum())
        total += b * n
    assert 1 - real / total < 0.1  # ~5% on ShapesWorld: one bucket and one length bin per batch


def test_codes_npy_replaces_target_images(tmp_path, cfg, tokenizer) -> None:
    _, ids = tokenizer
    written: set[tuple[int, ...]] = set()
    records = []
    for i, s in enumerate(t2i_samples(32, seed=5)):
        r = to_record("t2i", s)
        if i % 2:
            w, h = s["size"]
            codes = np.random.default_rng(i).integers(0, cfg.codebook_size, size=(h // DS, w // DS))
            buf = io.BytesIO()
            np.save(buf, codes.astype(np.int16))
            r["codes.npy"] = buf.getvalue()
            del r["png"]  # the codes are enough
            written.add(tuple(codes.reshape(-1).tolist()))
        records.append(r)
    tar_records(tmp_path / "codes.tar", records)
    dm = make_dm(cfg, tokenizer, t2i=td(tmp_path / "codes.tar", batch_size=4, epoch_samples=64))
    kinds = Counter()
    for batch in epoch_batches(dm.train_dataloader()):
        sub = batch["t2i"]
        gen = sub["input_ids"] == ids.generate_image_pad
        if "target_images" in sub:
            kinds["image"] += 1
            assert (sub["image_labels"] == IGNORE_INDEX).all()
        else:
            kinds["codes"] += 1
            assert ((sub["image_labels"] != IGNORE_INDEX) == gen).all()
            for row, g in zip(sub["image_labels"], gen, strict=True):
                assert tuple(row[g].tolist()) in written
            assert (sub["labels"][gen] == IGNORE_INDEX).all()
    assert kinds["image"] > 0 and kinds["codes"] > 0


# ----------------------------------------------------------------------------------------------------
# Resuming
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("consumed", "num_workers"), [(3, 2), (6, 0)])
def test_loader_state_resumes_the_same_batches(
    shards, cfg, tokenizer, consumed: int, num_workers: int
) -> None:
    def dm() -> WallarooDataModule:
        return make_dm(
            cfg, tokenizer, num_workers=num_workers,
            t2i=td(shards / "t2i", batch_size=4, epoch_samples=24),
            und=td(shards / "und", batch_size=4, epoch_samples=24),
        )  # fmt: skip

    loader = dm().train_dataloader()
    it = iter(loader)
    for _ in range(consumed):
        next(it)
    state = loader._state_dicts()
    assert [s["consumed"] for s in state] == [consumed, consumed]
    expected = [next(it)[0] for _ in range(6 - consumed)]
    if consumed == 6:  # the end of an epoch: resuming starts the next one
        expected = epoch_batches(loader)[:2]
    resumed_loader = dm().train_dataloader()
    resumed_loader._load_state_dicts(state)
    resumed = epoch_batches(resumed_loader)[: len(expected)]
    assert len(resumed) == len(expected)
    assert all(same(a, b) for a, b in zip(expected, resumed, strict=True))


class _Probe(L.LightningModule):
    """Stands in for a stage: has the model config and TASKS, records the batches it trains on."""

    TASKS = ("t2i", "und")

    def __init__(self) -> None:
        super().__init__()
        self.model_config = get_preset("tiny")
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[dict[str, torch.Tensor]] = []

    def training_step(self, batch: dict[str, dict[str, torch.Tensor]], batch_idx: int) -> torch.Tensor:
        self.seen.append({t: sub["input_ids"].clone() for t, sub in batch.items()})
        return (self.w**2).sum() + 1.0

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_trainer_resume_continues_the_data_position(shards, tokenizer, tmp_path, monkeypatch) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    from wallaroo import tokens

    # tokenizer_for may not exist yet; the DataModule looks it up at call time.
    monkeypatch.setattr(tokens, "tokenizer_for", lambda cfg: tokenizer, raising=False)

    def fit(max_steps: int, ckpt_path: str | None = None, callbacks: list | None = None) -> _Probe:
        dm = WallarooDataModule(
            t2i=td(shards / "t2i", batch_size=4, epoch_samples=12),  # 3 batches per epoch
            und={"shards": str(shards / "und"), "batch_size": 4, "epoch_samples": 12, "shuffle_buffer": 32},
            num_workers=0,
        )
        probe = _Probe()
        trainer = L.Trainer(
            max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
            enable_model_summary=False, enable_checkpointing=bool(callbacks), callbacks=callbacks,
            num_sanity_val_steps=0, log_every_n_steps=1,
        )  # fmt: skip
        trainer.fit(probe, datamodule=dm, ckpt_path=ckpt_path)
        return probe

    reference = fit(8).seen
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1, filename="{step}")
    fit(4, callbacks=[ckpt])
    # The position travels in the checkpoint as plain data (epoch 1 of 3-batch epochs, 1 batch in).
    state = torch.load(tmp_path / "step=4.ckpt", weights_only=True)["loops"]["fit_loop"]["state_dict"]
    assert [(s["task"], s["epoch"], s["consumed"]) for s in state["combined_loader"]] == [
        ("t2i", 1, 1),
        ("und", 1, 1),
    ]
    resumed = fit(8, ckpt_path=str(tmp_path / "step=4.ckpt")).seen
    assert len(reference) == 8 and len(resumed) == 4
    for a, b in zip(reference[4:], resumed, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[t], b[t]) for t in a)


# ----------------------------------------------------------------------------------------------------
# Workers, validation, images only, configuration errors
# ----------------------------------------------------------------------------------------------------


def _fingerprints(loader) -> Counter:
    out: Counter = Counter()
    for batch in loader:
        ((task, sub),) = batch.items()
        for i, (row, m) in enumerate(zip(sub["input_ids"], sub["attention_mask"], strict=True)):
            image = sub["target_images"][i] if "target_images" in sub else torch.zeros(0)
            out[(task, tuple(row[m.bool()].tolist()), image.numpy().tobytes())] += 1
    return out


def test_val_pass_with_workers_has_no_duplicates(shards, cfg, tokenizer) -> None:
    def val(num_workers: int) -> Counter:
        dm = make_dm(
            cfg, tokenizer, num_workers=num_workers,
            t2i=td(shards / "t2i", batch_size=8, val_shards=str(shards / "t2i"), val_samples=60),
            und=td(shards / "und", batch_size=8, val_shards=str(shards / "und"), val_samples=20),
        )  # fmt: skip
        return _fingerprints(dm.val_dataloader())

    single, multi = val(0), val(2)
    assert sum(v for (t, *_), v in single.items() if t == "t2i") == 60
    assert sum(v for (t, *_), v in single.items() if t == "und") == 20
    assert multi == single  # same samples, each once, whatever the number of workers


def test_train_with_two_workers(shards, cfg, tokenizer) -> None:
    dm = make_dm(cfg, tokenizer, num_workers=2, t2i=td(shards / "t2i", batch_size=4, epoch_samples=20))
    loader = dm.train_dataloader()
    batches = epoch_batches(loader)
    assert len(batches) == len(loader) == 5
    dm = make_dm(cfg, tokenizer, num_workers=2, t2i=td(shards / "t2i", batch_size=4, epoch_samples=20))
    again = epoch_batches(dm.train_dataloader())
    assert all(same(a, b) for a, b in zip(batches, again, strict=True))


def test_uint8_buffers_give_the_same_pixels_as_to_tensor_pm1() -> None:
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8))
    assert torch.equal(webdata.uint8_to_pm1(webdata.to_uint8_chw(img)), to_tensor_pm1(img))


def test_images_only(shards) -> None:
    dm = WallarooDataModule(
        t2i=td(shards / "t2i", batch_size=6, epoch_samples=24),
        und=td(shards / "und", batch_size=6, epoch_samples=24),
        edit=td(shards / "edit", batch_size=6, epoch_samples=24),
        num_workers=0,
        images_only=True,
    )
    dm.configure(None, downsample=DS)  # what setup() does for the tokenizer stage
    for batch in epoch_batches(dm.train_dataloader()):
        assert set(batch) == {"t2i", "und", "edit"}
        for sub in batch.values():
            assert set(sub) == {"target_images"}
            assert 1 <= sub["target_images"].shape[0] <= 6
            _check_images(sub, "target_images", sub["target_images"].shape[0])


def test_task_resolution_and_config_errors(shards, cfg, tokenizer) -> None:
    data = {"t2i": td(shards / "t2i"), "und": td(shards / "und")}
    with pytest.warns(UserWarning, match=r"\['und'\] is configured"):
        dm = make_dm(cfg, tokenizer, ("t2i",), **data)
    assert dm.tasks == ["t2i"]
    with pytest.raises(ValueError, match=r"data\.edit\.shards"):
        make_dm(cfg, tokenizer, ("t2i", "edit"), **data)
    with pytest.raises(ValueError, match="not a bucket set"):
        make_dm(cfg, tokenizer, t2i=td(shards / "t2i", buckets="nope"))
    with pytest.raises(ValueError, match="square bucket set"):
        make_dm(cfg, tokenizer, t2i=td(shards / "t2i", layout="square"))
    with pytest.raises(ValueError, match="matched no shards"):
        make_dm(cfg, tokenizer, t2i=td(shards / "missing" / "*.tar"))


def test_expand_shards_patterns(shards, tmp_path) -> None:
    listed = expand_shards(str(shards / "t2i"))
    assert [Path(u).name for u in listed] == [f"shard-{i:06d}.tar" for i in range(4)]
    assert expand_shards(str(shards / "t2i" / "shard-{000000..000003}.tar")) == listed
    assert expand_shards([str(shards / "t2i" / "*.tar"), listed[0]]) == listed
    shutil.copy(listed[0], tmp_path / "a.tar")
    assert expand_shards(str(tmp_path)) == [str(tmp_path / "a.tar")]


def test_und_pixels_use_the_model_normalisation_as_inference_does(shards, tokenizer) -> None:
    # Training samples and the inference pipeline must feed the ViT the same numbers for the same image.
    import random

    from datamodules.shapes_world import und_samples
    from datamodules.webdata import SampleBuilder
    from wallaroo.model import WallarooModel
    from wallaroo.pipeline import WallarooPipeline, to_pil
    from wallaroo.vq import build_vq

    cfg = get_preset("tiny", vit_image_mean=[1.0, 1.0, 1.0], vit_image_std=[0.5, 0.5, 0.5])
    dm = make_dm(cfg, tokenizer, ("und",), und=td(shards / "und"))
    sample = next(und_samples(1, 3))
    (item,) = SampleBuilder(dm.specs["und"], *tokenizer)(to_record("und", sample), random.Random(0), train=False)
    pipe = WallarooPipeline(WallarooModel(cfg), build_vq(cfg.vq), *tokenizer)
    expected, grid = pipe.vit([to_pil(sample["image"])])
    torch.testing.assert_close(item.sample.pixel_values, expected)
    torch.testing.assert_close(item.sample.image_grid_thw, grid)
    assert (expected == 0).float().mean() > 0.5  # white is 0 under this normalisation
