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

Before anything is started, the whole config is checked (cluster_config_problems): every service's settings, every
model path and every data file (read with the loader the parties use, cotune.data.read_jsonl); all the problems found
are reported at once, one line each (ClusterConfigError). With a Progress, start-up reports a line per phase (which
service it waits for, how long so far), for `cotune demo` and `cotune cluster up`.

The CLI's commands find a running local cluster with find_cluster_dir: --cluster-dir or $COTUNE_CLUSTER_DIR, else the
one running among var/cluster and var/demo/*/cluster (where `cotune demo` starts its clusters).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
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
    validate_security,
)

HOST = "127.0.0.1"
STATE_FILE = "cluster.json"
SECURITY_MODES = ("mtls", "insecure")
OPERATOR = Identity("operator", "admin")  # the identity the launcher, the CLI and the tests act as
SECURITY_KEY = "_security"  # cluster.json's entry for the operator's credentials (other entries are services)
# where the CLI looks for a running local cluster when neither --cluster-dir nor $COTUNE_CLUSTER_DIR names one
# (relative to the current directory): `cotune cluster up`'s usual workdir, then the demo's, one per preset
CLUSTER_DIR_ENV = "COTUNE_CLUSTER_DIR"
DEFAULT_CLUSTER_DIR = "var/cluster"
DEMO_CLUSTER_DIRS = "var/demo/*/cluster"
PROGRESS_INTERVAL_S = 10.0  # at most one "still waiting" line per service this often


