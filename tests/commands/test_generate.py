"""``python -m lit_llm.generate`` on a tiny checkpoint made by the real training path."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support import ROOT

from lit_llm import generate as gen_cli
from lit_llm.data.prompts import extract_response, format_prompt
from lit_llm.generate import complete, main
from lit_llm.model.config import GPTConfig
from lit_llm.model.gpt import GPTModel
from lit_llm.model.sampling import generate
from lit_llm.train import cli
from lit_llm.weights.readers import load_model_for_inference

PROMPT = "The import statement"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide GPT with a 300-token BPE, trained 3 steps by ``lit_llm.train``."""
    root = tmp_path_factory.mktemp("run")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)  # the shipped config's relative paths
        cli([
            "fit", "--config", "configs/pretrain/quickstart.yaml",
            "--model.init_args.model.n_layers=2", "--model.init_args.model.emb_dim=32",
            "--model.init_args.model.n_heads=2", "--data.init_args.tokenizer_vocab_size=300",
            f"--trainer.default_root_dir={root}", "--trainer.max_steps=3", "--trainer.val_check_interval=3",
            "--trainer.enable_progress_bar=false",
        ])
    path = root / "last.ckpt"
    assert path.is_file()
    return path


@pytest.fixture(scope="module")
def loaded(ckpt):
    model, tokenizer, meta = load_model_for_inference(str(ckpt))
    assert tokenizer is not None
    return model, tokenizer


def run_main(*argv: str, stdin: str = "") -> tuple[int, str]:
    out = io.StringIO()
    rc = main(list(argv), stdin=io.StringIO(stdin), stdout=out)
    return rc, out.getvalue()


def expected_text(model, tokenizer, prompt: str, n: int) -> str:
    """What generate() makes of the prompt, cut at end-of-text."""
    ids = tokenizer.encode(prompt)
    out = generate(model, torch.tensor([ids]), n, eos_id=tokenizer.eos_id)[0, len(ids):].tolist()
    if tokenizer.eos_id in out:
        out = out[: out.index(tokenizer.eos_id)]
    return tokenizer.decode(out)


def test_greedy_output_equals_generate(ckpt, loaded):
    model, tokenizer = loaded
    rc, out = run_main("--checkpoint", str(ckpt), "--prompt", PROMPT, "--max-new-tokens", "25", "--no-stream")
    assert rc == 0
    continuation = expected_text(model, tokenizer, PROMPT, 25)
    assert len(tokenizer.encode(continuation)) >= 20  # the model did write something
    assert out == PROMPT + continuation + "\n"


def test_streaming_prints_the_same_text(ckpt):
    args = ["--checkpoint", str(ckpt), "--prompt", PROMPT, "--max-new-tokens", "25"]
    rc1, streamed = run_main(*args, "--stream")
    rc2, whole = run_main(*args, "--no-stream")
    rc3, default = run_main(*args)  # one prompt streams by default
    assert rc1 == rc2 == rc3 == 0
    assert streamed == whole == default


def test_streaming_writes_token_by_token(loaded):
    model, tokenizer = loaded
    pieces: list[str] = []
    (text,) = complete(model, tokenizer, [PROMPT], max_new_tokens=12, on_text=pieces.append)
    assert len(pieces) > 1 and "".join(pieces) == text


def test_no_cache_gives_the_same_output(ckpt):
    args = ["--checkpoint", str(ckpt), "--prompt", PROMPT, "--max-new-tokens", "30", "--no-stream"]
    assert run_main(*args) == run_main(*args, "--no-cache")


def test_subprocess_entry_point(ckpt, loaded):
    model, tokenizer = loaded
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "lit_llm.generate", "--checkpoint", str(ckpt), "--prompt", PROMPT,
         "--max-new-tokens", "15", "--device", "cpu"],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == PROMPT + expected_text(model, tokenizer, PROMPT, 15) + "\n"


def test_batched_prompts_equal_single_runs(loaded):
    model, tokenizer = loaded
    prompts = ["The import statement", "def f", "The while", "A class"]
    batched = complete(model, tokenizer, prompts, max_new_tokens=10)
    single = [complete(model, tokenizer, [p], max_new_tokens=10)[0] for p in prompts]
    assert batched == single


