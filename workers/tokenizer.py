"""Tokenizers: whatever `tokenizer.json` a checkpoint ships (through the `tokenizers` library),
and the byte-level one of the tiny default (ids 0/1 = BOS/EOS, id 2+b = byte b), with which any
UTF-8 text round-trips exactly.
"""

from __future__ import annotations

import codecs
from pathlib import Path

from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models
from tokenizers.pre_tokenizers import ByteLevel

from .config import ModelConfig

BOS_TEXT, EOS_TEXT = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"  # DeepSeek's special tokens
BYTE_OFFSET = 2


class TokenizerError(ValueError):
    """A missing or unreadable tokenizer.json; the message names the path."""


def _byte_chars() -> list[str]:
    """The printable stand-in character of each byte, in ByteLevel's (GPT-2's) mapping."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def build_byte_tokenizer() -> HFTokenizer:
    vocab = {BOS_TEXT: 0, EOS_TEXT: 1}
    vocab.update({ch: BYTE_OFFSET + b for b, ch in enumerate(_byte_chars())})
    tk = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(BOS_TEXT, special=True), AddedToken(EOS_TEXT, special=True)])
    return tk


class Tokenizer:
    def __init__(self, tk: HFTokenizer, cfg: ModelConfig):
        self.tk, self.bos_id, self.eos_id = tk, cfg.bos_token_id, cfg.eos_token_id
        self.vocab_size = tk.get_vocab_size()
        self._special = {i for t, i in tk.get_vocab(with_added_tokens=True).items() if t in (BOS_TEXT, EOS_TEXT)}
        self._special |= {self.bos_id, self.eos_id}

    @classmethod
    def from_dir(cls, path: str | Path, cfg: ModelConfig) -> "Tokenizer":
        file = Path(path) / "tokenizer.json"
        if not file.exists():
            raise TokenizerError(f"no tokenizer.json in {path}")
        return cls.from_json(file.read_text(), cfg, where=str(file))

    @classmethod
    def from_json(cls, text: str, cfg: ModelConfig, where: str = "tokenizer.json") -> "Tokenizer":
        try:
            return cls(HFTokenizer.from_str(text), cfg)
        except Exception as e:  # the tokenizers library raises plain Exception subclasses
            raise TokenizerError(f"{where} is not a valid tokenizer: {e}") from None

    def to_json(self) -> str:
        return self.tk.to_str()

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self.tk.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if add_bos else ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special)

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special


class IncrementalDecoder:
    """Turns a token stream into text deltas without ever emitting half a UTF-8 character.

    Byte-level tokenizers (DeepSeek's, the tiny one): each token maps to bytes, fed through an
    incremental UTF-8 decoder. Others: re-decode the tokens so far and emit what grew, holding
    back while the text ends in an incomplete character.
    """

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        self._byte_level = isinstance(tok.tk.decoder, decoders.ByteLevel)
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._inverse = {ch: b for b, ch in enumerate(_byte_chars())}
        self._ids: list[int] = []
        self._emitted = 0

    def feed(self, token_id: int) -> str:
        if self.tok.is_special(token_id):
            return ""
        if self._byte_level:
            piece = self.tok.tk.id_to_token(token_id) or ""
            return self._utf8.decode(bytes(self._inverse[c] for c in piece if c in self._inverse))
        self._ids.append(token_id)
        text = self.tok.decode(self._ids)
        if text.endswith("\ufffd"):
            return ""
        delta, self._emitted = text[self._emitted :], len(text)
        return delta

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character becomes U+FFFD)."""
        return self._utf8.decode(b"", final=True) if self._byte_level else ""
