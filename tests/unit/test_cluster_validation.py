"""A cluster config is checked whole before anything starts: every service's settings, model paths, workdirs and
data files (read with the parties' own loader), each problem on its own line, and `cotune cluster up` prints them
without a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cotune.cluster import ClusterConfig, ClusterConfigError, LocalCluster, cluster_config_problems
from cotune.data import Example, MalformedDataError, read_jsonl, write_jsonl

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = [Example("Question: 1+1?\nAnswer:", " 2", (" 2", " 3"), 0), Example("Question: sky?\nAnswer:", " blue")]


@pytest.fixture
def files(tmp_path):
    """Valid data files and a (stand-in) HF model folder."""
    data = tmp_path / "data"
    for name in ("public", "eval", "client-1", "client-2"):
        write_jsonl(data / f"{name}.jsonl", EXAMPLES)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    return tmp_path


def _party(files: Path, private: str | None = None, **data) -> dict:
    cfg = {"model": {"path": str(files / "model")},
           "data": {"public": str(files / "data" / "public.jsonl"), "eval": str(files / "data" / "eval.jsonl")}}
    if private:
        cfg["data"]["private"] = str(files / "data" / private)
    cfg["data"].update(data)
    return cfg


def _config(files: Path, **overrides) -> ClusterConfig:
    fields = dict(workdir=str(files / "cluster"), llm=_party(files),
                  clients=[dict(_party(files, "client-1.jsonl"), party_id="client-1"),
                           dict(_party(files, "client-2.jsonl"), party_id="client-2")],
                  alignment=None, coordinator={})
    fields.update(overrides)
    return ClusterConfig(**fields)


@pytest.fixture
def no_spawn(monkeypatch):
    """Fail the test if anything is started."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"a process was started: {args[0] if args else kwargs}")

    monkeypatch.setattr(subprocess, "Popen", refuse)


def _loader_error(path: Path) -> str:
    with pytest.raises(MalformedDataError) as caught:
        read_jsonl(path)
    return str(caught.value)


def test_a_valid_config_has_no_problems(files):
    assert cluster_config_problems(_config(files)) == []


def test_every_problem_is_reported_at_once_before_anything_starts(files, no_spawn):
    data = files / "data"
    (data / "broken.jsonl").write_text('{"prompt": "a", "response": " b"}\n{"prompt": "c", \n')
    (data / "no-response.jsonl").write_text('{"prompt": "a"}\n')
    (data / "bad-label.jsonl").write_text('{"prompt": "a", "response": " b", "choices": [" b", " c"], "label": 5}\n')
    (data / "empty.jsonl").write_text("\n")
    (files / "not-a-model").mkdir()
    (files / "weights.bin").write_bytes(b"\0")
    llm = _party(files)
    llm["model"]["path"] = str(files / "missing-model")
    c1 = dict(_party(files, "broken.jsonl", public=str(data)), party_id="client-1")  # public is a folder
    c1["model"]["path"] = str(files / "not-a-model")
    c2 = dict(_party(files, "no-response.jsonl", eval=str(data / "empty.jsonl")), party_id="client-2")
    c2["model"]["path"] = str(files / "weights.bin")
    c3 = dict(_party(files, "missing.jsonl", public=str(data / "bad-label.jsonl")), party_id="client-3")
    config = _config(files, llm=llm, clients=[c1, c2, c3])
    with pytest.raises(ClusterConfigError) as caught:
        LocalCluster(config)
    problems = caught.value.problems
    assert problems == [
        f"llm: model.path: not found: {files / 'missing-model'}",
        f"client-1: model.path: {files / 'not-a-model'} is a folder without config.json (expected an HF model folder "
        "or a .gguf file)",
        f"client-1: data.public: {data} is not a file",
        f"client-1: data.private: {_loader_error(data / 'broken.jsonl')}",
        f"client-2: model.path: {files / 'weights.bin'} is neither an HF model folder nor a .gguf file",
        f"client-2: data.private: {data / 'no-response.jsonl'}:1: field 'response' must be a string",

        f"client-2: data.eval: {data / 'empty.jsonl'}: holds no examples (expected JSONL, one "
        '{"prompt", "response", ...} object a line)',
        f"client-3: data.public: {data / 'bad-label.jsonl'}:1: label 5 out of range for 2 choices",
        f"client-3: data.private: file not found: {data / 'missing.jsonl'}",
    ]
    assert str(caught.value) == "\n".join(problems)
    assert not (files / "cluster").exists()  # no workdir, no certificates, no config files