class _EosIs:
    """The checkpoint's tokenizer with another id playing end-of-text, to make rows stop at known steps."""

    def __init__(self, tokenizer, eos_id):
        self._tok, self.eos_id = tokenizer, eos_id

    def encode(self, text):
        return self._tok.encode(text)

    def decode(self, ids):
        return self._tok.decode(ids)


def test_each_row_stops_at_its_own_end_of_text(loaded):
    _, tokenizer = loaded
    torch.manual_seed(0)  # an untrained model writes varied tokens, unlike the 3-step one
    model = GPTModel(GPTConfig.from_name("tiny", vocab_size=tokenizer.vocab_size, drop_rate=0.0)).eval()
    # Two prompts of equal token length share one batch; pick them from a few candidates.
    by_length: dict[int, list[str]] = {}
    for p in ["The import statement", "The while statement", "The for statement", "The class statement",
              "The def statement", "A return statement", "The with statement"]:
        by_length.setdefault(len(tokenizer.encode(p)), []).append(p)
    prompts = max(by_length.values(), key=len)[:2]
    assert len(prompts) == 2
    ids = [tokenizer.encode(p) for p in prompts]
    free = [generate(model, torch.tensor([i]), 12)[0, len(i):].tolist() for i in ids]
    # A token the first row writes early and the second row later or never acts as end-of-text.
    stop = next(t for t in free[0][2:] if t not in free[1][:free[0].index(t) + 1])
    texts = complete(model, _EosIs(tokenizer, stop), prompts, max_new_tokens=12)
    for text, new in zip(texts, free):
        kept = new[: new.index(stop)] if stop in new else new
        assert text == tokenizer.decode(kept)
    assert len(texts[0]) < len(tokenizer.decode(free[0]))


def test_prompt_file_text_and_jsonl(ckpt, tmp_path):
    txt = tmp_path / "prompts.txt"
    txt.write_text("The import statement\n\ndef f\n", encoding="utf-8")
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text(json.dumps({"prompt": "The import statement"}) + "\n" + json.dumps({"prompt": "def f"}) + "\n")
    base = ["--checkpoint", str(ckpt), "--max-new-tokens", "8"]
    rc1, from_txt = run_main(*base, "--prompt-file", str(txt))
    rc2, from_jsonl = run_main(*base, "--prompt-file", str(jsonl))
    rc3, from_flags = run_main(*base, "--prompt", "The import statement", "--prompt", "def f")
    assert rc1 == rc2 == rc3 == 0
    assert from_txt == from_jsonl == from_flags
    assert from_txt.startswith("The import statement") and "\ndef f" in from_txt
    rc, records = run_main(*base, "--prompt-file", str(jsonl), "--format", "jsonl")
    rows = [json.loads(line) for line in records.splitlines()]
    assert rc == 0 and [r["prompt"] for r in rows] == ["The import statement", "def f"]
    assert from_flags == "".join(r["prompt"] + r["completion"] + "\n" for r in rows)


def test_chat_through_stdin(ckpt, loaded):
    model, tokenizer = loaded
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "lit_llm.generate", "--checkpoint", str(ckpt), "--chat", "--max-new-tokens", "12"],
        input="What is 2+2?\n/exit\nnever read\n", capture_output=True, text=True, cwd=ROOT, env=env, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    prompt = format_prompt("alpaca", "What is 2+2?")
    response = extract_response("alpaca", expected_text(model, tokenizer, prompt, 12))
    assert proc.stdout.strip() == response and response
    assert proc.stdout.count("\n") == 1  # one turn, then /exit


def test_chat_streamed_and_not_agree_and_eof_quits(ckpt):
    args = ["--checkpoint", str(ckpt), "--chat", "--max-new-tokens", "10"]
    rc1, streamed = run_main(*args, stdin="Name a color.\n\nSay hi.\n")  # EOF ends the loop; blank lines skipped
    rc2, whole = run_main(*args, "--no-stream", stdin="Name a color.\nSay hi.\n/exit\n")
    assert rc1 == rc2 == 0
    assert [s.strip() for s in streamed.splitlines()] == [s.strip() for s in whole.splitlines()]
    assert len(whole.splitlines()) == 2


