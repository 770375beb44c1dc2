"""The generic tasks every model holder can serve: CE training on private data, evaluation, adapter get/set.

Each is a handler `(party, task, ctx) -> work`: it validates the request synchronously (raising InvalidInput or
Precondition, changing nothing) and returns the work the party's operation worker runs.
"""

from __future__ import annotations

import hashlib

from cotune.data.tasks import GENERATION_METRICS
from cotune.errors import InvalidInput, Precondition
from cotune.party.base import ModelParty
from cotune.rpc.operations import OpResult
from cotune.v1 import party_pb2
from cotune.wire.media import MEDIA_ADAPTER


def train_local(party: ModelParty, task: party_pb2.TrainLocalTask, ctx: party_pb2.RunContext):
    """CE fine-tuning of the party's model on its private data."""
    if not party.private:
        raise Precondition(f"party {party.cfg.party_id} ({party.role_name}) has no private data to train on")
    epochs = party.epochs(task.epochs)
    lr, batch_size = party.lr(task), party.batch_size(task)
    examples = party.samples(party.private, task.max_samples)

    def work(op):
        trainer = party.trainer
        party.set_training(trainer, lr=lr, batch_size=batch_size)
        m = trainer.train_ce(examples, epochs=epochs, progress=party.progress(op, "train"), should_stop=op.cancelled)
        return OpResult(metrics={"train_loss_first": m["loss_first"], "train_loss_last": m["loss_last"],
                                 "train_steps": m["steps"], "train_samples": m["samples"], "train_tokens": m["tokens"],
                                 "train_truncated_samples": m["truncated_samples"]},
                        result=party_pb2.TrainLocalResult(samples=int(m["samples"]), loss_first=m["loss_first"],
                                                          loss_last=m["loss_last"]))
    return work


def evaluate(party: ModelParty, task: party_pb2.EvaluateTask, ctx: party_pb2.RunContext):
    """Public-set loss of a target model, and its score on the eval set.

    Multiple choice (evaluation.metric empty, eval items with choices): eval_accuracy, eval_accuracy_norm, eval_n.
    Generative (evaluation.metric exact_match | rouge_l): greedy generation (evaluation.max_new_tokens, stop),
    scored against each item's response: eval_exact_match or eval_rouge_l, eval_n, eval_generated_tokens (total) and
    eval_stopped (items that ended at a stop sequence or end-of-sequence token). In both cases eval_accuracy (metric
    and EvaluateResult field) carries the primary score, so reports, plots and exports show it for every task.
    A free-form eval set (items without choices) with no metric configured is refused (Precondition) rather than
    left unscored: configure evaluation.metric (cotune.data.tasks.evaluation_config_for_task) or drop data.eval.
    Without an eval set only the public loss is measured (eval_accuracy NaN).
    """
    eval_set = party.samples(party.eval, task.max_samples)
    public = party.samples(party.public, task.max_samples)
    party.target(task.target)  # an unknown or absent target is refused now, not when the work runs
    ecfg = party.cfg.evaluation
    generative = bool(eval_set) and bool(ecfg.metric)
    multiple_choice = bool(eval_set) and not generative and bool(eval_set[0].choices)
    if eval_set and not generative and not multiple_choice:
        raise Precondition(f"party {party.cfg.party_id}: its eval set is free-form (no choices) and "
                           "evaluation.metric is not set, so it cannot be scored; set evaluation.metric to exact_match "
                           "(GSM8K) or rouge_l (DialogSum), with max_new_tokens and stop "
                           "(cotune.data.tasks.evaluation_config_for_task), or remove data.eval")

    def work(op):
        from cotune.lm.evaluate import evaluate_loss, evaluate_mc

        target = party.target(task.target)
        bs, ml = party.trainer.config.batch_size, party.cfg.training.max_length
        metrics = {}
        # progress in items: the public samples whose loss is measured, then the eval items scored
        total = len(public) + (len(eval_set) if generative or multiple_choice else 0)
        report = party.progress(op, "evaluate")
        report(0, total)
        cache, key = _eval_cache_key(party, task.target, target.model, public, eval_set, bs, ml)
        if cache is not None and (hit := cache.get(key)) is not None:
            report(total, total)
            return OpResult(metrics={**hit["metrics"], "eval_cached": 1.0},
                            result=party_pb2.EvaluateResult(public_loss=hit["public_loss"],
                                                            eval_accuracy=hit["eval_accuracy"]))
        loss = evaluate_loss(target.model, target.tokenizer, public, batch_size=bs, max_length=ml,
                             progress=lambda done, _n: report(done, total))
        metrics.update({"public_loss": loss["loss"], "public_ppl": loss["perplexity"], "public_bpb": loss["bpb"]})
        accuracy = float("nan")
        if multiple_choice:
            acc = evaluate_mc(target.model, target.tokenizer, eval_set, batch_size=bs, max_length=ml,
                              mc_scoring=ecfg.mc_scoring,
                              progress=lambda done, _n: report(len(public) + done, total))
            accuracy = acc["accuracy"]
            metrics.update({"eval_accuracy": acc["accuracy"], "eval_accuracy_norm": acc["accuracy_norm"],
                            "eval_n": acc["n"]})
        elif generative:
            from cotune.lm.generate import evaluate_generation

            gen = evaluate_generation(target.model, target.tokenizer, eval_set, metric=ecfg.metric,
                                      max_new_tokens=ecfg.max_new_tokens, stop=tuple(ecfg.stop), batch_size=bs,
                                      max_length=ml, progress=lambda done, _n: report(len(public) + done, total))
            accuracy = gen["score"]
            metrics.update({GENERATION_METRICS[ecfg.metric]: gen["score"], "eval_accuracy": gen["score"],
                            "eval_n": gen["n"], "eval_generated_tokens": gen["generated_tokens"],
                            "eval_stopped": gen["stopped"]})
        report(total, total)
        if cache is not None:
            cache.put(key, metrics, public_loss=loss["loss"], eval_accuracy=accuracy)
        return OpResult(metrics=metrics,
                        result=party_pb2.EvaluateResult(public_loss=loss["loss"], eval_accuracy=accuracy))
    return work


