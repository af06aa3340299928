import subprocess
import sys

from conftest import build, small_config

from longboi.chat import ChatSession
from longboi.checkpoint import save_checkpoint
from longboi.data.finetune import tokenize_row
from longboi.generate import SamplingParams
from longboi.tokenizer import Tokenizer, chatml


def test_session_history_template_and_reset(tokenizer_path):
    tok = Tokenizer(tokenizer_path)
    session = ChatSession(build(small_config()), tok, SamplingParams(max_new_tokens=8, temperature=0), "Be brief.")
    reply = "".join(session.send("Hello?"))
    assert session.messages == [{"role": "user", "content": "Hello?"}, {"role": "assistant", "content": reply.strip()}]
    "".join(session.send("And then?"))
    prompt = session.prompt()
    assert prompt.startswith(chatml("system", "Be brief.") + chatml("user", "Hello?"))
    assert prompt.endswith(
        chatml("user", "And then?") + chatml("assistant", session.messages[-1]["content"]) + "<|im_start|>assistant\n"
    )
    # the inference template is the finetuning template: same text, same tokens
    row = {"messages": [{"role": "system", "content": "Be brief."}, *session.messages]}
    trained = tokenize_row(row, tok, "x")
    assert tok.decode(trained.input_ids, skip_special_tokens=False).startswith(
        prompt[: -len("<|im_start|>assistant\n")]
    )
    session.reset()
    assert session.messages == [] and session.prompt() == chatml("system", "Be brief.") + "<|im_start|>assistant\n"


def test_chat_command_reads_stdin_for_scripting(tmp_path, tokenizer_path):
    save_checkpoint(build(small_config()), tmp_path / "ck", Tokenizer(tokenizer_path))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "longboi",
            "chat",
            str(tmp_path / "ck"),
            "--max-new-tokens",
            "5",
            "--temperature",
            "0",
            "--system",
            "You are terse.",
        ],
        input="Hello\n/reset\n\nHow are you?\n/exit\nnever read\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("assistant> ") == 2 and "(conversation cleared)" in out.stderr
