import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import build, small_config

import longboi.checkpoint as ckpt
from longboi.checkpoint import load_model, save_checkpoint
from longboi.cli import main
from longboi.errors import UserError


def test_round_trip_is_exact_and_casts(tmp_path, tokenizer_path):
    from longboi.tokenizer import Tokenizer

    model = build(small_config(tie_word_embeddings=False, qk_ln=True))
    save_checkpoint(model, tmp_path / "ck", Tokenizer(tokenizer_path))
    assert sorted(os.listdir(tmp_path / "ck")) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    again = load_model(tmp_path / "ck")
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), again.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    save_checkpoint(model, tmp_path / "bf", dtype=torch.bfloat16)
    assert load_model(tmp_path / "bf").transformer.wte.weight.dtype == torch.bfloat16
    assert load_model(tmp_path / "bf", dtype=torch.float32).transformer.wte.weight.dtype == torch.float32


def test_failed_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    good = build(small_config(), seed=1)
    save_checkpoint(good, tmp_path / "ck")

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(build(small_config(), seed=2), tmp_path / "ck")
    assert torch.equal(load_model(tmp_path / "ck").transformer.wte.weight, good.transformer.wte.weight)
    assert os.listdir(tmp_path) == ["ck"]  # the temp dir was cleaned up


SAVE_FOREVER = """
import sys, torch
from longboi.checkpoint import save_checkpoint
from longboi.config import ModelConfig
from longboi.model import MPTForCausalLM
model = MPTForCausalLM(ModelConfig(d_model=256, n_heads=4, n_layers=6, vocab_size=50432))
print("ready", flush=True)
while True:
    save_checkpoint(model, sys.argv[1])
"""


def test_kill_9_during_saves_never_leaves_a_broken_checkpoint(tmp_path):
    target = tmp_path / "ck"
    save_checkpoint(build(small_config()), target)
    for delay in (0.3, 0.9, 1.6):
        proc = subprocess.Popen([sys.executable, "-c", SAVE_FOREVER, str(target)], stdout=subprocess.PIPE)
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        load_model(target)  # whichever save won, the directory is complete


def test_pickle_weights_need_the_explicit_flag(tmp_path):
    model = build(small_config())
    save_checkpoint(model, tmp_path / "ck")
    (tmp_path / "ck" / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "ck" / "pytorch_model.bin")
    with pytest.raises(UserError, match="pickle format.*--allow-pickle"):
        load_model(tmp_path / "ck")
    with pytest.warns(UserWarning, match="allow-pickle"):
        again = load_model(tmp_path / "ck", allow_pickle=True)
    assert torch.equal(again.transformer.wte.weight, model.transformer.wte.weight)


def test_bad_checkpoint_directories_give_clear_errors(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        load_model(tmp_path / "empty")
    save_checkpoint(build(small_config()), tmp_path / "ck")
    (tmp_path / "ck" / "config.json").write_text('{"d_model": 64,\n "n_heads": }')
    assert main(["info", str(tmp_path / "ck")]) == 2
    assert "config.json:2: invalid JSON" in capsys.readouterr().err
    save_checkpoint(build(small_config()), tmp_path / "ck")
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    cfg["n_layers"] = 3
    (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="do not match config.json: missing.*blocks.2"):
        load_model(tmp_path / "ck")
    cfg["model_type"] = "llama"
    (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="'llama' is not an MPT model"):
        load_model(tmp_path / "ck")


REPLACE_AND_DIE = """
import os, shutil, sys, torch
sys.path.insert(0, sys.argv[2])
from conftest import build, small_config
from longboi.train import checkpoint as ckpt
from longboi.train.parallelize import Dist
model = build(small_config())
opt = torch.optim.AdamW(model.parameters())
real, calls = shutil.rmtree, []
def rmtree_then_die(path, *a, **k):  # the worst moment: right after the removal that replaces step 5
    real(path, *a, **k)
    calls.append(path)
    if len(calls) == 2:  # the first clears the save's own temp dir
        os.kill(os.getpid(), 9)
shutil.rmtree = rmtree_then_die
ckpt.save(sys.argv[1], 5, model, opt, {"progress": {}}, Dist(), keep=3)
"""


def test_kill_9_during_a_same_step_training_checkpoint_replacement(tmp_path):
    """Re-saving a step (after a rollback) replaces it atomically: killed right after it removes a
    directory, the save still leaves a complete step 5 (the old code removed step 5, then died)."""
    from conftest import ROOT

    from longboi.train import checkpoint as train_ckpt
    from longboi.train.parallelize import Dist

    model = build(small_config())
    train_ckpt.save(tmp_path, 5, model, torch.optim.AdamW(model.parameters()), {"progress": {}}, Dist(), keep=3)
    done = subprocess.run([sys.executable, "-c", REPLACE_AND_DIE, str(tmp_path), str(ROOT / "tests")])
    assert done.returncode == -signal.SIGKILL
    assert [p.name for p in train_ckpt.checkpoints(tmp_path)] == ["step-00000005"]
    train_ckpt.load(train_ckpt.checkpoints(tmp_path)[0], model, torch.optim.AdamW(model.parameters()), Dist())


def test_stale_temp_directories_are_removed(tmp_path):
    for name in (".tmp-step-00000007", ".final.tmp-x1y2", ".ck.old-123", "step-00000005", ".keep"):
        (tmp_path / name).mkdir()
    removed = ckpt.remove_stale(tmp_path)
    assert sorted(p.name for p in removed) == [".ck.old-123", ".final.tmp-x1y2", ".tmp-step-00000007"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".keep", "step-00000005"]
