"""FedMKT (Fan et al. 2024): mutual knowledge transfer between one LLM and many SLMs through top-k logits.

Per round: clients fine-tune on private data -> clients send public top-k -> the LLM distils from them
(DualMinCE) -> the LLM sends its public top-k -> each client distils from it -> everyone is evaluated.
Across tokenizers, the alignment service supplies MinED vocabulary maps and public-set sequence
alignments once per run (cached across runs); receivers project logits themselves.
llm2slm is the same strategy with the LLM frozen (setting llm_to_slm).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from cotune.algorithms import steps
from cotune.algorithms.base import Driver, MalformedResult, PartyRef, Strategy, TaskOutcome
from cotune.algorithms.fedmkt.config import FedMKTConfig, LLMToSLMConfig
from cotune.algorithms.fedmkt.shards import read_shard
from cotune.errors import InvalidInput
from cotune.v1 import party_pb2


@dataclass(frozen=True)
class Link:
    """What a receiver needs to read a sender on another tokenizer: artifact shas of the MinED vocabulary map and
    the public-set sequence alignment, sender -> receiver."""

    vocab_map: str
    seq_alignment: str


@dataclass(frozen=True)
class Links:
    """A client on another tokenizer than the LLM's: the link from the LLM, and to it when knowledge flows both ways."""

    from_llm: Link
    to_llm: Link | None


