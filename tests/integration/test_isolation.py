"""Runs on one cluster do not see each other: every run starts from the configured models (cotune.party.runstate), so

- two runs of one spec started back to back compute the same thing: metrics, recorded artifacts, and every party's
  final adapter and saved state byte for byte (the first run on a fresh cluster is the reference for each spec);
- runs started at the same time (a fedavg and a fedmkt run; two fedavg runs of different settings) interleave on the
  parties and each still equals its run done alone;
- after a FedBiOT run, which ships and installs a compressed model on the clients, a FedMKT run's clients hold their
  configured model again (Describe during the run), and its results equal a FedMKT run done before any FedBiOT run; a
  second FedBiOT run equals the first.
- the same across tokenizers (a second cluster, of the FedMKT family: three tokenizers): after a FedBiOT run, a FedMKT
  run succeeds and equals the one before it. A client still holding the shipped model (the LLM's tokenizer) describes
  itself for the new run as its configured SLM (DescribeRequest.run_id), so the run is planned with the vocabulary
  maps its clients' own tokenizers need.

One cluster of the tiny shared-tokenizer family (an 8-layer LLM, 2-layer SLM clients, all on Mistral's tokenizer: it
serves fedbiot, fedavg and fedmkt, the last without the alignment service). What is compared, and what is left out
(timings), is test_kill_matrix's `fingerprint`/`differences`.
"""

from __future__ import annotations

import time

import pytest

from cotune.v1 import coordinator_pb2 as pb
from tests.integration.cluster_fixtures import TEST_PRESET, coordinator_client, party, start_tiny_cluster
from tests.integration.test_kill_matrix import (
    BIOT_SPEC,
    EventLog,
    differences,
    fingerprint,
    make_spec,
    run_alone,
)

pytestmark = pytest.mark.integration
CLUSTER_ALGORITHM = "fedbiot"  # the shared-tokenizer family: fedbiot, fedavg and (same tokenizer) fedmkt all run on it
CLIENTS = ("client-1", "client-2")

SPECS = {
    "fedmkt": dict(algorithm="fedmkt", rounds=1, max_public_samples=8, fedmkt=dict(top_k=8, ce_weight=TEST_PRESET.lam)),
    "fedavg": dict(algorithm="fedavg", rounds=2),
    "fedavg-2ep": dict(algorithm="fedavg", rounds=2, local_epochs=2, fedavg=dict(aggregation="product")),
    "fedbiot": BIOT_SPEC,
}
TARGETS = {
    "fedmkt": {"llm": ("",), **{c: ("",) for c in CLIENTS}},
    "fedavg": {c: ("",) for c in CLIENTS},
    "fedavg-2ep": {c: ("",) for c in CLIENTS},
    "fedbiot": {"llm": ("", "compressed"), **{c: ("",) for c in CLIENTS}},
}


def _describe(cluster, name: str):
    client = party(cluster, name)
    try:
        return client.describe()
    finally:
        client.close()


def _span(log: EventLog) -> tuple[float, float]:
    times = [e.time for e in log.events if e.kind in ("step", "progress")]
    return min(times), max(times)


class Runs:
    """Runs done on the module's cluster, each fingerprinted right after it ended."""

    def __init__(self, cluster):
        self.cluster = cluster
        self.results: dict[str, list[dict]] = {}
        self.runs: dict[str, list[pb.Run]] = {}

    def record(self, name: str, run: pb.Run) -> dict:
        assert run.state == pb.RUN_SUCCEEDED, (name, run.error)
        fp = fingerprint(self.cluster, run, TARGETS[name])
        self.results.setdefault(name, []).append(fp)
        self.runs.setdefault(name, []).append(run)
        return fp

    def alone(self, name: str) -> dict:
        return self.record(name, run_alone(self.cluster, make_spec(SPECS[name])))

    def together(self, *names: str) -> tuple[list[dict], float]:
        """Start runs at once; returns their fingerprints and for how many seconds their steps overlapped."""
        client = coordinator_client(self.cluster)
        try:
            started = [client.start_run(make_spec(SPECS[n])) for n in names]
        finally:
            client.close()
        logs = [EventLog(self.cluster, r.run_id) for r in started]
        try:
            finals = [log.wait_finished() for log in logs]
            spans = [_span(log) for log in logs]
        finally:
            for log in logs:
                log.close()
        overlap = min(s[1] for s in spans) - max(s[0] for s in spans)
        return [self.record(n, f) for n, f in zip(names, finals)], overlap

    def reference(self, name: str) -> dict:
        return self.results[name][0]


