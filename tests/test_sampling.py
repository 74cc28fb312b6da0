"""The decoding engine (``wallaroo/sampling.py``): golden generation cases, cache vs full recompute,
batching, padding, grids, seeds and the static cache."""

from __future__ import annotations

import pytest
import torch

from tests.test_golden import vit_token_types
from wallaroo.sampling import (
    SamplingConfig,
    filter_logits,
    generate_images,
    generate_text,
    guide,
    left_pad_batches,
    recompute_text,
    repeat_batch,
    sample,
)

PAD, IM_END, EOL, GEN_PAD, GEN_START = 960, 962, 986, 987, 982
GREEDY_CFG = SamplingConfig(cfg_scale=3.0, top_k=1)
# Cached (one query per step) and full-recompute logits differ by fp32 reduction order only: a few 1e-6 of
# the logit scale for the sharp golden weights, which guidance (3c - 2u) can multiply by up to 5.
CACHE_REL = 1e-5


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Decoding is thousands of microsecond-sized ops: intra-op threads only add synchronisation, and on a
    busy 2-core machine two OpenMP threads make these tests several times slower. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------- helpers
def prompt(ids: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """A left-padded prompt batch (text only, or with ViT tokens whose images the caller adds)."""
    ids = ids if ids.ndim == 2 else ids[None]
    if mask is None:
        mask = torch.ones_like(ids)
    return {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": vit_token_types(ids)}


def strip(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the left padding of a one-row batch."""
    keep = batch["attention_mask"][0].bool()
    row_keys = ("input_ids", "attention_mask", "mm_token_type_ids")
    return {k: (v[:, keep] if k in row_keys else v) for k, v in batch.items()}


def assert_same_logits(actual: torch.Tensor, expected: torch.Tensor, rel: float = CACHE_REL) -> None:
    """Per step, max |actual - expected| <= rel * max |expected| (fp32 rounding, not a real difference)."""
    err = (actual - expected).abs().flatten(1).amax(1)
    scale = expected.abs().flatten(1).amax(1)
    assert bool((err <= rel * scale).all()), (
        f"max abs err {err.max().item():.3g}, logit scale {scale.max().item():.3g}"
    )


def collect() -> tuple[list[torch.Tensor], object]:
    logs: list[torch.Tensor] = []
    return logs, lambda step, logits: logs.append(logits.clone())


@pytest.fixture
def bf16_adapter_input(golden_model):
    """The reference loop fed the adapter ``normalize(codebook[code]).to(bfloat16)``; the stored CFG logits
    carry that rounding (the codes do not depend on it)."""
    handle = golden_model.gen_adapter.register_forward_pre_hook(
        lambda mod, args: (args[0].to(torch.bfloat16).to(args[0].dtype),)
    )
    yield
    handle.remove()


def understanding_prompt(c: dict[str, torch.Tensor], end: int) -> dict[str, torch.Tensor]:
    """Case c's conversation cut after position ``end`` (inclusive), with its image."""
    batch = prompt(c["c.input_ids"][:, : end + 1])
    batch["pixel_values"] = c["c.pixel_values"]
    batch["image_grid_thw"] = c["c.image_grid_thw"]
    return batch


def edit_prompt(c: dict[str, torch.Tensor], i: int, gen_start: int) -> dict[str, torch.Tensor]:
    """Case b's sample i cut after its <|generate_start|> (unpadded), unmasked source latents."""
    ids = c["b.input_ids"][i : i + 1, : gen_start + 1]
    batch = prompt(ids)
    batch["pixel_values"] = c[f"b.pixel_values.{i}"]
    batch["image_grid_thw"] = c["b.image_grid_thw"][i : i + 1]
    batch["pixel_latents"] = c[f"b.z_unmasked.{i}"]
    return batch


# ------------------------------------------------------------------------------------------- filtering
def test_filter_logits_top_k_and_top_p():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0]])
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[True, False, False, True]]
    assert torch.equal(filter_logits(logits, top_k=0), logits)
    assert torch.equal(filter_logits(logits, top_k=None), logits)
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = ~torch.isinf(filter_logits(probs, top_p=0.7))
    assert kept.tolist() == [[True, True, False, False]]
    # The most likely entry always survives, however small top_p is.
    assert (~torch.isinf(filter_logits(probs, top_p=1e-6))).sum() == 1


def test_greedy_ties_take_lowest_index():
    logits = torch.tensor([[0.0, 2.0, 1.0, 2.0], [5.0, 5.0, 5.0, 5.0]])
    assert sample(logits, SamplingConfig(top_k=1)).tolist() == [1, 0]
    assert sample(logits, SamplingConfig(temperature=0, top_k=None)).tolist() == [1, 0]


