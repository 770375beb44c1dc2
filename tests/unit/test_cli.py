"""The `cotune` command line: a light import, help everywhere, quiet broken pipes, `run cancel` on a finished run,
finding the local cluster (the demo's included), `cluster down --config`, and the start-up progress lines."""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from cotune import cli
from cotune.cluster import ClusterConfig, ClusterNotFound, Progress, find_cluster_dir

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers", "grpc")


def _python(code: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT, **kwargs)


# -- a light CLI ------------------------------------------------------------------------------------------------
def test_importing_the_cli_and_building_its_parser_imports_nothing_heavy():
    proc = _python(textwrap.dedent(f"""
        import sys
        import cotune.cli
        after_import = sorted(m for m in {HEAVY!r} if m in sys.modules)
        cotune.cli.build_parser()  # what `cotune --help` does
        after_parser = sorted(m for m in {HEAVY!r} if m in sys.modules)
        print(after_import, after_parser)
    """))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["[]", "[]"], proc.stdout


def test_help_answers_without_a_traceback():
    proc = subprocess.run([sys.executable, "-m", "cotune.cli", "--help"], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)
    assert proc.returncode == 0
    assert "cluster" in proc.stdout and "demo" in proc.stdout and not proc.stderr


# -- help everywhere --------------------------------------------------------------------------------------------
def _walk(parser: argparse.ArgumentParser, path: tuple[str, ...] = ("cotune",)):
    """(path, parser, the help its parent lists it with) for the parser and every subcommand under it."""
    yield path, parser, None
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            listed = {a.dest: a.help for a in action._choices_actions}
            for name, child in action.choices.items():
                for sub_path, sub, helptext in _walk(child, path + (name,)):
                    yield sub_path, sub, listed.get(name) if sub is child else helptext


KNOWN_WITHOUT_HELP: set[tuple[str, ...]] = set()  # (command path..., dest) allowed to lack help: none


def test_every_subcommand_and_argument_has_a_help_text():
    missing = []
    for path, parser, listed in _walk(cli.build_parser()):
        if len(path) > 1 and not (listed or "").strip():
            missing.append(f"{' '.join(path)}: no help in its parent's list")
        if not (parser.description or "").strip():
            missing.append(f"{' '.join(path)}: no description")
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            if isinstance(action, argparse._SubParsersAction):
                if not (action.help or "").strip():
                    missing.append(f"{' '.join(path)}: its subcommand list has no help")
                continue
            if not (action.help or "").strip() and path + (action.dest,) not in KNOWN_WITHOUT_HELP:
                missing.append(f"{' '.join(path)}: {'/'.join(action.option_strings) or action.dest} has no help")
    assert not missing, "\n".join(missing)


