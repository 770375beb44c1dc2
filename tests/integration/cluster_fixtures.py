"""A tiny heterogeneous cluster of real service processes on loopback, shared by the integration tests."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from cotune.cluster import LocalCluster
from cotune.demo import PRESETS, cluster_config, prepare_data, prepare_models

TEST_PRESET = replace(PRESETS["tiny"], per_part=16, eval_size=24, max_length=96)


def start_tiny_cluster(workdir: Path) -> LocalCluster:
    data = prepare_data(TEST_PRESET, workdir)
    models = prepare_models("tiny", workdir)
    cluster = LocalCluster(cluster_config("tiny", TEST_PRESET, workdir, data, models), start_timeout_s=300)
    cluster.up()
    return cluster
