"""A byte-level BPE tokenizer trained for pre-training from scratch (``model.train_tokenizer``)."""
from __future__ import annotations

from ..errors import ConfigError

EOS, PAD = "<|endoftext|>", "<pad>"


def train_bpe_tokenizer(texts: list[str], tcfg):
    """Byte-level BPE (Sennrich et al. 2016; bytes as the base alphabet as in GPT-2, Radford et al. 2019).

    ``texts`` must be the server's own text (the held-out split, ``FederatedData.public_texts()``), never a client's
    data: the vocabulary is shared with every client and would otherwise leak their words. Training is deterministic
    for the same texts and settings. ``<|endoftext|>`` is bos, eos and unk (byte-level BPE never needs unk); ``<pad>``
    pads. Returns a ``transformers.PreTrainedTokenizerFast``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise ConfigError("model.train_tokenizer: there is no text to train the tokenizer on (it trains on the server's "
                          "held-out split, which is empty or pre-tokenized here); set model.tokenizer instead")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=tcfg.vocab_size, min_frequency=tcfg.min_frequency, show_progress=False,
                                  special_tokens=[EOS, PAD], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token=PAD)
