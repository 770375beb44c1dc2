"""Separate hosts: a tiny FedMKT deployment (three tokenizers) whose services each run on a host of their own, so that
addresses, certificates and the coordinator's address rules are exercised as on real machines.

Isolation, in order of preference (the one used is printed, shown in the test ids' module header line and recorded as
the `isolation` property of every test; `COTUNE_MULTI_HOST_ISOLATION=netns|loopback` forces one):

- netns: one Linux network namespace per host (alignment, llm, client-1, client-2, coordinator, an operator's host and
  an outsider's host), each with its own interface and address 192.0.2.x (TEST-NET-1: never routed, so nothing outside
  the namespaces answers there), joined by a bridge in a "switch" namespace; the root namespace gets no interface and
  no route, so this machine's own network is untouched. Every host resolves the others by name
  (<host>.cotune.test) from its own /etc/hosts, provided by `ip netns exec` from /etc/netns/<namespace>/hosts (the
  machine's /etc/hosts is left alone). Needs root and iproute2.
- loopback: every host its own loopback address, 127.0.0.2-8, on this machine's network (Linux routes all of
  127.0.0.0/8 to lo); the services are named by address (nothing resolves *.cotune.test without /etc/hosts).

Either way each service listens on its own host's address only, every certificate (made by `cotune certs --host
ID=HOST`) carries its host's name and address besides its identity, the coordinator's client_addresses allow only
the two clients' hosts, and each step is done by a process on the host that would do it, with that host's
certificate only (tests/integration/multi_host_probe.py): the operator starts the run from its own host, client-1
registers itself from its host, the outsider tries from its.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import yaml

from cotune.cluster import stop_processes
from cotune.demo import cluster_config, prepare_data, prepare_models
from tests.integration.cluster_fixtures import TEST_PRESET
from tests.integration.test_security import GUARD_DENIAL

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1800)]

REPO = Path(__file__).resolve().parents[2]
ISOLATION_ENV = "COTUNE_MULTI_HOST_ISOLATION"
DOMAIN = "cotune.test"  # RFC 2606: reserved for tests
NETNS_NET = "192.0.2"   # RFC 5737 TEST-NET-1
NETNS_PREFIX = "cotune-mh"
# every host and the last byte of its address (192.0.2.x in namespaces, 127.0.0.x on loopback)
HOSTS = {"alignment": 2, "llm": 3, "client-1": 4, "client-2": 5, "coordinator": 6, "operator": 7, "outsider": 8}
# the services: host -> (what it serves, its port in namespaces, where every host can take the usual one)
SERVICES = {"alignment": ("alignment", 50071), "llm": ("llm", 50051), "client-1": ("slm", 50061),
            "client-2": ("slm", 50061), "coordinator": ("coordinator", 50041)}
CLIENTS = ("client-1", "client-2")
# the identity each host holds a certificate of: the outsider holds a valid client certificate for a client the
# deployment does not have (client-3); its host is not among the coordinator's client_addresses
IDENTITY = {"alignment": "alignment", "llm": "llm", "client-1": "client/client-1", "client-2": "client/client-2",
            "coordinator": "coordinator", "operator": "operator/alice", "outsider": "client/client-3"}
START_TIMEOUT_S = 600.0


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COTUNE_") or k == "COTUNE_SHARED_DATA"}
    # one torch thread per model process: five processes share this machine's cores
    env.update(PYTHONUNBUFFERED="1", MALLOC_ARENA_MAX="2", COTUNE_TORCH_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")])))
    return env


def _sh(*args: str) -> None:
    subprocess.run(list(args), check=True, capture_output=True, text=True, timeout=30)


# -- the hosts ------------------------------------------------------------------------------------------------------
@dataclass
class Hosts:
    mode: str  # netns | loopback
    why: str   # why this isolation was used
    net: str   # the first three bytes of the hosts' addresses
    resolvable: bool = False  # whether every host resolves <host>.cotune.test
    namespaces: list[str] = field(default_factory=list)
    etc_dirs: list[Path] = field(default_factory=list)
    made_etc_netns: bool = False

    def ip(self, host: str) -> str:
        return f"{self.net}.{HOSTS[host]}"

    @staticmethod
    def hostname(host: str) -> str:
        return f"{host}.{DOMAIN}"

    def name(self, host: str) -> str:
        """How the others address `host`: its name where names resolve, else its address."""
        return self.hostname(host) if self.resolvable else self.ip(host)

    def command(self, host: str, args: list[str]) -> list[str]:
        """`args` run on `host`."""
        return ["ip", "netns", "exec", self.namespace(host), *args] if self.mode == "netns" else list(args)

    def namespace(self, host: str) -> str:
        return f"{NETNS_PREFIX}{os.getpid()}-{host}"

    def close(self) -> None:
        for ns in reversed(self.namespaces):
            _delete_namespace(ns)
        for d in self.etc_dirs:
            shutil.rmtree(d, ignore_errors=True)
        if self.made_etc_netns:
            with contextlib.suppress(OSError):  # only if empty: another run of this test may be using it
                Path("/etc/netns").rmdir()


def _delete_namespace(ns: str) -> None:
    pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
    for pid in pids:  # only ever processes this test started in its own namespaces
        with contextlib.suppress(OSError):
            os.kill(int(pid), signal.SIGKILL)
    subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _remove_stale_namespaces() -> None:
    """Namespaces (and their /etc/netns files) left by an earlier run of this test that was killed: named
    cotune-mh<pid>-<host>, where <pid> no longer runs."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split("\n")
    for line in listed:
        ns = line.split(" ", 1)[0]
        if not ns.startswith(NETNS_PREFIX):
            continue
        pid = ns[len(NETNS_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not Path(f"/proc/{pid}").exists():
            _delete_namespace(ns)
            shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)


def _netns_problem() -> str | None:
    """Why network namespaces cannot be used here (None: they can)."""
    if sys.platform != "linux":
        return f"not Linux ({sys.platform})"
    if os.geteuid() != 0:
        return "not root (creating network namespaces and interfaces needs CAP_SYS_ADMIN and CAP_NET_ADMIN)"
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2)"
    probe = f"{NETNS_PREFIX}{os.getpid()}-probe"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    try:
        veth = subprocess.run(["ip", "-n", probe, "link", "add", "p0", "type", "veth", "peer", "name", "p1"],
                              capture_output=True, text=True)
        if veth.returncode != 0:
            return f"cannot make a veth pair in a namespace: {veth.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _netns_hosts(why: str) -> Hosts:
    """One namespace per host and a switch namespace with a bridge joining them; per-namespace /etc/hosts."""
    hosts = Hosts("netns", why, NETNS_NET)
    _remove_stale_namespaces()
    try:
        switch = f"{NETNS_PREFIX}{os.getpid()}-switch"
        _sh("ip", "netns", "add", switch)
        hosts.namespaces.append(switch)
        _sh("ip", "-n", switch, "link", "add", "br0", "type", "bridge")
        _sh("ip", "-n", switch, "link", "set", "br0", "up")
        for host, last in HOSTS.items():
            ns = hosts.namespace(host)
            _sh("ip", "netns", "add", ns)
            hosts.namespaces.append(ns)
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
            # the host's interface eth0; its other end, port v<last>, on the switch's bridge
            _sh("ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", f"v{last}", "netns", switch)
            _sh("ip", "-n", ns, "addr", "add", f"{hosts.ip(host)}/24", "dev", "eth0")
            _sh("ip", "-n", ns, "link", "set", "eth0", "up")
            _sh("ip", "-n", switch, "link", "set", f"v{last}", "master", "br0")
            _sh("ip", "-n", switch, "link", "set", f"v{last}", "up")
        try:  # names: each host's own /etc/hosts, which `ip netns exec` puts in place of the machine's
            etc = Path("/etc/netns")
            hosts.made_etc_netns = not etc.exists()
            table = "127.0.0.1 localhost\n::1 localhost\n" + "".join(
                f"{hosts.ip(h)} {hosts.hostname(h)}\n" for h in HOSTS)
            for host in HOSTS:
                d = etc / hosts.namespace(host)
                d.mkdir(parents=True, exist_ok=True)
                hosts.etc_dirs.append(d)
                (d / "hosts").write_text(table)
            hosts.resolvable = True
        except OSError as exc:
            hosts.why += f"; hosts are named by address (cannot write /etc/netns: {exc.strerror or exc})"
    except BaseException:
        hosts.close()
        raise
    return hosts


