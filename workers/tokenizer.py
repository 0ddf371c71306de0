"""Tokenizers: whatever `tokenizer.json` a checkpoint ships (through the `tokenizers` library),
and the byte-level one of the tiny default (ids 0/1 = BOS/EOS, id 2+b = byte b), with which any
UTF-8 text round-trips exactly.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models
from tokenizers.pre_tokenizers import ByteLevel

from .config import ModelConfig

BOS_TEXT, EOS_TEXT = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"  # DeepSeek's special tokens
BYTE_OFFSET = 2


class TokenizerError(ValueError):
    """A missing or unreadable tokenizer.json; the message names the path."""


def byte_chars() -> list[str]:
    """The printable stand-in character of each byte in ByteLevel's (GPT-2's) mapping: bytes that
    are printable Latin-1 stand for themselves, the others take U+0100 onwards in byte order."""
    keep = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def build_byte_tokenizer() -> HFTokenizer:
    """Byte-level BPE without merges: BOS, EOS, then one token per byte."""
    vocab = {BOS_TEXT: 0, EOS_TEXT: 1}
    vocab.update({ch: BYTE_OFFSET + b for b, ch in enumerate(byte_chars())})
    tk = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    # No regex split and no prefix space: the text is only mapped to bytes, nothing is added or lost.
    tk.pre_tokenizer = ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(BOS_TEXT, special=True), AddedToken(EOS_TEXT, special=True)])
    return tk


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the BOS/EOS ids of the model config."""

    def __init__(self, tk: HFTokenizer, cfg: ModelConfig):
        self.tk, self.bos_id, self.eos_id = tk, cfg.bos_token_id, cfg.eos_token_id
        self.vocab_size = tk.get_vocab_size()
        # Text is text: a prompt that spells out "<｜end▁of▁sentence｜>" gets its bytes, not EOS, so
        # users cannot inject control tokens and every string round-trips. Special ids enter only
        # as ids (add_bos, or a caller assembling ids).
        self.tk.encode_special_tokens = True

    @classmethod
    def from_dir(cls, path: str | Path, cfg: ModelConfig) -> "Tokenizer":
        file = Path(path) / "tokenizer.json"
        try:
            text = file.read_text()
        except FileNotFoundError:
            raise TokenizerError(f"no tokenizer.json in {path}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise TokenizerError(f"cannot read {file}: {e}") from None
        return cls.from_json(text, cfg, where=str(file))

    @classmethod
    def from_json(cls, text: str, cfg: ModelConfig, where: str = "tokenizer.json") -> "Tokenizer":
        try:
            tk = HFTokenizer.from_str(text)
        except Exception as e:  # the tokenizers library raises plain Exception
            raise TokenizerError(f"{where} is not a valid tokenizer: {e}") from None
        return cls(tk, cfg)

    def to_json(self) -> str:
        return self.tk.to_str()

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self.tk.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if add_bos else ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special)


class IncrementalDecoder:
    """Turns a token stream into text deltas without ever emitting half a UTF-8 character.

    Each step decodes two short id windows that start at the same token, the text already
    emitted and that plus the new tokens, and emits the difference. While the longer one ends in
    U+FFFD (the decoder's rendering of an incomplete byte sequence) the new tokens are held back.
    Decoding windows rather than single tokens keeps whatever the tokenizer's decoder does across
    token boundaries (added tokens, leading-space rules) identical to `Tokenizer.decode`.
    """

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        self._ids: list[int] = []
        self._start = 0  # first id of the windows
        self._done = 0  # ids up to here are emitted

    def feed(self, token_id: int) -> str:
        self._ids.append(token_id)
        emitted = self.tok.decode(self._ids[self._start : self._done])
        text = self.tok.decode(self._ids[self._start :])
        if text.endswith("\ufffd") or len(text) <= len(emitted):
            return ""
        self._start, self._done = self._done, len(self._ids)
        return text[len(emitted) :]

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character becomes U+FFFD)."""
        emitted = self.tok.decode(self._ids[self._start : self._done])
        text = self.tok.decode(self._ids[self._start :])
        self._start = self._done = len(self._ids)
        return text[len(emitted) :]
