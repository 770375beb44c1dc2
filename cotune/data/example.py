"""The unit of data every party trains and evaluates on."""

from __future__ import annotations

from dataclasses import dataclass, field

# The line that ends a passage in the passage tasks' prompt templates (cotune.data.tasks: BoolQ, SciQ with support,
# RTE): "{passage}\nQuestion: {question}...\nAnswer:". Encoding cuts an over-long prompt's passage, never this line.
QUESTION_LINE = "\nQuestion: "
# DialogSum's template ends its passage (the dialogue) the same way: "Dialogue:\n{dialogue}\nSummary:".
SUMMARY_LINE = "\nSummary:"
PASSAGE_END_LINES = (QUESTION_LINE, SUMMARY_LINE)


def passage_end(prompt: str) -> int:
    """Character offset where a prompt's passage ends: the start of its last passage-ending line (PASSAGE_END_LINES;
    the latest one wins); 0 when the prompt has no passage (ARC- and GSM8K-style prompts are all question)."""
    return max(max(prompt.rfind(line) for line in PASSAGE_END_LINES), 0)


@dataclass(frozen=True)
class Example:
    """A prompt and its gold continuation.

    prompt:   the text the model conditions on (question, passage, template).
    response: the gold continuation the model is trained to produce (e.g. " Paris").
    choices:  for multiple-choice evaluation, every candidate continuation (the gold one included);
              empty for free-form samples.
    label:    index of the gold continuation in `choices`, or -1.
    """

    prompt: str
    response: str
    choices: tuple[str, ...] = field(default=())
    label: int = -1

    def to_json(self) -> dict:
        return {"prompt": self.prompt, "response": self.response, "choices": list(self.choices), "label": self.label}

    @classmethod
    def from_json(cls, obj: dict) -> "Example":
        return cls(
            prompt=str(obj["prompt"]),
            response=str(obj["response"]),
            choices=tuple(str(c) for c in obj.get("choices", ())),
            label=int(obj.get("label", -1)),
        )
