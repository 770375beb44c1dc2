"""Exporting a finished run: what its adapters are, the model card that describes them, and writing both to a folder.

The coordinator's ExportRun (coordinator/service.py) has every party of a SUCCEEDED run hand over the final adapter of
that run's saved state and pulls it into its artifact store; this module describes those adapters and renders the
model card (torch-free: the coordinator runs it). `download` is the operator's side (`cotune run export RUN_ID --out
DIR`): it fetches each adapter from the coordinator's artifact store into `DIR/<party>[-<target>].safetensors` and
writes `DIR/MODEL_CARD.md`.

An adapter file is the safetensors of peft's LoRA state dict (keys as `get_peft_model_state_dict` writes them, e.g.
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`; fp32), with the run, round, step, party and target
in its metadata (`cotune.*`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cotune.algorithms.aggregate import parse_adapter
from cotune.report import human_bytes
from cotune.v1 import coordinator_pb2 as pb

CARD_FILE = "MODEL_CARD.md"
# besides every party's own model: the LLM server's other model whose adapter a run of the algorithm trains
EXTRA_TARGETS: dict[str, str] = {"fedcollm": "companion", "fedbiot": "compressed", "fedot": "compressed"}
CARD_METRICS = (("eval_accuracy", "eval accuracy", "{:.3f}"), ("public_loss", "public loss", "{:.4f}"))


def adapter_name(party_id: str, target: str = "") -> str:
    """How an export names an adapter: the party id for its own model, else `<party>/<target>` ('/' is in no id)."""
    return f"{party_id}/{target}" if target else party_id


def file_name(name: str) -> str:
    """`client-1` -> `client-1.safetensors`, `llm/companion` -> `llm-companion.safetensors`."""
    return name.replace("/", "-") + ".safetensors"


@dataclass(frozen=True)
class ExportedAdapter:
    """One exported adapter, as the model card describes it."""

    name: str            # adapter_name(party_id, target)
    party_id: str
    target: str          # "" (the party's model), "companion" or "compressed"
    sha256: str
    size: int            # bytes
    model: str           # the model it adapts, as the party names it
    rank: int            # LoRA r (the rows of every lora_A); 0 when the file holds no lora_A
    modules: tuple[str, ...]  # target-module suffixes (`self_attn.q_proj`): peft's target_modules
    layers: int          # adapted linear layers
    parameters: int
    meta: Mapping[str, str] = field(default_factory=dict)


def describe_adapter(data: bytes, *, party_id: str, target: str, sha256: str, model: str) -> ExportedAdapter:
    """Rank, modules and size of adapter bytes (ValueError when they are not a LoRA adapter)."""
    state, meta = parse_adapter(data)
    marker = ".lora_A."
    modules, ranks, layers = set(), set(), 0
    for key, value in state.items():
        if marker not in key:
            continue
        layers += 1
        ranks.add(int(value.shape[0]) if value.ndim else 0)
        path = key.split(marker, 1)[0].removeprefix("base_model.model.")
        modules.add(".".join(path.split(".")[-2:]))
    if not layers:
        raise ValueError("it holds no LoRA tensors (no lora_A)")
    if len(ranks) != 1:
        raise ValueError(f"its lora_A tensors disagree on the rank: {sorted(ranks)}")
    return ExportedAdapter(name=adapter_name(party_id, target), party_id=party_id, target=target, sha256=sha256,
                           size=len(data), model=model, rank=ranks.pop(), modules=tuple(sorted(modules)),
                           layers=layers, parameters=int(sum(v.size for v in state.values())), meta=dict(meta))


# -- the model card ----------------------------------------------------------------------------------------------
def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t)) if t else "-"


def _spec_yaml(spec: pb.RunSpec) -> str:
    """The fields the run's spec set, as YAML (what `cotune run start --spec` reads)."""
    import yaml
    from google.protobuf import json_format

    fields = json_format.MessageToDict(spec, preserving_proto_field_name=True)
    return yaml.safe_dump(fields, sort_keys=False, default_flow_style=False).rstrip()