@pytest.fixture(scope="module")
def configured(cluster, addresses):
    """How each client describes itself before any run: its configured SLM."""
    return {c: _describe(cluster, c) for c in CLIENTS}


@pytest.fixture(scope="module")
def runs(cluster, configured, coordinator):
    r = Runs(cluster)
    r.alone("fedmkt")  # the first run on a fresh cluster: the reference for its spec
    r.alone("fedavg")
    r.alone("fedavg-2ep")
    return r


def test_back_to_back_runs_of_one_spec_are_identical(runs):
    for name in ("fedmkt", "fedavg"):
        again = runs.alone(name)
        assert differences(again, runs.reference(name)) == [], name
        assert again["adapters"] and again["metrics"], name  # not vacuous
    print(f"\nback to back: fedmkt and fedavg each equal their first run (metrics, artifacts, "
          f"{len(runs.reference('fedmkt')['adapters'])} + {len(runs.reference('fedavg')['adapters'])} final adapters)")


def test_two_different_runs_at_once_do_not_interfere(runs):
    (mkt, avg), overlap = runs.together("fedmkt", "fedavg")
    assert overlap > 0, "the two runs did not overlap: nothing was tested"
    assert differences(mkt, runs.reference("fedmkt")) == []
    assert differences(avg, runs.reference("fedavg")) == []
    print(f"\nfedmkt and fedavg at once (their steps overlapped {overlap:.1f} s): each equals its run done alone")


def test_two_fedavg_runs_of_different_settings_at_once_do_not_interfere(runs):
    assert differences(runs.reference("fedavg"), runs.reference("fedavg-2ep"), what=("adapters",)), \
        "the two fedavg settings end with the same adapters: the check would be vacuous"
    (one, two), overlap = runs.together("fedavg", "fedavg-2ep")
    assert overlap > 0, "the two runs did not overlap: nothing was tested"
    assert differences(one, runs.reference("fedavg")) == []
    assert differences(two, runs.reference("fedavg-2ep")) == []
    print(f"\ntwo fedavg runs (1 epoch, factors / 2 epochs, product) at once (overlap {overlap:.1f} s): each equals "
          "its run done alone")


def test_a_fedmkt_run_after_fedbiot_runs_on_the_configured_models(cluster, runs, configured):
    client = coordinator_client(cluster)
    try:
        biot = client.start_run(make_spec(SPECS["fedbiot"]))
    finally:
        client.close()
    log = EventLog(cluster, biot.run_id)
    try:
        log.wait_for(lambda e: e.kind == "step" and e.round == 1 and e.step == "train_local")
        during_biot = {c: _describe(cluster, c) for c in CLIENTS}
        final = log.wait_finished()
    finally:
        log.close()
    runs.record("fedbiot", final)
    archive = next(r for r in final.rounds if r.round == 0).artifacts["model"]
    for c, info in during_biot.items():  # the check below is not vacuous: FedBiOT did swap the clients' model
        assert info.loaded_model == archive and info.num_layers != configured[c].num_layers, (c, info.model_name)

    client = coordinator_client(cluster)
    try:
        mkt = client.start_run(make_spec(SPECS["fedmkt"]))
    finally:
        client.close()
    log = EventLog(cluster, mkt.run_id)
    try:
        log.wait_for(lambda e: e.kind == "step" and e.round == 1 and e.step == "train_local")
        during_mkt = {c: _describe(cluster, c) for c in CLIENTS}
        final = log.wait_finished()
    finally:
        log.close()
    for c, info in during_mkt.items():
        assert not info.loaded_model, (c, info.model_name)
        assert info.model_name == configured[c].model_name, (c, info.model_name, configured[c].model_name)
        assert info.num_layers == configured[c].num_layers, c
        assert info.lora_layout_hash == configured[c].lora_layout_hash, c
    got = runs.record("fedmkt", final)
    assert differences(got, runs.reference("fedmkt")) == []
    print(f"\nafter fedbiot (clients held the {during_biot['client-1'].num_layers}-layer shipped model), fedmkt's "
          f"clients held their configured {configured['client-1'].num_layers}-layer SLM and its results equal the "
          "first fedmkt run's")


