"""The CLI against a real local cluster, as a newcomer types it: `cluster up --config` (progress lines while the
models load), `run ...` finding the cluster without flags, `run cancel` on a finished run, `cluster down --config`."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from cotune.cluster import down_detached, running_pids
from cotune.demo import cluster_config, prepare_data, prepare_models
from tests.integration.cluster_fixtures import TEST_PRESET

pytestmark = pytest.mark.integration


def _cotune(cwd, *args, timeout=600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COTUNE_") or k == "COTUNE_SHARED_DATA"}
    return subprocess.run([sys.executable, "-m", "cotune.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=env)


def test_cluster_up_run_and_down_from_the_command_line(tmp_path, shared_data):
    data = prepare_data(TEST_PRESET, tmp_path)
    models = prepare_models("tiny", tmp_path, algorithm="fedavg")
    config = cluster_config("tiny", TEST_PRESET, tmp_path, data, models, algorithm="fedavg")
    config.workdir = str(tmp_path / "var" / "cluster")  # where `cotune run` looks first, from tmp_path
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(vars(config)))
    spec = tmp_path / "run.yaml"
    spec.write_text(yaml.safe_dump({"name": "cli", "algorithm": "fedavg", "rounds": 5, "max_length": 96}))
    try:
        up = _cotune(tmp_path, "cluster", "up", "--config", path, "--detach")
        assert up.returncode == 0, up.stderr[-3000:]
        progress = up.stderr.splitlines()
        assert any(line.startswith("waiting for llm to load its model (") for line in progress), up.stderr
        for name in ("llm", "client-1", "client-2", "coordinator"):
            assert any(line.startswith(f"{name} is serving (") for line in progress), up.stderr
        assert progress[-1].startswith("cluster up in "), up.stderr
        assert "\r" not in up.stderr
        assert "find the coordinator" in up.stdout and "cluster down --config" in up.stdout

        listed = _cotune(tmp_path, "run", "list")  # no flag, no environment: found in var/cluster
        assert listed.returncode == 0, listed.stderr
        missing = _cotune(tmp_path, "run", "status", "no-such-run")
        assert missing.returncode == 2 and missing.stderr.startswith("cotune: NOT_FOUND") and "Traceback" not in missing.stderr

        started = _cotune(tmp_path, "run", "start", "--spec", spec)
        assert started.returncode == 0, started.stderr
        run_id = started.stdout.strip()
        first = _cotune(tmp_path, "run", "cancel", run_id)
        assert first.returncode == 0 and run_id in first.stdout, first.stderr
        watched = _cotune(tmp_path, "run", "watch", run_id)  # until it has stopped
        assert watched.returncode == 0 and "RUN_CANCELLED" in watched.stdout, watched.stdout + watched.stderr
        again = _cotune(tmp_path, "run", "cancel", run_id)
        assert again.returncode == 0
        assert again.stdout.strip() == f"{run_id}: already finished (RUN_CANCELLED); nothing to cancel"

        down = _cotune(tmp_path, "cluster", "down", "--config", path)
        assert down.returncode == 0 and down.stdout.startswith("stopped: "), down.stderr
        assert running_pids(config.workdir) == []
        gone = _cotune(tmp_path, "run", "list")
        assert gone.returncode == 2 and "var/cluster (no cluster.json)" in gone.stderr, gone.stderr
    finally:
        if (tmp_path / "var" / "cluster" / "cluster.json").exists():
            down_detached(tmp_path / "var" / "cluster")