def _eval_cache_key(party: ModelParty, target_name: str, model, public, eval_set, batch_size: int, max_length: int):
    """(cache, key) for an evaluation of `model` when the party keeps evaluations (evaluation.cache_dir), else
    (None, ""): the key covers all the result depends on (cotune.lm.eval_cache)."""
    from dataclasses import asdict

    from cotune.data.tasks import dataset_hash
    from cotune.lm.eval_cache import EvalCache, model_fingerprint

    directory = party.cfg.evaluation.cache_dir
    if not directory:
        return None, ""
    import torch

    # the weights' dtypes are in the model's fingerprint; the rest of the numerics is the party's
    key = EvalCache.key(
        target=target_name, model=model_fingerprint(model),
        lora=[asdict(party.cfg.lora), asdict(party.cfg.companion_lora)],
        public=dataset_hash(public), eval=dataset_hash(eval_set), batch_size=batch_size, max_length=max_length,
        evaluation={k: v for k, v in asdict(party.cfg.evaluation).items() if k != "cache_dir"},
        numerics=[party.device, party.bf16_in_fp32, torch.__version__, torch.get_num_threads()])
    return EvalCache(directory), key


def set_lora(party: ModelParty, task: party_pb2.SetLoraTask, ctx: party_pb2.RunContext):
    """Load an adapter (safetensors) into the party's model."""
    from cotune.lm.lora import LoraMismatchError, load_lora_state_dict, lora_from_bytes, validate_lora_state_dict

    if not task.HasField("adapter"):
        raise InvalidInput("set_lora needs adapter")
    state = party.parse_blob(task.adapter, "adapter", lora_from_bytes)
    try:
        validate_lora_state_dict(party.model, state)
    except LoraMismatchError as exc:
        raise InvalidInput(f"adapter does not fit this model: {exc}") from exc

    def work(op):
        load_lora_state_dict(party.model, state)
        lora_hash = party.lora_hash()
        return OpResult(result=party_pb2.SetLoraResult(lora_hash=lora_hash))
    return work


def get_lora(party: ModelParty, task: party_pb2.GetLoraTask, ctx: party_pb2.RunContext):
    """A target's adapter as a blob, optionally tagged with the step it answers."""
    party.target(task.target)
    tags = {}
    if task.tag:
        # the step this adapter answers travels inside it: an aggregator can tell another round's upload apart
        tags = {"cotune.run_id": ctx.run_id, "cotune.round": str(ctx.round), "cotune.task_key": ctx.task_key,
                "cotune.party_id": party.cfg.party_id, "cotune.target": task.target or "model"}

    def work(op):
        from cotune.lm.lora import LORA_FORMAT, lora_state_dict
        from cotune.wire.safetensors_io import dumps

        model = party.target(task.target).model
        canonical = party.lora_bytes(model)
        if tags:
            sd = lora_state_dict(model)
            data = dumps(sd, {"format": LORA_FORMAT, "keys": str(len(sd)), **tags})
        else:
            data = canonical
        blob = party.store.put_bytes(data, MEDIA_ADAPTER)
        lora_hash = hashlib.sha256(canonical).hexdigest()
        return OpResult(result=party_pb2.GetLoraResult(adapter=blob.ref(), lora_hash=lora_hash))
    return work