def test_data_errors_are_the_loaders_own(files):
    """The check reads data with cotune.data.read_jsonl (what the parties use), so its messages are the loader's."""
    bad = files / "data" / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": 3}\n')
    problems = cluster_config_problems(_config(files, llm=_party(files, public=str(bad))))
    assert problems == [f"llm: data.public: {_loader_error(bad)}"]


def test_required_and_mistyped_settings_are_named(files):
    client = _party(files)  # no private data
    client["party_id"] = "Client_1"  # not a DNS label
    client["lora"] = {"r": "eight"}
    problems = cluster_config_problems(_config(files, clients=[client, _party(files, "client-1.jsonl")],
                                               coordinator={"party_grace": 5}, clients_per_process=0))
    assert problems[:2] == [
        "clients_per_process must be an integer >= 1, got 0",
        "Client_1: party_id: client names must be 1-63 lower-case letters, digits or '-' (a DNS label, since "
        "certificates carry them as DNS names), got 'Client_1'",
    ]
    assert len(problems) == 3 and problems[2].startswith("coordinator: unknown key(s) party_grace; known: ")
    client["party_id"] = "client-9"
    del client["lora"]
    problems = cluster_config_problems(_config(files, clients=[client]))
    assert problems == ["client-9: data.private is required for an SLM client (its private training data)"]
    typo = _party(files, "client-1.jsonl")
    typo["lora"] = {"r": "eight"}
    assert cluster_config_problems(_config(files, clients=[typo])) == [
        "client-1.lora.r: expected int, got 'eight'"]


def test_duplicate_clients_and_a_malformed_structure(files):
    twin = dict(_party(files, "client-1.jsonl"), party_id="client-1")
    assert cluster_config_problems(_config(files, clients=[twin, dict(twin)])) == [
        "clients: clients[0], clients[1] have the same party_id 'client-1'"]
    assert cluster_config_problems(_config(files, workdir="", llm=["x"], clients={"a": 1}, security="tls")) == [
        "workdir is required: the folder for the cluster's state, logs and certificates",
        "security must be one of mtls, insecure, got 'tls'",
        "llm: expected a mapping of the LLM server's settings, got list",
        "clients: expected a list of client settings, got dict",
    ]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads and writes every file")
def test_unreadable_files_are_named(files):
    data = files / "data" / "client-1.jsonl"
    data.chmod(0)
    try:
        problems = cluster_config_problems(_config(files))
    finally:
        data.chmod(0o644)
    assert problems == [f"client-1: data.private: {data}: cannot read: Permission denied"]


def test_cluster_up_prints_one_line_per_problem_and_starts_nothing(files):
    config = {"workdir": str(files / "cluster"), "alignment": None,
              "llm": _party(files, public=str(files / "data" / "nope.jsonl")),
              "clients": [dict(_party(files, "client-1.jsonl"), party_id="client-1")]}
    config["clients"][0]["model"]["path"] = str(files / "nope-model")
    path = files / "cluster.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = subprocess.run([sys.executable, "-m", "cotune.cli", "cluster", "up", "--config", str(path)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.splitlines() == [
        f"cotune: {path}: llm: data.public: file not found: {files / 'data' / 'nope.jsonl'}",
        f"cotune: {path}: client-1: model.path: not found: {files / 'nope-model'}",
        f"cotune: 2 problem(s) in {path}; nothing was started",
    ]
    assert not (files / "cluster").exists()


@pytest.mark.parametrize("text, message", [
    ("- just\n- a list\n", "expected a mapping of cluster settings (workdir, llm, clients, ...), got list"),
    ("workdir: [unclosed\n", "not valid YAML: line 2, column 1: expected ',' or ']', but got '<stream end>'"),
    ("wrkdir: x\n", "unknown key(s) wrkdir"),
])
def test_a_malformed_config_file_is_one_line(tmp_path, text, message):
    path = tmp_path / "cluster.yaml"
    path.write_text(text)
    proc = subprocess.run([sys.executable, "-m", "cotune.cli", "cluster", "up", "--config", str(path)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"cotune: {path}: ") and message in lines[0], proc.stderr
