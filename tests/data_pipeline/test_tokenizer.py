"""Tokenizer contract: round trip on unicode/emoji, specials appended after the base vocabulary,
unique, and never produced by plain text (not even by their own literal strings)."""

import json

import pytest

from data_pipeline.cli import main
from data_pipeline.config import TokenizerSpec
from data_pipeline.tokenizer import load_hf, load_sentencepiece, load_tokenizer, mistral_model_path

TEXTS = ["Hello, world!", "Grüße aus Köln — naïve café", "日本語のテキストと中文", "emoji 😀🎉👩‍👩‍👧 ok",
         "Ünïcödé\ttabs\nand newlines", "<boi> <eoi> <s> </s> <pad> <image> <|endoftext|> [INST]"]


def _check_specials(tokenizer):
    specials = [tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.boi_id,
                tokenizer.eoi_id, tokenizer.image_id]
    assert len(set(specials)) == 6
    for name in ("pad", "boi", "eoi", "image"):
        assert getattr(tokenizer, f"{name}_id") >= tokenizer.base_vocab
    assert max(specials) == tokenizer.vocab_size - 1
    for text in TEXTS:
        ids = tokenizer.encode(text)
        assert not set(ids) & set(specials), (text, ids)
        assert all(0 <= i < tokenizer.base_vocab for i in ids)
        assert tokenizer.decode(ids) == text
        assert tokenizer.decode([tokenizer.bos_id, *ids, tokenizer.boi_id, tokenizer.image_id,
                                 tokenizer.eoi_id, tokenizer.eos_id, tokenizer.pad_id]) == text


def test_mistral_sentencepiece_round_trip_and_specials(tok):
    assert tok.base_vocab == 32000 and (tok.bos_id, tok.eos_id) == (1, 2)  # the model's own bos/eos
    assert tok.vocab_size == 32004
    _check_specials(tok)
    assert mistral_model_path().endswith("mistral_common/data/tokenizer.model.v1")


def test_train_sentencepiece_command(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"a photo of a sneaker number {i} in the café 😀" for i in range(200)))
    model = tmp_path / "sp.model"
    assert main(["tokenizer", "train", "--corpus", str(corpus), "--vocab", "320", "--out", str(model)]) == 0
    tokenizer = load_sentencepiece(str(model))
    assert tokenizer.base_vocab == 320
    _check_specials(tokenizer)  # byte fallback: unseen scripts and emoji still round-trip
    saved = tokenizer.save(str(tmp_path / "saved"))
    again = load_tokenizer(TokenizerSpec(kind="sentencepiece", path=saved))
    assert again.describe()["boi_id"] == tokenizer.boi_id
    assert json.load(open(tmp_path / "saved" / "megaflow_tokenizer.json"))["image_id"] == tokenizer.image_id


def test_hugging_face_tokenizer_from_local_dir(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(TEXTS[:3] * 20))
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train([str(corpus)], trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>").save_pretrained(tmp_path / "hf")
    tokenizer = load_hf(str(tmp_path / "hf"))
    assert tokenizer.eos_id == 0  # the HF tokenizer's own eos; bos is appended
    assert tokenizer.bos_id >= tokenizer.base_vocab
    _check_specials(tokenizer)  # "<|endoftext|>" in text stays text (split_special_tokens)


def test_unknown_kind_is_a_clear_error():
    with pytest.raises(ValueError, match="tokenizer kind 'bogus'"):
        load_tokenizer(TokenizerSpec(kind="bogus"))
