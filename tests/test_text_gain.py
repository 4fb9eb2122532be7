from __future__ import annotations

import re

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel

from nested_attention.tiny import write_clip_tokenizer
from nested_attention_toy.text_gain import ROWS, make_swaps, text_change, text_gain
from nested_attention_toy.world import (
    CONTEXT_FACTORS,
    DOMAINS,
    attribute_names,
    attribute_phrase,
    attribute_values,
    prompt_factors,
    vocabulary,
)


@pytest.mark.parametrize("factor", list(CONTEXT_FACTORS))
def test_factor_swaps_change_that_factor_only(factor):
    prompts_a, prompts_b = make_swaps(factor, 24, seed=3)
    assert (prompts_a, prompts_b) == make_swaps(factor, 24, seed=3)
    for a, b in zip(prompts_a, prompts_b):
        fa, fb = prompt_factors(a), prompt_factors(b)
        assert set(fa) == set(fb) == set(CONTEXT_FACTORS)
        assert [f for f in CONTEXT_FACTORS if fa[f] != fb[f]] == [factor]


@pytest.mark.parametrize("domain", DOMAINS)
def test_attribute_swaps_change_one_attribute_phrase(domain):
    phrases = {name: {attribute_phrase(domain, name, v) for v in attribute_values(domain, name)} - {None}
               for name in attribute_names(domain)}
    prompts_a, prompts_b = make_swaps(f"{domain} attributes", 24, seed=3)
    for a, b in zip(prompts_a, prompts_b):
        assert prompt_factors(a) == prompt_factors(b)
        (head_a, tail_a), (head_b, tail_b) = (re.split(rf" {domain}\b", p, maxsplit=1) for p in (a, b))
        assert tail_a == tail_b
        named = [name for name, options in phrases.items()
                 if any(head_a.endswith(" " + p) for p in options) and any(head_b.endswith(" " + p) for p in options)]
        assert named, (a, b)
        assert a != b


def test_unknown_row_is_refused():
    with pytest.raises(ValueError, match="row must be one of"):
        make_swaps("weather", 2)


def test_text_change_is_zero_for_equal_prompts_and_gain_is_the_ratio(tmp_path):
    tokenizer = write_clip_tokenizer(tmp_path / "tok", vocabulary(), max_length=32)
    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=32, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    encoder = CLIPTextModel(config).eval()
    prompts_a, prompts_b = make_swaps("scene", 8)
    assert text_change(tokenizer, encoder, prompts_a, prompts_a) == (0.0, 0.0)
    text, embedding = text_change(tokenizer, encoder, prompts_a, prompts_b)
    assert text > 0 and embedding > 0
    table = text_gain(tokenizer, encoder, rows=ROWS, pairs=8)
    assert list(table) == list(ROWS)
    assert table["scene"]["text"] == pytest.approx(text) and table["scene"]["embedding"] == pytest.approx(embedding)
    for row in table.values():
        assert row["gain"] == pytest.approx(row["text"] / row["embedding"])


def test_command_reads_a_pipeline_or_a_clip_folder_and_refuses_anything_else(tmp_path, capsys):
    from nested_attention_toy.text_gain import main

    assert main(["--model", "clip", "--pairs", "4"]) == 0
    clip_table = capsys.readouterr().out
    assert main(["--pairs", "4"]) == 0  # the shipped pipeline's text encoder
    pipeline_table = capsys.readouterr().out
    for table in (clip_table, pipeline_table):
        assert [line.split()[0] for line in table.splitlines()[1:len(ROWS) + 1]] == [row.split()[0] for row in ROWS]
    assert main(["--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "pipeline folder" in err and "or a CLIP folder" in err
