"""Local cluster: every service of a cluster config as its own process on loopback.

Used by `cotune cluster up`, `cotune demo` and the integration tests. Each service gets its own config
file and working directory under the cluster's workdir, listens on a free loopback port (reported through
a port file), and the launcher waits for grpc.health.v1 to report SERVING before starting dependents.

With `clients_per_process: k` (default 1) the SLM clients are packed k to a process (`cotune serve slm --config a.yaml
--config b.yaml ...`, for scale tests): each logical client keeps its own config, workdir, port and entry in
`services` / addresses() / cluster.json, and the clients of one process share its Popen (the same pid) and its log,
logs/slm-<g>.log for the g-th process. Killing or restarting one of them kills or restarts its whole process.

Security: `security: mtls` (the default) makes a development CA and one certificate per service identity under
<workdir>/certs on first use (cotune.security.certs.ensure; reused afterwards), gives every service its own, and
records the operator's (operator/admin) in cluster.json, where `cotune run ... --cluster-dir` finds it. `security:
insecure` runs every service in plaintext without identities (`insecure: true`), for debugging only.
"""

from __future__ import annotations

import dataclasses
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

from cotune.rpc.channel import Credentials, TlsFiles, make_channel
from cotune.security.identity import ALIGNMENT, COORDINATOR, LLM, Identity, client_identity
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
SECURITY_MODES = ("mtls", "insecure")
OPERATOR = Identity("operator", "admin")  # the identity the launcher, the CLI and the tests act as
SECURITY_KEY = "_security"  # cluster.json's entry for the operator's credentials (other entries are services)


@dataclass
class ClusterConfig:
    workdir: str = ""
    llm: dict = field(default_factory=dict)            # PartyConfig fields (listen/workdir/party_id are filled in)
    clients: list = field(default_factory=list)        # PartyConfig fields, each with its party_id
    alignment: dict | None = field(default_factory=dict)  # AlignmentConfig fields; null = no alignment service
    coordinator: dict = field(default_factory=dict)    # CoordinatorConfig fields
    clients_per_process: int = 1                       # logical SLM clients hosted by one process (scale tests)
    security: str = "mtls"                             # mtls (certificates made on first use) | insecure (plaintext)

    @classmethod
    def load(cls, path: str | Path) -> "ClusterConfig":
        data = load_yaml(path)
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
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
    group: list[str] = field(default_factory=list)  # every client its process hosts (packed SLM clients), else empty

    @property
    def pid(self) -> int:
        return self.process.pid if self.process else 0