def test_chat_uses_the_checkpoints_template(ckpt, loaded, tmp_path):
    model, tokenizer = loaded
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    state["hyper_parameters"]["prompt_template"] = "phi3"
    finetuned = tmp_path / "finetuned.ckpt"
    torch.save(state, finetuned)
    rc, out = run_main("--checkpoint", str(finetuned), "--chat", "--no-stream", "--max-new-tokens", "12",
                       stdin="Name a color.\n")
    assert rc == 0
    expected = extract_response("phi3", expected_text(model, tokenizer, format_prompt("phi3", "Name a color."), 12))
    assert out == expected + "\n"
    # --template wins over the checkpoint's
    rc, out = run_main("--checkpoint", str(finetuned), "--chat", "--no-stream", "--max-new-tokens", "12",
                       "--template", "alpaca", stdin="Name a color.\n")
    alpaca = extract_response("alpaca", expected_text(model, tokenizer, format_prompt("alpaca", "Name a color."), 12))
    assert rc == 0 and out == alpaca + "\n"


def test_tokenizer_flag_and_dtype(ckpt):
    base = ["--checkpoint", str(ckpt), "--prompt", PROMPT, "--max-new-tokens", "10", "--no-stream"]
    tok = ckpt.parent / "tokenizer.json"  # the run directory's copy of the checkpoint's tokenizer
    assert run_main(*base) == run_main(*base, "--tokenizer", str(tok))
    rc, out = run_main(*base, "--dtype", "bfloat16")
    assert rc == 0 and out.startswith(PROMPT)


def test_long_prompt_is_cropped_with_a_warning(ckpt):
    long_prompt = "The import statement " * 60  # well over the 128-token context
    with pytest.warns(UserWarning, match=r"has \d+ tokens but the model's context_length is 128"):
        rc, out = run_main("--checkpoint", str(ckpt), "--prompt", long_prompt, "--max-new-tokens", "5")
    assert rc == 0 and out.startswith(long_prompt)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--temperature", "-1"], "temperature=-1.0 must be >= 0"),
        (["--top-p", "0"], "top_p=0.0 must be in (0, 1]"),
        (["--top-p", "1.5"], "top_p=1.5"),
        (["--top-k", "0"], "top_k=0"),
        (["--max-new-tokens", "-3"], "max_new_tokens=-3"),
        (["--max-new-tokens", "many"], "argument --max-new-tokens: invalid int value: 'many'"),
        (["--template", "vicuna", "--chat"], "Unknown prompt template 'vicuna'"),
        (["--device", "tpu:9"], "--device 'tpu:9'"),
        (["--prompt-file", "/no/such/prompts.txt"], "/no/such/prompts.txt"),
        (["--chat", "--prompt", "x"], "leave out --prompt"),
    ],
)
def test_bad_flags_give_one_error_line(ckpt, argv, message, capsys):
    if "--prompt" not in argv and "--prompt-file" not in argv and "--chat" not in argv:
        argv = [*argv, "--prompt", "x"]
    rc, out = run_main("--checkpoint", str(ckpt), *argv)
    err = capsys.readouterr().err
    usage = message.startswith("argument ")  # argparse refused the flag itself: a usage mistake
    assert rc == (2 if usage else 1) and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_missing_checkpoint_and_missing_prompt(capsys, tmp_path):
    rc, _ = run_main("--checkpoint", str(tmp_path / "nope.ckpt"), "--prompt", "x")
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("error: ") and "nope.ckpt" in err and err.count("\n") == 1
    rc, _ = run_main("--checkpoint", str(tmp_path / "nope.ckpt"))
    assert rc == 1 and "pass --prompt TEXT" in capsys.readouterr().err


