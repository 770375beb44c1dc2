"""The deployment files: Kubernetes manifests (deploy/k8s), the compose cluster (deploy/compose), the Dockerfile.

- Every Kubernetes manifest validates against the Kubernetes OpenAPI schemas (kubernetes-validate bundles them, so this
  runs offline), strictly (unknown fields are errors), for the oldest and the newest version we claim.
- The kustomize layout is rendered here (resources and JSON 6902 patches: all it uses); when kubectl or kustomize is
  on PATH, the real `kustomize build` must produce the same objects.
- The Cotune configs in the ConfigMaps, Secret templates and compose mounts parse as Cotune configs with the loader the
  services use, and agree with the manifests around them (ports, probes, mounts, certificates, addresses).
- The NetworkPolicies allow exactly the calls the authorization table allows: the expected matrix is derived from
  cotune.security.policy.POLICIES, so a policy change that the manifests do not follow fails here.
- compose.yaml validates against the compose-spec JSON schema (vendored by check-jsonschema, with its licence) and is
  wired consistently (health-gated start order, a named volume per workdir, certificates issued for each identity).
"""

from __future__ import annotations

import copy
import fnmatch
import importlib.resources
import json
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from cotune.config import AlignmentConfig, CoordinatorConfig, PartyConfig, from_dict, validate_security
from cotune.security.certs import cert_files
from cotune.security.identity import KINDS, Identity, client_identity
from cotune.security.policy import POLICIES

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
COMPOSE_DIR = REPO / "deploy" / "compose"
COMPOSE = COMPOSE_DIR / "compose.yaml"
# oldest and newest Kubernetes we claim (grpc probes are GA since 1.27); the newest is whatever the package bundles
K8S_VERSIONS = ("1.30", kubernetes_validate.latest_version())
CONFIG_CLASSES = {"coordinator": CoordinatorConfig, "llm": PartyConfig, "slm": PartyConfig, "alignment": AlignmentConfig}
KIND_LABEL = "cotune.io/identity-kind"


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


def service_config(role: str, text: str, where: str):
    """A Cotune config as `cotune serve ROLE` loads it (cotune.config.load_config's from_dict), plus the checks every
    service makes at start-up that need no files (TLS given, tokens bound to identities, the health address)."""
    cfg = from_dict(CONFIG_CLASSES[role], yaml.safe_load(text))
    validate_security(cfg, where)
    assert cfg.tls.ca and cfg.tls.cert and cfg.tls.key and not cfg.insecure, f"{where}: must take the mTLS path"
    return cfg


def port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


# -- kustomize, rendered here ---------------------------------------------------------------------------------------
def _pointer(path: str) -> list[str]:
    assert path.startswith("/"), path
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def apply_json6902(doc: dict, ops: list[dict]) -> dict:
    """RFC 6902 add / replace / remove / test (what the overlays use); anything else fails the test."""
    doc = copy.deepcopy(doc)
    for op in ops:
        *parents, last = _pointer(op["path"])
        node = doc
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        kind = op["op"]
        if isinstance(node, list):
            index = len(node) if last == "-" else int(last)
            if kind == "add":
                node.insert(index, op["value"])
            elif kind == "replace":
                node[index] = op["value"]
            elif kind == "remove":
                del node[index]
            elif kind == "test":
                assert node[index] == op["value"], op
            else:
                raise AssertionError(f"unsupported JSON 6902 op {kind!r}")
        else:
            if kind in ("replace", "remove", "test"):
                assert last in node, f"{kind} {op['path']}: no such field"
            if kind in ("add", "replace"):
                node[last] = op["value"]
            elif kind == "remove":
                del node[last]
            elif kind == "test":
                assert node[last] == op["value"], op
            else:
                raise AssertionError(f"unsupported JSON 6902 op {kind!r}")
    return doc


