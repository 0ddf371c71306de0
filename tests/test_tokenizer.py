"""The byte-level tokenizer round-trips any UTF-8 text; the incremental decoder streams it without
ever splitting a character."""

import json

import pytest
from tokenizers import AddedToken
from tokenizers.pre_tokenizers import ByteLevel

from workers.config import preset
from workers.tokenizer import (
    BOS_TEXT, BYTE_OFFSET, EOS_TEXT, IncrementalDecoder, Tokenizer, TokenizerError, build_byte_tokenizer, byte_chars,
)

TINY = preset("tiny")
# Every code point below U+0800 (all 1- and 2-byte sequences), then a stride through the 3- and
# 4-byte ranges: together they use every byte that valid UTF-8 can contain.
WIDE = "".join(map(chr, [*range(0x800), *range(0x800, 0xD800, 7), *range(0xE000, 0x110000, 89)]))
TEXTS = ["Hello world", "  two leading spaces", "日本語のテキスト", "emoji 🎉🧪👩‍👩‍👧", "line\nbreaks\r\n\n",
         "tab\tnul\x00end", "é" * 50, "", f"literal {EOS_TEXT} and {BOS_TEXT}", WIDE]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(build_byte_tokenizer(), TINY)


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_any_utf8_text_round_trips_and_its_ids_are_its_bytes(tok, text):
    ids = tok.encode(text)
    assert ids == [BYTE_OFFSET + b for b in text.encode()]  # special-token spellings included: no injection
    assert tok.decode(ids) == text


def test_vocabulary_is_bos_eos_then_the_256_byte_level_characters(tok):
    assert tok.vocab_size == TINY.vocab_size == 258
    assert (tok.tk.id_to_token(0), tok.tk.id_to_token(1)) == (BOS_TEXT, EOS_TEXT)
    chars = byte_chars()
    assert len(set(chars)) == 256 and set(chars) == set(ByteLevel.alphabet())
    assert [tok.tk.id_to_token(BYTE_OFFSET + b) for b in range(256)] == chars
    spec = json.loads(tok.to_json())
    assert spec["model"]["merges"] == [] and spec["decoder"]["type"] == "ByteLevel"
    assert spec["pre_tokenizer"]["type"] == "ByteLevel"
    assert (spec["pre_tokenizer"]["add_prefix_space"], spec["pre_tokenizer"]["use_regex"]) == (False, False)


def test_bos_and_eos_come_from_the_config_and_are_skipped_on_decode(tok):
    a = BYTE_OFFSET + ord("a")
    assert (tok.bos_id, tok.eos_id) == (TINY.bos_token_id, TINY.eos_token_id) == (0, 1)
    assert tok.encode("a", add_bos=True) == [0, a]
    assert tok.decode([0, a, 1]) == "a"
    assert tok.decode([0, a, 1], skip_special=False) == f"{BOS_TEXT}a{EOS_TEXT}"
    swapped = Tokenizer(build_byte_tokenizer(), TINY.model_copy(update={"bos_token_id": 1, "eos_token_id": 0}))
    assert (swapped.bos_id, swapped.eos_id) == (1, 0) and swapped.encode("a", add_bos=True) == [1, a]


def stream(tok, ids):
    dec = IncrementalDecoder(tok)
    return [dec.feed(i) for i in ids], dec.flush()


def test_incremental_decoder_holds_multibyte_characters_until_their_last_byte(tok):
    # a: 1 byte, é: 2, 日: 3, 🎉: 4 -> one byte token each
    pieces, rest = stream(tok, tok.encode("aé日🎉z"))
    assert pieces == ["a", "", "é", "", "", "日", "", "", "", "🎉", "z"]
    assert rest == ""


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_incremental_decoder_streams_exactly_the_decoded_text(tok, text):
    ids = tok.encode(text, add_bos=True) + [tok.eos_id]
    pieces, rest = stream(tok, ids)
    assert "".join(pieces) + rest == tok.decode(ids) == text
    assert rest == "" and not any("\ufffd" in p for p in pieces)


def test_incremental_decoder_flush_renders_a_truncated_character_as_replacement(tok):
    pieces, rest = stream(tok, tok.encode("ok日")[:-1])  # the stream stops inside 日
    assert pieces == ["o", "k", "", ""] and rest == "\ufffd"


def test_incremental_decoder_emits_added_tokens_as_decode_does():
    tk = build_byte_tokenizer()
    tk.add_tokens([AddedToken("<｜User｜>", special=False)])  # DeepSeek's role markers are such tokens
    tok = Tokenizer(tk, TINY)
    ids = tok.encode("<｜User｜>日x")
    assert ids[0] == 258 and len(ids) == 5
    pieces, rest = stream(tok, ids)
    assert pieces == ["<｜User｜>", "", "", "日", "x"] and rest == ""


def test_tokenizer_json_round_trips_through_a_checkpoint_dir(tok, tmp_path):
    (tmp_path / "tokenizer.json").write_text(tok.to_json())
    again = Tokenizer.from_dir(tmp_path, TINY)
    assert again.encode(WIDE) == tok.encode(WIDE) and again.vocab_size == 258
    assert Tokenizer.from_json(tok.to_json(), TINY).decode(tok.encode("日")) == "日"


def test_missing_or_corrupt_tokenizer_json_is_an_error_naming_the_path(tmp_path):
    with pytest.raises(TokenizerError, match=f"no tokenizer.json in {tmp_path / 'missing'}"):
        Tokenizer.from_dir(tmp_path / "missing", TINY)
    (tmp_path / "tokenizer.json").write_text("{]")
    with pytest.raises(TokenizerError, match=f"{tmp_path / 'tokenizer.json'} is not a valid tokenizer"):
        Tokenizer.from_dir(tmp_path, TINY)
    (tmp_path / "tokenizer.json").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(TokenizerError, match=f"cannot read {tmp_path / 'tokenizer.json'}"):
        Tokenizer.from_dir(tmp_path, TINY)