def _loopback_problem() -> str | None:
    for last in HOSTS.values():
        with socket.socket() as sock:
            try:
                sock.bind((f"127.0.0.{last}", 0))
            except OSError as exc:
                return f"cannot bind 127.0.0.{last}: {exc.strerror or exc}"
    return None


def make_hosts() -> Hosts:
    forced = os.environ.get(ISOLATION_ENV, "").strip().lower()
    if forced not in ("", "netns", "loopback"):
        raise pytest.UsageError(f"{ISOLATION_ENV} must be netns or loopback, got {forced!r}")
    if forced == "loopback":
        why = f"{ISOLATION_ENV}=loopback"
    else:
        problem = _netns_problem()
        if problem is None:
            try:
                return _netns_hosts("network namespaces work here (root, iproute2)")
            except (OSError, subprocess.SubprocessError) as exc:
                detail = exc.stderr.strip() if isinstance(exc, subprocess.CalledProcessError) and exc.stderr else exc
                problem = f"setting them up failed: {detail}"
        if forced == "netns":
            pytest.skip(f"isolation: none ({ISOLATION_ENV}=netns, but network namespaces do not work here: {problem})")
        why = f"network namespaces do not work here: {problem}"
    problem = _loopback_problem()
    if problem is not None:
        pytest.skip(f"isolation: none (loopback addresses 127.0.0.2-8 unusable: {problem}; netns: {why})")
    return Hosts("loopback", why, "127.0.0")