def _targets(target: dict, doc: dict) -> bool:
    group, _, version = doc["apiVersion"].rpartition("/")
    return all(target.get(k) in (None, v) for k, v in
               (("group", group), ("version", version), ("kind", doc["kind"]), ("name", doc["metadata"]["name"])))


def render(directory: Path) -> list[dict]:
    """`kustomize build DIRECTORY` for the subset the layout uses: resources (files or directories) and patches that
    are inline JSON 6902 with a target. Other kustomize features are refused, so using one needs this renderer taught."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unsupported = set(kustomization) - {"apiVersion", "kind", "resources", "patches"}
    assert not unsupported, f"{directory}: kustomization uses {unsupported}; teach render() (or keep the layout simple)"
    docs: list[dict] = []
    for entry in kustomization.get("resources", []):
        path = (directory / entry).resolve()
        assert path.exists(), f"{directory}/kustomization.yaml lists {entry}, which does not exist"
        docs += render(path) if path.is_dir() else load_docs(path)
    for patch in kustomization.get("patches", []):
        assert set(patch) == {"target", "patch"}, f"{directory}: only inline JSON 6902 patches with a target"
        ops = yaml.safe_load(patch["patch"])
        assert isinstance(ops, list), f"{directory}: a patch must be a JSON 6902 list of operations"
        hits = [i for i, d in enumerate(docs) if _targets(patch["target"], d)]
        assert hits, f"{directory}: patch target {patch['target']} matches nothing"
        for i in hits:
            docs[i] = apply_json6902(docs[i], ops)
    keys = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(keys) == len(set(keys)), f"{directory}: duplicate objects {sorted(k for k in keys if keys.count(k) > 1)}"
    return docs


LAYOUTS = {"base": K8S / "base", "gpu": K8S / "overlays" / "gpu"}


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: render(path) for name, path in LAYOUTS.items()}


def by_key(docs: list[dict]) -> dict[tuple[str, str], dict]:
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


# -- schema validation ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(K8S)))
def test_every_manifest_validates_against_the_kubernetes_schema(path, version):
    docs = load_docs(path)
    assert docs, f"{path} is empty"
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{path.relative_to(REPO)}: {doc['kind']} {doc['metadata']['name']}: {exc.message} "
                        f"at {'/'.join(map(str, exc.absolute_path))}")


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_rendered_layouts_validate(rendered, layout):
    for doc in rendered[layout]:
        try:
            kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{layout}: {doc['kind']} {doc['metadata']['name']}: {exc.message} "
                        f"at {'/'.join(map(str, exc.absolute_path))}")


def test_base_kustomization_lists_every_manifest_in_base():
    listed = set(yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())["resources"])
    present = {p.name for p in (K8S / "base").glob("*.yaml") if p.name != "kustomization.yaml"}
    assert listed == present, f"unlisted: {sorted(present - listed)}; missing: {sorted(listed - present)}"


def _kustomize_command() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_render_agrees_with_real_kustomize_when_available(rendered, layout):
    command = _kustomize_command()
    if command is None:
        pytest.skip("neither kustomize nor kubectl on PATH (the layout is still rendered and validated here)")
    try:
        out = subprocess.run([*command, str(LAYOUTS[layout])], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"{command[0]} did not run: {exc}")
    assert out.returncode == 0, out.stderr
    real = by_key(d for d in yaml.safe_load_all(out.stdout) if d)
    assert real == by_key(rendered[layout])


def test_gpu_overlay_puts_only_the_llm_server_on_a_gpu(rendered):
    base, gpu = by_key(rendered["base"]), by_key(rendered["gpu"])
    assert base.keys() == gpu.keys()
    llm = gpu[("StatefulSet", "llm")]["spec"]["template"]["spec"]
    container = llm["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["image"].endswith(":cuda")
    assert any(t["key"] == "nvidia.com/gpu" for t in llm["tolerations"])
    for key in base:
        if key != ("StatefulSet", "llm"):
            assert gpu[key] == base[key], f"the gpu overlay changed {key}"
    assert "nvidia.com/gpu" not in json.dumps(base[("StatefulSet", "llm")])


# -- the StatefulSets and the configs they mount --------------------------------------------------------------------
def statefulsets(docs) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == "StatefulSet"}


def role_of(sts: dict) -> str:
    args = sts["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[0] == "serve" and args[2] == "--config", args
    return args[1]


def mounted_config(sts: dict, objects: dict) -> tuple[str, str]:
    """(config text, its path in the container) from the ConfigMap mounted as the `--config` file."""
    pod = sts["spec"]["template"]["spec"]
    container = pod["containers"][0]
    config_path = Path(container["args"][3])
    mount = next(m for m in container["volumeMounts"] if Path(m["mountPath"]) == config_path.parent)
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    cm = objects[("ConfigMap", volume["configMap"]["name"])]
    return cm["data"][config_path.name], str(config_path)


def under(path: str, mount_path: str) -> bool:
    return Path(path).is_relative_to(mount_path)


def identity_of(role: str, cfg) -> Identity:
    return client_identity(cfg.party_id) if role == "slm" else Identity(role)


def test_each_statefulset_runs_its_config_consistently(rendered):
    objects = by_key(rendered["base"])
    sets = statefulsets(rendered["base"])
    assert {role_of(s) for s in sets.values()} == set(CONFIG_CLASSES), "one StatefulSet per service role"
    for name, sts in sets.items():
        role = role_of(sts)
        text, _ = mounted_config(sts, objects)
        cfg = service_config(role, text, f"ConfigMap of {name}")
        pod = sts["spec"]["template"]["spec"]
        container = pod["containers"][0]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        mounts = {m["name"]: m for m in container["volumeMounts"]}
        claims = {c["metadata"]["name"] for c in sts["spec"]["volumeClaimTemplates"]}
        assert sts["spec"]["replicas"] == 1 and sts["spec"]["serviceName"] == name
        assert port_of(cfg.listen) == ports["grpc"], name
        # the probes ask the plaintext health port, which the config opens
        assert port_of(cfg.health_address) == ports["health"], name
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["port"] == ports["health"], f"{name} {probe}"
        # the workdir (state, blobs; the coordinator's SQLite) is on a persistent claim
        assert "work" in claims and under(cfg.workdir, mounts["work"]["mountPath"]), name
        # its certificate comes from its own Secret, whose keys the config names
        certs = mounts["certs"]
        secret = next(v for v in pod["volumes"] if v["name"] == "certs")["secret"]
        assert secret["secretName"] == f"cotune-{name}-tls"
        assert certs["readOnly"] and secret["defaultMode"] & 0o007 == 0, f"{name}: keys must not be world-readable"
        for file in (cfg.tls.ca, cfg.tls.cert, cfg.tls.key):
            assert Path(file).parent == Path(certs["mountPath"]) and Path(file).name in ("ca.crt", "tls.crt", "tls.key")
        if role == "slm":
            assert cfg.party_id == name, "a client's StatefulSet, Secret and certificate are named after its party_id"
        if role in ("llm", "slm"):  # models and data from its own read-only claim
            assert "inputs" in claims and mounts["inputs"]["readOnly"]
            for path in (cfg.model.path, cfg.data.public, cfg.data.eval, cfg.data.private or cfg.data.public):
                assert under(path, mounts["inputs"]["mountPath"]), f"{name}: {path}"
        security = pod["securityContext"]
        assert security["runAsNonRoot"] and security["runAsUser"] != 0
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert pod["automountServiceAccountToken"] is False


def test_coordinator_dials_the_services_by_their_service_names(rendered):
    objects = by_key(rendered["base"])
    sets = statefulsets(rendered["base"])
    coordinator = next(s for s in sets.values() if role_of(s) == "coordinator")
    cfg = service_config("coordinator", mounted_config(coordinator, objects)[0], "coordinator")

    def target(address: str) -> str:
        host, _, port = address.rpartition(":")
        service = objects[("Service", host)]
        assert any(p["port"] == int(port) and p["name"] == "grpc" for p in service["spec"]["ports"]), address
        matched = [n for n, s in sets.items()
                   if all(s["spec"]["template"]["metadata"]["labels"].get(k) == v
                          for k, v in service["spec"]["selector"].items())]
        assert len(matched) == 1, f"{address}: Service {host} selects {matched}"
        return matched[0]

    assert role_of(sets[target(cfg.llm)]) == "llm"
    assert role_of(sets[target(cfg.alignment)]) == "alignment"
    clients = {n for n, s in sets.items() if role_of(s) == "slm"}
    assert {e.client_id for e in cfg.clients} == clients
    for entry in cfg.clients:
        assert target(entry.address) == entry.client_id
        assert any(fnmatch.fnmatch(entry.address, p) for p in cfg.client_addresses)


def test_secret_templates_hold_valid_configs_and_name_every_secret_the_pods_mount(rendered):
    docs = load_docs(K8S / "secrets.example.yaml")
    configs = [d for d in docs if "config.yaml" in d.get("stringData", {})]
    assert configs, "the template shows a config kept in a Secret (for tokens)"
    for doc in configs:
        name = doc["metadata"]["name"].removeprefix("cotune-").removesuffix("-config")
        role = role_of(statefulsets(rendered["base"])[name])
        cfg = service_config(role, doc["stringData"]["config.yaml"], doc["metadata"]["name"])
        assert cfg.auth.tokens or cfg.auth.peer_tokens
    # the peer tokens of the coordinator's template match what the LLM server's template accepts from it
    parsed = {d["metadata"]["name"]: yaml.safe_load(d["stringData"]["config.yaml"]) for d in configs}
    coordinator_to_llm = parsed["cotune-coordinator-config"]["auth"]["peer_tokens"]["llm"]
    assert parsed["cotune-llm-config"]["auth"]["tokens"][coordinator_to_llm] == "coordinator"
    # the documented loop creates a Secret for every certificate a pod mounts
    header = (K8S / "secrets.example.yaml").read_text()
    loop = re.search(r"for s in (.*?); do", header, re.S).group(1).replace("#", "").replace("\\", "").split()
    made = {pair.split(":")[0] for pair in loop}
    pods = [*statefulsets(rendered["base"]).values(), *job_pods()]
    mounted = {v["secret"]["secretName"] for p in pods for v in p["spec"]["template"]["spec"]["volumes"] if "secret" in v}
    assert mounted == {f"cotune-{m}-tls" for m in made}
    for pair in loop:  # each is the file stem `cotune certs` writes for that identity
        name, stem = pair.split(":")
        identity = {"operator": "operator/admin"}.get(name, f"client/{name}" if name.startswith("client-") else name)
        assert cert_files("certs", Identity.parse(identity)).cert.name == f"{stem}.crt"


def job_pods() -> list[dict]:
    return [d for d in load_docs(K8S / "examples" / "start-run.yaml") if d["kind"] == "Job"]


def test_example_run_job_acts_as_an_operator_with_a_valid_spec():
    from cotune.algorithms.config import spec_from_dict

    docs = load_docs(K8S / "examples" / "start-run.yaml")
    spec = next(d for d in docs if d["kind"] == "ConfigMap")["data"]["run.yaml"]
    assert spec_from_dict(yaml.safe_load(spec), where="start-run.yaml").algorithm == "fedmkt"
    (job,) = job_pods()
    assert job["spec"]["template"]["metadata"]["labels"][KIND_LABEL] == "operator"
    env = {e["name"]: e["value"] for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert port_of(env["COTUNE_COORDINATOR"]) == 50041


# -- NetworkPolicies against the authorization table -----------------------------------------------------------------
def allowed_kinds(role: str) -> set[str]:
    """Identity kinds that may call some RPC of `role` on its main port. Health and reflection (open to any valid
    certificate) are left out: the health port serves the former to everyone."""
    return {kind for method, kinds in POLICIES[role].items() if not method.startswith("grpc.") for kind in kinds}


NAMESPACE = {"kubernetes.io/metadata.name": "cotune"}


class Pod:
    def __init__(self, name: str, labels: dict, ports: dict | None = None, namespace: dict = NAMESPACE):
        self.name, self.labels, self.ports, self.namespace = name, labels, ports or {}, namespace


def selects(selector: dict | None, labels: dict) -> bool:
    if selector is None:
        return False
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {"In": key in labels and labels[key] in values, "NotIn": labels.get(key) not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


def peer_matches(peer: dict, pod: Pod | None) -> bool:
    assert "ipBlock" not in peer, "teach the test ipBlock before using it"
    if pod is None:  # the kubelet, or anything that is not a pod
        return False
    ns = peer.get("namespaceSelector")
    ns_ok = selects(ns, pod.namespace) if ns is not None else pod.namespace == NAMESPACE
    return ns_ok and ("podSelector" not in peer or selects(peer["podSelector"], pod.labels))


def port_matches(ports: list | None, dest: Pod, port: int) -> bool:
    if not ports:
        return True
    for p in ports:
        if p.get("protocol", "TCP") != "TCP":
            continue
        if "port" not in p:
            return True
        number = dest.ports.get(p["port"]) if isinstance(p["port"], str) else p["port"]
        if number is not None and number <= port <= p.get("endPort", number):
            return True
    return False


def direction_allowed(policies, direction: str, subject: Pod, other: Pod | None, dest: Pod, port: int) -> bool:
    """Whether the policies that select `subject` (the destination for Ingress, the source for Egress) let the
    connection through in that direction (Kubernetes semantics: not selected = not isolated)."""
    key, peers = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    isolating = [p for p in policies if direction in p["spec"]["policyTypes"] and selects(p["spec"]["podSelector"], subject.labels)]
    if not isolating:
        return True
    return any(port_matches(rule.get("ports"), dest, port) and (not rule.get(peers) or any(peer_matches(q, other) for q in rule[peers]))
               for p in isolating for rule in p["spec"].get(key) or [])


def ingress_ok(policies, src: Pod | None, dst: Pod, port: int) -> bool:
    return direction_allowed(policies, "Ingress", dst, src, dst, port)


def egress_ok(policies, src: Pod | None, dst: Pod, port: int) -> bool:
    return src is None or direction_allowed(policies, "Egress", src, dst, dst, port)


@pytest.fixture(scope="module")
def network(rendered):
    policies = [d for d in rendered["base"] if d["kind"] == "NetworkPolicy"]
    assert policies
    pods = {}
    for name, sts in statefulsets(rendered["base"]).items():
        template = sts["spec"]["template"]
        ports = {p["name"]: p["containerPort"] for p in template["spec"]["containers"][0]["ports"]}
        pods[name] = (role_of(sts), Pod(name, template["metadata"]["labels"], ports))
    (job,) = job_pods()
    operator = Pod("operator", job["spec"]["template"]["metadata"]["labels"])
    outsider = Pod("outsider", {"app": "something-else"})  # another pod of the namespace
    return policies, pods, [operator, outsider]


def test_every_identity_kind_has_pods_to_test():
    assert set(KINDS) == {"coordinator", "llm", "alignment", "client", "operator"}, \
        "a new identity kind: give its pods a cotune.io/identity-kind label and NetworkPolicies"


def test_main_ports_accept_exactly_the_callers_the_authorization_table_allows(network):
    policies, pods, others = network
    sources = [p for _, p in pods.values()] + others
    checked = 0
    for role, dst in pods.values():
        expected = allowed_kinds(role)
        grpc_port = dst.ports["grpc"]
        for src in sources:
            if src is dst:
                continue
            kind = src.labels.get(KIND_LABEL)
            want = kind in expected
            # each layer alone enforces the table: the destination's ingress and the source's egress
            assert ingress_ok(policies, src, dst, grpc_port) == want, \
                f"ingress {src.name} ({kind}) -> {dst.name} ({role}) should be {'allowed' if want else 'denied'}"
            if src.labels.get("app.kubernetes.io/part-of") == "cotune":  # others' egress is not ours to police
                assert egress_ok(policies, src, dst, grpc_port) == want, \
                    f"egress {src.name} ({kind}) -> {dst.name} ({role}) should be {'allowed' if want else 'denied'}"
            checked += 1
        assert not ingress_ok(policies, None, dst, grpc_port), f"{dst.name}: main port open to non-pods"
    assert checked >= 20


def test_health_port_is_open_to_anyone_and_nothing_else_is(network):
    policies, pods, others = network
    for _, dst in pods.values():
        for src in [None, *others, *(p for _, p in pods.values() if p is not dst)]:
            assert ingress_ok(policies, src, dst, dst.ports["health"]), f"health of {dst.name} from {src and src.name}"
            assert not ingress_ok(policies, src, dst, 9999), f"{dst.name}: port 9999 open"


def test_services_that_dial_no_one_have_no_egress(network):
    """The LLM server and the alignment service never dial out (nor does any kind whose identity the table lets call
    nothing): no egress at all, not even DNS, so what they hold cannot leave except in answers to the coordinator."""
    policies, pods, others = network
    dialers = {kind for role in POLICIES for kind in allowed_kinds(role)}
    world = [*others, *(p for _, p in pods.values()), Pod("kube-dns", {"k8s-app": "kube-dns"}, {"dns": 53},
                                                          {"kubernetes.io/metadata.name": "kube-system"})]
    for role, src in pods.values():
        kind = src.labels[KIND_LABEL]
        if kind in dialers:
            continue
        for dst in world:
            if dst is not src:
                for port in (53, *dst.ports.values()):
                    assert not egress_ok(policies, src, dst, port), f"{src.name} may dial {dst.name}:{port}"


# -- compose -----------------------------------------------------------------------------------------------------------
def compose_schema() -> dict:
    """The compose-spec JSON schema as check-jsonschema vendors it (Apache-2.0, licence beside it in that package)."""
    vendor = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    return json.loads((vendor / "compose-spec.json").read_text())


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def interpolate(value: str) -> str:
    """${VAR:-default} and ${VAR} as compose reads them with nothing set in the environment."""
    return re.sub(r"\$\{\w+(?::?-([^}]*))?\}", lambda m: m.group(1) or "", value)


@pytest.mark.parametrize("path", sorted(COMPOSE_DIR.glob("compose*.yaml")), ids=lambda p: p.name)
def test_compose_files_validate_against_the_compose_spec_schema(path):
    schema = compose_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = sorted(validator.iter_errors(yaml.safe_load(path.read_text())), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


def test_compose_gpu_override_touches_only_the_llm_server(compose):
    override = yaml.safe_load((COMPOSE_DIR / "compose.gpu.yaml").read_text())
    assert set(override["services"]) == {"llm"} and "llm" in compose["services"]
    llm = override["services"]["llm"]
    assert llm["build"]["args"]["VARIANT"] == "cuda"
    assert llm["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


def test_compose_schema_check_catches_a_mistake(compose):
    bad = copy.deepcopy(compose)
    bad["services"]["llm"]["depends_on"]["certs"]["condition"] = "service_ready"  # not a compose condition
    bad["services"]["coordinator"]["healthcheck"] = {"test": "x", "intervall": "5s"}
    schema = compose_schema()
    assert len(list(jsonschema.validators.validator_for(schema)(schema).iter_errors(bad))) >= 2


def compose_services(compose) -> dict[str, tuple[str, dict, object]]:
    """name -> (role, service, parsed config) for every service that runs `cotune serve`."""
    out = {}
    for name, svc in compose["services"].items():
        command = svc.get("command") or []
        if command[:1] != ["serve"]:
            continue
        config_path = command[command.index("--config") + 1]
        source = next(v.split(":")[0] for v in svc["volumes"] if v.split(":")[1] == config_path)
        text = (COMPOSE_DIR / source).read_text()
        out[name] = (command[1], svc, service_config(command[1], text, f"compose {name}"))
    return out


def mounts(svc: dict) -> dict[str, tuple[str, bool]]:
    """container path -> (source, read-only) of a service's short-syntax volumes."""
    out = {}
    for v in svc.get("volumes", []):
        parts = interpolate(v).split(":")
        out[parts[1]] = (parts[0], parts[2:] == ["ro"])
    return out


