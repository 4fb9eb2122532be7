"""Binding a subject to a word: positions, every occurrence, and the errors that name word and prompt."""

import pytest

from nested_attention import NestedAttentionError
from nested_attention.binding import word_positions
from nested_attention.tiny import TINY_WORDS, write_clip_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return write_clip_tokenizer(tmp_path_factory.mktemp("tok"))


def test_positions_follow_the_tokenization(tokenizer):
    prompt = "a photo of a person at the beach"
    ids = tokenizer(prompt).input_ids
    [position] = word_positions([tokenizer], prompt, "person")
    assert tokenizer.convert_ids_to_tokens(ids[position]) == "person</w>"


def test_every_occurrence_is_bound_case_insensitively(tokenizer):
    assert word_positions([tokenizer], "A Person and a PERSON", "person") == [2, 5]


def test_word_inside_another_word_is_not_bound(tokenizer):
    with pytest.raises(NestedAttentionError, match="does not contain the subject word 'pet'"):
        word_positions([tokenizer], "a photo of petals", "pet")


def test_missing_word_names_word_and_prompt(tokenizer):
    with pytest.raises(NestedAttentionError, match=r"prompt 'a dog in the snow' does not contain the subject word 'person'"):
        word_positions([tokenizer], "a dog in the snow", "person")


def test_multi_token_word_is_refused(tokenizer):
    with pytest.raises(NestedAttentionError, match=r"'dachshund' \(prompt 'a dachshund'\) is split by the tokenizer into \d+ tokens"):
        word_positions([tokenizer], "a dachshund", "dachshund")


def test_word_cut_off_by_the_length_limit(tokenizer):
    prompt = " ".join(["red"] * 80) + " person"
    with pytest.raises(NestedAttentionError, match="after the tokenizer's 77-token limit"):
        word_positions([tokenizer], prompt, "person")


def test_tokenizers_must_agree(tokenizer, tmp_path):
    other = write_clip_tokenizer(tmp_path, words=[w for w in TINY_WORDS if w != "photo"])
    prompt = "a photo of a person"
    assert word_positions([tokenizer, tokenizer], prompt, "person") == [5]  # after <|startoftext|>
    with pytest.raises(NestedAttentionError, match="different positions"):
        word_positions([tokenizer, other], prompt, "person")
