"""The lit_llm adapter of the lm-evaluation-harness: parity with the harness's Hugging Face backend on the ``to-hf``
export of the same checkpoint, scores by construction, checkpoint errors."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")  # the harness's Hugging Face backend

import lm_eval  # noqa: E402
from eval_helpers import sentence, write_jsonl, write_task  # noqa: E402

from lit_llm.errors import CheckpointError, ConfigError  # noqa: E402
from lit_llm.evaluation import (
    LitLLMEvalModel,
    build_task_manager,
    load_for_evaluation,
    multiple_choice_task,
    perplexity_task,
    scalar_metrics,
)
from lit_llm.model.config import GPTConfig  # noqa: E402
from lit_llm.model.gpt import GPTModel  # noqa: E402
from lit_llm.weights.export import export_hf  # noqa: E402


def lora_checkpoint(path: Path, tokenizer) -> Path:
    """What lit_llm.train writes for a LoRA run (reduced to what the readers use): a tiny fp32 GPT with random LoRA
    adapters on every target, a vocabulary padded past the tokenizer's, a 32-token context."""
    from lit_llm.model.lora import LoRAConfig, LoRALinear, apply_lora

    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=tokenizer.vocab_size, context_length=32, emb_dim=32, n_heads=2, n_layers=2,
                               drop_rate=0.0, qkv_bias=True, tie_weights=True, pad_vocab_multiple=64))
    apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=["all"]))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(0.0, 0.05)
    ckpt = {"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
            "model_config": model.config.to_dict(),
            "hyper_parameters": {"model": model.config.to_dict(),
                                 "lora": {"rank": 4, "alpha": 8.0, "dropout": 0.0, "targets": ["all"]}},
            "PretrainDataModule": {"tokenizer_json": tokenizer.to_json()}}
    torch.save(ckpt, path)
    return path


@pytest.fixture(scope="module")
def parity_tasks(tmp_path_factory) -> Path:
    """Three local tasks, one per kind of request, whose inputs cross the 32-token context."""
    folder = tmp_path_factory.mktemp("tasks")
    rng = random.Random(1)
    mc = [{"query": sentence(rng, rng.choice([3, 6, 40])), "choices": [sentence(rng, k) for k in (1, 2, 3, 1)],
           "gold": rng.randrange(4)} for _ in range(12)]
    write_task(folder, "tiny_mc", mc, [
        "output_type: multiple_choice", 'doc_to_text: "{{query}}"', 'doc_to_choice: "{{choices}}"',
        'doc_to_target: "{{gold}}"', "metric_list:", "  - metric: acc", "  - metric: acc_norm"])
    texts = [{"text": sentence(rng, n) + "."} for n in (5, 30, 90)]
    write_task(folder, "tiny_ppl", texts, [
        "output_type: loglikelihood_rolling", 'doc_to_text: ""', 'doc_to_target: "{{text}}"', "metric_list:",
        "  - metric: word_perplexity", "  - metric: byte_perplexity", "  - metric: bits_per_byte"])
    questions = [{"question": sentence(rng, n), "answer": sentence(rng, 2)} for n in (4, 4, 7, 30)]
    write_task(folder, "tiny_gen", questions, [
        "output_type: generate_until", 'doc_to_text: "{{question}}"', 'doc_to_target: "{{answer}}"',
        "generation_kwargs:", '  until: [" red", "."]', "  max_gen_toks: 8", "  do_sample: false",
        "metric_list:", "  - metric: exact_match"])
    return folder


def by_doc(results: dict, task: str) -> dict[int, list]:
    return {s["doc_id"]: s["resps"] for s in results["samples"][task]}


