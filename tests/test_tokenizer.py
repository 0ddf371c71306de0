import pytest

from workers.config import preset
from workers.tokenizer import BYTE_OFFSET, IncrementalDecoder, Tokenizer, TokenizerError, build_byte_tokenizer

TEXTS = ["Hello world", " leading space", "日本語 and emoji 🎉🧪\n", "tab\tnul\x00end", "é" * 50, ""]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(build_byte_tokenizer(), preset("tiny"))


@pytest.mark.parametrize("text", TEXTS)
def test_any_utf8_text_round_trips_and_ids_are_its_bytes(tok, text):
    ids = tok.encode(text)
    assert ids == [b + BYTE_OFFSET for b in text.encode()]
    assert tok.decode(ids) == text


def test_vocabulary_is_bos_eos_then_256_bytes(tok):
    assert tok.vocab_size == preset("tiny").vocab_size == 258
    assert tok.encode("a", add_bos=True) == [0, ord("a") + BYTE_OFFSET]
    assert tok.decode([0, ord("a") + BYTE_OFFSET, 1]) == "a"


def test_incremental_decoder_never_emits_half_a_character(tok):
    text = "aé日🎉z"
    dec = IncrementalDecoder(tok)
    pieces = [dec.feed(i) for i in tok.encode(text)]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert pieces[1] == "" and pieces[2] == "é"  # 0xC3 held back until 0xA9 arrives


def test_tokenizer_json_round_trips_and_bad_files_name_the_path(tok, tmp_path):
    (tmp_path / "tokenizer.json").write_text(tok.to_json())
    again = Tokenizer.from_dir(tmp_path, preset("tiny"))
    assert again.encode("xyz") == tok.encode("xyz")
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        Tokenizer.from_dir(tmp_path / "missing", preset("tiny"))
    (tmp_path / "tokenizer.json").write_text("{]")
    with pytest.raises(TokenizerError, match="tokenizer.json is not a valid tokenizer"):
        Tokenizer.from_dir(tmp_path, preset("tiny"))
