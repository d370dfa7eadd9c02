"""``model.train_tokenizer``: a deterministic byte-level BPE with the special tokens the LM task and generation use."""
from __future__ import annotations

import pytest

from fedfm.config import TokenizerTrainConfig
from fedfm.errors import ConfigError
from fedfm.models.tokenizer import EOS, PAD, train_bpe_tokenizer

from tests.conftest import make_rows

TEXTS = [r["text"] for r in make_rows(200)] + ["The quick brown fox jumps over the lazy dog."] * 3


def test_trained_tokenizer_specials_and_size():
    tok = train_bpe_tokenizer(TEXTS, TokenizerTrainConfig(vocab_size=320, min_frequency=2))
    assert tok.eos_token == tok.bos_token == tok.unk_token == EOS and tok.pad_token == PAD
    assert tok.eos_token_id != tok.pad_token_id
    assert 256 + 2 < len(tok) <= 320  # the 256 byte symbols, the two specials, and learned merges
    assert tok.convert_ids_to_tokens(tok(" the said")["input_ids"]) == ["Ġthe", "Ġsaid"]  # frequent words merged


def test_training_is_deterministic():
    cfg = TokenizerTrainConfig(vocab_size=400, min_frequency=1)
    a, b = train_bpe_tokenizer(TEXTS, cfg), train_bpe_tokenizer(list(TEXTS), cfg)
    assert a.get_vocab() == b.get_vocab()
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()  # same merges, in the same order


def test_byte_level_round_trips_unseen_text(tmp_path):
    from transformers import AutoTokenizer

    tok = train_bpe_tokenizer(TEXTS, TokenizerTrainConfig(vocab_size=320))
    text = "naïve café ☕ — 12,345 ÄÖÜ\n\ttabs"  # nothing like the training text: bytes cover it, no unk
    ids = tok(text)["input_ids"]
    assert tok.unk_token_id not in ids and tok.decode(ids) == text
    tok.save_pretrained(str(tmp_path))
    again = AutoTokenizer.from_pretrained(str(tmp_path))
    assert again(text)["input_ids"] == ids and again.pad_token == PAD and again.eos_token == EOS


@pytest.mark.parametrize("texts", [[], ["", "   \n"]])
def test_no_text_is_a_config_error(texts):
    with pytest.raises(ConfigError, match="model.train_tokenizer"):
        train_bpe_tokenizer(texts, TokenizerTrainConfig())