class FedMKT(Strategy):
    name = "fedmkt"
    config_class = FedMKTConfig
    summary = "mutual knowledge transfer through public top-k logits, across tokenizers (MinED)"

    def check(self, config: FedMKTConfig, run, llm, clients) -> list[str]:
        problems = []
        if config.setting == "one_to_one" and len(clients) != 1:
            problems.append(f"fedmkt.setting one_to_one needs exactly one client, the spec selects {len(clients)}")
        if config.setting == "homogeneous" and len({i.tokenizer_hash for i in clients.values()}) > 1:
            problems.append("fedmkt.setting homogeneous needs every client to share one tokenizer; these clients differ: "
                            + ", ".join(f"{c}={i.tokenizer_hash[:12]}" for c, i in sorted(clients.items())))
        return problems

    def execute(self, d: Driver, config: FedMKTConfig) -> None:
        run = d.run
        logits = party_pb2.PublicLogitsTask(top_k=config.top_k, max_samples=run.max_public_samples,
                                            bits=config.logits_bits, max_length=run.max_length)
        distill = dict(ce_weight=config.ce_weight, epochs=config.distill_epochs, selection=config.selection,
                       max_samples=run.max_public_samples, max_length=run.max_length, projection=config.projection,
                       skip_span_mismatch=config.skip_span_mismatch)

        d.set_step(0, "align")
        links = {c.party_id: self._links(d, c, config, mutual=config.mutual) for c in d.clients
                 if c.info.tokenizer_hash != d.llm.info.tokenizer_hash}
        d.set_step(0, "evaluate")
        steps.evaluate(d, [d.llm, *d.clients], 0)

        for rnd in range(1, run.rounds + 1):
            d.check_cancelled()
            if config.mutual:
                active, _ = steps.train_local(d, d.clients, rnd)
                d.set_step(rnd, "client_logits")
                out = d.on_parties(active, rnd, "public_logits", lambda c: self._logits(d, c, rnd, logits),
                                   quorum=steps.quorum(d))
                for pid, res in out.ok.items():
                    d.record_metrics(rnd, pid, {"public_loss_bpb": res.result.public_loss_bpb})
                active = [c for c in active if c.party_id in out.ok]
                d.set_step(rnd, "llm_distill")
                teachers = [self._teacher(c, out.ok[c.party_id].result.shard,
                                          links[c.party_id].to_llm if c.party_id in links else None, d)
                            for c in active]
                res = d.task(d.llm, rnd, "distill", distill=party_pb2.DistillTask(teachers=teachers, **distill))
                d.record_metrics(rnd, d.llm.party_id, res.metrics)
                llm_shard = self._llm_logits(d, rnd, logits)
            else:  # the LLM is frozen: its logits need nothing from this round's training, so both run at once
                (active, _), llm_shard = d.concurrently(lambda: steps.train_local(d, d.clients, rnd),
                                                        lambda: self._llm_logits(d, rnd, logits))

            def client_distill(c: PartyRef):
                teacher = self._teacher(d.llm, llm_shard, links[c.party_id].from_llm if c.party_id in links else None, d)
                return d.task(c, rnd, "distill", distill=party_pb2.DistillTask(teachers=[teacher], **distill))

            def distill_clients() -> list[PartyRef]:
                d.set_step(rnd, "client_distill")
                out = d.on_parties(active, rnd, "distill", client_distill, quorum=steps.quorum(d))
                for pid, res in out.ok.items():
                    d.record_metrics(rnd, pid, res.metrics)
                return [c for c in active if c.party_id in out.ok]

            if d.run.overlap_steps:  # the LLM's evaluation needs nothing the clients do now: it runs while they distil
                active, _ = d.concurrently(distill_clients, lambda: steps.evaluate(d, [d.llm], rnd))
                d.set_step(rnd, "evaluate")
                steps.evaluate(d, active, rnd)
            else:
                active = distill_clients()
                d.set_step(rnd, "evaluate")
                steps.evaluate(d, [d.llm, *active], rnd)
            d.emit("metrics", round=rnd, message=f"round {rnd} complete")

    @classmethod
    def _llm_logits(cls, d: Driver, rnd: int, task: party_pb2.PublicLogitsTask):
        d.set_step(rnd, "llm_logits")
        res = cls._logits(d, d.llm, rnd, task)
        d.record_metrics(rnd, d.llm.party_id, {"public_loss_bpb": res.result.public_loss_bpb})
        return res.result.shard

    @staticmethod
    def _logits(d: Driver, sender: PartyRef, rnd: int, task: party_pb2.PublicLogitsTask) -> TaskOutcome:
        """A party's public top-k, its shard checked here as every receiver will check it (fedmkt.shards): a bad
        shard (unreadable, another public set, tokenizer or vocabulary than the sender describes, the wrong sample
        count, a negative loss) is the sender's malformed result, dropping a client from the round instead of failing
        the receiver's distillation."""
        res = d.task(sender, rnd, "public_logits", public_logits=task)
        info, n, llm = sender.info, d.llm.info.public_set_size, d.llm.info  # the run's public set is the LLM's
        if not math.isfinite(res.result.public_loss_bpb) or res.result.public_loss_bpb < 0:
            raise MalformedResult(sender, rnd, "public_logits",
                                  f"public_loss_bpb {res.result.public_loss_bpb:.6g} is not a loss")
        try:
            samples, _, _ = read_shard(d.read_artifact(res.result.shard.sha256), where="its shard",
                                       public_set_hash=d.public_set_hash,
                                       n_samples=min(task.max_samples, n) if task.max_samples else n,
                                       tokenizer_hash=info.tokenizer_hash, vocab_size=info.vocab_size,
                                       party_id=info.party_id)
        except InvalidInput as exc:
            raise MalformedResult(sender, rnd, "public_logits", str(exc)) from exc
        if sender.role != "llm" and info.tokenizer_hash == llm.tokenizer_hash:  # the LLM reads its ids as its own
            top = max((int(s.ids.max()) for s in samples if s.ids.size), default=-1)
            if top >= llm.vocab_size:
                raise MalformedResult(sender, rnd, "public_logits", f"its shard holds token id {top}, beyond the "
                                                                    f"LLM's vocabulary of {llm.vocab_size}")
        return res

    @staticmethod
    def _teacher(sender: PartyRef, shard, link: Link | None, d: Driver) -> party_pb2.TeacherShard:
        teacher = party_pb2.TeacherShard(sender_id=sender.party_id, shard=shard)
        if link is not None:
            teacher.vocab_map.CopyFrom(d.ref(link.vocab_map))
            teacher.sequence_alignment.CopyFrom(d.ref(link.seq_alignment))
        return teacher

    @staticmethod
    def _links(d: Driver, client: PartyRef, config: FedMKTConfig, *, mutual: bool) -> Links:
        """A client whose tokenizer differs from the LLM's: vocab maps and sequence alignments from the LLM, and to
        it when knowledge flows both ways."""
        def link(src: PartyRef, dst: PartyRef) -> Link:
            return Link(d.vocab_map(src, dst), d.sequence_alignment(src, dst, method=config.alignment_method,
                                                                    max_length=d.run.max_length))

        return Links(from_llm=link(d.llm, client), to_llm=link(client, d.llm) if mutual else None)


class LLMToSLM(FedMKT):
    """FedMKT with the LLM frozen: exactly FedMKT's `llm_to_slm` setting, under its own algorithm name."""

    name = "llm2slm"
    config_class = LLMToSLMConfig
    summary = "one-way transfer: clients distil from the frozen LLM's public logits"