def test_log_likelihoods_and_scores_equal_the_hugging_face_backend_on_the_export(
    tmp_path, eval_tokenizer, parity_tasks
):
    checkpoint = lora_checkpoint(tmp_path / "lora.ckpt", eval_tokenizer)
    export = export_hf(str(checkpoint), tmp_path / "hf")  # the `to-hf` export of the same checkpoint
    tasks = ["tiny_mc", "tiny_ppl", "tiny_gen"]
    manager = build_task_manager(parity_tasks, include_defaults=False)
    hf = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": str(export), "dtype": "float32"},
                                 device="cpu", batch_size=4, tasks=tasks, task_manager=manager, log_samples=True)
    # batch_size 3 against 4: the batches differ, the numbers must not.
    lit = lm_eval.simple_evaluate(model="lit_llm", model_args={"checkpoint": str(checkpoint), "device": "cpu"},
                                  batch_size=3, tasks=tasks, task_manager=manager, log_samples=True)

    for task in ("tiny_mc", "tiny_ppl"):
        ours, theirs = by_doc(lit, task), by_doc(hf, task)
        assert ours.keys() == theirs.keys() and len(ours) > 0
        count = 0
        for doc_id, resps in theirs.items():
            for mine, ref in zip(ours[doc_id], resps, strict=True):
                mine, ref = mine[0], ref[0]
                if task == "tiny_mc":  # (log-likelihood, greedy)
                    assert mine[1] == ref[1], (task, doc_id)
                    mine, ref = mine[0], ref[0]
                assert mine == pytest.approx(ref, abs=1e-4), (task, doc_id)
                count += 1
        assert count == (48 if task == "tiny_mc" else 3)
    mine_gen, ref_gen = by_doc(lit, "tiny_gen"), by_doc(hf, "tiny_gen")
    assert mine_gen == ref_gen
    assert any(r[0][0] for r in ref_gen.values())  # something was generated, and cut at the stop sequences
    assert not any(" red" in r[0][0] or "." in r[0][0] for r in ref_gen.values())

    for task in tasks:
        for key, value in hf["results"][task].items():
            if key != "alias":
                assert lit["results"][task][key] == pytest.approx(value, rel=1e-5), (task, key)
    assert 0 < lit["results"]["tiny_mc"]["acc,none"] < 1  # a random model: the comparison covers both outcomes


def names_and_foods(n: int = 40, seed: int = 0) -> list[dict]:
    """Questions "<name> likes" whose right ending is each name's own food, drawn at random among four."""
    rng = random.Random(seed)
    foods = [" bread", " fish", " rice", " apples"]
    syllables = ["ka", "lo", "mi", "ne", "ru", "ta", "vo", "zi"]
    names = sorted({"".join(rng.choice(syllables) for _ in range(3)).capitalize() for _ in range(200)})[:n]
    return [{"context": f"{name} likes", "choices": foods, "answer": rng.randrange(4)} for name in names]