def test_compose_runs_every_service_with_a_valid_config(compose):
    services = compose_services(compose)
    assert sorted(role for role, _, _ in services.values()) == ["alignment", "coordinator", "llm", "slm", "slm"]
    workdir_volumes = []
    for name, (role, svc, cfg) in services.items():
        m = mounts(svc)
        # the workdir is a named volume of its own
        volume = next(src for path, (src, _) in m.items() if under(cfg.workdir, path))
        assert volume in compose["volumes"], f"{name}: workdir on {volume}, not a named volume"
        workdir_volumes.append(volume)
        # the healthcheck asks the plaintext health port the config opens
        test = svc["healthcheck"]["test"]
        assert test[:4] == ["CMD", "python", "-m", "cotune.healthcheck"] and port_of(test[4]) == port_of(cfg.health_address)
        assert not svc["healthcheck"].get("disable")
        # certificates from the read-only certs volume, named for this service's identity
        certs_dir = Path(cfg.tls.cert).parent
        assert m[str(certs_dir)] == ("certs", True), f"{name}: certificates must come read-only from the certs volume"
        expected = cert_files(certs_dir, identity_of(role, cfg))
        assert (Path(cfg.tls.ca), Path(cfg.tls.cert), Path(cfg.tls.key)) == (expected.ca, expected.cert, expected.key)
        # a party sees the shared sets and its own folder only (no client mounts another's private shard)
        if role in ("llm", "slm"):
            own = m["/inputs/own"]
            assert own[1] and own[0].endswith(f"/{name}") and m["/inputs/shared"][1]
            for path in (cfg.model.path, cfg.data.private or cfg.data.public):
                assert under(path, "/inputs/own") or under(path, "/inputs/shared")
            assert under(cfg.data.public, "/inputs/shared") and under(cfg.data.eval, "/inputs/shared")
    assert len(workdir_volumes) == len(set(workdir_volumes)), "two services share a workdir volume"


