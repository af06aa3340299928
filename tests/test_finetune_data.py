import json

import pytest
import torch
import torch.nn.functional as F
from conftest import SHARED, build, small_config

from longboi.data.finetune import IGNORE, load_examples, pack, tokenize_row
from longboi.errors import UserError
from longboi.tokenizer import Tokenizer, chatml

DOLLY = SHARED / "instruct" / "dolly_hhrlhf_small.jsonl"
CHAT = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi?"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "Four."},
    ]
}


@pytest.fixture(scope="module")
def tok(tokenizer_path):
    return Tokenizer(tokenizer_path)


def trained_text(tok, ex):
    return tok.decode([label for label in ex.labels if label != IGNORE], skip_special_tokens=False)


def test_prompt_response_masks_the_prompt_exactly(tok):
    row = {"prompt": "### Instruction: add 2 and 2\n### Response:", "response": " 4"}
    ex = tokenize_row(row, tok, "x")
    n_prompt, n_response = len(tok.encode(row["prompt"])), len(tok.encode(row["response"]))
    assert len(ex.input_ids) == len(ex.labels) == n_prompt + n_response  # +EOS, -1 for the shift
    assert sum(label != IGNORE for label in ex.labels) == n_response + 1  # response tokens and EOS
    assert trained_text(tok, ex) == " 4<|endoftext|>"
    full = tokenize_row(row, tok, "x", target_prompts="all")
    assert all(label != IGNORE for label in full.labels)
    assert tokenize_row({"prompt": "p", "completion": " c"}, tok, "x").labels[-2:] == [tok.encode(" c")[0], 0]


def test_chat_masking_rules_and_template(tok):
    last = tokenize_row(CHAT, tok, "x")
    assert trained_text(tok, last) == "Four.<|im_end|>\n<|endoftext|>"
    both = tokenize_row(CHAT, tok, "x", target_responses="all")
    assert trained_text(tok, both) == "Hello.<|im_end|>\nFour.<|im_end|>\n<|endoftext|>"
    rendered = "".join(chatml(m["role"], m["content"]) for m in CHAT["messages"])
    assert tok.decode(last.input_ids + [last.labels[-1]], skip_special_tokens=False) == rendered + "<|endoftext|>"
    prompt_lengths = [
        len(tok.encode(chatml(m["role"], m["content"]))) for m in CHAT["messages"] if m["role"] != "assistant"
    ]
    trained = lambda rule: sum(x != IGNORE for x in tokenize_row(CHAT, tok, "x", target_prompts=rule).labels)  # noqa: E731
    longest = max(prompt_lengths)
    assert trained("none") < trained(f"length>={longest}") < trained("all")  # only the longest prompt turn
    assert trained("length>=1") == trained("all") and trained("length>=100000") == trained("none")
    with pytest.raises(UserError, match="target_prompts"):
        tokenize_row(CHAT, tok, "x", target_prompts="some")


def test_dolly_loads_and_overflow_is_counted(tok):
    examples, report = load_examples(DOLLY, tok, max_seq_len=2048)
    assert report.examples == len(examples) == 1000 and report.skipped == 0
    short, rep = load_examples(DOLLY, tok, max_seq_len=64)
    assert rep.truncated > 0 and all(len(e.input_ids) <= 64 for e in short)
    _, dropped = load_examples(DOLLY, tok, max_seq_len=64, overflow="drop")
    assert dropped.dropped >= rep.truncated and dropped.examples + dropped.dropped == 1000


def test_bad_rows_name_file_and_line(tmp_path, tok):
    path = tmp_path / "ft.jsonl"
    path.write_text(
        json.dumps({"prompt": "a", "response": "b"})
        + "\n{broken\n"
        + json.dumps({"text": "x"})
        + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "only a question"}]})
        + "\n"
    )
    with pytest.raises(UserError, match=r"ft.jsonl:2: invalid JSON"):
        load_examples(path, tok, 128)
    examples, report = load_examples(path, tok, 128, on_bad_input="skip")
    assert len(examples) == 1 and report.skipped == 3
    assert any("ft.jsonl:3" in r and "prompt, response" in r for r in report.skip_examples)
    assert any("ft.jsonl:4" in r and "assistant" in r for r in report.skip_examples)
    with pytest.raises(UserError, match="not found"):
        load_examples(tmp_path / "none.jsonl", tok, 128)


def test_packing_never_mixes_examples(tok):
    examples, _ = load_examples(DOLLY, tok, max_seq_len=128)
    examples = examples[:12]
    batch, efficiency = pack(examples, 256, tok.pad_id)
    assert batch["input_ids"].shape[1] == 256 and batch["input_ids"].shape[0] < 12 and 0.5 < efficiency <= 1
    assert int((batch["labels"] != IGNORE).sum()) == sum(sum(x != IGNORE for x in e.labels) for e in examples)
    model = build(small_config(max_seq_len=256))
    with torch.no_grad():
        logits = model(batch["input_ids"], sequence_id=batch["sequence_id"])
        packed_losses = []
        for row in range(len(batch["input_ids"])):
            for s in batch["sequence_id"][row].unique().tolist():
                if s < 0:
                    continue
                at = batch["sequence_id"][row] == s
                packed_losses.append(
                    round(float(F.cross_entropy(logits[row][at], batch["labels"][row][at], ignore_index=IGNORE)), 4)
                )
        alone = []
        for e in examples:
            out = model(torch.tensor([e.input_ids]))[0]
            alone.append(round(float(F.cross_entropy(out, torch.tensor(e.labels), ignore_index=IGNORE)), 4))
    assert sorted(packed_losses) == sorted(alone)  # ALiBi is relative: packed = alone, to 1e-4


def test_the_tokenizers_own_jinja_chat_template_is_used_for_training_and_chat(tmp_path, tokenizer_path):
    from longboi.chat import ChatSession
    from longboi.generate import SamplingParams
    from longboi.tokenizer import render_chat

    template = (
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    Tokenizer(tokenizer_path).save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    tok = Tokenizer(tmp_path)
    assert tok.chat_template == template
    ex = tokenize_row(CHAT, tok, "x", target_responses="all")
    assert trained_text(tok, ex) == "Hello.\nFour.\n<|endoftext|>"  # only the assistant turns (and EOS)
    rendered = render_chat(CHAT["messages"], template, add_generation_prompt=False)
    assert tok.decode(ex.input_ids + [ex.labels[-1]], skip_special_tokens=False) == rendered + "<|endoftext|>"
    session = ChatSession(build(small_config()), tok, SamplingParams(max_new_tokens=3, temperature=0), "Be brief.")
    session.messages = CHAT["messages"][1:4]
    assert session.prompt() == "[system] Be brief.\n[user] Hi?\n[assistant] Hello.\n[user] 2+2?\n[assistant] "
    broken = "{{ messages | length }}"  # renders are not growing prefixes: refused, not mis-masked
    with pytest.raises(ValueError, match="growing prefixes"):
        from longboi.data.finetune import _segments

        _segments(CHAT, "x", broken)
