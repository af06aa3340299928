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


def byte_fallback_tokenizer(path) -> Tokenizer:
    """A Llama-style tokenizer: SentencePiece spaces, and characters outside its vocab as <0xNN> bytes."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, normalizers

    vocab = {f"<0x{i:02X}>": i for i in range(256)}
    for ch in "\u2581abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.,!?'\n":
        vocab.setdefault(ch, len(vocab))
    vocab["</s>"] = len(vocab)
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.save(str(path))
    return Tokenizer(path)


MULTILINGUAL = "naïve café 🤖🚀 日本語のテキスト, Ελληνικά, العربية, हिन्दी done\n"


@pytest.mark.parametrize("kind", ["neox-long", "neox-multilingual", "byte-fallback"])
def test_stream_decoder_equals_the_full_decode_incrementally(kind, tokenizer_path, tmp_path, monkeypatch):
    from conftest import SHARED

    if kind == "byte-fallback":
        tok, text = byte_fallback_tokenizer(tmp_path / "tokenizer.json"), "Hello world! " + MULTILINGUAL * 3
    else:
        tok = Tokenizer(tokenizer_path)
        text = (
            (SHARED / "text" / "tinyshakespeare.txt").read_text()[:40_000] if kind == "neox-long" else MULTILINGUAL * 5
        )
    ids = tok.encode(text)
    decoded = {"ids": 0}
    real = tok.decode

    def counting(ids_, **kw):
        decoded["ids"] += len(ids_)
        return real(ids_, **kw)

    monkeypatch.setattr(tok, "decode", counting)
    decoder = StreamDecoder(tok)
    pieces = [decoder.push(i) for i in ids]
    assert "".join(pieces) + decoder.flush() == real(ids) == text
    assert not any("\ufffd" in p for p in pieces)
    if kind != "neox-long":
        assert len(ids) > len([p for p in pieces if p])  # some tokens were held back mid-character
    assert decoded["ids"] < 12 * len(ids)  # short windows: linear in the length, not quadratic


def test_stream_decoder_flushes_an_unfinished_character(tokenizer_path):
    tok = Tokenizer(tokenizer_path)
    ids = tok.encode("ok 🤖")
    decoder = StreamDecoder(tok)
    pieces = [decoder.push(i) for i in ids[:-1]]  # the robot's last byte never comes
    assert "".join(pieces) + decoder.flush() == tok.decode(ids[:-1])


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


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",  # the classic escape to os / subprocess
        "{{ cycler.__init__.__globals__.os.getcwd() }}",  # reaching for os through a default global
        "{{ messages.append({'role': 'system', 'content': 'injected'}) }}",  # mutating the caller's data
    ],
)
def test_a_checkpoint_chat_template_runs_sandboxed(template):
    import jinja2

    from longboi.tokenizer import render_chat

    messages = [{"role": "user", "content": "hi"}]
    assert jinja2.Environment().from_string(template).render(messages=list(messages))  # unsandboxed: it runs
    with pytest.raises(UserError, match="chat template tried an unsafe operation"):
        render_chat(messages, template, add_generation_prompt=True)
    assert messages == [{"role": "user", "content": "hi"}]