def test_compose_start_order_is_health_gated(compose):
    services = compose_services(compose)
    names = set(compose["services"])
    for name, svc in compose["services"].items():
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert dep in names, f"{name} depends on unknown {dep}"
            if cond["condition"] == "service_healthy":
                assert dep in services and not compose["services"][dep]["healthcheck"].get("disable")
        if name in services:
            assert svc["depends_on"]["certs"]["condition"] == "service_completed_successfully"
    coordinator = next(n for n, (role, _, _) in services.items() if role == "coordinator")
    waits_for = {d for d, c in compose["services"][coordinator]["depends_on"].items() if c["condition"] == "service_healthy"}
    assert waits_for == set(services) - {coordinator}, "the coordinator starts once every other service is SERVING"
    assert compose["services"]["cli"]["depends_on"] == {coordinator: {"condition": "service_healthy"}}


def test_compose_certs_are_issued_for_every_identity_in_use_and_the_ca_key_stays_out(compose):
    services = compose_services(compose)
    init = compose["services"]["certs"]
    script = " ".join(init["command"])
    issued = re.search(r"cotune certs --dir (\S+) (.*?) &&", script)
    ca_dir, identities = Path(issued.group(1)), {Identity.parse(t) for t in issued.group(2).split()}
    for name, (role, _, cfg) in services.items():
        assert identity_of(role, cfg) in identities, f"no certificate issued for {name}"
    env = compose["services"]["cli"]["environment"]
    operator = Path(env["COTUNE_TLS_CERT"]).stem.replace("-", "/", 1)
    assert Identity.parse(operator).kind == "operator" and Identity.parse(operator) in identities
    # the CA (with its key) is only in the `ca` volume, mounted by the init service alone; the key is removed from certs
    assert mounts(init)[str(ca_dir.parent)] == ("ca", False)
    assert "rm -f /etc/cotune/certs/ca.key" in script
    for name, svc in compose["services"].items():
        if name != "certs":
            assert all(src != "ca" for src, _ in mounts(svc).values()), f"{name} mounts the CA volume"