def test_a_second_fedbiot_run_equals_the_first(runs):
    assert runs.results.get("fedbiot"), "needs the fedbiot run of the previous test"
    started = time.time()
    again = runs.alone("fedbiot")
    assert differences(again, runs.reference("fedbiot")) == []
    print(f"\na second fedbiot run ({time.time() - started:.0f} s, after a fedmkt run) equals the first")


# -- across tokenizers ------------------------------------------------------------------------------------------------
MKT_CROSS = dict(algorithm="fedmkt", rounds=1, max_public_samples=8, fedmkt=dict(top_k=8, ce_weight=TEST_PRESET.lam))
# the FedMKT family's LLM has 2 layers: the last one is the adapter, the other the emulator (nothing dropped)
BIOT_SMALL = dict(algorithm="fedbiot", rounds=1, max_public_samples=8,
                  fedbiot=dict(adapter_layers=1, drop=0.1, pre_align_steps=2, align_steps=1))


@pytest.fixture(scope="module")
def after_fedbiot_across_tokenizers(tmp_path_factory, shared_data):
    """A FedMKT-family cluster (LLM, clients and their tokenizers all differ) that ran FedMKT, then FedBiOT: returns
    (cluster, the first FedMKT run's fingerprint)."""
    cluster = start_tiny_cluster(tmp_path_factory.mktemp("isolation-mkt") / "w", "fedmkt")
    try:
        first = run_alone(cluster, make_spec(MKT_CROSS))
        assert first.state == pb.RUN_SUCCEEDED, first.error
        reference = fingerprint(cluster, first, TARGETS["fedmkt"])
        biot = run_alone(cluster, make_spec(BIOT_SMALL))
        assert biot.state == pb.RUN_SUCCEEDED, biot.error
        shipped = _describe(cluster, "client-1")
        assert shipped.loaded_model, "FedBiOT did not install its model on the clients: nothing to test"
        assert shipped.current_run == biot.run_id
        yield cluster, reference, shipped
    finally:
        cluster.down()


def test_a_party_describes_itself_as_a_run_sees_it(after_fedbiot_across_tokenizers):
    cluster, _, shipped = after_fedbiot_across_tokenizers
    client = party(cluster, "client-1")
    try:
        for_biot = client.describe(run_id=shipped.current_run)
        for_new = client.describe(run_id="a-run-it-never-saw")
    finally:
        client.close()
    assert for_biot.loaded_model == shipped.loaded_model and for_biot.tokenizer_hash == shipped.tokenizer_hash
    assert for_biot.described_run == shipped.current_run
    assert not for_new.loaded_model and for_new.described_run == "a-run-it-never-saw"
    assert for_new.tokenizer_hash != shipped.tokenizer_hash and for_new.model_name != shipped.model_name
    assert for_new.current_run == shipped.current_run  # describing changed nothing: the party still holds that run


def test_after_fedbiot_a_fedmkt_run_across_tokenizers_equals_the_one_before(after_fedbiot_across_tokenizers):
    cluster, reference, _ = after_fedbiot_across_tokenizers
    run = run_alone(cluster, make_spec(MKT_CROSS))
    assert run.state == pb.RUN_SUCCEEDED, run.error
    assert differences(fingerprint(cluster, run, TARGETS["fedmkt"]), reference) == []