# -- the deployment -------------------------------------------------------------------------------------------------
@dataclass
class Service:
    host: str
    kind: str
    process: subprocess.Popen
    log: Path
    port_file: Path
    address: str = ""


@dataclass
class Deployment:
    hosts: Hosts
    root: Path
    services: dict[str, Service] = field(default_factory=dict)
    registered: dict[str, dict] = field(default_factory=dict)
    certs_shown: subprocess.CompletedProcess | None = None  # `cotune certs --show` after issuing

    def tls(self, host: str) -> dict:
        """The certificate files on `host`: the CA's certificate and the host's own certificate and key."""
        d = self.root / "hosts" / host / "certs"
        stem = IDENTITY[host].replace("/", "-")
        return {"ca": str(d / "ca.crt"), "cert": str(d / f"{stem}.crt"), "key": str(d / f"{stem}.key")}

    def address(self, host: str) -> str:
        return self.services[host].address

    def probe(self, host: str, action: str, timeout: float = 120, **request) -> dict:
        """Run tests/integration/multi_host_probe.py on `host` with that host's certificate."""
        request = {"action": action, "tls": self.tls(host), **request}
        args = [sys.executable, "-m", "tests.integration.multi_host_probe", json.dumps(request)]
        done = subprocess.run(self.hosts.command(host, args), cwd=REPO, env=_env(), capture_output=True, text=True,
                              timeout=timeout)
        assert done.returncode == 0, f"probe {action} on {host} failed:\n{done.stderr[-3000:]}"
        return json.loads(done.stdout.strip().splitlines()[-1])

    def start(self, host: str, config: dict) -> Service:
        kind, port = SERVICES[host]
        listen_port = port if self.hosts.mode == "netns" else 0  # loopback: this machine's ports are shared
        config = {"workdir": str(self.root / "hosts" / host / "work"), **config,
                  "listen": f"{self.hosts.ip(host)}:{listen_port}", "tls": self.tls(host)}
        path = self.root / "hosts" / host / f"{host}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        log, port_file = path.with_suffix(".log"), path.with_suffix(".port")
        args = [sys.executable, "-m", "cotune.cli", "serve", kind, "--config", str(path), "--port-file", str(port_file)]
        with open(log, "ab") as out:
            process = subprocess.Popen(self.hosts.command(host, args), cwd=REPO, env=_env(), stdout=out,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        svc = self.services[host] = Service(host, kind, process, log, port_file)
        deadline = time.monotonic() + 120
        while not port_file.exists():
            self.check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{host} did not report its port within 120 s (log: {log})")
            time.sleep(0.1)
        svc.address = f"{self.hosts.name(host)}:{int(port_file.read_text().strip())}"
        return svc

    def check_alive(self) -> None:
        for svc in self.services.values():
            if svc.process.poll() is not None:
                raise RuntimeError(f"{svc.host} exited with code {svc.process.returncode}:\n{svc.log.read_text()[-3000:]}")

    def wait_serving(self, hosts: list[str]) -> None:
        """Until every service of `hosts` reports SERVING, asked from the operator's host (its models load first)."""
        targets = [{"address": self.address(h), "peer": IDENTITY[h]} for h in hosts]
        request = {"action": "wait", "targets": targets, "tls": self.tls("operator"), "timeout_s": START_TIMEOUT_S}
        args = [sys.executable, "-m", "tests.integration.multi_host_probe", json.dumps(request)]
        waiter = subprocess.Popen(self.hosts.command("operator", args), cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        try:
            while waiter.poll() is None:
                self.check_alive()
                time.sleep(0.5)
            out, err = waiter.communicate()
            assert waiter.returncode == 0, f"waiting for {', '.join(hosts)} failed:\n{err[-3000:]}"
        finally:
            if waiter.poll() is None:
                waiter.kill()
                waiter.wait()

    def stop(self) -> None:
        stop_processes([s.process for s in self.services.values()], grace_s=15)


def _issue_certificates(dep: Deployment) -> subprocess.CompletedProcess:
    """`cotune certs` as an operator would run it: every identity, each with its host's name and address; then each
    host gets the CA's certificate and its own certificate and key only."""
    certs = dep.root / "ca"
    hosts = [arg for host in HOSTS for arg in ("--host", f"{IDENTITY[host]}={dep.hosts.hostname(host)}",
                                                "--host", f"{IDENTITY[host]}={dep.hosts.ip(host)}")]
    made = subprocess.run([sys.executable, "-m", "cotune.cli", "certs", "--dir", str(certs),
                           *(IDENTITY[h] for h in HOSTS), *hosts], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    for host in HOSTS:
        files = dep.tls(host)
        Path(files["ca"]).parent.mkdir(parents=True, exist_ok=True)
        stem = IDENTITY[host].replace("/", "-")
        shutil.copy(certs / "ca.crt", files["ca"])
        shutil.copy(certs / f"{stem}.crt", files["cert"])
        shutil.copy(certs / f"{stem}.key", files["key"])
    return subprocess.run([sys.executable, "-m", "cotune.cli", "certs", "--dir", str(certs), "--show"], cwd=REPO,
                          env=_env(), capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def deployment(request, tmp_path_factory, shared_data):
    hosts = make_hosts()
    line = f"multi-host isolation: {hosts.mode} ({hosts.why})"
    print(line)
    reporter = request.config.pluginmanager.getplugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(line)
    root = tmp_path_factory.mktemp("multi-host")
    dep = Deployment(hosts, root)
    try:
        dep.certs_shown = _issue_certificates(dep)
        data = prepare_data(TEST_PRESET, root)
        models = prepare_models("tiny", root, algorithm="fedmkt")
        config = cluster_config("tiny", TEST_PRESET, root, data, models, algorithm="fedmkt")
        dep.start("alignment", dict(config.alignment))
        dep.start("llm", {**config.llm, "party_id": "llm"})
        for client in config.clients:
            dep.start(client["party_id"], client)
        dep.wait_serving(["alignment", "llm", *CLIENTS])
        dep.start("coordinator", {
            "llm": dep.address("llm"), "alignment": dep.address("alignment"),
            "clients": [],  # none known at start: they register, from where client_addresses allow
            "client_addresses": [f"{hosts.name(c)}:*" for c in CLIENTS]})
        dep.wait_serving(["coordinator"])
        # client-1 registers itself, from its own host; the operator registers client-2
        dep.registered["client-1"] = dep.probe("client-1", "register", coordinator=dep.address("coordinator"),
                                               client_id="client-1", address=dep.address("client-1"))
        dep.registered["client-2"] = dep.probe("operator", "register", coordinator=dep.address("coordinator"),
                                               client_id="client-2", address=dep.address("client-2"))
        yield dep
    finally:
        dep.stop()
        hosts.close()


@pytest.fixture(autouse=True)
def _record_isolation(request, record_property):
    if "deployment" in request.fixturenames:
        dep = request.getfixturevalue("deployment")
        record_property("isolation", f"{dep.hosts.mode}: {dep.hosts.why}")


# -- the tests ------------------------------------------------------------------------------------------------------
def test_every_service_listens_on_its_own_hosts_address(deployment):
    dep = deployment
    print(f"isolation: {dep.hosts.mode} ({dep.hosts.why})")
    for host in SERVICES:
        name, _, port = dep.address(host).rpartition(":")
        assert name == dep.hosts.name(host), (host, dep.address(host))
        if dep.hosts.mode == "netns":
            assert int(port) == SERVICES[host][1]  # every host its own ports: the usual one for each service
    # nothing answers at another host's address on that port: each service bound its own address only
    port = dep.address("llm").rpartition(":")[2]
    (code, _), = dep.probe("operator", "calls", calls=[{"address": f"{dep.hosts.name('client-1')}:{port}",
                                                         "peer": "llm", "method": "grpc.health.v1.Health/Check"}])["results"]
    assert code == "UNAVAILABLE"


def test_every_certificate_carries_its_hosts_name_and_address(deployment):
    dep = deployment
    shown = dep.certs_shown
    assert shown.returncode == 0, shown.stderr
    for host in HOSTS:
        line = next(line for line in shown.stdout.splitlines() if line.startswith(IDENTITY[host] + " "))
        sans = line.split("SANs: ", 1)[1].split("  expires", 1)[0].split(", ")
        assert sans[0] == _dns_identity(IDENTITY[host]) and {dep.hosts.hostname(host), dep.hosts.ip(host)} <= set(sans), line
    # TLS as any client does it (no identity pinning): dialled by host name (netns) or address, the service's
    # certificate matches what was dialled; pinned to another host's name it does not
    for host in SERVICES:
        port = dep.address(host).rpartition(":")[2]
        for dialled in dict.fromkeys((dep.address(host), f"{dep.hosts.ip(host)}:{port}")):
            got = dep.probe("operator", "tls_name", address=dialled, server_name=None)
            assert got["code"] == "OK", (host, dialled, got)
    wrong = dep.probe("operator", "tls_name", address=dep.address("llm"), server_name=dep.hosts.hostname("client-1"))
    assert wrong["code"] == "UNAVAILABLE", wrong


def _dns_identity(text: str) -> str:
    from cotune.security.identity import Identity

    return Identity.parse(text).dns_name


def test_clients_register_from_their_own_hosts_only(deployment):
    dep = deployment
    coordinator = dep.address("coordinator")
    assert dep.registered["client-1"]["code"] == "OK", dep.registered  # itself, from its host
    assert dep.registered["client-2"]["code"] == "OK", dep.registered  # by the operator
    # a valid client certificate on a host outside client_addresses: refused, although the outsider reaches the
    # coordinator (its certificate is accepted: the refusal is the address rule's)
    outsider = dep.probe("outsider", "register", coordinator=coordinator, client_id="client-3",
                         address=f"{dep.hosts.name('outsider')}:50061")
    assert outsider["code"] == "PERMISSION_DENIED" and "client_addresses" in outsider["details"], outsider
    # not even the operator may point a client at another address (here: the LLM server's)
    elsewhere = dep.probe("operator", "register", coordinator=coordinator, client_id="client-3",
                          address=dep.address("llm"))
    assert elsewhere["code"] == "PERMISSION_DENIED" and "client_addresses" in elsewhere["details"], elsewhere
    # and a client registers only itself, even at an allowed address
    other = dep.probe("client-2", "register", coordinator=coordinator, client_id="client-1",
                      address=dep.address("client-1"))
    assert other["code"] == "PERMISSION_DENIED" and "only itself" in other["details"], other
    listed = dep.probe("operator", "calls", calls=[{"address": coordinator, "peer": "coordinator",
                                                     "method": "cotune.v1.Coordinator/ListClients"}])["results"]
    assert listed == [["OK", ""]]


def test_a_client_reaches_the_other_services_but_may_call_none_of_them(deployment):
    """The authorization table as a firewall: client-1's host reaches every service (health checks answer), but as
    client/client-1 it may call nothing of the other client, the LLM server, the alignment service, nor the
    coordinator's run API; the LLM server may not call a client either (only the coordinator drives parties)."""
    dep = deployment
    calls = [
        ("client-2", "grpc.health.v1.Health/Check", "OK"),
        ("llm", "grpc.health.v1.Health/Check", "OK"),
        ("alignment", "grpc.health.v1.Health/Check", "OK"),
        ("client-2", "cotune.v1.SLMClient/Describe", GUARD_DENIAL),
        ("client-2", "cotune.v1.SLMClient/StartTask", GUARD_DENIAL),
        ("client-2", "cotune.v1.BlobStore/StatBlob", GUARD_DENIAL),
        ("llm", "cotune.v1.LLMServer/Describe", GUARD_DENIAL),
        ("llm", "cotune.v1.LLMServer/StartTask", GUARD_DENIAL),
        ("llm", "cotune.v1.BlobStore/GetBlob", GUARD_DENIAL),
        ("alignment", "cotune.v1.Alignment/BuildVocabMap", GUARD_DENIAL),
        ("coordinator", "cotune.v1.Coordinator/StartRun", GUARD_DENIAL),
        ("coordinator", "cotune.v1.Coordinator/ListClients", GUARD_DENIAL),
    ]
    results = dep.probe("client-1", "calls", calls=[{"address": dep.address(h), "peer": IDENTITY[h], "method": m}
                                                    for h, m, _ in calls])["results"]
    table = [f"client-1 -> {h:11s} {m:40s} {code} {details[:60]}" for (h, m, _), (code, details) in zip(calls, results)]
    print("\n".join(table))
    for (host, method, want), (code, details) in zip(calls, results):
        if want == "OK":
            assert code == "OK", (host, method, code, details)
        else:
            assert code == "PERMISSION_DENIED" and want in details, (host, method, code, details)
    (code, details), = dep.probe("llm", "calls", calls=[{"address": dep.address("client-1"), "peer": "client/client-1",
                                                         "method": "cotune.v1.SLMClient/Describe"}])["results"]
    assert code == "PERMISSION_DENIED" and GUARD_DENIAL in details, (code, details)


def test_a_fedmkt_run_across_tokenizers_succeeds_between_the_hosts(deployment):
    dep = deployment
    spec = {"name": "multi-host", "algorithm": "fedmkt", "rounds": 1, "max_length": TEST_PRESET.max_length,
            "fedmkt": {"setting": "heterogeneous", "top_k": 8, "ce_weight": TEST_PRESET.lam, "distill_epochs": 1}}
    got = dep.probe("operator", "run", timeout=1200, coordinator=dep.address("coordinator"), spec=spec)
    assert got["code"] == "OK", got
    run = got["run"]
    assert run["state"] == "RUN_SUCCEEDED", run["error"]
    assert sorted(run["rounds"]) == ["0", "1"]
    for rnd, rec in run["rounds"].items():
        assert set(rec["parties"]) == {"llm", *CLIENTS}, (rnd, sorted(rec["parties"]))
        for party, metrics in rec["parties"].items():
            assert np.isfinite(metrics["public_loss"]) and 0.0 <= metrics["eval_accuracy"] <= 1.0, (rnd, party)
    assert run["rounds"]["1"]["bytes_received"]["public_logits.shard"] > 0
    assert run["rounds"]["1"]["bytes_sent"]["distill.teachers.shard"] > 0