def test_compose_coordinator_dials_the_compose_services(compose):
    services = compose_services(compose)
    (cfg,) = [c for _, (role, _, c) in services.items() if role == "coordinator"]

    def listen_of(address: str) -> tuple[str, object]:
        host = address.rpartition(":")[0]
        role, _, target = services[host]
        assert port_of(target.listen) == port_of(address), address
        return role, target

    assert listen_of(cfg.llm)[0] == "llm" and listen_of(cfg.alignment)[0] == "alignment"
    for entry in cfg.clients:
        role, target = listen_of(entry.address)
        assert role == "slm" and target.party_id == entry.client_id
        assert any(fnmatch.fnmatch(entry.address, p) for p in cfg.client_addresses)


def test_compose_run_spec_mount_is_a_valid_spec(compose):
    from cotune.algorithms.config import spec_from_dict

    cli = compose["services"]["cli"]
    for container_path, (source, read_only) in mounts(cli).items():
        if container_path.startswith("/specs/"):
            assert read_only
            spec = spec_from_dict(yaml.safe_load((COMPOSE_DIR / source).read_text()), where=source)
            assert spec.algorithm


# -- the image ---------------------------------------------------------------------------------------------------------
def dockerfile_stages() -> list[list]:
    dockerfile = pytest.importorskip("dockerfile")  # Docker's own parser (dev extra)
    stages: list[list] = []
    for cmd in dockerfile.parse_file(str(REPO / "Dockerfile")):
        if cmd.cmd == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(cmd)
    return stages


