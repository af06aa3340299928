import pytest

from longboi.config import preset
from longboi.errors import UserError
from longboi.tokenizer import StreamDecoder, Tokenizer, padded_vocab_size


def test_neox_tokenizer_facts(tokenizer_path):
    tok = Tokenizer(tokenizer_path)
    assert tok.vocab_size == 50277
    assert padded_vocab_size(tok.vocab_size) == 50304  # smallest multiple of 128
    assert padded_vocab_size(tok.vocab_size, 256) == 50432 == preset("mpt-7b").vocab_size  # MPT's (NeoX's)
    assert 50432 % 128 == 0
    assert tok.encode("Hello world") == [12092, 1533]
    assert (tok.eos_id, tok.pad_id, tok.eos_token) == (0, 1, "<|endoftext|>")
    assert tok.decode(tok.encode("  indented\n\ttabs")) == "  indented\n\ttabs"
    assert len(tok.sha256()) == 64


def test_model_vocab_must_cover_the_tokenizer(tokenizer_path):
    tok = Tokenizer(tokenizer_path)
    tok.check_fits(50432)
    with pytest.raises(UserError, match="50277 ids.*vocab_size is 50000.*>= 50304"):
        tok.check_fits(50000)


def test_stream_decoder_never_splits_a_character(tokenizer_path):
    tok = Tokenizer(tokenizer_path)
    text = "naïve café 🤖🚀 日本語のテキスト done"
    ids = tok.encode(text)
    decoder = StreamDecoder(tok)
    pieces = [decoder.push(i) for i in ids]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert len(ids) > len([p for p in pieces if p])  # some tokens were held back mid-character


def test_bad_tokenizer_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        Tokenizer(tmp_path / "missing.json")
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="not a valid HF tokenizer.json"):
        Tokenizer(bad)


def test_tokenizer_config_names_special_tokens(tokenizer_path, tmp_path):
    tok = Tokenizer(tokenizer_path)
    tok.save(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": "<|padding|>", "pad_token": null}')
    again = Tokenizer(tmp_path)  # a directory works too
    assert again.eos_id == 1 and again.pad_id == 1


def test_train_bpe_small_vocab_round_trips_and_skips_the_holdout(tmp_path):
    from conftest import SHARED

    from longboi.tokenizer import train_bpe

    text_file = SHARED / "text" / "tinyshakespeare.txt"
    tok = train_bpe([text_file], 1000, tmp_path / "t.json", holdout_fraction=0.1)
    assert tok.vocab_size == 1000 and tok.eos_id == 0 and tok.pad_id == 1
    sample = "ROMEO:\nBut soft, what light through yonder window breaks? 🤖"
    assert tok.decode(tok.encode(sample)) == sample
    full = train_bpe([text_file], 1000, tmp_path / "full.json")
    assert tok.sha256() != full.sha256()  # the held-out tail changed the merges
    with pytest.raises(UserError, match="too small"):
        train_bpe([text_file], 100, tmp_path / "x.json")
