"""Tokenizers for prepare-data: a user's Hugging Face `tokenizer.json`, or a byte-level BPE trained here.

The trained tokenizer puts the special tokens at the ids the model config expects (ModelConfig:
eos_token_id=0, pad_token_id=1, bos_token_id=2). Training is deterministic: the same documents give a
byte-identical tokenizer.json.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from complexity_dist.data.errors import DataError

EOS, PAD, BOS = "</s>", "<pad>", "<s>"
SPECIAL_TOKENS = (EOS, PAD, BOS)  # in id order: 0, 1, 2
# end-of-document tokens we recognise in a user's tokenizer, most preferred first
EOS_CANDIDATES = (EOS, "<|endoftext|>", "<|end_of_text|>", "<eos>")


def train_bpe(texts: Iterable[str], vocab_size: int, length: int | None = None) -> Tokenizer:
    """A byte-level BPE with </s>=0, <pad>=1, <s>=2, trained on `texts` up to `vocab_size` entries."""
    min_vocab = len(SPECIAL_TOKENS) + 256
    if vocab_size < min_vocab:
        raise DataError(f"vocab size {vocab_size} is too small for a byte-level BPE: it needs at least "
                        f"{min_vocab} (3 special tokens + 256 bytes); pass a larger --vocab-size")
    tokenizer = Tokenizer(models.BPE())
    # no prefix space: documents are joined with </s> as given, without inventing characters
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=length)
    return tokenizer


def load_tokenizer(path: Path) -> Tokenizer:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"tokenizer file {path} does not exist; pass a Hugging Face tokenizer.json or "
                        f"leave --tokenizer out to train one with --vocab-size")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust side raises a bare Exception on a malformed file
        raise DataError(f"tokenizer file {path} is not a Hugging Face tokenizer.json ({e}); "
                        f"save it with tokenizer.save('tokenizer.json')") from None


def vocab_size_of(tokenizer: Tokenizer) -> int:
    """One past the largest id the tokenizer can emit (added tokens included)."""
    return max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1


def eos_id_of(tokenizer: Tokenizer, where: Path | str) -> int:
    """The id appended after every document."""
    for token in EOS_CANDIDATES:
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token_id
    raise DataError(f"tokenizer {where} has no end-of-document token (looked for "
                    f"{', '.join(EOS_CANDIDATES)}); add one or let prepare-data train a tokenizer")


def special_ids_of(tokenizer: Tokenizer) -> dict[str, int]:
    """Ids of </s>, <pad>, <s> where the tokenizer has them (recorded in index.json for the trainer)."""
    names = {"eos_token_id": EOS, "pad_token_id": PAD, "bos_token_id": BOS}
    return {key: tokenizer.token_to_id(tok) for key, tok in names.items() if tokenizer.token_to_id(tok) is not None}