def test_a_model_trained_on_the_right_endings_scores_them_all(tmp_path, monkeypatch):
    """By construction: a tiny GPT trained on "<name> likes <its food>." picks every right ending offline, while the
    same model untrained is near chance (1 in 4)."""
    from lit_llm.data.tokenizer import train_bpe

    rows = names_and_foods()
    task = multiple_choice_task(write_jsonl(tmp_path / "likes.jsonl", rows))
    texts = [r["context"] + r["choices"][r["answer"]] + "." for r in rows]
    tokenizer = train_bpe(texts * 5, vocab_size=300)
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=tokenizer.vocab_size, context_length=16, emb_dim=32, n_heads=2,
                               n_layers=2, drop_rate=0.0))
    manager = build_task_manager(include_defaults=False)

    def accuracy() -> float:
        lm = LitLLMEvalModel(model=model, tokenizer=tokenizer, batch_size=16, show_progress=False)
        return lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=manager,
                                       bootstrap_iters=0)["results"]["likes"]["acc,none"]

    untrained = accuracy()
    assert untrained <= 0.5  # chance is 0.25; 40 questions put 0.5 more than 3 standard deviations above it

    # Trained on the endings only (the names themselves are random and cannot be learned), each text at position 0
    # as the harness puts a question with no few-shot examples before it.
    ids = [tokenizer.encode(t) for t in texts]
    starts = [len(tokenizer.encode(r["context"])) for r in rows]
    width = max(map(len, ids))
    batch = torch.tensor([x + [tokenizer.eos_id] * (width - len(x)) for x in ids])
    targets = torch.full_like(batch[:, 1:], -100)
    for row, (x, start) in enumerate(zip(ids, starts)):
        targets[row, start - 1 : len(x) - 1] = batch[row, start : len(x)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small trains several times faster on one thread than on contended two
    try:
        for _ in range(200):
            loss = model(batch[:, :-1], targets=targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    assert loss.item() < 0.05
    assert accuracy() == 1.0
    assert model.training  # the adapter restores the mode it found


def test_local_perplexity_file_scores_like_its_own_loss(tmp_path, eval_tokenizer):
    """A text shorter than the context: bits per byte = the summed next-token loss (after end-of-text) / bytes."""
    text = "the cat sat on a mat while dogs ran in parks."
    task = perplexity_task(write_jsonl(tmp_path / "one.jsonl", [{"text": text}]))
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=eval_tokenizer.vocab_size, context_length=32, emb_dim=32, n_heads=2,
                               n_layers=2, drop_rate=0.0)).eval()
    lm = LitLLMEvalModel(model=model, tokenizer=eval_tokenizer, show_progress=False)
    results = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=build_task_manager(include_defaults=False),
                                      bootstrap_iters=0)
    ids = torch.tensor([[eval_tokenizer.eos_id, *eval_tokenizer.encode(text)]])
    with torch.no_grad():
        logits = model(ids[:, :-1])[..., : eval_tokenizer.vocab_size]
        nll = torch.nn.functional.cross_entropy(logits[0], ids[0, 1:], reduction="sum").item()
    metrics = scalar_metrics(results)
    assert metrics["one_bits_per_byte"] == pytest.approx(nll / len(text.encode()) / torch.log(torch.tensor(2.0)).item(),
                                                         rel=1e-5)
    assert set(metrics) == {"one_word_perplexity", "one_byte_perplexity", "one_bits_per_byte"}


def test_a_classifier_checkpoint_gets_one_clear_error(tmp_path, eval_tokenizer):
    """A classification run's checkpoint has a class head, not a token head: refused with what to do instead."""
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=eval_tokenizer.vocab_size, context_length=32, emb_dim=32, n_heads=2,
                               n_layers=2, drop_rate=0.0))
    state = {f"model.{k}": v for k, v in model.state_dict().items() if k != "out_head.weight"}
    state["model.out_head.weight"] = torch.zeros(2, 32)
    state["model.out_head.bias"] = torch.zeros(2)
    path = tmp_path / "classifier.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": {"model": model.config.to_dict(), "num_classes": 2},
                "classifier": {"num_classes": 2, "label_names": ["ham", "spam"]},
                "ClassifyDataModule": {"tokenizer_json": eval_tokenizer.to_json()}}, path)
    for source in (path, tmp_path):  # the file, and the run directory holding it
        with pytest.raises(CheckpointError, match="is a classification checkpoint.*python -m lit_llm.classify"):
            load_for_evaluation(str(source), device="cpu")


def test_adapter_arguments_are_checked(eval_tokenizer):
    model = GPTModel(GPTConfig(vocab_size=eval_tokenizer.vocab_size, context_length=32, emb_dim=32, n_heads=2,
                               n_layers=2))
    with pytest.raises(ConfigError, match="either model="):
        LitLLMEvalModel()
    with pytest.raises(ConfigError, match="tokenizer"):
        LitLLMEvalModel(model=model)
    with pytest.raises(ConfigError, match="batch_size='auto'"):
        LitLLMEvalModel(model=model, tokenizer=eval_tokenizer, batch_size="auto")
    with pytest.raises(CheckpointError, match="does not exist"):
        LitLLMEvalModel(checkpoint="no/such/run.ckpt", device="cpu")


def test_without_the_harness_the_import_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what `import lm_eval` meets when it is not installed
    monkeypatch.delitem(sys.modules, "lit_llm.evaluation")
    with pytest.raises(ConfigError, match=r"pip install 'lit_llm\[eval\]'"):
        import lit_llm.evaluation  # noqa: F401
