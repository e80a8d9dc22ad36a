"""ClassifyTask: the new head, pooling, which parameters train, the loss, predictions and config errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from classify_helpers import tiny_config

from lit_llm.errors import ConfigError
from lit_llm.model.gpt import Linear
from lit_llm.model.lora import LoRAConfig
from lit_llm.tasks import ClassifyTask
from lit_llm.tasks.classify import format_confusion, pool_logits

C = 32  # emb_dim of the tiny model
CLASSES = 3


def _task(**kwargs: object) -> ClassifyTask:
    values: dict = dict(model=tiny_config(), num_classes=CLASSES)
    values.update(kwargs)
    task = ClassifyTask(**values)
    task.configure_model()
    return task


def _trainable(task: ClassifyTask) -> int:
    return sum(p.numel() for p in task.model.parameters() if p.requires_grad)


# Parameter counts of the tiny model (emb 32, 2 blocks, 2 heads, qkv without bias, other layers with bias), by hand.
HEAD = C * CLASSES + CLASSES
LAYER_NORM = 2 * C
BLOCK = (LAYER_NORM + C * 3 * C + (C * C + C) + LAYER_NORM + (C * 4 * C + 4 * C) + (4 * C * C + C))
EMBEDDINGS = 320 * C + 64 * C  # vocabulary 300 padded to a multiple of 64, and 64 positions


@pytest.mark.parametrize("policy,expected", [
    ("head", HEAD),
    ("last_block", BLOCK + LAYER_NORM + HEAD),
    ("last_n_blocks:2", 2 * BLOCK + LAYER_NORM + HEAD),
    ("all", EMBEDDINGS + 2 * BLOCK + LAYER_NORM + HEAD),
])
def test_trainable_parameter_counts(policy: str, expected: int) -> None:
    task = _task(trainable=policy)
    assert _trainable(task) == expected
    assert task.model.num_parameters() == EMBEDDINGS + 2 * BLOCK + LAYER_NORM + HEAD


def test_lora_policy_trains_adapters_and_head() -> None:
    """rank r on each adapted (in -> out) Linear trains r * (in + out); the new head trains in full."""
    r = 4
    task = _task(trainable="lora", lora=LoRAConfig(rank=r, alpha=8, targets=["attention", "ff"]))
    per_block = r * (C + 3 * C) + r * (C + C) + r * (C + 4 * C) + r * (4 * C + C)
    assert _trainable(task) == 2 * per_block + HEAD
    trainable = {n for n, p in task.model.named_parameters() if p.requires_grad}
    assert {"out_head.weight", "out_head.bias"} <= trainable
    assert all("lora_" in n or n.startswith("out_head.") for n in trainable)


def test_lora_policy_needs_lora_and_lora_needs_the_policy() -> None:
    with pytest.raises(ConfigError, match="model.trainable=lora needs model.lora"):
        ClassifyTask(model=tiny_config(), trainable="lora")
    with pytest.raises(ConfigError, match="model.lora is set but model.trainable='last_block'"):
        ClassifyTask(model=tiny_config(), lora={"rank": 2, "alpha": 4})


@pytest.mark.parametrize("option", [{"fused_loss": True}, {"chunked_loss": 64}])
def test_next_token_loss_options_are_refused(option) -> None:
    """They only change how the language-model head's loss is computed, which classification does not use."""
    (key,) = option
    with pytest.raises(ConfigError, match=f"model.speed.{key} computes the next-token loss.*remove model.speed.{key}"):
        ClassifyTask(model=tiny_config(), speed=option)


def test_config_errors_collected_in_one_message() -> None:
    with pytest.raises(ConfigError) as err:
        ClassifyTask(model=tiny_config(), optim={"learning_rate": -1}, pooling="first", trainable="last_n_blocks:0",
                         num_classes=1, class_weights=[1.0, -1.0])
    msg = str(err.value)
    for needle in ("model.optim.learning_rate=-1", "model.pooling='first'", "model.trainable='last_n_blocks:0'",
                   "model.num_classes=1", "model.class_weights=[1.0, -1.0]"):
        assert needle in msg
    with pytest.raises(ConfigError, match="asks for 5 blocks but the model has 2"):
        _task(trainable="last_n_blocks:5")
    with pytest.raises(ConfigError, match="model.num_classes is not set and there is no DataModule"):
        _task(num_classes=None)


