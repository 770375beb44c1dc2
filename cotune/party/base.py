"""The model-holding party: what the LLM server and every SLM client have in common, and nothing algorithm-specific.

A party loads its model with a LoRA adapter, holds the public set (and, for a client, its private data), and runs
tasks on request as long-running operations. Which tasks a party serves is its role's table (`tasks`, filled by
llm_server.server.LLMServer and slm_client.client.SLMClient): kind -> handler, every handler with one signature,

    handler(party, task, ctx) -> work        ctx: the request's RunContext; validates synchronously
    work(op_ctx) -> OpResult                 runs on the operation worker, one task at a time

so a request is checked completely before any work starts, and a rejected request changes nothing. The generic
tasks are in cotune.party.tasks, the algorithms' in cotune.algorithms.<name>. Algorithm state (FedCoLLM's companion
SLM, FedBiOT's compressed model or shipped layer map) lives in state objects the algorithm modules own and attach here
with `set_state`/`state_for`; the models a task can address by name are the `targets`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from google.protobuf.message import Message

from cotune import metrics
from cotune.config import PartyConfig
from cotune.data import canonical_jsonl_bytes, dataset_hash, read_jsonl
from cotune.errors import InvalidInput, Precondition, Unavailable
from cotune.profile import phase
from cotune.rpc.operations import OperationContext, OperationManager, OpResult
from cotune.tasks import MAX_BATCH_SIZE, MAX_EPOCHS, MAX_LENGTH_RANGE, MAX_LOSS_WEIGHT, MAX_LR, MAX_STEPS, MAX_TOP_K
from cotune.v1 import party_pb2
from cotune.wire.blobs import Blob, service_store
from cotune.wire.media import MEDIA_DATASET, MEDIA_TOKENIZER
from cotune.party.runstate import RunStates, StateKind
from cotune.workdir import WorkdirLock

log = logging.getLogger(__name__)


Work = Callable[[OperationContext], OpResult]
Handler = Callable[["ModelParty", Message, party_pb2.RunContext], Work]


@dataclass(frozen=True)
class Target:
    """A model a task can address by name (EvaluateTask.target, GetLoraTask.target), with its tokenizer."""

    model: Any
    tokenizer: Any


TargetGetter = Callable[["ModelParty"], Target]


def own_model(party: "ModelParty") -> Target:
    with party.model_lock:
        return Target(party.model, party.tokenizer)


def held_elsewhere(what: str) -> TargetGetter:
    """A target this role never holds (another role's): asking for it is a FAILED_PRECONDITION naming the role."""

    def getter(party: "ModelParty") -> Target:
        raise Precondition(f"{party.role_name} ({party.cfg.party_id}) holds no {what}")

    return getter


def in_range(value, what: str, lo, hi, *, lo_open: bool = False):
    """`value` when it is a finite number in [lo, hi] ((lo, hi] with lo_open), else InvalidInput naming the field and
    the range. Every numeric task field goes through this before any work starts."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise InvalidInput(f"{what} must be a number, got {value!r:.40}") from None
    if not (math.isfinite(x) and (x > lo if lo_open else x >= lo) and x <= hi):
        raise InvalidInput(f"{what} must be in {'(' if lo_open else '['}{lo}, {hi}], got {value}")
    return value


class ModelParty:
    """Config, blob store, operations, data, model + tokenizer + Trainer, describe, and task dispatch.

    Subclasses (the roles) set `role`, `role_name`, fill `self.tasks` (and optionally `self.not_served` hints and
    extra `self.targets`) in __init__, and may override `setup` (after the model has loaded) and `describe_extra`."""

    role: ClassVar[str] = ""       # "llm" | "slm" (PartyInfo.role, PartyConfig.validate)
    role_name: ClassVar[str] = ""  # "the LLM server" | "an SLM client", in messages
    # set when a model loads: bf16 on a CPU without native bf16, so tasks run under cotune.lm.device.Bf16MatmulInFp32
    bf16_in_fp32: bool = False

    def __init__(self, cfg: PartyConfig):
        cfg.validate(self.role)
        self.cfg = cfg
        workdir = Path(cfg.workdir)
        self.workdir_lock = WorkdirLock(workdir, f"party {cfg.party_id}")  # one live party per workdir
        self.store = service_store(workdir / "blobs", cfg.blob_quota_gib)
        self.runs = RunStates(self)  # per-run durable state; also the journal of finished operations
        self.ops = OperationManager(workers=1, journal=self.runs)
        self._worker = threading.Lock()  # held while a task's work runs (and while a run is switched in)
        # the algorithm states kept per run, by name (roles fill it): how each is saved, restored and reset
        self.durable_states: dict[str, StateKind] = {}
        self.initial_lora = None  # the adapter a run starts from (the configured model's fresh LoRA)
        self.public = read_jsonl(cfg.data.public)
        self.private = read_jsonl(cfg.data.private) if cfg.data.private else []
        self.eval = read_jsonl(cfg.data.eval) if cfg.data.eval else []
        self.public_hash = dataset_hash(self.public)
        self.public_blob = self.store.put_bytes(canonical_jsonl_bytes(self.public), MEDIA_DATASET)
        self.model = self.tokenizer = self.trainer = None
        self.tokenizer_blob: Blob | None = None
        self.tokenizer_hash = ""
        self.vocab_size = 0
        self.device = ""
        self.model_path = cfg.model.path
        self.loaded_model = ""  # sha256 of the shipped archive the model came from; "" = the configured model
        self.model_lock = threading.RLock()  # install_model swaps the model while Describe may read it
        self._ready = threading.Event()
        self._fresh_info: party_pb2.PartyInfo | None = None
        self._states: dict[str, Any] = {}
        # the role's task table: kind -> handler(party, task, ctx) -> work
        self.tasks: dict[str, Handler] = {}
        # why a kind outside the table is not served here (appended to the refusal), by kind
        self.not_served: dict[str, str] = {}
        # models a task can name: "" (and "model") = this party's model; roles add their algorithms' targets
        self.targets: dict[str, TargetGetter] = {"": own_model, "model": own_model}

    # -- per-algorithm state -------------------------------------------------------------------------------------
    def state_for(self, name: str, default: Any = None) -> Any:
        """The state object the algorithm module `name` attached to this party, or `default`."""
        return self._states.get(name, default)

    def set_state(self, name: str, state: Any) -> None:
        self._states[name] = state

    # -- lifecycle --------------------------------------------------------------------------------------------
    @property
    def model_cache(self) -> Path:
        mc = self.cfg.model
        return Path(mc.cache_dir) if mc.cache_dir else Path(self.cfg.workdir) / "model-cache"

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def load(self) -> None:
        """Load model, tokenizer and adapter (slow), then the role's `setup`; the service reports NOT_SERVING until
        this returns."""
        from cotune.lm.device import configure_threads

        configure_threads()  # $COTUNE_TORCH_THREADS: the cluster launcher shares the cores among model processes
        self.install_model(self.cfg.model.path, self.cfg.lora)
        self.setup()
        self.runs.recover()
        self._fresh_info = self.live_info()  # how a run this party has not seen starts (Describe for a new run)
        self._ready.set()
        log.info("%s ready: %s on %s, vocab %d, public set %s (%d samples)", self.cfg.party_id, self.cfg.model.path,
                 self.device, self.vocab_size, self.public_hash[:12], len(self.public))

    def setup(self) -> None:
        """The role's hook after the configured model has loaded (e.g. load an algorithm's extra model)."""

    def install_model(self, path, lora, *, archive: str = "") -> None:
        """Load the model at `path` with a fresh LoRA (`lora`: a LoraConfig) and a Trainer, and make it this party's
        model, replacing the previous one only once the new one has loaded. `archive`: the sha256 of the shipped model
        archive it came from, empty for the configured model."""
        from cotune.align.tokenizers import tokenizer_bundle_bytes
        from cotune.lm.device import emulates_bf16
        from cotune.lm.lora import attach_lora, lora_state_dict
        from cotune.lm.model import load_causal_lm

        mc = self.cfg.model
        model, tokenizer = load_causal_lm(path, cache_dir=self.model_cache, device=mc.device, dtype=mc.dtype)
        model = attach_lora(model, r=lora.r, alpha=lora.alpha, dropout=lora.dropout, seed=lora.seed)
        trainer = self.new_trainer(model, tokenizer)
        initial = lora_state_dict(model)
        tokenizer_blob = self.store.put_bytes(tokenizer_bundle_bytes(tokenizer), MEDIA_TOKENIZER)
        head = model.get_output_embeddings()
        with self.model_lock:
            self.model, self.tokenizer, self.trainer = model, tokenizer, trainer
            if not archive:
                self.initial_lora = initial
            self.tokenizer_blob, self.tokenizer_hash = tokenizer_blob, tokenizer_blob.sha256
            self.vocab_size = int(head.weight.shape[0]) if head is not None else len(tokenizer)
            self.device = str(next(model.parameters()).device)
            self.bf16_in_fp32 = emulates_bf16(model.get_input_embeddings().weight.dtype, self.device)
            self.model_path, self.loaded_model = str(path), archive
        metrics.set_model_bytes(self.cfg.party_id, "model", model)  # cotune_party_model_bytes

    def new_trainer(self, model, tokenizer=None):
        """A fresh Trainer (optimizer, schedule, counters) over `model`, with this party's training config."""
        from cotune.lm.train import TrainConfig, Trainer

        tc = self.cfg.training
        return Trainer(model, tokenizer or self.tokenizer, TrainConfig(lr=tc.lr, batch_size=tc.batch_size,
                                                                       max_length=tc.max_length, seed=tc.seed))

    def reset_adapter(self) -> None:
        """The configured model's fresh adapter and a fresh optimizer: where every run starts."""
        from cotune.lm.lora import load_lora_state_dict

        load_lora_state_dict(self.model, self.initial_lora)
        self.trainer = self.new_trainer(self.model)

    def on_model_installed(self) -> None:
        """The role's hook after a run switch reinstalled the configured model (e.g. re-read its layer map)."""

    def install_archive(self, sha: str) -> None:
        """Reinstall the shipped model archive `sha` (a run's state names the model it belongs to); roles that accept
        shipped models override this."""
        raise Precondition(f"{self.role_name} ({self.cfg.party_id}) does not install shipped models")

    def require_ready(self) -> None:
        if not self._ready.is_set():
            raise Unavailable(f"party {self.cfg.party_id} is still loading its model; retry shortly")

    # -- describe ---------------------------------------------------------------------------------------------
    def lora_bytes(self, model=None) -> bytes:
        from cotune.lm.lora import lora_state_dict, lora_to_bytes

        return lora_to_bytes(lora_state_dict(self.model if model is None else model))

    def lora_hash(self, model=None) -> str:
        """sha256 of the canonical adapter bytes of `model` (default: this party's model)."""
        return hashlib.sha256(self.lora_bytes(model)).hexdigest()

    @staticmethod
    def lora_layout_hash(model) -> str:
        """Identity of an adapter's layout (sorted keys and shapes; dtypes are cast on load): equal layouts average."""
        from cotune.lm.lora import lora_shapes

        layout = json.dumps(sorted([k, list(v)] for k, v in lora_shapes(model).items()), separators=(",", ":"))
        return hashlib.sha256(layout.encode()).hexdigest()

    @staticmethod
    def trainable_params(model) -> int:
        return sum(p.numel() for p in model.parameters() if p.requires_grad)

    def describe(self, run_id: str = "") -> party_pb2.PartyInfo:
        """This party as run `run_id` sees it (see DescribeRequest): the run in memory is described live; another run
        by what its saved state recorded at its last step (RunStates.saved_info), or, for a run this party has not
        taken part in, by the configured model with a fresh adapter, as recorded when the model loaded. Empty
        `run_id`: what the party holds now."""
        if not self._ready.is_set():
            return self._identity_info()
        info = None
        if run_id and run_id != self.runs.current:
            info = self.runs.saved_info(run_id)
            if info is None:
                info = party_pb2.PartyInfo()
                info.CopyFrom(self._fresh_info)
        if info is None:
            info = self.live_info()
        info.current_run = self.runs.current or ""
        info.described_run = run_id
        return info

    def _identity_info(self) -> party_pb2.PartyInfo:
        """What this party says before its model has loaded: who it is and which data it holds."""
        name = self.cfg.model.name or Path(self.cfg.model.path).name
        return party_pb2.PartyInfo(
            party_id=self.cfg.party_id, role=self.role, model_name=name,
            public_set_hash=self.public_hash, public_set_size=len(self.public), private_set_size=len(self.private),
            eval_set_size=len(self.eval), public_set=self.public_blob.ref(), ready=self._ready.is_set(),
        )

    def live_info(self, lora_hash: str = "") -> party_pb2.PartyInfo:
        """The models this party holds in memory now: name, tokenizer, vocabulary, adapter and its layout.
        `lora_hash`: the adapter's hash when the caller has just serialized it (else computed here)."""
        from cotune.lm.layers import num_decoder_layers

        info = self._identity_info()
        info.ready = True
        with self.model_lock:
            if self.loaded_model:
                info.model_name = f"shipped model {self.loaded_model[:12]} (in place of {info.model_name})"
                info.loaded_model = self.loaded_model
            info.tokenizer_hash = self.tokenizer_hash
            info.vocab_size = self.vocab_size
            info.device = self.device
            info.trainable_params = self.trainable_params(self.model)
            info.tokenizer_bundle.CopyFrom(self.tokenizer_blob.ref())
            info.lora_hash = lora_hash or self.lora_hash()
            info.lora_layout_hash = self.lora_layout_hash(self.model)
            try:
                info.num_layers = num_decoder_layers(self.model)
            except ValueError:  # an architecture whose layer list we cannot find: FedBiOT refuses it at validation
                info.num_layers = 0
        self.describe_extra(info)
        return info

    def describe_extra(self, info: party_pb2.PartyInfo) -> None:
        """The role's hook to add its algorithms' fields to a ready party's PartyInfo."""

    # -- tasks --------------------------------------------------------------------------------------------------
    def start_task(self, req: party_pb2.TaskRequest):
        self.require_ready()
        ctx = req.ctx
        if not ctx.run_id:
            raise InvalidInput("ctx.run_id is required")
        if ctx.round < 0:
            raise InvalidInput(f"ctx.round must be >= 0, got {ctx.round}")
        if ctx.public_set_hash and ctx.public_set_hash != self.public_hash:
            raise Precondition(
                f"party {self.cfg.party_id} holds public set {self.public_hash[:16]}…, but run {ctx.run_id} uses "
                f"{ctx.public_set_hash[:16]}…; samples are matched by position, so this party refuses the run")
        kind = req.WhichOneof("task")
        if kind is None:
            raise InvalidInput("TaskRequest names no task")
        handler = self.tasks.get(kind)
        if handler is None:
            hint = self.not_served.get(kind)
            raise Precondition(f"{self.role_name} does not serve {kind}" + (f" ({hint})" if hint else ""))
        task = getattr(req, kind)
        if self._worker.acquire(blocking=False):
            previous = self.runs.current
            try:  # an idle worker: switch to the task's run (restoring it if needed) and validate against its state
                self.runs.enter(ctx.run_id, ctx.resumes)
                prepared = handler(self, task, ctx)  # validates synchronously
            except Exception:
                if previous is not None and previous != ctx.run_id:
                    self.runs.enter(previous, True)  # a refused request leaves the party holding what it held
                raise
            finally:
                self._worker.release()
        elif self.runs.current == ctx.run_id:
            prepared = handler(self, task, ctx)
        else:  # another run's task holds the worker: validate once this run is switched in (a failed operation)
            prepared = lambda op: handler(self, task, ctx)(op)  # noqa: E731
        key = f"{ctx.run_id}/{ctx.round}/{ctx.task_key}" if ctx.task_key else ""
        work = self._in_run(ctx, key, prepared, kind)
        if not key:
            return self.ops.start(kind, work)
        # the key names the step (run, round, task_key) and is bound to the task asked (kind + serialized task): a
        # retry re-attaches to its operation (or, after a restart, gets its recorded result); a different task under
        # the same key is refused
        fingerprint = hashlib.sha256(task.SerializeToString(deterministic=True)).hexdigest()
        return self.ops.start(kind, work, key=key, fingerprint=fingerprint)

    def _in_run(self, ctx: party_pb2.RunContext, key: str, work: Work, kind: str = "") -> Work:
        """`work` run against its run's state, which it stages when done (committed with the operation's record;
        cotune.party.runstate). A failed or cancelled task leaves the in-memory state to be restored. A task that
        trained tokens adds them, and its seconds, to the party's training throughput (cotune.metrics)."""

        def run(op_ctx: OperationContext) -> OpResult:
            from cotune.lm.device import Bf16MatmulInFp32, release_freed_memory, threads_for_task

            # bf16 on a CPU without native bf16: matrix products in fp32 instead of torch's slow emulation
            with self._worker, Bf16MatmulInFp32() if self.bf16_in_fp32 else contextlib.nullcontext():
                threads_for_task(ctx.parallel_tasks)  # on a shared host: the cores the plan leaves this task
                with phase("checkpoint"):
                    self.runs.enter(ctx.run_id, ctx.resumes)
                try:
                    started = time.perf_counter()
                    result = work(op_ctx)
                    metrics.training(self.cfg.party_id, kind, getattr(result, "metrics", None), time.perf_counter() - started)
                    with phase("checkpoint"):
                        self.runs.stage(ctx.run_id, key)
                except BaseException:
                    self.runs.forget_current()
                    raise
                finally:  # an idle party must not hold its task's peak (the host's other parties need it)
                    release_freed_memory()
                if not key:
                    self.runs.promote(ctx.run_id)
                return result
        return run

    def target(self, name: str) -> Target:
        """The model (and tokenizer) a task names: InvalidInput for an unknown name, Precondition for a known one
        this party does not hold (now)."""
        getter = self.targets.get(name)
        if getter is None:
            known = ", ".join(repr(t) for t in self.targets if t)
            raise InvalidInput(f"target must be '' (this party's model) or one of {known}, got {name!r:.40}")
        return getter(self)

    # -- helpers for task handlers: every numeric task field is bounded (limits: cotune.tasks) ----------------------
    @staticmethod
    def samples(items, max_samples: int) -> list:
        if max_samples < 0:
            raise InvalidInput(f"max_samples must be >= 0, got {max_samples}")
        return list(items[:max_samples]) if max_samples else list(items)

    @staticmethod
    def progress(ctx: OperationContext, stage: str):
        def report(done, total):
            ctx.check_cancelled()
            ctx.progress(done, total, stage)
        return report

    @staticmethod
    def epochs(value: int, what: str = "epochs") -> int:
        return int(in_range(value, what, 1, MAX_EPOCHS))

    @staticmethod
    def steps(value: int, what: str = "steps") -> int:
        """An optimizer step count, 0 (none) .. MAX_STEPS."""
        return int(in_range(value, what, 0, MAX_STEPS))

    @staticmethod
    def weight(value: float, what: str, hi: float = MAX_LOSS_WEIGHT) -> float:
        """A loss weight, finite and in [0, hi]."""
        return float(in_range(value, what, 0.0, hi))

    @staticmethod
    def top_k(value: int, what: str = "top_k") -> int:
        return int(in_range(value, what, 1, MAX_TOP_K))

    def lr(self, task: Message, field: str = "lr", default: float | None = None) -> float:
        """A task's `optional` learning rate, else `default` (else the party's training.lr); InvalidInput unless in
        (0, MAX_LR]."""
        if not task.HasField(field):
            return self.cfg.training.lr if default is None else default
        return float(in_range(getattr(task, field), field, 0.0, MAX_LR, lo_open=True))

    def batch_size(self, task: Message, field: str = "batch_size") -> int:
        """A task's `optional` batch size, else the party's training.batch_size; InvalidInput unless in
        1..MAX_BATCH_SIZE."""
        if not task.HasField(field):
            return self.cfg.training.batch_size
        return int(in_range(getattr(task, field), field, 1, MAX_BATCH_SIZE))

    @staticmethod
    def max_length(task: Message) -> int:
        lo, hi = MAX_LENGTH_RANGE
        if not lo <= task.max_length <= hi:
            raise InvalidInput(f"max_length must be in {lo}..{hi} tokens, got {task.max_length}")
        return int(task.max_length)

    def set_training(self, trainer, *, lr: float, batch_size: int) -> None:
        """A task's learning rate and batch size on `trainer` for this step."""
        trainer.config.batch_size = batch_size
        trainer.set_lr(lr)

    def read_blob(self, ref, what: str, max_bytes: int = 4 << 30) -> bytes:
        blob = Blob.from_ref(ref)
        if not self.store.has(blob.sha256):
            raise Precondition(f"{what} blob {blob.sha256} is not in party {self.cfg.party_id}'s store; "
                               "upload it with PutBlob first")
        return self.store.read_bytes(blob.sha256, max_bytes=max_bytes)

    def parse_blob(self, ref, what: str, parse: Callable[[bytes], Any], max_bytes: int = 4 << 30) -> Any:
        """read_blob, then `parse` its bytes: a parser's error on bad bytes is the caller's bad blob (InvalidInput)."""
        data = self.read_blob(ref, what, max_bytes)
        try:
            return parse(data)
        except (ValueError, KeyError, IndexError, OSError) as exc:  # what parsers raise on bad bytes; others are bugs
            raise InvalidInput(f"{what} (blob {ref.sha256[:12]}…) cannot be read: {exc}") from exc