def test_dockerfile_is_multi_stage_non_root_without_compilers_and_runs_the_cli():
    stages = dockerfile_stages()
    assert len(stages) >= 2
    build, final = stages[0], stages[-1]
    text = lambda stage, kind: [" ".join(c.value) for c in stage if c.cmd == kind]  # noqa: E731
    # a CPU build by default, CUDA by build argument, chosen where torch is installed
    assert "VARIANT=cpu" in text(build, "ARG")
    torch = next(r for r in text(build, "RUN") if "torch==" in r)
    assert "cpu)" in torch and "cuda)" in torch
    # the final stage: the environment copied from the build, no compilers or package installs, a non-root user
    assert any(c.cmd == "COPY" and "--from=build" in c.flags for c in final)
    for run in text(final, "RUN"):
        assert not re.search(r"apt-get install|gcc|build-essential|pip install", run), run
    user = text(final, "USER")
    assert user and user[-1].split(":")[0] not in ("0", "root")
    assert text(final, "ENTRYPOINT") == ["cotune"]
    # every package the project installs is copied in and let through .dockerignore
    import tomllib

    include = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {p.rstrip("*") for p in include}
    copied = {c.value[0] for c in build if c.cmd == "COPY"}
    ignore = (REPO / ".dockerignore").read_text().split()
    assert ignore[ignore.index("*") if "*" in ignore else 0] == "*", ".dockerignore lets in only what the image needs"
    for package in packages:
        assert package in copied, f"Dockerfile does not copy {package}"
        assert f"!{package}/" in ignore, f".dockerignore keeps out {package}"