def _write_config(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def wait_healthy(address: str, *, timeout_s: float, service: str = "", process: subprocess.Popen | None = None,
                 log_path: Path | None = None, creds: Credentials | None = None, peer: Identity | None = None) -> None:
    channel = make_channel(address, creds, peer=peer)
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
        if not isinstance(config.clients_per_process, int) or isinstance(config.clients_per_process, bool) \
                or config.clients_per_process < 1:
            raise ConfigError(f"cluster config: clients_per_process must be an integer >= 1, got {config.clients_per_process!r}")
        if config.security not in SECURITY_MODES:
            raise ConfigError(f"cluster config: security must be one of {', '.join(SECURITY_MODES)}, got {config.security!r:.40}")
        self.config = config
        self.workdir = Path(config.workdir).resolve()
        self.start_timeout_s = start_timeout_s
        self.services: dict[str, ServiceProcess] = {}

    # -- security --------------------------------------------------------------------------------------------
    @property
    def secure(self) -> bool:
        return self.config.security == "mtls"

    @property
    def certs_dir(self) -> Path:
        return self.workdir / "certs"

    def _client_names(self) -> list[str]:
        return [c.get("party_id") or f"client-{i + 1}" for i, c in enumerate(self.config.clients)]

    def _ensure_certs(self) -> None:
        if self.secure:
            from cotune.security.certs import ensure

            ensure(self.certs_dir, [COORDINATOR, LLM, ALIGNMENT, OPERATOR]
                   + [client_identity(n) for n in self._client_names()])

    def _security(self, identity: Identity) -> dict:
        """The security part of a service's config: its certificate, or plaintext."""
        if not self.secure:
            return {"insecure": True}
        from cotune.security.certs import cert_files

        files = cert_files(self.certs_dir, identity)
        return {"tls": {"ca": str(files.ca), "cert": str(files.cert), "key": str(files.key)}}

    def credentials(self, identity: Identity = OPERATOR) -> Credentials:
        """What a caller acting as `identity` (default: the operator) presents to this cluster's services."""
        if not self.secure:
            return Credentials()
        from cotune.security.certs import cert_files

        files = cert_files(self.certs_dir, identity)
        return Credentials(TlsFiles(str(files.ca), str(files.cert), str(files.key)))

    @staticmethod
    def identity_of(name: str) -> Identity:
        """The identity of the service `name` (alignment, llm, coordinator or a client's name)."""
        return {"alignment": ALIGNMENT, "llm": LLM, "coordinator": COORDINATOR}.get(name) or client_identity(name)

    def coordinator_client(self, identity: Identity = OPERATOR):
        from cotune.rpc.clients import CoordinatorClient

        return CoordinatorClient(self.services["coordinator"].address, creds=self.credentials(identity))

    def party_client(self, name: str, identity: Identity = COORDINATOR):
        """A client of party `name` ("llm" or a client's name), acting as `identity` (default: the coordinator)."""
        from cotune.rpc.clients import PartyClient

        return PartyClient(self.services[name].address, role="llm" if name == "llm" else "slm", party_id=name,
                           creds=self.credentials(identity))

    def _wait_healthy(self, svc: "ServiceProcess", timeout_s: float) -> None:
        wait_healthy(svc.address, timeout_s=timeout_s, service=svc.name, process=svc.process, log_path=svc.log_path,
                     creds=self.credentials(), peer=self.identity_of(svc.name))

    # -- lifecycle -------------------------------------------------------------------------------------------
    def _model_processes(self) -> int:
        n = len(self.config.clients)
        return 1 + -(-n // self.config.clients_per_process)  # the LLM server + the client processes

    def _popen(self, kind: str, config_paths: list[Path], port_file: Path, log_path: Path) -> subprocess.Popen:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        port_file.parent.mkdir(parents=True, exist_ok=True)
        log = open(log_path, "ab")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        # fewer malloc arenas: gRPC's 1 MiB chunk buffers otherwise churn through page faults (measured in
        # docs/wire.md: transfers ~420 -> ~570 MB/s, receiver RSS bounded)
        env.setdefault("MALLOC_ARENA_MAX", "2")
        if kind in ("llm", "slm") and "COTUNE_TORCH_THREADS" not in os.environ:
            # model processes share this machine's cores instead of each spinning on all of them
            env["COTUNE_TORCH_THREADS"] = str(max(1, (os.cpu_count() or 1) // self._model_processes()))
        args = [sys.executable, "-m", "cotune.cli", "serve", kind]
        for path in config_paths:
            args += ["--config", str(path)]
        try:
            return subprocess.Popen(args + ["--port-file", str(port_file)],
                                    stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        finally:
            log.close()

    def _spawn(self, name: str, kind: str, data: dict) -> ServiceProcess:
        cfg_path = self.workdir / "configs" / f"{name}.yaml"
        _write_config(cfg_path, data)
        svc = ServiceProcess(name, kind, cfg_path, self.workdir / "logs" / f"{name}.log", self.workdir / "ports" / f"{name}.port")
        svc.port_file.unlink(missing_ok=True)
        svc.process = self._popen(kind, [cfg_path], svc.port_file, svc.log_path)
        self.services[name] = svc
        return svc

    def _spawn_clients(self, process_name: str, clients: list[tuple[str, dict]]) -> list[ServiceProcess]:
        """One process hosting several SLM clients (`cotune serve slm --config ... --config ...`): client i of the
        process reports its port in ports/<process_name>.port.<i> (the serve command's convention)."""
        if len(clients) == 1:
            return [self._spawn(clients[0][0], "slm", clients[0][1])]
        port_base = self.workdir / "ports" / f"{process_name}.port"
        log_path = self.workdir / "logs" / f"{process_name}.log"
        names = [name for name, _ in clients]
        members = []
        for i, (name, data) in enumerate(clients):
            cfg_path = self.workdir / "configs" / f"{name}.yaml"
            _write_config(cfg_path, data)
            svc = ServiceProcess(name, "slm", cfg_path, log_path, Path(f"{port_base}.{i}"), group=names)
            svc.port_file.unlink(missing_ok=True)
            members.append(svc)
        process = self._popen("slm", [m.config_path for m in members], port_base, log_path)
        for svc in members:
            svc.process = process
            self.services[svc.name] = svc
        return members

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
        out.update(self._security(self.identity_of(name)))
        out.setdefault("workdir", str(self.workdir / name))
        from_dict(PartyConfig, out, name)  # validate early, with the service's name in the message
        return out

    def up(self) -> dict[str, str]:
        running = running_pids(self.workdir)
        if running:
            raise ConfigError(f"a cluster is already running in {self.workdir} (pids {', '.join(map(str, running))}); "
                              f"`cotune cluster down --workdir {self.workdir}` stops it")
        try:
            self._ensure_certs()
            workers = []
            if self.config.alignment is not None:
                data = dict(self.config.alignment or {})
                data.update(listen=f"{HOST}:0", workdir=data.get("workdir") or str(self.workdir / "alignment"),
                            **self._security(ALIGNMENT))
                from_dict(AlignmentConfig, data, "alignment")
                workers.append(self._spawn("alignment", "alignment", data))
            workers.append(self._spawn("llm", "llm", self._party_data("llm", self.config.llm)))
            clients = []
            for name, client in zip(self._client_names(), self.config.clients):
                clients.append((name, self._party_data(name, client)))
            k = self.config.clients_per_process
            for g, start in enumerate(range(0, len(clients), k), 1):
                workers.extend(self._spawn_clients(f"slm-{g}", clients[start:start + k]))
            for svc in workers:
                self._await_port(svc)
            for svc in workers:
                self._wait_healthy(svc, self.start_timeout_s)
            coord = dict(self.config.coordinator or {}, **self._security(COORDINATOR))
            coord.update(listen=f"{HOST}:0", workdir=coord.get("workdir") or str(self.workdir / "coordinator"),
                         llm=self.services["llm"].address,
                         alignment=self.services["alignment"].address if "alignment" in self.services else "",
                         clients=[to_dict(ClientEntry(s.name, s.address)) for s in workers if s.kind == "slm"])
            from_dict(CoordinatorConfig, coord, "coordinator")
            svc = self._spawn("coordinator", "coordinator", coord)
            self._await_port(svc)
            self._wait_healthy(svc, 60)
            self._write_state()
            return self.addresses()
        except BaseException:
            self.down()
            raise

    def addresses(self) -> dict[str, str]:
        return {name: svc.address for name, svc in self.services.items()}

    def _write_state(self) -> None:
        state = {name: {"kind": s.kind, "address": s.address, "pid": s.pid, "log": str(s.log_path)} for name, s in self.services.items()}
        tls = self.credentials().tls
        # how an operator reaches this cluster (`cotune run ... --cluster-dir`): mode and the operator's files
        state[SECURITY_KEY] = {"mode": self.config.security, "ca": tls.ca, "cert": tls.cert, "key": tls.key}
        (self.workdir / STATE_FILE).write_text(json.dumps(state, indent=2))

    def restart(self, name: str) -> str:
        """Stop one service (SIGKILL) and start it again from its config; returns its address. The LLM server and the
        alignment service come back on the port they had (the coordinator's config names it), unless another process
        took it meanwhile. A client comes back on a new port and is registered again with the coordinator, as the
        operator (and the coordinator's config file is updated, so a later coordinator restart dials it there); a
        packed client restarts with its whole process (every client of it gets a new address)."""
        svc = self.services[name]
        previous = svc.address
        self.kill(name)
        if svc.group:
            members = [self.services[n] for n in svc.group]
            process_name = svc.log_path.stem
            clients = [(m.name, yaml.safe_load(m.config_path.read_text())) for m in members]
            restarted = self._spawn_clients(process_name, clients)
        else:
            data = yaml.safe_load(svc.config_path.read_text())
            if svc.kind in ("llm", "alignment") and previous:
                port = int(previous.rsplit(":", 1)[1])
                if _port_free(port):
                    data["listen"] = f"{HOST}:{port}"
                else:
                    print(f"warning: {name}'s port {port} is taken; it restarts on a new port, which the coordinator "
                          "does not know", file=sys.stderr)
                    data["listen"] = f"{HOST}:0"
            restarted = [self._spawn(name, svc.kind, data)]
        for new in restarted:
            self._await_port(new)
        for new in restarted:
            self._wait_healthy(new, self.start_timeout_s)
        self._write_state()
        moved = [new for new in restarted if new.kind == "slm"]
        if moved and name != "coordinator":
            self._client_moved(moved)
        return self.services[name].address

    def _client_moved(self, clients: list[ServiceProcess]) -> None:
        """Tell the coordinator (its running process, as the operator, and its config file) where restarted clients
        now listen. A coordinator that is down learns it from the config file when it starts."""
        import grpc

        coord = self.services.get("coordinator")
        if coord is None:
            return
        data = yaml.safe_load(coord.config_path.read_text())
        addresses = {c.name: c.address for c in clients}
        for entry in data.get("clients") or []:
            if entry.get("client_id") in addresses:
                entry["address"] = addresses[entry["client_id"]]
        _write_config(coord.config_path, data)
        if coord.process is None or coord.process.poll() is not None:
            return
        client = self.coordinator_client()
        try:
            for c in clients:
                try:
                    client.register_client(c.name, c.address)
                except grpc.RpcError as exc:
                    print(f"warning: could not register the restarted {c.name} at {c.address} with the coordinator: "
                          f"{exc.code().name}: {exc.details()}", file=sys.stderr)
        finally:
            client.close()

    def kill(self, name: str) -> None:
        """SIGKILL a service's process (for a packed client: its process, with every client it hosts)."""
        svc = self.services[name]
        if svc.process and svc.process.poll() is None:
            svc.process.kill()
            svc.process.wait(timeout=30)

    def processes(self) -> dict[int, list[str]]:
        """The services each started process hosts, by pid (packed clients share one)."""
        out: dict[int, list[str]] = {}
        for name, svc in self.services.items():
            if svc.process is not None:
                out.setdefault(svc.pid, []).append(name)
        return out

    def down(self, grace_s: float = 10.0) -> None:
        running = list({id(s.process): s.process for s in self.services.values()
                        if s.process and s.process.poll() is None}.values())
        for process in running:
            process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for process in running:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        state = self.workdir / STATE_FILE
        state.unlink(missing_ok=True)

    def __enter__(self) -> "LocalCluster":
        self.up()
        return self

    def __exit__(self, *exc) -> None:
        self.down()


def _port_free(port: int) -> bool:
    """Whether a listener could bind HOST:port now (as gRPC's does: address reuse on, so a port whose last
    connections linger in TIME_WAIT counts as free)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def down_detached(workdir: str | Path) -> list[str]:
    """Stop the services a detached `cluster up` left running (from its cluster.json)."""
    state_path = Path(workdir) / STATE_FILE
    if not state_path.exists():
        raise FileNotFoundError(f"no running cluster recorded at {state_path}")
    state = json.loads(state_path.read_text())
    state.pop(SECURITY_KEY, None)
    stopped = []
    signalled: set[int] = set()
    for name, entry in state.items():
        try:
            if entry["pid"] not in signalled:  # packed clients share their process's pid
                os.kill(entry["pid"], signal.SIGTERM)
                signalled.add(entry["pid"])
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


def running_pids(workdir: str | Path) -> list[int]:
    """The live processes of the cluster recorded in `workdir`'s cluster.json (empty if none is recorded or all died)."""
    state_path = Path(workdir) / STATE_FILE
    if not state_path.exists():
        return []
    state = json.loads(state_path.read_text())
    alive = []
    for name, entry in state.items():
        if name == SECURITY_KEY:
            continue
        try:
            os.kill(entry["pid"], 0)
            alive.append(entry["pid"])
        except ProcessLookupError:
            pass
    return sorted(set(alive))


def operator_credentials(workdir: str | Path) -> tuple[str, Credentials] | None:
    """(coordinator address, operator credentials) of the local cluster whose state is in `workdir`, or None."""
    state_path = Path(workdir) / STATE_FILE
    if not state_path.exists():
        return None
    state = json.loads(state_path.read_text())
    security = state.get(SECURITY_KEY, {})
    tls = TlsFiles(security.get("ca", ""), security.get("cert", ""), security.get("key", ""))
    return state["coordinator"]["address"], Credentials(tls)