# -- broken pipes -----------------------------------------------------------------------------------------------
def test_a_reader_that_goes_away_ends_any_command_quietly():
    """`cotune ... | head`: the command's output outgrows the pipe, the reader closes it; no traceback, exit 141."""
    code = textwrap.dedent("""
        import sys
        import cotune.cli as cli

        def chatty(args):
            for i in range(200_000):
                print(f"line {i} " + "x" * 60)
            return 0

        cli.cmd_algorithms = chatty  # any command: the handling is in main()
        sys.exit(cli.main(["algorithms"]))
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    first = proc.stdout.readline()
    proc.stdout.close()  # as `head -1` does
    err = proc.stderr.read().decode()
    rc = proc.wait(timeout=120)
    assert first.startswith(b"line 0 ")
    assert rc == cli.EXIT_BROKEN_PIPE, err
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


# -- run cancel -------------------------------------------------------------------------------------------------
class FakeCoordinator:
    def __init__(self, state, after_cancel=None):
        from cotune.v1 import coordinator_pb2 as pb

        self.pb = pb
        self.state, self.after_cancel = state, after_cancel
        self.cancelled = False

    def get_run(self, run_id):
        return self.pb.Run(run_id=run_id, state=self.state)

    def cancel_run(self, run_id):
        self.cancelled = True
        return self.pb.Run(run_id=run_id, state=self.after_cancel)


@pytest.mark.parametrize("state", ["RUN_SUCCEEDED", "RUN_FAILED", "RUN_CANCELLED"])
def test_cancelling_a_finished_run_says_it_finished_with_its_state(monkeypatch, capsys, state):
    from cotune.v1 import coordinator_pb2 as pb

    fake = FakeCoordinator(pb.RunState.Value(state))
    monkeypatch.setattr(cli, "_coordinator", lambda args: fake)
    assert cli.main(["run", "cancel", "r-1"]) == 0
    out = capsys.readouterr().out
    assert out.strip() == f"r-1: already finished ({state}); nothing to cancel"
    assert not fake.cancelled  # nothing was asked of the coordinator


def test_cancelling_a_running_run_requests_it(monkeypatch, capsys):
    from cotune.v1 import coordinator_pb2 as pb

    fake = FakeCoordinator(pb.RUN_RUNNING, after_cancel=pb.RUN_RUNNING)
    monkeypatch.setattr(cli, "_coordinator", lambda args: fake)
    assert cli.main(["run", "cancel", "r-2"]) == 0
    assert fake.cancelled
    assert "cancel requested (RUN_RUNNING)" in capsys.readouterr().out


def test_a_run_that_ends_while_the_cancel_travels_is_reported_as_finished(monkeypatch, capsys):
    from cotune.v1 import coordinator_pb2 as pb

    monkeypatch.setattr(cli, "_coordinator", lambda args: FakeCoordinator(pb.RUN_RUNNING, after_cancel=pb.RUN_SUCCEEDED))
    assert cli.main(["run", "cancel", "r-3"]) == 0
    assert "already finished (RUN_SUCCEEDED)" in capsys.readouterr().out


# -- finding the local cluster ----------------------------------------------------------------------------------
def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _record_cluster(workdir: Path, pid: int, address: str = "127.0.0.1:50999") -> Path:
    """A cluster.json as LocalCluster writes it (plaintext, so that no certificate is read)."""
    workdir.mkdir(parents=True, exist_ok=True)
    state = {"coordinator": {"kind": "coordinator", "address": address, "pid": pid, "log": ""},
             "_security": {"mode": "insecure", "ca": "", "cert": "", "key": ""}}
    (workdir / "cluster.json").write_text(json.dumps(state))
    return workdir


@pytest.fixture
def no_cluster_env(monkeypatch):
    for name in ("COTUNE_CLUSTER_DIR", "COTUNE_COORDINATOR", "COTUNE_TLS_CA", "COTUNE_TLS_CERT", "COTUNE_TLS_KEY",
                 "COTUNE_TOKEN"):
        monkeypatch.delenv(name, raising=False)


def test_the_running_demo_cluster_is_found_and_stale_ones_are_skipped(tmp_path, no_cluster_env):
    (tmp_path / "var" / "cluster").mkdir(parents=True)  # a folder, nothing recorded
    _record_cluster(tmp_path / "var" / "demo" / "small" / "cluster", _dead_pid())  # left by a killed demo
    running = _record_cluster(tmp_path / "var" / "demo" / "tiny" / "cluster", os.getpid())
    assert find_cluster_dir(base=tmp_path) == running


def test_an_explicit_dir_or_the_environment_wins(tmp_path, monkeypatch, no_cluster_env):
    _record_cluster(tmp_path / "var" / "cluster", os.getpid())
    other = _record_cluster(tmp_path / "elsewhere", os.getpid())
    monkeypatch.setenv("COTUNE_CLUSTER_DIR", str(other))
    assert find_cluster_dir(base=tmp_path) == other
    third = _record_cluster(tmp_path / "third", os.getpid())
    assert find_cluster_dir(str(third), base=tmp_path) == third
    monkeypatch.setenv("COTUNE_CLUSTER_DIR", str(tmp_path / "nothing-here"))
    with pytest.raises(ClusterNotFound, match=r"nothing-here \(from \$COTUNE_CLUSTER_DIR\): no such folder"):
        find_cluster_dir(base=tmp_path)


def test_several_running_clusters_ask_which(tmp_path, no_cluster_env):
    _record_cluster(tmp_path / "var" / "cluster", os.getpid())
    _record_cluster(tmp_path / "var" / "demo" / "tiny" / "cluster", os.getpid())
    with pytest.raises(ClusterNotFound, match="several local clusters are running.*--cluster-dir"):
        find_cluster_dir(base=tmp_path)


def test_run_commands_reach_the_demo_clusters_coordinator(tmp_path, monkeypatch, no_cluster_env):
    _record_cluster(tmp_path / "var" / "demo" / "tiny" / "cluster", os.getpid(), address="127.0.0.1:50123")
    monkeypatch.chdir(tmp_path)
    args = cli.build_parser().parse_args(["run", "list"])
    client = cli._coordinator(args)
    try:
        assert client.address == "127.0.0.1:50123"
    finally:
        client.close()


def test_no_coordinator_lists_where_it_looked(tmp_path):
    _record_cluster(tmp_path / "var" / "demo" / "tiny" / "cluster", _dead_pid())
    env = {k: v for k, v in os.environ.items() if not k.startswith("COTUNE_")}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run([sys.executable, "-m", "cotune.cli", "run", "list"], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path, env=env)
    assert proc.returncode == cli.EXIT_USER_ERROR
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cotune: no coordinator:"), proc.stderr
    assert "var/cluster (no such folder)" in lines[0]
    assert "var/demo/tiny/cluster (cluster.json left by a cluster whose processes have all exited)" in lines[0]
    assert "--coordinator" in lines[0] and "--cluster-dir" in lines[0]


# -- cluster up / down take the same --config -------------------------------------------------------------------
def test_cluster_down_takes_the_config_it_was_started_with_and_keeps_workdir(tmp_path, monkeypatch, capsys,
                                                                             no_cluster_env):
    import cotune.cluster

    stopped = []
    monkeypatch.setattr(cotune.cluster, "down_detached", lambda workdir: stopped.append(str(workdir)) or ["llm"])
    config = tmp_path / "cluster.yaml"
    config.write_text(f"workdir: {tmp_path / 'c1'}\nllm: {{}}\nclients: []\n")
    assert cli.main(["cluster", "down", "--config", str(config)]) == 0
    assert cli.main(["cluster", "down", "--workdir", str(tmp_path / "c2")]) == 0
    assert cli.main(["cluster", "down", "--cluster-dir", str(tmp_path / "c3")]) == 0
    assert stopped == [str(tmp_path / "c1"), str(tmp_path / "c2"), str(tmp_path / "c3")]
    up = cli.build_parser().parse_args(["cluster", "up", "--config", str(config)])
    assert up.config == str(config)
    with pytest.raises(SystemExit):  # one or the other
        cli.build_parser().parse_args(["cluster", "down", "--config", str(config), "--workdir", "x"])
    capsys.readouterr()


def test_cluster_down_without_a_name_finds_the_running_cluster(tmp_path, monkeypatch, no_cluster_env):
    import cotune.cluster

    running = _record_cluster(tmp_path / "var" / "cluster", os.getpid())
    stopped = []
    monkeypatch.setattr(cotune.cluster, "down_detached", lambda workdir: stopped.append(Path(workdir)) or [])
    monkeypatch.chdir(tmp_path)
    assert cli.main(["cluster", "down"]) == 0
    assert [p.resolve() for p in stopped] == [running.resolve()]


# -- start-up progress ------------------------------------------------------------------------------------------
class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_waiting_lines_come_at_most_every_interval_per_service():
    out, clock = io.StringIO(), Clock()
    progress = Progress(out, interval_s=10, clock=clock)
    for t in range(0, 35):  # polled every second for 34 s
        clock.now = float(t)
        progress.every("llm", lambda first: f"{'waiting' if first else 'still waiting'} llm {clock.now:.0f}")
        progress.every("client-1", lambda first: f"client-1 {clock.now:.0f}")
    lines = out.getvalue().splitlines()
    assert [line for line in lines if "llm" in line] == ["waiting llm 0", "still waiting llm 10", "still waiting llm 20",
                                                         "still waiting llm 30"]
    assert [line for line in lines if "client-1" in line] == ["client-1 0", "client-1 10", "client-1 20", "client-1 30"]
    assert "\r" not in out.getvalue()


def test_a_phase_says_when_it_starts_and_how_long_it_took():
    out, clock = io.StringIO(), Clock()
    progress = Progress(out, clock=clock)
    with progress.phase("converting model m.gguf"):
        clock.now = 95.4
    with pytest.raises(RuntimeError):
        with progress.phase("building x"):
            clock.now = 97.0
            raise RuntimeError("boom")
    assert out.getvalue().splitlines() == ["converting model m.gguf...", "converting model m.gguf: done in 95 s",
                                           "building x...", "building x: failed after 2 s"]


def test_a_phase_with_a_heartbeat_says_it_is_still_at_it():
    import time

    out = io.StringIO()
    with Progress(out, interval_s=0.05).phase("converting model m.gguf", heartbeat=True):
        time.sleep(0.3)
    time.sleep(0.15)  # nothing more once it is done
    lines = out.getvalue().splitlines()
    assert lines[0] == "converting model m.gguf..." and lines[-1].startswith("converting model m.gguf: done in ")
    beats = lines[1:-1]
    assert len(beats) >= 2 and all(b.startswith("converting model m.gguf: ") and b.endswith(" s so far") for b in beats)


def test_wait_healthy_reports_while_a_service_loads(tmp_path):
    """A real health endpoint that reports NOT_SERVING (a model loading) and then SERVING."""
    import threading
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    from cotune.cluster import wait_healthy

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    waits = []
    timer = threading.Timer(1.0, servicer.set, ("", health_pb2.HealthCheckResponse.SERVING))
    timer.start()
    try:
        wait_healthy(f"127.0.0.1:{port}", timeout_s=30, on_wait=lambda: waits.append(1))
    finally:
        timer.cancel()
        server.stop(0)
    assert len(waits) >= 2  # it was waited for, and reported while it was


def test_demo_converts_gguf_models_with_a_line_per_model(tmp_path, monkeypatch):
    """The demo converts GGUF models itself (with progress) so that the services only load them."""
    import types

    from cotune.demo import convert_models

    calls = []
    fake = types.ModuleType("cotune.lm.model")
    cached = tmp_path / "cache" / "gguf-cached"
    cached.mkdir(parents=True)
    fake.gguf_cache_path = lambda path, cache: cached if path.name == "old.gguf" else tmp_path / "cache" / "gguf-new"
    fake.ensure_hf_dir = lambda path, cache: calls.append((Path(path).name, cache))
    monkeypatch.setitem(sys.modules, "cotune.lm.model", fake)
    cache = str(tmp_path / "cache")
    config = ClusterConfig(
        workdir=str(tmp_path / "w"),
        llm={"model": {"path": "/m/new.gguf", "cache_dir": cache, "companion_slm_path": "/m/slm-dir"}},
        clients=[{"model": {"path": "/m/old.gguf", "cache_dir": cache}}, {"model": {"path": "/m/old.gguf", "cache_dir": cache}},
                 {"model": {"path": "/m/hf-folder", "cache_dir": cache}}])
    out = io.StringIO()
    convert_models(config, Progress(out))
    assert calls == [("new.gguf", Path(cache)), ("old.gguf", Path(cache))]  # each GGUF once, HF folders left alone
    lines = out.getvalue().splitlines()
    assert lines[0] == f"converting model new.gguf to an HF folder (once; cached in {cache})..."
    assert lines[1].startswith("converting model new.gguf to an HF folder") and " done in " in lines[1]
    assert lines[2] == f"model old.gguf: using its converted copy in {cache}"
    assert len(lines) == 3


def test_watching_a_run_outside_a_terminal_prints_plain_lines(monkeypatch):
    """No progress bars (carriage returns) when the output is a pipe or a file: a line per piece of work instead."""
    from cotune.v1 import coordinator_pb2 as pb
    from cotune.watch import watch_run

    events = [pb.RunEvent(seq=1, kind="step", round=1, step="client_logits")]
    events += [pb.RunEvent(seq=2 + i, kind="progress", round=1, step="client_logits", party_id="client-1", done=i,
                           total=100) for i in range(100)]
    events += [pb.RunEvent(seq=200, kind="state", state=pb.RUN_SUCCEEDED)]

    class Client:
        def watch_run(self, run_id, after_seq=0, timeout=None):
            return iter([e for e in events if e.seq > after_seq])

        def get_run(self, run_id):
            return pb.Run(run_id=run_id, state=pb.RUN_SUCCEEDED)

    out = io.StringIO()
    run = watch_run(Client(), "r-1", stream=out)
    assert run.state == pb.RUN_SUCCEEDED
    text = out.getvalue()
    assert "\r" not in text and "\x1b" not in text
    assert text.splitlines() == ["[round 1] client_logits", "[round 1] client_logits client-1: 0/100",
                                 "run r-1: RUN_SUCCEEDED"]


def test_cluster_up_progress_is_wired_to_the_cli(monkeypatch):
    """`cotune cluster up` hands LocalCluster a Progress (the lines themselves are tested above and in
    tests/integration/test_cli_cluster.py)."""
    import cotune.cluster

    seen = {}

    class Stop(Exception):
        pass

    def fake(config, **kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(cotune.cluster, "LocalCluster", fake)
    monkeypatch.setattr(cotune.cluster.ClusterConfig, "load", classmethod(lambda cls, path: SimpleNamespace()))
    with pytest.raises(Stop):
        cli.main(["cluster", "up", "--config", "x.yaml"])
    assert isinstance(seen.get("progress"), Progress)
