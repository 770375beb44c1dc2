"""Local cluster: every service of a cluster config as its own process on loopback.

Used by `cotune cluster up`, `cotune demo` and the integration tests. Each service gets its own config
file and working directory under the cluster's workdir, listens on a free loopback port (reported through
a port file), and the launcher waits for grpc.health.v1 to report SERVING before starting dependents.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cotune.config import (
    AlignmentConfig,
    ClientEntry,
    ConfigError,
    CoordinatorConfig,
    PartyConfig,
    from_dict,
    load_yaml,
    to_dict,
)

HOST = "127.0.0.1"
STATE_FILE = "cluster.json"


@dataclass
class ClusterConfig:
    workdir: str = ""
    llm: dict = field(default_factory=dict)            # PartyConfig fields (listen/workdir/party_id are filled in)
    clients: list = field(default_factory=list)        # PartyConfig fields, each with its party_id
    alignment: dict | None = field(default_factory=dict)  # AlignmentConfig fields; null = no alignment service
    coordinator: dict = field(default_factory=dict)    # CoordinatorConfig fields

    @classmethod
    def load(cls, path: str | Path) -> "ClusterConfig":
        data = load_yaml(path)
        unknown = sorted(set(data) - {"workdir", "llm", "clients", "alignment", "coordinator"})
        if unknown:
            raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)}")
        return cls(**data)


@dataclass
class ServiceProcess:
    name: str
    kind: str
    config_path: Path
    log_path: Path
    port_file: Path
    process: subprocess.Popen | None = None
    address: str = ""

    @property
    def pid(self) -> int:
        return self.process.pid if self.process else 0


def _write_config(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def wait_healthy(address: str, *, timeout_s: float, service: str = "", process: subprocess.Popen | None = None,
                 log_path: Path | None = None) -> None:
    channel = grpc.insecure_channel(address)
    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                tail = log_path.read_text()[-3000:] if log_path and log_path.exists() else ""
                raise RuntimeError(f"{service or address} exited with code {process.returncode} while starting:\n{tail}")
            try:
                resp = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.25)
    finally:
        channel.close()
    raise TimeoutError(f"{service or address} did not become healthy within {timeout_s:.0f}s")


class LocalCluster:
    def __init__(self, config: ClusterConfig, *, start_timeout_s: float = 900.0):
        if not config.workdir:
            raise ConfigError("cluster config: workdir is required")
        if not config.llm:
            raise ConfigError("cluster config: llm is required")
        if not config.clients:
            raise ConfigError("cluster config: at least one client is required")
        self.config = config
        self.workdir = Path(config.workdir).resolve()
        self.start_timeout_s = start_timeout_s
        self.services: dict[str, ServiceProcess] = {}

    # -- lifecycle -------------------------------------------------------------------------------------------
    def _spawn(self, name: str, kind: str, data: dict) -> ServiceProcess:
        cfg_path = self.workdir / "configs" / f"{name}.yaml"
        _write_config(cfg_path, data)
        svc = ServiceProcess(name, kind, cfg_path, self.workdir / "logs" / f"{name}.log", self.workdir / "ports" / f"{name}.port")
        svc.log_path.parent.mkdir(parents=True, exist_ok=True)
        svc.port_file.parent.mkdir(parents=True, exist_ok=True)
        svc.port_file.unlink(missing_ok=True)
        log = open(svc.log_path, "ab")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        # fewer malloc arenas: gRPC's 1 MiB chunk buffers otherwise churn through page faults (measured in
        # docs/wire.md: transfers ~420 -> ~570 MB/s, receiver RSS bounded)
        env.setdefault("MALLOC_ARENA_MAX", "2")
        if kind in ("llm", "slm") and "COTUNE_TORCH_THREADS" not in os.environ:
            # model processes share this machine's cores instead of each spinning on all of them
            parties = 1 + len(self.config.clients)
            env["COTUNE_TORCH_THREADS"] = str(max(1, (os.cpu_count() or 1) // parties))
        svc.process = subprocess.Popen(
            [sys.executable, "-m", "cotune.cli", "serve", kind, "--config", str(cfg_path), "--port-file", str(svc.port_file)],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        log.close()
        self.services[name] = svc
        return svc

    def _await_port(self, svc: ServiceProcess) -> None:
        deadline = time.monotonic() + 120
        while not svc.port_file.exists():
            if svc.process.poll() is not None:
                raise RuntimeError(f"{svc.name} exited with code {svc.process.returncode}:\n{svc.log_path.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{svc.name} did not report its port within 120s (see {svc.log_path})")
            time.sleep(0.1)
        svc.address = f"{HOST}:{int(svc.port_file.read_text().strip())}"

    def _party_data(self, name: str, data: dict) -> dict:
        out = dict(data)
        out.setdefault("party_id", name)
        out["listen"] = f"{HOST}:0"
        out.setdefault("workdir", str(self.workdir / name))
        from_dict(PartyConfig, out, name)  # validate early, with the service's name in the message
        return out

    def up(self) -> dict[str, str]:
        try:
            workers = []
            if self.config.alignment is not None:
                data = dict(self.config.alignment or {})
                data.update(listen=f"{HOST}:0", workdir=data.get("workdir") or str(self.workdir / "alignment"))
                from_dict(AlignmentConfig, data, "alignment")
                workers.append(self._spawn("alignment", "alignment", data))
            workers.append(self._spawn("llm", "llm", self._party_data("llm", self.config.llm)))
            for i, client in enumerate(self.config.clients):
                name = client.get("party_id") or f"client-{i + 1}"
                workers.append(self._spawn(name, "slm", self._party_data(name, client)))
            for svc in workers:
                self._await_port(svc)
            for svc in workers:
                wait_healthy(svc.address, timeout_s=self.start_timeout_s, service=svc.name, process=svc.process, log_path=svc.log_path)
            coord = dict(self.config.coordinator or {})
            coord.update(listen=f"{HOST}:0", workdir=coord.get("workdir") or str(self.workdir / "coordinator"),
                         llm=self.services["llm"].address,
                         alignment=self.services["alignment"].address if "alignment" in self.services else "",
                         clients=[to_dict(ClientEntry(s.name, s.address)) for s in workers if s.kind == "slm"])
            from_dict(CoordinatorConfig, coord, "coordinator")
            svc = self._spawn("coordinator", "coordinator", coord)
            self._await_port(svc)
            wait_healthy(svc.address, timeout_s=60, service="coordinator", process=svc.process, log_path=svc.log_path)
            self._write_state()
            return self.addresses()
        except BaseException:
            self.down()
            raise

    def addresses(self) -> dict[str, str]:
        return {name: svc.address for name, svc in self.services.items()}

    def _write_state(self) -> None:
        state = {name: {"kind": s.kind, "address": s.address, "pid": s.pid, "log": str(s.log_path)} for name, s in self.services.items()}
        (self.workdir / STATE_FILE).write_text(json.dumps(state, indent=2))

    def restart(self, name: str) -> str:
        """Stop one service (SIGKILL) and start it again from its config; returns its new address."""
        svc = self.services[name]
        self.kill(name)
        data = yaml.safe_load(svc.config_path.read_text())
        new = self._spawn(name, svc.kind, data)
        self._await_port(new)
        wait_healthy(new.address, timeout_s=self.start_timeout_s, service=name, process=new.process, log_path=new.log_path)
        self._write_state()
        return new.address

    def kill(self, name: str) -> None:
        svc = self.services[name]
        if svc.process and svc.process.poll() is None:
            svc.process.kill()
            svc.process.wait(timeout=30)

    def down(self, grace_s: float = 10.0) -> None:
        running = [s for s in self.services.values() if s.process and s.process.poll() is None]
        for svc in running:
            svc.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for svc in running:
            try:
                svc.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                svc.process.kill()
                svc.process.wait(timeout=10)
        state = self.workdir / STATE_FILE
        state.unlink(missing_ok=True)

    def __enter__(self) -> "LocalCluster":
        self.up()
        return self

    def __exit__(self, *exc) -> None:
        self.down()


def down_detached(workdir: str | Path) -> list[str]:
    """Stop the services a detached `cluster up` left running (from its cluster.json)."""
    state_path = Path(workdir) / STATE_FILE
    if not state_path.exists():
        raise FileNotFoundError(f"no running cluster recorded at {state_path}")
    state = json.loads(state_path.read_text())
    stopped = []
    for name, entry in state.items():
        try:
            os.kill(entry["pid"], signal.SIGTERM)
            stopped.append(name)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 15
    for entry in state.values():
        while time.monotonic() < deadline:
            try:
                os.kill(entry["pid"], 0)
                time.sleep(0.2)
            except ProcessLookupError:
                break
        else:
            try:
                os.kill(entry["pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass
    state_path.unlink()
    return stopped
