"""Conversational finetuning: the instruction task on conversations, scored turn by turn.

:class:`ChatTask` is :class:`~lit_llm.tasks.InstructTask` paired with :class:`~lit_llm.data.ChatDataModule`: the
loss is the next-token loss on the assistant turns the data module marks (every one of them), and after ``fit`` (and
in ``predict``) the model answers each assistant turn of the test conversations given the true earlier turns,
greedily by default, stopping at the chat template's end-of-turn marker. Each answer is compared exactly with the
expected one; the result is printed and logged as ``chat exact match: x/y`` (with the first answers of each
conversation and the later ones, which need the earlier turns, counted apart) and written to
``test_responses.json`` / ``test_scores.json``.

The chat template itself travels in the checkpoint with the tokenizer (the data module's state), which is where
``generate --chat``, ``serve`` and ``convert to-hf`` read it.
"""

from __future__ import annotations

from typing import Any

from lit_llm.tasks.base import GPTTask
from lit_llm.tasks.instruct import InstructTask


class ChatTask(InstructTask):
    """Finetuning on conversations; pair it with :class:`~lit_llm.data.ChatDataModule`.

    Takes the arguments of :class:`~lit_llm.tasks.InstructTask` (``model``, ``optim``, ``lora``,
    ``generate_after_fit``, ``max_new_tokens``, ``temperature``, ...); its ``prompt_template`` is not used (the chat
    template comes from the data). Logs ``test/exact_match`` and ``test/chat_exact_match_first`` /
    ``test/chat_exact_match_later`` besides the instruction task's metrics.
    """

    def setup(self, stage: str) -> None:
        datamodule = self._datamodule()
        if getattr(datamodule, "chat_template", None) is None:
            super().setup(stage)  # an instruction data module: the instruction task's prompt template
            return
        GPTTask.setup(self, stage)

    def write_responses(
        self, predictions: dict[int, str], responses_file: str | None = None, label: str = ""
    ) -> dict[str, float]:
        """Write and score the answers as the instruction task does, then print ``chat exact match: x/y``."""
        scores = super().write_responses(predictions, responses_file, label)
        datamodule = self._datamodule()
        if getattr(datamodule, "chat_template", None) is None:
            return scores
        counts = {"first": [0, 0], "later": [0, 0]}
        for index, response in predictions.items():
            record = datamodule.test_records[index]
            part = counts["first" if record["turn"] == 1 else "later"]
            part[0] += int(response.strip() == str(record[datamodule.reference_field]).strip())
            part[1] += 1
        right = counts["first"][0] + counts["later"][0]
        total = counts["first"][1] + counts["later"][1]
        line = (f"chat exact match: {right}/{total} (first answers {counts['first'][0]}/{counts['first'][1]}, later "
                f"answers, which need the earlier turns, {counts['later'][0]}/{counts['later'][1]})")
        if self.trainer.is_global_zero:
            print(line, flush=True)  # the run's result: on stdout, where the user looks for it
        metrics: dict[str, Any] = {f"test/{label}chat_exact_match_{part}": (r / n if n else 0.0)
                                   for part, (r, n) in counts.items()}
        for logger in self.loggers:
            logger.log_metrics(metrics, step=self.global_step)
            logger.save()
        return {**scores, **{k.removeprefix(f"test/{label}"): v for k, v in metrics.items()}}