def test_guide_formula():
    c, u = torch.tensor([2.0]), torch.tensor([1.0])
    assert guide(c, u, 3.0).item() == 4.0


def test_left_pad_batches():
    a = {
        "input_ids": torch.tensor([[1, 2, 3]]),
        "attention_mask": torch.ones(1, 3, dtype=torch.long),
        "mm_token_type_ids": torch.zeros(1, 3, dtype=torch.long),
        "pixel_latents": torch.ones(2, 8),
    }
    b = {
        "input_ids": torch.tensor([[PAD, 5], [6, 7]]),
        "attention_mask": torch.tensor([[0, 1], [1, 1]]),
        "mm_token_type_ids": torch.zeros(2, 2, dtype=torch.long),
    }
    out = left_pad_batches([a, b], PAD)
    assert out["input_ids"].tolist() == [[1, 2, 3], [PAD, PAD, 5], [PAD, 6, 7]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    assert out["mm_token_type_ids"].shape == (3, 3)
    assert out["pixel_latents"].shape == (2, 8)


# ------------------------------------------------------------------------------------------- golden
def test_golden_d_codes_and_cfg_logits(golden_model, golden_cases, golden_codebook, bf16_adapter_input):
    c = golden_cases
    logs, hook = collect()
    codes = generate_images(
        golden_model,
        golden_codebook,
        prompt(c["d.input_ids"]),
        prompt(c["d.null_input_ids"]),
        (3, 4),
        "t2i",
        GREEDY_CFG,
        on_logits=hook,
    )
    assert codes.shape == (1, 3, 4)
    assert codes.flatten().tolist() == c["d.expected.codes"].tolist()
    logits = torch.cat(logs)
    values, indices = logits.topk(5)
    assert torch.equal(indices, c["d.expected.cfg_logits_top5_indices"])
    torch.testing.assert_close(values, c["d.expected.cfg_logits_top5_values"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(
        logits[[0, 1, 4, 8]], c["d.expected.cfg_logits_codes_0_1_4_8"], rtol=1e-4, atol=1e-4
    )


def test_golden_d_fp32_codes(golden_model, golden_cases, golden_codebook):
    """Without the bf16 rounding the greedy codes are the same (``codes_fp32_pure``)."""
    c = golden_cases
    codes = generate_images(
        golden_model,
        golden_codebook,
        prompt(c["d.input_ids"]),
        prompt(c["d.null_input_ids"]),
        (3, 4),
        "t2i",
        GREEDY_CFG,
    )
    assert codes.flatten().tolist() == c["d.expected.codes_fp32_pure"].tolist()


def test_golden_d2_pads_masked_at_every_step(golden_model, golden_cases, golden_codebook):
    c = golden_cases
    uncond = prompt(c["d2.null_input_ids"], c["d2.null_attention_mask"])
    codes = generate_images(
        golden_model, golden_codebook, prompt(c["d2.input_ids"]), uncond, (3, 4), "t2i", GREEDY_CFG
    )
    assert codes.flatten().tolist() == c["d2.derived.codes_pads_masked"].tolist()
    # The released loop's leak (pads attended after the prefill) gives these instead; we must not.
    assert codes.flatten().tolist() != c["d2.expected.codes"].tolist()


@pytest.mark.parametrize("attn", ["eager"])
def test_other_attention_implementations_mask_pads(golden_model, golden_cases, golden_codebook, attn):
    """Non-SDPA attention gets its masks from the library (``create_causal_mask``), pads masked as well."""
    c = golden_cases
    config = golden_model.language_model.config
    uncond = prompt(c["d2.null_input_ids"], c["d2.null_attention_mask"])
    saved = config._attn_implementation
    config._attn_implementation = attn
    try:
        codes = [
            generate_images(
                golden_model,
                golden_codebook,
                prompt(c["d2.input_ids"]),
                uncond,
                (3, 4),
                "t2i",
                SamplingConfig(top_k=1, static_cache=static),
            )
            for static in (False, True)
        ]
        text = generate_text(golden_model, understanding_prompt(c, 50), 6, set(), GREEDY_CFG)
    finally:
        config._attn_implementation = saved
    for got in codes:
        assert got.flatten().tolist() == c["d2.derived.codes_pads_masked"].tolist()
    assert text == generate_text(golden_model, understanding_prompt(c, 50), 6, set(), GREEDY_CFG)


def test_pad_contents_do_not_matter(golden_model, golden_cases, golden_codebook):
    """Changing the ids (hence embeddings, keys and values) of the null prompt's left pads changes nothing."""
    c = golden_cases
    uncond = prompt(c["d2.null_input_ids"], c["d2.null_attention_mask"])
    logs_a, hook_a = collect()
    codes_a = generate_images(
        golden_model,
        golden_codebook,
        prompt(c["d2.input_ids"]),
        uncond,
        (2, 3),
        "t2i",
        GREEDY_CFG,
        on_logits=hook_a,
    )
    other = dict(uncond)
    ids = uncond["input_ids"].clone()
    ids[uncond["attention_mask"] == 0] = torch.arange(1, 9)
    other["input_ids"] = ids
    logs_b, hook_b = collect()
    codes_b = generate_images(
        golden_model,
        golden_codebook,
        prompt(c["d2.input_ids"]),
        other,
        (2, 3),
        "t2i",
        GREEDY_CFG,
        on_logits=hook_b,
    )
    assert torch.equal(codes_a, codes_b)
    torch.testing.assert_close(torch.cat(logs_a), torch.cat(logs_b), rtol=0, atol=1e-6)

    # Text: a padded question with different pad ids gives the same tokens and logits.
    q = understanding_prompt(c, 50)
    padded = left_pad_batches([q, prompt(c["d.input_ids"])], PAD)
    outs = []
    for fill in (PAD, 7):
        batch = dict(padded)
        ids = padded["input_ids"].clone()
        ids[padded["attention_mask"] == 0] = fill
        batch["input_ids"] = ids
        logs, hook = collect()
        outs.append(
            (generate_text(golden_model, batch, 6, set(), GREEDY_CFG, on_logits=hook), torch.cat(logs))
        )
    assert outs[0][0] == outs[1][0]
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------ cache vs recompute
def test_image_cache_equals_full_recompute(golden_model, golden_cases, golden_codebook):
    c = golden_cases
    uncond = prompt(c["d2.null_input_ids"], c["d2.null_attention_mask"])
    runs = []
    for full in (False, True):
        logs, hook = collect()
        codes = generate_images(
            golden_model,
            golden_codebook,
            prompt(c["d2.input_ids"]),
            uncond,
            (3, 4),
            "t2i",
            GREEDY_CFG,
            full_recompute=full,
            on_logits=hook,
        )
        runs.append((codes, torch.cat(logs)))
    assert torch.equal(runs[0][0], runs[1][0])
    assert_same_logits(runs[0][1], runs[1][1])


def test_edit_cache_equals_full_recompute(golden_model, golden_cases, golden_codebook):
    """Editing: pixel block + ViT block (3-D positions, rope deltas) in both branches of different lengths."""
    c = golden_cases
    cond, uncond = edit_prompt(c, 0, 115), edit_prompt(c, 1, 92)
    runs = []
    for full in (False, True):
        logs, hook = collect()
        codes = generate_images(
            golden_model,
            golden_codebook,
            cond,
            uncond,
            (3, 4),
            "edit",
            GREEDY_CFG,
            full_recompute=full,
            on_logits=hook,
        )
        runs.append((codes, torch.cat(logs)))
    assert torch.equal(runs[0][0], runs[1][0])
    assert_same_logits(runs[0][1], runs[1][1])


def test_text_cache_equals_full_recompute(golden_model, golden_cases):
    """Case c cut after the first ``<|im_start|>assistant\\n``: ViT tokens, 3-D positions, rope delta -20."""
    c = golden_cases
    batch = understanding_prompt(c, 50)
    runs = []
    for fn in (generate_text, recompute_text):
        logs, hook = collect()
        runs.append((fn(golden_model, batch, 10, set(), GREEDY_CFG, on_logits=hook), torch.cat(logs)))
    assert runs[0][0] == runs[1][0]
    assert len(runs[0][0][0]) == 10
    torch.testing.assert_close(runs[0][1], runs[1][1], rtol=0, atol=1e-5)
    # Left-padded: a shorter text-only question beside the image one.
    padded = left_pad_batches([batch, prompt(c["d.input_ids"][:, :13])], PAD)
    runs = []
    for fn in (generate_text, recompute_text):
        logs, hook = collect()
        runs.append((fn(golden_model, padded, 6, set(), GREEDY_CFG, on_logits=hook), torch.cat(logs)))
    assert runs[0][0] == runs[1][0]
    assert_same_logits(runs[0][1], runs[1][1])


# ------------------------------------------------------------------------------------------- batching
def test_image_batch_equals_one_by_one(golden_model, golden_cases, golden_codebook):
    c = golden_cases
    null_real = strip(prompt(c["d2.null_input_ids"], c["d2.null_attention_mask"]))
    conds = [prompt(c["d.input_ids"]), prompt(c["d.input_ids"][:, 10:]), null_real]
    unconds = [prompt(c["d.null_input_ids"]), null_real, prompt(null_real["input_ids"][:, 5:])]
    singles = []
    for cond, uncond in zip(conds, unconds, strict=True):
        logs, hook = collect()
        codes = generate_images(
            golden_model, golden_codebook, cond, uncond, (2, 4), "t2i", GREEDY_CFG, on_logits=hook
        )
        singles.append((codes, torch.cat(logs)))
    logs, hook = collect()
    batched = generate_images(
        golden_model,
        golden_codebook,
        left_pad_batches(conds, PAD),
        left_pad_batches(unconds, PAD),
        (2, 4),
        "t2i",
        GREEDY_CFG,
        on_logits=hook,
    )
    assert torch.equal(batched, torch.cat([s[0] for s in singles]))
    batched_logits = torch.stack(logs, 1)  # [B, steps, K]
    for i, (_, single_logits) in enumerate(singles):
        torch.testing.assert_close(batched_logits[i], single_logits, rtol=0, atol=1e-4)


def test_text_batch_equals_one_by_one(golden_model, golden_cases):
    """Questions of different lengths (two with the image, one text only), left-padded into one batch."""
    c = golden_cases
    questions = [understanding_prompt(c, 50), understanding_prompt(c, 69), prompt(c["d.input_ids"][:, :13])]
    singles = [generate_text(golden_model, q, 8, {IM_END}, GREEDY_CFG) for q in questions]
    batched = generate_text(golden_model, left_pad_batches(questions, PAD), 8, {IM_END}, GREEDY_CFG)
    assert batched == [s[0] for s in singles]


def test_text_stops_per_row(golden_model, golden_cases):
    c = golden_cases
    q = understanding_prompt(c, 50)
    free = generate_text(golden_model, q, 6, set(), GREEDY_CFG)[0]
    stop = free[2]
    first = free.index(stop)
    stopped = generate_text(golden_model, q, 6, {stop}, GREEDY_CFG)[0]
    assert stopped == free[:first]


# ------------------------------------------------------------------------------------ shapes, seeds, cache
@pytest.fixture(scope="module")
def tiny():
    from wallaroo.config import get_preset
    from wallaroo.model import WallarooModel

    torch.manual_seed(0)
    model = WallarooModel(get_preset("tiny", attn_implementation="sdpa")).eval()
    codebook = torch.randn(model.cfg.codebook_size, model.cfg.codebook_dim)
    return model, codebook


def tiny_prompts(n: int, length: int = 20, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 900, (n, length), generator=g)
    ids[:, -1] = GEN_START
    return prompt(ids)


@pytest.mark.parametrize("grid", [(8, 8), (8, 12), (12, 8)])
def test_requested_grid(tiny, grid):
    model, codebook = tiny
    sampling = SamplingConfig(top_k=10, seed=0)
    codes = generate_images(
        model, codebook, tiny_prompts(2), tiny_prompts(2, 12, seed=1), grid, "t2i", sampling
    )
    assert codes.shape == (2, *grid)
    assert codes.dtype == torch.long
    assert 0 <= int(codes.min()) and int(codes.max()) < model.cfg.codebook_size


def test_seeds(tiny):
    model, codebook = tiny
    cond, uncond = tiny_prompts(2), tiny_prompts(2, 12, seed=1)

    def run(seed: int) -> torch.Tensor:
        torch.manual_seed(1000 + seed * 7)  # the global RNG must not matter
        return generate_images(
            model, codebook, cond, uncond, (4, 4), "t2i", SamplingConfig(top_k=0, seed=seed)
        )

    a, b, other = run(1), run(1), run(2)
    assert torch.equal(a, b)
    assert not torch.equal(a, other)


def test_static_cache_equals_dynamic(golden_model, golden_cases, golden_codebook):
    c = golden_cases
    uncond = prompt(c["d2.null_input_ids"], c["d2.null_attention_mask"])
    runs = []
    for static in (False, True):
        logs, hook = collect()
        sampling = SamplingConfig(cfg_scale=3.0, top_k=1, static_cache=static)
        codes = generate_images(
            golden_model,
            golden_codebook,
            prompt(c["d2.input_ids"]),
            uncond,
            (3, 4),
            "t2i",
            sampling,
            on_logits=hook,
        )
        runs.append((codes, torch.cat(logs)))
    assert torch.equal(runs[0][0], runs[1][0])
    assert_same_logits(runs[0][1], runs[1][1])
    q = left_pad_batches([understanding_prompt(c, 50), prompt(c["d.input_ids"][:, :13])], PAD)
    texts = [
        generate_text(golden_model, q, 8, {IM_END}, SamplingConfig(top_k=1, static_cache=s)) for s in (0, 1)
    ]
    assert texts[0] == texts[1]


def test_num_images_and_no_guidance(tiny):
    model, codebook = tiny
    cond, uncond = tiny_prompts(2), tiny_prompts(2, 12, seed=1)
    greedy = SamplingConfig(top_k=1)
    once = generate_images(model, codebook, cond, uncond, (3, 3), "t2i", greedy)
    many = generate_images(model, codebook, cond, uncond, (3, 3), "t2i", greedy, num_images=3)
    assert many.shape == (6, 3, 3)
    assert torch.equal(many, once.repeat_interleave(3, dim=0))
    # cfg_scale 1 and uncond None both run the cond rows alone, and agree.
    a = generate_images(model, codebook, cond, None, (3, 3), "t2i", greedy)
    b = generate_images(model, codebook, cond, uncond, (3, 3), "t2i", SamplingConfig(cfg_scale=1.0, top_k=1))
    assert torch.equal(a, b)


def test_repeat_batch_keeps_images_with_rows(golden_model, golden_cases):
    c = golden_cases
    two = left_pad_batches([edit_prompt(c, 0, 115), edit_prompt(c, 1, 92)], PAD)
    rep = repeat_batch(two, 2, golden_model.image_pad_id)
    with torch.no_grad():
        base = golden_model.prepare_inputs(two, None, "edit").inputs_embeds
        out = golden_model.prepare_inputs(rep, None, "edit").inputs_embeds
    torch.testing.assert_close(out, base.repeat_interleave(2, dim=0))


def test_rejects_right_padding_and_gen_pads(golden_model, golden_cases, golden_codebook):
    c = golden_cases
    right = prompt(c["a.input_ids"][:1], c["a.attention_mask"][:1])
    with pytest.raises(ValueError, match="LEFT"):
        generate_images(golden_model, golden_codebook, right, None, (1, 1), "t2i", GREEDY_CFG)
    with pytest.raises(ValueError, match="generate_image_pad"):
        generate_images(
            golden_model, golden_codebook, prompt(c["a.input_ids"][:1, :60]), None, (1, 1), "t2i", GREEDY_CFG
        )


# ------------------------------------------------------------------------------------------- layouts
@pytest.mark.parametrize("places", [0.0, 0.5])
@pytest.mark.parametrize("layout", ["square", "aspect"])
def test_generation_follows_the_training_layout(layout: str, places: float) -> None:
    """Greedy codes fed back through the training sequence of the same layout (square: no end-of-line
    tokens; aspect: EOL after every row but the last) are each the argmax of the teacher-forced image logits
    at their position: the sampler reproduces exactly the sequence the model was trained on, code-grid place
    features (``code_position_scale``) included, with the cache and with full recomputation."""
    from wallaroo.config import get_preset
    from wallaroo.model import WallarooModel
    from wallaroo.sequences import Bucket, build_t2i, collate, t2i_prompt
    from wallaroo.tokens import tokenizer_for

    torch.manual_seed(0)
    cfg = get_preset("tiny", code_position_scale=places)
    model = WallarooModel(cfg).eval()
    tok, ids = tokenizer_for(cfg)
    codebook = torch.randn(cfg.codebook_size, cfg.codebook_dim)
    bucket, kw = Bucket(w=48, h=32), dict(lang="en", template_index=0, layout=layout, ds=8)
    cond = collate([t2i_prompt(tok, ids, "a red circle at the top left", bucket, **kw)], ids.pad, "left")
    greedy = SamplingConfig(cfg_scale=1.0, top_k=1)
    codes = generate_images(model, codebook, cond, None, (4, 6), "t2i", greedy, eol=layout == "aspect")
    slow = generate_images(model, codebook, cond, None, (4, 6), "t2i", greedy, eol=layout == "aspect",
                           full_recompute=True)
    assert torch.equal(codes, slow)
    batch = collate([build_t2i(tok, ids, "a red circle at the top left", bucket, codes[0], **kw)], ids.pad)
    with torch.no_grad():
        hidden = model.decode(model.prepare_inputs(batch, codebook, "t2i", cols=6))
    targets = batch["image_labels"][0, 1:]
    argmax = model.gen_head(hidden[0, :-1][targets != -100]).argmax(-1)
    assert torch.equal(argmax, codes.flatten())
    assert int((batch["input_ids"] == ids.eol).sum()) == (3 if layout == "aspect" else 0)