def _metrics_table(run: pb.Run) -> list[str]:
    """Eval accuracy and public loss of every party evaluated in the last round (and, beside them, in round 0)."""
    rounds = sorted(run.rounds, key=lambda r: r.round)
    if not rounds:
        return ["(the run recorded no rounds)"]
    last, first = rounds[-1], rounds[0]
    both = first is not last
    before = {p.party_id: p.metrics for p in first.parties}

    def cells(metrics) -> list[str]:
        return [fmt.format(metrics[k]) if k in metrics else "" for k, _, fmt in CARD_METRICS]

    titles = [f"{title}, round {last.round}" for _, title, _ in CARD_METRICS]
    if both:
        titles += [f"{title}, round {first.round}" for _, title, _ in CARD_METRICS]
    lines = ["| party | " + " | ".join(titles) + " |", "|---|" + "---:|" * len(titles)]
    for party in sorted(last.parties, key=lambda p: (p.party_id.split("/")[0] != "llm", p.party_id)):
        if any(k in party.metrics for k, _, _ in CARD_METRICS):
            row = cells(party.metrics) + (cells(before.get(party.party_id, {})) if both else [])
            lines.append(f"| {party.party_id} | " + " | ".join(row) + " |")
    return lines if len(lines) > 2 else [f"(round {last.round} recorded no evaluation)"]


def _bytes_table(run: pb.Run) -> list[str]:
    sent: dict[str, int] = {}
    received: dict[str, int] = {}
    for rec in run.rounds:
        for k, v in rec.bytes_sent.items():
            sent[k] = sent.get(k, 0) + v
        for k, v in rec.bytes_received.items():
            received[k] = received.get(k, 0) + v
    kinds = sorted(set(sent) | set(received))
    if not kinds:
        return ["Nothing: the run moved no blobs through the coordinator."]
    lines = ["| what | sent to parties | received from parties |", "|---|---:|---:|"]
    lines += [f"| `{k}` | {human_bytes(sent.get(k, 0))} | {human_bytes(received.get(k, 0))} |" for k in kinds]
    lines.append(f"| **total** | **{human_bytes(sum(sent.values()))}** | **{human_bytes(sum(received.values()))}** |")
    return lines


def _loading(adapters: Sequence[ExportedAdapter]) -> list[str]:
    example = next((a for a in adapters if not a.target and a.party_id != "llm"), adapters[0] if adapters else None)
    if example is None:
        return []
    f = file_name(example.name)
    modules = ", ".join(repr(m) for m in example.modules)
    return [
        "## Loading an adapter",
        "",
        "Each file is the safetensors of peft's LoRA state dict (the keys `get_peft_model_state_dict` writes, fp32) for "
        "the model named in the table above; LoRA alpha is the party's `lora.alpha` (`companion_lora.alpha` for the "
        "companion), which the adapter does not record (cotune's default: 16). With peft:",
        "",
        "```python",
        "from peft import LoraConfig, get_peft_model, set_peft_model_state_dict",
        "from safetensors.torch import load_file",
        "from transformers import AutoModelForCausalLM",
        "",
        f"model = AutoModelForCausalLM.from_pretrained(\"PATH/TO/BASE_MODEL\")  # {example.model}",
        f"model = get_peft_model(model, LoraConfig(r={example.rank}, lora_alpha=16, target_modules=[{modules}]))",
        f"result = set_peft_model_state_dict(model, load_file(\"{f}\"))",
        "assert not result.unexpected_keys",
        "```",
        "",
        "With cotune (the same LoRA layout every party builds; `load_lora_state_dict` checks keys and shapes):",
        "",
        "```python",
        "from pathlib import Path",
        "from cotune.lm.lora import attach_lora, load_lora_state_dict, lora_from_bytes",
        "from cotune.lm.model import load_causal_lm",
        "",
        f"model, tokenizer = load_causal_lm(\"PATH/TO/BASE_MODEL\")  # {example.model}",
        f"model = attach_lora(model, r={example.rank}, alpha=16)",
        f"load_lora_state_dict(model, lora_from_bytes(Path(\"{f}\").read_bytes()))",
        "```",
    ]