def test_bad_prompt_file(ckpt, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt key"}\n')
    rc, _ = run_main("--checkpoint", str(ckpt), "--prompt-file", str(bad))
    assert rc == 1 and f"{bad}:2" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    rc, _ = run_main("--checkpoint", str(ckpt), "--prompt-file", str(empty))
    assert rc == 1 and "holds no prompts" in capsys.readouterr().err


def test_no_tokenizer_says_to_pass_one(ckpt, loaded, monkeypatch, capsys):
    model, tokenizer = loaded
    from lit_llm.weights import readers

    monkeypatch.setattr(readers, "load_model_for_inference", lambda source, device, dtype: (model, None, {}))
    rc, _ = run_main("--checkpoint", "book.pth", "--prompt", "x")
    err = capsys.readouterr().err
    assert rc == 1 and "no tokenizer is known for --checkpoint 'book.pth'" in err and "--tokenizer PATH" in err
    rc, out = run_main("--checkpoint", "book.pth", "--prompt", PROMPT, "--max-new-tokens", "5",
                       "--tokenizer", str(ckpt.parent / "tokenizer.json"))
    assert rc == 0 and out.startswith(PROMPT)


def test_subprocess_error_has_no_traceback_unless_debug(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-m", "lit_llm.generate", "--checkpoint", str(tmp_path / "x.ckpt"), "--prompt", "x",
            "--top-p", "2"]
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.startswith("error: ") and "top_p=2.0" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env={**env, "LIT_LLM_DEBUG": "1"},
                          timeout=120)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "ConfigError" in proc.stderr


def test_ignored_settings_warn(ckpt, capsys):
    base = ["--checkpoint", str(ckpt), "--max-new-tokens", "4"]
    rc, out = run_main(*base, "--prompt", "a", "--prompt", "b", "--stream")
    err = capsys.readouterr().err
    assert rc == 0 and out.count("\n") == 2 and "warning: --stream needs a single prompt" in err
    rc, _ = run_main(*base, "--prompt", "a", "--template", "phi3")
    assert rc == 0 and "warning: --template applies to --chat" in capsys.readouterr().err
    rc, out = run_main(*base, "--prompt", "a", "--format", "jsonl")  # one prompt, jsonl: no stream, no warning
    assert rc == 0 and json.loads(out)["prompt"] == "a" and capsys.readouterr().err == ""


def test_sampling_with_a_seed_repeats(ckpt):
    base = ["--checkpoint", str(ckpt), "--prompt", PROMPT, "--max-new-tokens", "20", "--temperature", "1.5",
            "--top-k", "100", "--top-p", "0.95"]
    a, b, c = run_main(*base, "--seed", "5"), run_main(*base, "--seed", "5"), run_main(*base, "--seed", "6")
    assert a[0] == 0 and a == b and a != c


def test_chat_uses_an_instruct_checkpoints_template(tmp_path, monkeypatch):
    """A checkpoint written by InstructTask records the data's template, and --chat prompts with it."""
    records = [{"instruction": f"Name color {i}.", "input": "", "output": c}
               for i, c in enumerate(["red", "green", "blue", "amber"] * 10)]
    source = tmp_path / "records.json"
    source.write_text(json.dumps(records), encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)
        cli([
            "fit", "--config", "configs/instruct/quickstart.yaml", f"--data.init_args.source={source}",
            "--data.init_args.prompt_template=phi3", "--data.init_args.tokenizer_vocab_size=300",
            "--data.init_args.batch_size=4", "--model.init_args.model.n_layers=2",
            "--model.init_args.model.emb_dim=32", "--model.init_args.model.n_heads=2",
            "--model.init_args.generate_after_fit=false", f"--trainer.default_root_dir={tmp_path}",
            "--trainer.max_steps=2", "--trainer.enable_progress_bar=false",
        ])
    ckpt = tmp_path / "last.ckpt"
    model, tokenizer, meta = load_model_for_inference(str(ckpt))
    assert gen_cli.checkpoint_template(meta) == "phi3"
    prompts: list[str] = []
    real_complete = gen_cli.complete

    def recording_complete(model, tokenizer, batch, **kwargs):
        prompts.extend(batch)
        return real_complete(model, tokenizer, batch, **kwargs)

    monkeypatch.setattr(gen_cli, "complete", recording_complete)
    rc, out = run_main("--checkpoint", str(ckpt), "--chat", "--no-stream", "--max-new-tokens", "8",
                       stdin="Name color 3.\n")
    assert rc == 0 and prompts == [format_prompt("phi3", "Name color 3.")]
    expected = extract_response("phi3", expected_text(model, tokenizer, prompts[0], 8))
    assert out == expected + "\n"
