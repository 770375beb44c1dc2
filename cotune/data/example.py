"""The unit of data every party trains and evaluates on."""

from __future__ import annotations

from dataclasses import dataclass, field


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
