"""The ``sparsecore`` command: train -> checkpoint -> resume -> generate end to end,
bit-identical resume, the corpus, and one clear line for every CLI error."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from sparsecore import cli
from sparsecore.data import CorpusError, load_corpus, train_batch, val_batches

# A tiny run: 2-layer d_model 32 model (--quick), 8 steps, refresh every 2 steps,
# validation and checkpoints every 4 steps, 64 KiB of the default corpus.
TINY = ["--quick", "--steps", "8", "--eval-every", "4", "--save-every", "4",
        "--refresh-every", "2", "--max-bytes", "64KiB", "--val-tokens", "512"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train(tmp_path, name, *extra):
    return cli.main(["train", "--runs-dir", str(tmp_path / "runs"), "--name", name, *TINY,
                     *extra])


def records(run_dir, kind):
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return [r for r in map(json.loads, fh) if r["type"] == kind]


def error_line(capsys, rc):
    """Assert a CLI error: exit code 2 and exactly one line on stderr; return it."""
    out, err = capsys.readouterr()
    assert rc == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One finished tiny run shared by the tests that only read it."""
    tmp = tmp_path_factory.mktemp("trained")
    assert train(tmp, "a") == 0
    return tmp, os.path.join(tmp, "runs", "a")


# ------------------------------------------------------------------ end to end
def test_train_writes_run_and_learns(trained, capsys):
    _, run = trained
    for f in ("checkpoint.safetensors", "config.json", "metrics.jsonl", "curves.png",
              "summary.json"):
        assert os.path.getsize(os.path.join(run, f)) > 0, f
    val = records(run, "val")
    assert [r["step"] for r in val] == [0, 4, 8]
    assert val[-1]["bpb"] < val[0]["bpb"] - 0.3          # it learns
    assert [r["step"] for r in records(run, "train")] == list(range(1, 9))
    refresh = records(run, "refresh")
    assert [r["step"] for r in refresh] == [2, 4, 6, 8]
    assert all(0.0 <= r["changed_a"] <= 1.0 for r in refresh)
    with open(os.path.join(run, "summary.json")) as fh:
        s = json.load(fh)
    assert s["steps"] == 8 and not s["dense"]
    assert s["stored_params"] < s["dense_equivalent_params"]
    assert 0 < s["state_bytes"] < s["dense_adam_state_bytes"]
    assert s["val_bpb_last"][1] == pytest.approx(val[-1]["bpb"])
    with open(os.path.join(run, "curves.png"), "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"


def test_generate_from_run(trained, capsys):
    _, run = trained
    capsys.readouterr()
    assert cli.main(["generate", "--run", run, "--prompt", "def ", "--tokens", "40"]) == 0
    first = capsys.readouterr().out
    assert first.startswith("def ")
    assert len(first.encode("utf-8", errors="replace")) >= 20
    assert cli.main(["generate", "--run", run, "--prompt", "def ", "--tokens", "40"]) == 0
    assert capsys.readouterr().out == first           # same seed, same text
    assert cli.main(["generate", "--run", run, "--prompt", "x", "--tokens", "5",
                     "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("x")


def test_resume_is_bit_identical(tmp_path, trained):
    """8 steps in one go == 5 steps, stop, resume to 8 (refreshes at 2, 4, 6, 8)."""
    _, full = trained
    assert train(tmp_path, "b", "--stop-at", "5") == 0
    part = str(tmp_path / "runs" / "b")
    mid = load_file(os.path.join(part, "checkpoint.safetensors"))
    assert train(tmp_path, "b", "--resume") == 0
    a = load_file(os.path.join(full, "checkpoint.safetensors"))
    b = load_file(os.path.join(part, "checkpoint.safetensors"))
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert any(not torch.equal(mid[k], b[k]) for k in mid if k in b)  # it did train on
    la = [r["loss"] for r in records(full, "train")]
    lb = [r["loss"] for r in records(part, "train")]
    assert la == lb and len(la) == 8


def test_dense_run(tmp_path):
    assert train(tmp_path, "d", "--dense", "--steps", "4") == 0
    with open(tmp_path / "runs" / "d" / "summary.json") as fh:
        s = json.load(fh)
    assert s["dense"] and s["stored_params"] == s["dense_equivalent_params"]
    assert records(str(tmp_path / "runs" / "d"), "refresh") == []
    assert cli.main(["generate", "--run", str(tmp_path / "runs" / "d"), "--tokens", "5"]) == 0


def test_no_arguments_prints_help(capsys):
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    for cmd in ("train", "generate", "plan"):
        assert cmd in out


def test_console_entry_exit_code():
    """The real process: exit status 2 and one line on stderr."""
    p = subprocess.run([sys.executable, "-m", "sparsecore", "train", "--d-model", "0"],
                       capture_output=True, text=True, cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=ROOT))
    assert p.returncode == 2
    assert p.stderr.strip() == ("sparsecore train: error: argument --d-model: expected a "
                                "positive integer, got '0'")


# ------------------------------------------------------------------ the corpus
def test_default_corpus_is_capped_and_deterministic():
    a = load_corpus(max_bytes=50_000, context=32)
    b = load_corpus(max_bytes=50_000, context=32)
    assert a.n_bytes == 50_000 and a.digest == b.digest
    assert torch.equal(a.val, b.val) and a.val.numel() == 2_500     # the last 5%
    assert "standard library" in a.source


def test_folder_corpus_sorted_and_skips_binary(tmp_path):
    (tmp_path / "b.txt").write_bytes(b"B" * 300)
    (tmp_path / "a.txt").write_bytes(b"A" * 300)
    (tmp_path / "blob.bin").write_bytes(b"\0\1\2" * 100)
    (tmp_path / ".hidden").write_bytes(b"H" * 300)
    c = load_corpus(str(tmp_path), context=16)
    text = bytes(torch.cat([c.train, c.val]).tolist())
    assert text == b"A" * 300 + b"B" * 300
    assert c.files == 2


def test_batches_are_a_pure_function_of_seed_and_step():
    data = torch.arange(1000, dtype=torch.int64).to(torch.uint8)
    x1, y1 = train_batch(data, batch=4, context=8, seed=3, step=7)
    x2, y2 = train_batch(data, batch=4, context=8, seed=3, step=7)
    x3, _ = train_batch(data, batch=4, context=8, seed=3, step=8)
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and not torch.equal(x1, x3)
    assert torch.equal(x1[:, 1:], y1[:, :-1])
    v1 = list(val_batches(data, batch=2, context=8, max_tokens=64))
    assert sum(x.shape[0] for x, _ in v1) == 8


def test_corpus_errors(tmp_path):
    with pytest.raises(CorpusError, match="does not exist"):
        load_corpus(str(tmp_path / "nope"))
    (tmp_path / "small.txt").write_bytes(b"x" * 50)
    with pytest.raises(CorpusError, match="50 bytes; with context 32"):
        load_corpus(str(tmp_path / "small.txt"), context=32)


# ------------------------------------------------------------------ CLI errors
@pytest.mark.parametrize("flags, expected", [
    (["--d-model", "0"], "--d-model: expected a positive integer, got '0'"),
    (["--forward-sparsity", "1.5"], "--forward-sparsity: expected a sparsity in [0, 1), got '1.5'"),
    (["--lr", "-1"], "--lr: expected a positive number, got '-1'"),
    (["--max-bytes", "lots"], "expected a positive size such as 80GB"),
    (["--heads", "3"], "d_model=32 is not divisible by heads=3"),
    (["--forward-sparsity", "0.5", "--backward-sparsity", "0.8"],
     "--backward-sparsity 0.8 must not exceed --forward-sparsity 0.5"),
    (["--min-lr", "1"], "--min-lr 1.0 exceeds --lr"),
    (["--optimizer", "lion"], "invalid choice: 'lion'"),
    (["--bogus"], "unrecognized arguments: --bogus"),
] + ([] if torch.cuda.is_available() else
      [(["--device", "cuda"], "--device cuda: no CUDA device is available")]))
def test_bad_flags(tmp_path, capsys, flags, expected):
    line = error_line(capsys, train(tmp_path, "x", *flags))
    assert line.startswith("sparsecore train: error: ") and expected in line
    assert not (tmp_path / "runs" / "x").exists()      # nothing was written


def test_data_errors(tmp_path, capsys):
    line = error_line(capsys, train(tmp_path, "x", "--data", str(tmp_path / "missing.txt")))
    assert "missing.txt' does not exist" in line
    (tmp_path / "empty.txt").write_bytes(b"")
    assert "is empty" in error_line(capsys, train(tmp_path, "x", "--data",
                                                  str(tmp_path / "empty.txt")))
    (tmp_path / "emptydir").mkdir()
    assert "is empty" in error_line(capsys, train(tmp_path, "x", "--data",
                                                  str(tmp_path / "emptydir")))
    (tmp_path / "short.txt").write_bytes(b"print('hi')\n" * 4)
    line = error_line(capsys, train(tmp_path, "x", "--data", str(tmp_path / "short.txt")))
    assert "48 bytes; with context 32 it needs at least 66" in line


def test_run_and_resume_errors(tmp_path, capsys):
    assert "nothing to resume" in error_line(capsys, train(tmp_path, "r", "--resume"))
    assert train(tmp_path, "r", "--steps", "2") == 0
    capsys.readouterr()
    assert "already holds a run; add --resume" in error_line(capsys, train(tmp_path, "r"))
    line = error_line(capsys, train(tmp_path, "r", "--resume", "--d-model", "64"))
    assert "--d-model 64 differs from the run's 32" in line
    line = error_line(capsys, train(tmp_path, "r", "--resume", "--forward-sparsity", "0.95"))
    assert "--forward-sparsity 0.95 differs from the run's 0.9" in line
    ckpt = tmp_path / "runs" / "r" / "checkpoint.safetensors"
    good = ckpt.read_bytes()
    # a checkpoint of another model in the run folder
    assert train(tmp_path, "other", "--steps", "2", "--d-model", "64") == 0
    capsys.readouterr()
    ckpt.write_bytes((tmp_path / "runs" / "other" / "checkpoint.safetensors").read_bytes())
    line = error_line(capsys, train(tmp_path, "r", "--resume", "--steps", "4"))
    assert line.startswith("sparsecore train: error: cannot resume: ")
    assert "checkpoint.safetensors" in line
    # a corrupt checkpoint
    ckpt.write_bytes(good[:-100])
    line = error_line(capsys, train(tmp_path, "r", "--resume", "--steps", "4"))
    assert line.startswith("sparsecore train: error: cannot resume: ")
    assert "checkpoint.safetensors" in line
    line = error_line(capsys, cli.main(["generate", "--run", str(tmp_path / "runs" / "r")]))
    assert line.startswith("sparsecore generate: error: cannot load the run's checkpoint: ")
    assert "checkpoint.safetensors" in line
    (tmp_path / "runs" / "other" / "config.json").write_text("[1, 2]")
    line = error_line(capsys, train(tmp_path, "other", "--resume"))
    assert "config.json: cannot read the run's settings" in line
    ckpt.unlink()
    assert "no checkpoint to resume" in error_line(capsys, train(tmp_path, "r", "--resume"))


def test_generate_and_plan_errors(tmp_path, capsys):
    line = error_line(capsys, cli.main(["generate", "--run", str(tmp_path / "nope")]))
    assert "no such run folder" in line
    line = error_line(capsys, cli.main(["generate", "--run", str(tmp_path), "--tokens", "0"]))
    assert "--tokens: expected a positive integer" in line
    line = error_line(capsys, cli.main(["plan", "--gpu-memory", "eighty"]))
    assert "--gpu-memory" in line and "'eighty'" in line
    line = error_line(capsys, cli.main(["nonsense"]))
    assert "invalid choice: 'nonsense'" in line


def test_info_command(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "kernel backend (cpu)" in out and "refresh changed" in out