class ClusterConfigError(ConfigError):
    """A cluster config with problems, found before anything was started: `problems` holds one line each."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class ClusterNotFound(ConfigError):
    """No running local cluster where the CLI looked (the message lists the places and what was there)."""


class Progress:
    """Start-up progress for people: one plain line per phase, flushed at once and free of terminal control codes, so
    that it reads the same in a terminal, a pipe or a log file; the repeated "still waiting" lines of one key come at
    most every `interval_s`. Lines go to `stream` (default: stderr, the demo's and the CLI's channel for progress)."""

    def __init__(self, stream=None, *, interval_s: float = PROGRESS_INTERVAL_S, clock: Callable[[], float] = time.monotonic):
        self.stream = stream
        self.interval_s = interval_s
        self.clock = clock
        self._last: dict[str, float] = {}

    def say(self, message: str) -> None:
        print(message, file=self.stream or sys.stderr, flush=True)

    def every(self, key: str, message: Callable[[bool], str]) -> None:
        """Print `message(first)` unless a line for `key` was printed less than interval_s ago (`first`: none was)."""
        now = self.clock()
        last = self._last.get(key)
        if last is None or now - last >= self.interval_s:
            self._last[key] = now
            self.say(message(last is None))

    def phase(self, what: str, *, heartbeat: bool = False) -> "_Phase":
        """`with progress.phase("converting X"):` prints "converting X..." and then "converting X: done in N s"
        (or "failed after N s"). heartbeat: also "converting X: N s so far" every interval_s meanwhile (for work
        that reports nothing itself)."""
        return _Phase(self, what, heartbeat)


class _Phase:
    def __init__(self, progress: Progress, what: str, heartbeat: bool):
        self.progress, self.what, self.heartbeat = progress, what, heartbeat
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "_Phase":
        self.t0 = self.progress.clock()
        self.progress.say(f"{self.what}...")
        if self.heartbeat:
            self._thread = threading.Thread(target=self._beat, name="progress-heartbeat", daemon=True)
            self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.progress.interval_s):
            self.progress.say(f"{self.what}: {self.progress.clock() - self.t0:.0f} s so far")

    def __exit__(self, exc_type, *_) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        took = self.progress.clock() - self.t0
        self.progress.say(f"{self.what}: {'failed after' if exc_type else 'done in'} {took:.0f} s")


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
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of cluster settings (workdir, llm, clients, ...), "
                              f"got {type(data).__name__}")
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
    started: float = 0.0  # time.monotonic() when its process was started

    @property
    def pid(self) -> int:
        return self.process.pid if self.process else 0


def _write_config(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def wait_healthy(address: str, *, timeout_s: float, service: str = "", process: subprocess.Popen | None = None,
                 log_path: Path | None = None, creds: Credentials | None = None, peer: Identity | None = None,
                 on_wait: Callable[[], None] | None = None) -> None:
    """Poll grpc.health.v1 at `address` until it reports SERVING; `on_wait()` is called after each probe that finds it
    not serving yet (e.g. to report progress). Raises RuntimeError if `process` exits, TimeoutError after timeout_s."""
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
            if on_wait is not None:
                on_wait()
            time.sleep(0.25)
    finally:
        channel.close()
    raise TimeoutError(f"{service or address} did not become healthy within {timeout_s:.0f}s")


def stop_processes(processes, grace_s: float = 10.0) -> None:
    """SIGTERM every process still running, wait up to `grace_s` for them together, then SIGKILL the rest."""
    running = [p for p in processes if p.poll() is None]
    for process in running:
        process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for process in running:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


class LocalCluster:
    def __init__(self, config: ClusterConfig, *, start_timeout_s: float = 900.0, progress: Progress | None = None):
        """Checks the whole config first (every service's settings, model paths, data files: see
        cluster_config_problems) and raises ClusterConfigError listing every problem; nothing is started until up()."""
        self.config = config
        self.workdir = Path(config.workdir if isinstance(config.workdir, str) and config.workdir else ".").resolve()
        self.start_timeout_s = start_timeout_s
        self.progress = progress
        self.services: dict[str, ServiceProcess] = {}
        problems = self._problems()
        if problems:
            raise ClusterConfigError(problems)

    # -- checks before anything starts -----------------------------------------------------------------------
    def _problems(self) -> list[str]:
        """Every problem found without starting anything, one line each (see cluster_config_problems)."""
        c = self.config
        problems = []
        if not c.workdir or not isinstance(c.workdir, str):
            problems.append("workdir is required: the folder for the cluster's state, logs and certificates")
        elif (why := _dir_problem(c.workdir)) is not None:
            problems.append(f"workdir: {why}")
        if not isinstance(c.clients_per_process, int) or isinstance(c.clients_per_process, bool) \
                or c.clients_per_process < 1:
            problems.append(f"clients_per_process must be an integer >= 1, got {c.clients_per_process!r:.40}")
        if not isinstance(c.security, str) or c.security not in SECURITY_MODES:
            problems.append(f"security must be one of {', '.join(SECURITY_MODES)}, got {c.security!r:.40}")
        parties: list[tuple[str, str, dict]] = []
        if not c.llm:
            problems.append("llm is required: the LLM server's settings (model, data, ...)")
        elif not isinstance(c.llm, dict):
            problems.append(f"llm: expected a mapping of the LLM server's settings, got {type(c.llm).__name__}")
        else:
            parties.append(("llm", "llm", c.llm))
        if not c.clients:
            problems.append("clients: at least one client is required")
        elif not isinstance(c.clients, list):
            problems.append(f"clients: expected a list of client settings, got {type(c.clients).__name__}")
        elif bad := [i for i, client in enumerate(c.clients) if not isinstance(client, dict)]:
            problems.extend(f"clients[{i}]: expected a mapping of a client's settings, got "
                            f"{type(c.clients[i]).__name__}" for i in bad)
        else:
            names = self._client_names()
            for name in sorted({n for n in names if names.count(n) > 1}, key=str):
                where = ", ".join(f"clients[{i}]" for i, n in enumerate(names) if n == name)
                problems.append(f"clients: {where} have the same party_id {name!r}")
            parties.extend((name, "slm", data) for name, data in zip(names, c.clients))
        checked: dict[str, str | None] = {}  # a data file shared by several parties is read once
        for name, role, data in parties:
            problems.extend(self._party_problems(name, role, data, checked))
        for section, value in (("alignment", c.alignment), ("coordinator", c.coordinator)):
            if value is not None and not isinstance(value, dict):
                problems.append(f"{section}: expected a mapping of its settings or null, got {type(value).__name__}")
                continue
            try:
                if section == "alignment" and value is None:
                    continue
                data = self._alignment_data() if section == "alignment" else self._coordinator_data(f"{HOST}:1", "", [])
                cfg = from_dict(AlignmentConfig if section == "alignment" else CoordinatorConfig, data, section)
                cfg.validate()
                validate_security(cfg, section)
            except ConfigError as exc:
                problems.append(str(exc) if str(exc).startswith(section) else f"{section}: {exc}")
                continue
            if (value or {}).get("workdir") and (why := _dir_problem(cfg.workdir)) is not None:
                problems.append(f"{section}: workdir: {why}")
        return problems

    def _party_problems(self, name: str, role: str, data: dict, checked: dict[str, str | None]) -> list[str]:
        """A party's settings, model paths, workdirs and data files (each parsed as the party will read it)."""
        from cotune.security.identity import IdentityError

        try:
            cfg = from_dict(PartyConfig, self._party_data(name, data), name)
        except ConfigError as exc:
            return [str(exc)]
        except IdentityError as exc:
            return [f"{name}: party_id: {exc}"]
        lines = []
        model = cfg.model
        if not model.path:
            lines.append("model.path is required (an HF model directory or a .gguf file)")
        for key in ("path", "companion_slm_path"):
            value = getattr(model, key)
            if value and (why := _model_problem(value)) is not None:
                lines.append(f"model.{key}: {why}")
        for key, value in (("model.cache_dir", model.cache_dir), ("workdir", data.get("workdir"))):
            if value and isinstance(value, str) and (why := _dir_problem(value)) is not None:
                lines.append(f"{key}: {why}")
        if not cfg.data.public:
            lines.append("data.public is required (every party holds the public set)")
        if role == "slm" and not cfg.data.private:
            lines.append("data.private is required for an SLM client (its private training data)")
        for key in ("public", "private", "eval"):
            value = getattr(cfg.data, key)
            if value:
                if value not in checked:
                    checked[value] = _data_problem(value)
                if checked[value] is not None:
                    lines.append(f"data.{key}: {checked[value]}")
        if not lines:  # the rest of the party's own rules (party_id, evaluation, roles); it stops at the first
            try:
                cfg.validate(role)
                validate_security(cfg, name)
            except ConfigError as exc:
                lines.append(str(exc))
        return [f"{name}: {line}" for line in lines]

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
        doing = "load its model" if svc.kind in ("llm", "slm") else "start"

        def line(first: bool) -> str:
            took = time.monotonic() - svc.started
            if first:
                return f"waiting for {svc.name} to {doing} ({took:.0f} s so far; log: {svc.log_path})"
            return f"still waiting for {svc.name} to {doing} ({took:.0f} s so far)"

        def report() -> None:
            self.progress.every(svc.name, line)

        on_wait = report if self.progress is not None else None
        wait_healthy(svc.address, timeout_s=timeout_s, service=svc.name, process=svc.process, log_path=svc.log_path,
                     creds=self.credentials(), peer=self.identity_of(svc.name), on_wait=on_wait)
        if self.progress is not None:
            self.progress.say(f"{svc.name} is serving ({time.monotonic() - svc.started:.0f} s after its start)")

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
            # model processes share this machine's cores instead of each spinning on all of them; per task, the
            # cores the run's plan leaves it (RunContext.parallel_tasks, cotune.lm.device.threads_for_task)
            env["COTUNE_TORCH_THREADS"] = str(max(1, (os.cpu_count() or 1) // self._model_processes()))
            env.setdefault("COTUNE_HOST_CORES", str(os.cpu_count() or 1))
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
        svc.started = time.monotonic()
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
            svc.started = time.monotonic()
            self.services[svc.name] = svc
        return members

    def _await_port(self, svc: ServiceProcess) -> None:
        deadline = time.monotonic() + 120

        def line(first: bool) -> str:
            took = f"{time.monotonic() - svc.started:.0f} s so far"
            return f"waiting for {svc.name} to start ({took}; log: {svc.log_path})" if first else \
                f"still waiting for {svc.name} to start ({took})"

        while not svc.port_file.exists():
            if svc.process.poll() is not None:
                raise RuntimeError(f"{svc.name} exited with code {svc.process.returncode}:\n{svc.log_path.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{svc.name} did not report its port within 120s (see {svc.log_path})")
            if self.progress is not None and time.monotonic() - svc.started > 2:  # only when it is slow to start
                self.progress.every(f"{svc.name} start", line)
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

    def _alignment_data(self) -> dict:
        data = dict(self.config.alignment or {})
        data.update(listen=f"{HOST}:0", workdir=data.get("workdir") or str(self.workdir / "alignment"),
                    **self._security(ALIGNMENT))
        from_dict(AlignmentConfig, data, "alignment")
        return data

    def _coordinator_data(self, llm: str, alignment: str, clients: list[ServiceProcess]) -> dict:
        coord = dict(self.config.coordinator or {}, **self._security(COORDINATOR))
        coord.update(listen=f"{HOST}:0", workdir=coord.get("workdir") or str(self.workdir / "coordinator"),
                     llm=llm, alignment=alignment, clients=[to_dict(ClientEntry(s.name, s.address)) for s in clients])
        from_dict(CoordinatorConfig, coord, "coordinator")
        return coord

    def _say(self, message: str) -> None:
        if self.progress is not None:
            self.progress.say(message)

    def up(self) -> dict[str, str]:
        running = running_pids(self.workdir)
        if running:
            raise ConfigError(f"a cluster is already running in {self.workdir} (pids {', '.join(map(str, running))}); "
                              f"`cotune cluster down --workdir {self.workdir}` stops it")
        t0 = time.monotonic()
        try:
            self._ensure_certs()
            workers = []
            if self.config.alignment is not None:
                workers.append(self._spawn("alignment", "alignment", self._alignment_data()))
            workers.append(self._spawn("llm", "llm", self._party_data("llm", self.config.llm)))
            clients = []
            for name, client in zip(self._client_names(), self.config.clients):
                clients.append((name, self._party_data(name, client)))
            k = self.config.clients_per_process
            for g, start in enumerate(range(0, len(clients), k), 1):
                workers.extend(self._spawn_clients(f"slm-{g}", clients[start:start + k]))
            self._say(f"started {', '.join(s.name for s in workers)} (logs in {self.workdir / 'logs'})")
            for svc in workers:
                self._await_port(svc)
            for svc in workers:
                self._wait_healthy(svc, self.start_timeout_s)
            coord = self._coordinator_data(self.services["llm"].address,
                                           self.services["alignment"].address if "alignment" in self.services else "",
                                           [s for s in workers if s.kind == "slm"])
            svc = self._spawn("coordinator", "coordinator", coord)
            self._await_port(svc)
            self._wait_healthy(svc, 60)
            self._write_state()
            self._say(f"cluster up in {time.monotonic() - t0:.0f} s")
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
        stop_processes({id(s.process): s.process for s in self.services.values() if s.process}.values(), grace_s)
        state = self.workdir / STATE_FILE
        state.unlink(missing_ok=True)

    def __enter__(self) -> "LocalCluster":
        self.up()
        return self

    def __exit__(self, *exc) -> None:
        self.down()


def cluster_config_problems(config: ClusterConfig) -> list[str]:
    """Every problem of a cluster config that shows without starting anything, one line each, [] when none: the
    cluster's own settings; each service's settings as its process will read them (unknown keys, wrong types, party
    rules); every model path (an HF directory with config.json, or a readable .gguf file); every workdir and cache
    folder (a folder that exists or can be created); and every data file (data.public/private/eval: a readable file
    that cotune.data.read_jsonl, the parties' own loader, reads as one or more examples). LocalCluster raises them
    as ClusterConfigError when it is made, before anything is started."""
    try:
        LocalCluster(config)
    except ClusterConfigError as exc:
        return exc.problems
    return []


def _model_problem(path: str) -> str | None:
    p = Path(path)
    if not p.exists():
        return f"not found: {path}"
    if p.is_dir():
        config = p / "config.json"
        if not config.is_file():
            return f"{path} is a folder without config.json (expected an HF model folder or a .gguf file)"
        return None if os.access(config, os.R_OK) else f"{config} is not readable"
    if p.suffix.lower() != ".gguf":
        return f"{path} is neither an HF model folder nor a .gguf file"
    return None if os.access(p, os.R_OK) else f"{path} is not readable"


def _dir_problem(path: str) -> str | None:
    """Why `path` cannot serve as a folder this process writes into (None if it can, or can be created)."""
    p = Path(path)
    if p.exists():
        if not p.is_dir():
            return f"{path} exists and is not a folder"
        return None if os.access(p, os.W_OK | os.X_OK) else f"{path} is not writable"
    parent = p.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return f"cannot create {path}: {parent} is not a folder"
    return None if os.access(parent, os.W_OK | os.X_OK) else f"cannot create {path}: {parent} is not writable"


def _data_problem(path: str) -> str | None:
    """Why the JSONL file at `path` cannot be a party's data, read with the parties' own loader (None if it can)."""
    from cotune.data import MalformedDataError, read_jsonl

    p = Path(path)
    if not p.exists():
        return f"file not found: {path}"
    if not p.is_file():
        return f"{path} is not a file"
    try:
        examples = read_jsonl(p)
    except MalformedDataError as exc:  # names the file and the line
        return str(exc)
    except UnicodeDecodeError as exc:
        return f"{path}: not UTF-8 text (byte {exc.start})"
    except OSError as exc:
        return f"{path}: cannot read: {exc.strerror or exc}"
    if not examples:
        return f"{path}: holds no examples (expected JSONL, one {{\"prompt\", \"response\", ...}} object a line)"
    return None


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


def default_cluster_dirs(base: str | Path = ".") -> list[Path]:
    """Where a local cluster is looked for when none is named, in order: var/cluster, then var/demo/*/cluster (the
    demo's, one per preset), under `base` (default: the current directory)."""
    base = Path(base)
    return [base / DEFAULT_CLUSTER_DIR, *sorted(base.glob(DEMO_CLUSTER_DIRS))]


def _cluster_dir_state(workdir: Path) -> str:
    """What is in a cluster workdir: "running", or why it is not a running cluster."""
    if not (workdir / STATE_FILE).exists():
        return "no cluster.json" if workdir.is_dir() else "no such folder"
    try:
        alive = running_pids(workdir)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"unreadable cluster.json ({exc})"
    return "running" if alive else "cluster.json left by a cluster whose processes have all exited"


def find_cluster_dir(explicit: str | Path | None = None, *, base: str | Path = ".") -> Path:
    """The workdir of the local cluster a CLI command acts on (every command finds it here).

    `explicit` (--cluster-dir / --workdir), else $COTUNE_CLUSTER_DIR, wins: that folder is returned if a cluster runs
    there. Otherwise the one running cluster among default_cluster_dirs(base) is. Raises ClusterNotFound naming every
    place it looked and what was there (or, when several run, asking which)."""
    named, source = (explicit, "--cluster-dir") if explicit else (os.environ.get(CLUSTER_DIR_ENV, ""), f"${CLUSTER_DIR_ENV}")
    if named:
        state = _cluster_dir_state(Path(named))
        if state != "running":
            raise ClusterNotFound(f"no running cluster in {named} (from {source}): {state}")
        return Path(named)
    looked = [(path, _cluster_dir_state(path)) for path in default_cluster_dirs(base)]
    running = [path for path, state in looked if state == "running"]
    if len(running) == 1:
        return running[0]
    if running:
        raise ClusterNotFound(f"several local clusters are running ({', '.join(map(str, running))}); name one with "
                              f"--cluster-dir DIR or ${CLUSTER_DIR_ENV}")
    where = "; ".join(f"{path} ({state})" for path, state in looked)
    if len(looked) == 1:
        where += f"; no {DEMO_CLUSTER_DIRS}"
    raise ClusterNotFound(f"no running local cluster: looked in {where}. Name one with --cluster-dir DIR or "
                          f"${CLUSTER_DIR_ENV}, or start one (`cotune cluster up --config FILE --detach`, `cotune demo`)")
