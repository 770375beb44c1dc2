"""Module-scoped cluster fixtures for the integration modules: each module gets its own tiny cluster of real service
processes, for the algorithm its CLUSTER_ALGORITHM names (default fedmkt: three different tokenizers); a module
setting CLUSTER_CROSS_TOKENIZER gets FedCoLLM's cross-tokenizer cluster; CLUSTER_COORDINATOR (a dict of CoordinatorConfig
fields) configures its coordinator."""

from __future__ import annotations

import pytest

from tests.integration.cluster_fixtures import Artifacts, coordinator_client, start_tiny_cluster


@pytest.fixture(scope="module")
def cluster(request, tmp_path_factory, shared_data):
    algorithm = getattr(request.module, "CLUSTER_ALGORITHM", "fedmkt")
    cross = getattr(request.module, "CLUSTER_CROSS_TOKENIZER", False)
    cluster = start_tiny_cluster(tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1]), algorithm,
                                 cross_tokenizer=cross, coordinator=getattr(request.module, "CLUSTER_COORDINATOR", None))
    yield cluster
    cluster.down()


@pytest.fixture(scope="module")
def addresses(cluster):
    return cluster.addresses()


@pytest.fixture(scope="module")
def coordinator(cluster):
    client = coordinator_client(cluster)
    yield client
    client.close()


@pytest.fixture(scope="module")
def artifacts(cluster, tmp_path_factory):
    """The coordinator's artifact store, read over gRPC."""
    a = Artifacts(cluster, tmp_path_factory.mktemp("pulled"))
    yield a
    a.close()
