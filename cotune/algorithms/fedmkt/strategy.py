"""FedMKT (Fan et al. 2024): mutual knowledge transfer between one LLM and many SLMs through top-k logits.

Per round: clients fine-tune on private data -> clients send public top-k -> the LLM distils from them
(DualMinCE) -> the LLM sends its public top-k -> each client distils from it -> everyone is evaluated.
Across tokenizers, the alignment service supplies MinED vocabulary maps and public-set sequence
alignments once per run (cached across runs); receivers project logits themselves.
"""

from __future__ import annotations

from cotune.errors import InvalidInput
from cotune.v1 import party_pb2
from coordinator.driver import Party, RunDriver, Strategy

SETTINGS = ("heterogeneous", "homogeneous", "one_to_one", "llm_to_slm")
DEFAULT_TOP_K = 16
DEFAULT_LAM = 0.9
DEFAULT_MAX_LENGTH = 512


class FedMKT(Strategy):
    name = "fedmkt"

    def validate(self, spec, llm_info, client_infos) -> None:
        setting = spec.setting or "heterogeneous"
        if setting not in SETTINGS:
            raise InvalidInput(f"fedmkt setting must be one of {', '.join(SETTINGS)}, got {setting!r}")
        if setting == "one_to_one" and len(client_infos) != 1:
            raise InvalidInput(f"setting one_to_one needs exactly one client, the spec selects {len(client_infos)}")
        if setting == "homogeneous" and len({i.tokenizer_hash for i in client_infos.values()}) > 1:
            raise InvalidInput("setting homogeneous needs every client to share one tokenizer; these clients differ: "
                               + ", ".join(f"{c}={i.tokenizer_hash[:12]}" for c, i in client_infos.items()))
        if spec.selection and spec.selection not in ("dualmince", "fate_self"):
            raise InvalidInput(f"selection must be dualmince or fate_self, got {spec.selection!r}")
        if not 0 <= spec.top_k <= 1024:
            raise InvalidInput(f"top_k must be in 1..1024 (0 = {DEFAULT_TOP_K}), got {spec.top_k}")
        if not 0.0 <= spec.lam <= 1.0:
            raise InvalidInput(f"lam must be in [0, 1], got {spec.lam}")
        if not 0 <= spec.max_length <= 32768:
            raise InvalidInput(f"max_length must be in 8..32768 (0 = {DEFAULT_MAX_LENGTH}), got {spec.max_length}")
        if spec.logits_bits and not 2 <= spec.logits_bits <= 16:
            raise InvalidInput(f"logits_bits must be 0 (lossless) or 2..16, got {spec.logits_bits}")

    # ------------------------------------------------------------------------------------------------------------
    def execute(self, d: RunDriver) -> None:
        spec = d.spec
        setting = spec.setting or "heterogeneous"
        mutual = setting != "llm_to_slm"
        top_k = spec.top_k or DEFAULT_TOP_K
        max_length = spec.max_length or DEFAULT_MAX_LENGTH
        logits = party_pb2.PublicLogitsTask(top_k=top_k, max_samples=spec.max_public_samples, bits=spec.logits_bits,
                                            max_length=max_length)
        distill_args = dict(lam=spec.lam or DEFAULT_LAM, epochs=spec.distill_epochs or 1, selection=spec.selection or "dualmince",
                            max_samples=spec.max_public_samples, max_length=max_length)
        evaluate = party_pb2.EvaluateTask(max_samples=spec.eval_max_samples)
        everyone = [d.llm, *d.clients]

        d.set_step(0, "align")
        links = self._align(d)
        d.set_step(0, "evaluate")
        self._evaluate(d, everyone, 0, evaluate)

        for rnd in range(1, spec.rounds + 1):
            d.check_cancelled()
            d.set_step(rnd, "train_local")
            train = party_pb2.TrainLocalTask(epochs=spec.local_epochs or 1)
            out = d.on_parties(d.clients, rnd, "train_local", lambda c: d.task(c, rnd, "train_local", train_local=train),
                               quorum=self._quorum(d))
            for pid, res in out.ok.items():
                d.record_metrics(rnd, pid, res["metrics"])
            active = [c for c in d.clients if c.party_id in out.ok]

            if mutual:
                d.set_step(rnd, "client_logits")

                def client_logits(c: Party):
                    res = d.task(c, rnd, "public_logits", public_logits=logits)
                    d.fetch(c, res["blobs"]["shard"], rnd, "logits_shard")
                    return res

                out = d.on_parties(active, rnd, "public_logits", client_logits, quorum=self._quorum(d))
                for pid, res in out.ok.items():
                    d.record_metrics(rnd, pid, {"public_loss_bpb": res["metrics"]["public_loss_bpb"]})
                active = [c for c in active if c.party_id in out.ok]
                shards = {pid: res["blobs"]["shard"] for pid, res in out.ok.items()}

                d.set_step(rnd, "llm_distill")
                teachers = [self._teacher(d, c, shards[c.party_id], links.get(c.party_id, {}).get("to_llm")) for c in active]

                def deliver_to_llm():
                    for c in active:
                        d.deliver(d.llm, shards[c.party_id], rnd, "logits_shard")
                        for kind, sha in (links.get(c.party_id, {}).get("to_llm") or {}).items():
                            d.deliver(d.llm, sha, rnd, kind)

                res = d.task(d.llm, rnd, "distill", before=deliver_to_llm,
                             distill=party_pb2.DistillTask(teachers=teachers, **distill_args))
                d.record_metrics(rnd, d.llm.party_id, res["metrics"])

            d.set_step(rnd, "llm_logits")
            res = d.task(d.llm, rnd, "public_logits", public_logits=logits)
            d.fetch(d.llm, res["blobs"]["shard"], rnd, "logits_shard")
            d.record_metrics(rnd, d.llm.party_id, {"public_loss_bpb": res["metrics"]["public_loss_bpb"]})
            llm_shard = res["blobs"]["shard"]

            d.set_step(rnd, "client_distill")

            def client_distill(c: Party):
                link = links.get(c.party_id, {}).get("from_llm")

                def deliver():
                    d.deliver(c, llm_shard, rnd, "logits_shard")
                    for kind, sha in (link or {}).items():
                        d.deliver(c, sha, rnd, kind)

                teacher = self._teacher(d, d.llm, llm_shard, link)
                return d.task(c, rnd, "distill", before=deliver, distill=party_pb2.DistillTask(teachers=[teacher], **distill_args))

            out = d.on_parties(active, rnd, "distill", client_distill, quorum=self._quorum(d))
            for pid, res in out.ok.items():
                d.record_metrics(rnd, pid, res["metrics"])

            d.set_step(rnd, "evaluate")
            self._evaluate(d, [d.llm, *active], rnd, evaluate)
            d.emit("metrics", round=rnd, message=f"round {rnd} complete")

    # ------------------------------------------------------------------------------------------------------------
    @staticmethod
    def _quorum(d: RunDriver) -> int:
        return d.spec.min_clients or len(d.clients)

    @staticmethod
    def _teacher(d: RunDriver, sender: Party, shard: str, link: dict | None) -> party_pb2.TeacherShard:
        t = party_pb2.TeacherShard(sender_id=sender.party_id, shard=d.ref(shard))
        if link:
            t.vocab_map.CopyFrom(d.ref(link["vocab_map"]))
            t.sequence_alignment.CopyFrom(d.ref(link["seq_alignment"]))
        return t

    def _evaluate(self, d: RunDriver, parties, rnd: int, task) -> None:
        out = d.on_parties(parties, rnd, "evaluate", lambda p: d.task(p, rnd, "evaluate", evaluate=task), quorum=1)
        for pid, res in out.ok.items():
            d.record_metrics(rnd, pid, res["metrics"])

    def _align(self, d: RunDriver) -> dict:
        """For each client whose tokenizer differs from the LLM's: vocab maps and sequence alignments both ways.
        Returns {client_id: {"to_llm": {"vocab_map": sha, "seq_alignment": sha}, "from_llm": {...}}}."""
        hetero = [c for c in d.clients if c.info.tokenizer_hash != d.llm.info.tokenizer_hash]
        if not hetero:
            return {}
        if d.alignment is None:
            raise InvalidInput("clients use tokenizers other than the LLM's, but the coordinator has no alignment service configured")

        def prepare():
            d.fetch(d.llm, d.public_set_hash, 0, "public_set")
            d.count_bytes(0, "sent", "public_set", d.alignment.push(d.artifacts, d.public_set_hash))
            d.register_tokenizers([(p, p.info.tokenizer_bundle.sha256) for p in [d.llm, *hetero]])
            return {}

        d.step("r0/alignment-inputs", prepare)
        links = {}
        method = d.spec.alignment_method or "offsets"
        llm_tok = d.llm.info.tokenizer_hash

        def build(c: Party):
            def pair(src: str, dst: str) -> dict:
                ops = [d.alignment.build_vocab_map(src, dst),
                       d.alignment.build_sequence_alignment(src, dst, d.public_set_hash, method=method,
                                                            max_length=d.spec.max_length or DEFAULT_MAX_LENGTH)]
                return {kind: d.alignment_artifact(op, kind, c.party_id)
                        for kind, op in zip(("vocab_map", "seq_alignment"), ops)}

            tok = c.info.tokenizer_hash
            return {"to_llm": pair(tok, llm_tok), "from_llm": pair(llm_tok, tok)}

        for c in hetero:
            links[c.party_id] = d.step(f"r0/align/{c.party_id}", lambda c=c: build(c))
        return links

