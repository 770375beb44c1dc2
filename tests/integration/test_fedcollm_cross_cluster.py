"""FedCoLLM across tokenizers (an extension): the LLM keeps Mistral's tokenizer while both clients and the LLM
server's SLM copy run a GPT-2-tokenizer SLM; the co-distillation goes through MinED maps the coordinator has the
alignment service build once. Real processes over loopback gRPC."""

from __future__ import annotations

import grpc
import pytest

from cotune.v1 import coordinator_pb2 as pb
from tests.integration.cluster_fixtures import check_aggregate, metrics_of, party, rounds_of, run_to_end

pytestmark = pytest.mark.integration
CLUSTER_ALGORITHM = "fedcollm"
CLUSTER_CROSS_TOKENIZER = True
CLIENTS = ("client-1", "client-2")


def test_without_align_tokenizers_the_spec_is_refused(cluster, coordinator, addresses):
    llm = party(cluster, "llm").describe()
    assert llm.companion.tokenizer_hash != llm.tokenizer_hash
    with pytest.raises(grpc.RpcError) as err:
        coordinator.start_run(pb.RunSpec(algorithm="fedcollm", rounds=1))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "align_tokenizers" in err.value.details()


def test_two_rounds_across_tokenizers(cluster, coordinator, addresses, artifacts):
    run = run_to_end(coordinator, algorithm="fedcollm", rounds=2,
                     fedcollm=pb.FedCoLLMSpec(kl_weight=20.0, top_k=8, align_tokenizers=True))
    assert run.state == pb.RUN_SUCCEEDED, run.error
    rounds = rounds_of(run)
    # two MinED maps built once at round 0, delivered to the LLM server once
    assert rounds[0].bytes_received["vocab_map"] > 0 and rounds[1].bytes_sent["co_distill.llm_to_slm_map"] > 0
    assert "co_distill.llm_to_slm_map" not in rounds[2].bytes_sent
    for rnd in (1, 2):
        llm = metrics_of(rounds[rnd])["llm"]
        assert llm["codistill_positions"] > 0 and 0 < llm["codistill_aligned_fraction"] <= 1, llm
        assert llm["codistill_slm_ce_after"] < llm["codistill_slm_ce_before"] + 1.0  # finite, sane numbers
        check_aggregate(rounds[rnd], artifacts, CLIENTS)
    distilled = rounds[2].artifacts["distilled"]
    assert distilled != rounds[2].artifacts["aggregate"]
    for c in CLIENTS:
        assert party(cluster, c).describe().lora_hash == distilled