def test_new_head_replaces_and_unties_the_lm_head() -> None:
    task = _task(model=tiny_config(tie_weights=True))
    head = task.model.out_head
    assert isinstance(head, Linear) and head.weight.shape == (CLASSES, C) and head.bias is not None
    assert head.weight.data_ptr() != task.model.tok_emb.weight.data_ptr()
    assert task(torch.randint(0, 300, (2, 5))).shape == (2, 5, CLASSES)
    assert task.hparams.label_names == ["0", "1", "2"]  # no names known: the ids


def _rows() -> tuple[list[list[int]], torch.Tensor, torch.Tensor]:
    rows = [[5, 17, 42, 8, 99, 3], [7, 7, 1], [250, 4, 4, 4, 4]]
    pad = 299
    width = max(map(len, rows))
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    return rows, ids, torch.tensor([len(r) for r in rows])


def test_last_nonpad_reads_the_last_real_token_under_padding() -> None:
    task = _task(pooling="last_nonpad").eval()
    rows, ids, lengths = _rows()
    with torch.no_grad():
        pooled = task.class_logits(ids, lengths)
        alone = torch.cat([task.class_logits(torch.tensor([r]), torch.tensor([len(r)])) for r in rows])
        last = pool_logits(task(ids), lengths, "last")
    assert torch.allclose(pooled, alone, atol=1e-5)  # padding after a text cannot change a causal model's reading
    assert torch.allclose(last[0], alone[0], atol=1e-5)  # the longest row has no padding ...
    assert not torch.allclose(last[1:], alone[1:], atol=1e-3)  # ... the others' last position is a pad token


def test_mean_pooling_averages_real_tokens_only() -> None:
    task = _task(pooling="mean").eval()
    rows, ids, lengths = _rows()
    with torch.no_grad():
        pooled = task.class_logits(ids, lengths)
        expected = torch.stack([task(torch.tensor([r]))[0].mean(0) for r in rows])
    assert torch.allclose(pooled, expected, atol=1e-5)


def test_last_pooling_matches_the_books_accuracy_loop(ch06) -> None:
    """pooling=last is the book's ``model(input_batch)[:, -1, :]``: same accuracy as ch06.calc_accuracy_loader."""
    torch.manual_seed(0)
    task = _task(pooling="last").eval()
    ids = torch.randint(0, 300, (24, 10))
    labels = torch.randint(0, CLASSES, (24,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids, labels), batch_size=8)
    book = ch06.calc_accuracy_loader(loader, task.model, "cpu")
    with torch.no_grad():
        ours = (task.class_logits(ids).argmax(-1) == labels).float().mean().item()
    assert ours == pytest.approx(book)


def test_class_weights_weight_the_cross_entropy() -> None:
    task = _task(class_weights=[1.0, 3.0, 0.5])
    logits = torch.randn(6, CLASSES)
    labels = torch.tensor([0, 1, 2, 1, 0, 2])
    expected = F.cross_entropy(logits, labels, weight=torch.tensor([1.0, 3.0, 0.5]))
    assert task._loss(logits, labels).item() == pytest.approx(expected.item())
    assert task._loss(logits, labels).item() != pytest.approx(F.cross_entropy(logits, labels).item())


def test_predict_step_rows() -> None:
    task = _task(label_names=["neg", "neu", "pos"]).eval()
    _, ids, lengths = _rows()
    out = task.predict_step({"input_ids": ids, "lengths": lengths, "labels": torch.tensor([2, -1, 0]),
                             "text": ["a", "b", "c"]}, 0)
    assert out["text"] == ["a", "b", "c"] and out["target"] == ["pos", None, "neg"]
    assert all(label in ("neg", "neu", "pos") for label in out["label"])
    for label, p, probs in zip(out["label"], out["probability"].tolist(), out["probs"]):
        assert set(probs) == {"neg", "neu", "pos"} and sum(probs.values()) == pytest.approx(1.0)
        assert p == pytest.approx(max(probs.values())) and probs[label] == pytest.approx(p)


def test_checkpoint_carries_the_class_names() -> None:
    task = _task(label_names=["neg", "neu", "pos"], pooling="mean")
    checkpoint: dict = {}
    task.on_save_checkpoint(checkpoint)
    assert checkpoint["classifier"] == {"num_classes": 3, "label_names": ["neg", "neu", "pos"], "pooling": "mean"}
    assert task.hparams.label_names == ["neg", "neu", "pos"] and task.hparams.num_classes == 3


def test_format_confusion() -> None:
    text = format_confusion([[12, 3], [0, 145]], ["ham", "spam"])
    assert text.splitlines() == ["       ham spam", "ham     12    3", "spam     0  145"]