def model_card(run: pb.Run, adapters: Sequence[ExportedAdapter], *, skipped: Mapping[str, str] | None = None,
               summary: str = "", exported_at: float | None = None) -> str:
    """The markdown model card of an exported run: the run, its spec, every exported adapter with its model and
    LoRA, the final metrics per party, the bytes the run moved, and how to load an adapter."""
    rounds = sorted(run.rounds, key=lambda r: r.round)
    last = rounds[-1].round if rounds else run.current_round
    finished = max((r.finished_at for r in rounds), default=0.0)
    title = f"Cotune run {run.run_id}" + (f" ({run.spec.name})" if run.spec.name else "")
    out = [f"# {title}", "",
           f"Final adapters of a {run.spec.algorithm} run" + (f": {summary}" if summary else "") + ".", "",
           "| | |", "|---|---|",
           f"| run id | `{run.run_id}` |",
           f"| name | {run.spec.name or '-'} |",
           f"| algorithm | {run.spec.algorithm} |",
           f"| state | {pb.RunState.Name(run.state)} |",
           f"| rounds | {last} after round 0 |",
           f"| clients | {', '.join(run.spec.clients) or '-'} |",
           f"| public set | `{run.spec.public_set_hash}` |",
           f"| created | {_when(run.created_at)} |",
           f"| finished | {_when(finished)} |",
           f"| exported | {_when(time.time() if exported_at is None else exported_at)} |",
           "", "## Spec", "", "```yaml", _spec_yaml(run.spec), "```", "",
           "## Adapters", "",
           "The state each party saved for this run after its last step (round "
           f"{last}), exported by the coordinator's ExportRun.", "",
           "| file | party | model | LoRA r | target modules | layers | parameters | size | sha256 |",
           "|---|---|---|---:|---|---:|---:|---:|---|"]
    for a in sorted(adapters, key=lambda a: (a.party_id != "llm", a.name)):
        out.append(f"| `{file_name(a.name)}` | {a.party_id} | {a.model or '-'} | {a.rank} | {', '.join(a.modules)} | "
                   f"{a.layers} | {a.parameters:,} | {human_bytes(a.size)} | `{a.sha256}` |")
    for pid, why in sorted((skipped or {}).items()):
        out.append(f"| - | {pid} | not exported: {why} | | | | | | |")
    if run.spec.algorithm in ("fedbiot", "fedot"):
        archive = next((r.artifacts.get("model", "") for r in rounds if r.artifacts.get("model")), "")
        out += ["", "The clients' adapters (and `llm-compressed`) adapt the compressed model (emulator + adapter) the "
                "LLM server built in round 0" + (f": the tar of its model directory, `{archive}` in the "
                                                 "coordinator's artifact store" if archive else "") + "."]
    out += ["", f"## Final metrics (round {last})", "", *_metrics_table(run), "",
            "## Bytes moved by the coordinator", "", *_bytes_table(run), ""]
    loading = _loading(adapters)
    if loading:
        out += [*loading, ""]
    return "\n".join(out)


# -- the operator's side -----------------------------------------------------------------------------------------
def download(response: pb.ExportRunResponse, fetch: Callable[[str], bytes], out_dir: str | Path) -> list[Path]:
    """Write every adapter of `response` (its bytes from `fetch(sha256)`) to `out_dir/<party>[-<target>].safetensors`
    and the model card to `out_dir/MODEL_CARD.md`; returns the files written."""
    out = Path(out_dir)
    names = {name: file_name(name) for name in response.adapters}
    clash = {f for f in names.values() if list(names.values()).count(f) > 1}
    if clash:
        raise ValueError(f"adapters {sorted(n for n, f in names.items() if f in clash)} would share a file name")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in sorted(response.adapters):
        path = out / names[name]
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(fetch(response.adapters[name].sha256))
        tmp.replace(path)
        written.append(path)
    card = out / CARD_FILE
    card.write_text(response.model_card_markdown, encoding="utf-8")
    written.append(card)
    return written
