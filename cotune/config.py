"""Service and cluster configuration: YAML files mapped onto dataclasses, with strict validation.

Unknown keys and wrong types are errors naming the offending key, so a typo never silently falls back
to a default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ConfigError(ValueError):
    pass


@dataclass
class TlsConfig:
    ca: str = ""
    cert: str = ""
    key: str = ""


@dataclass
class AuthConfig:
    """Bearer tokens, each bound to one identity ('coordinator', 'client/<id>', 'operator/<name>', ...). Optional
    beside mTLS (a token must then name the certificate's identity); the way callers identify themselves on an
    `insecure: true` loopback host."""

    tokens: dict[str, str] = field(default_factory=dict)       # tokens this service accepts: token -> its identity
    peer_tokens: dict[str, str] = field(default_factory=dict)  # tokens it presents when dialling: peer identity -> token


def validate_security(cfg, what: str) -> None:
    """Secure by default: a service needs its TLS files, or the explicit `insecure: true` (plaintext, loopback only)."""
    from cotune.security.identity import Identity, IdentityError

    tls = cfg.tls
    given = [name for name in ("ca", "cert", "key") if getattr(tls, name)]
    if given and len(given) != 3:
        raise ConfigError(f"{what}: tls needs ca, cert and key together (got only {', '.join(given)})")
    if given and cfg.insecure:
        raise ConfigError(f"{what}: `insecure: true` contradicts the tls files given; remove one of them")
    if not given and not cfg.insecure:
        raise ConfigError(f"{what}: no TLS configured. Set tls.ca, tls.cert and tls.key (`cotune certs` makes them), "
                          "or `insecure: true` for plaintext on a loopback address (development on one machine only)")
    validate_side_listeners(cfg, what)
    pairs = [("auth.tokens", token, identity) for token, identity in cfg.auth.tokens.items()]
    pairs += [("auth.peer_tokens", token, identity) for identity, token in cfg.auth.peer_tokens.items()]
    for section, token, identity in pairs:
        try:
            Identity.parse(identity)
        except IdentityError as exc:
            raise ConfigError(f"{what}: {section}: {exc}") from exc
        if len(token) < 16:
            raise ConfigError(f"{what}: {section}: the token for {identity} is shorter than 16 characters")


def split_host_port(address: str, where: str) -> tuple[str, int]:
    """'HOST:PORT' (HOST a name, an IPv4 address or a bracketed IPv6 address) -> (HOST, PORT), or a ConfigError."""
    host, sep, port = address.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    if bracketed:
        host = host[1:-1]
    if (not sep or not host or (":" in host and not bracketed) or any(c.isspace() for c in host)
            or not port.isdigit() or int(port) > 65535):
        raise ConfigError(f"{where}: expected HOST:PORT (e.g. 0.0.0.0:8081 or [::]:8081), got {address!r:.80}")
    return host, int(port)


# the optional plaintext listeners beside a service's main port, each needing a port of its own: `health_address`
# serves grpc.health.v1 only (cotune.rpc.server), for probes that cannot present a client certificate (Kubernetes'
# grpc probes, compose healthchecks); `metrics_address` serves Prometheus metrics over HTTP (cotune.metrics).
# Empty = off; port 0 binds a free port.
SIDE_LISTENERS = {"health_address": "the health port", "metrics_address": "the metrics endpoint"}


def validate_side_listeners(cfg, what: str) -> None:
    """Each side listener that is set is HOST:PORT, on a port that neither the main port (`listen`) nor the side
    listener before it uses."""
    taken = {"listen": cfg.listen}
    for key, purpose in SIDE_LISTENERS.items():
        address = getattr(cfg, key)
        if not address:
            continue
        _, port = split_host_port(address, f"{what}: {key}")
        for other_key, other in taken.items():
            if port and other.rpartition(":")[2] == str(port):
                raise ConfigError(f"{what}: {key} {address} uses the port of {other_key} ({other}); {purpose} is a "
                                  "separate plaintext listener and needs a port of its own")
        taken[key] = address


@dataclass
class ModelConfig:
    path: str = ""            # HF model directory or .gguf file
    name: str = ""            # display name; defaults to the path's name
    device: str = "auto"      # auto | cpu | cuda | cuda:N | auto-multi | cuda:N,M,... (one model across GPUs)
    dtype: str = "auto"       # auto | fp32 | bf16 | fp16
    cache_dir: str = ""       # where GGUF models are cached as HF directories
    companion_slm_path: str = ""  # LLM server, FedCoLLM: the SLM the clients train (HF directory or .gguf), held here
                                  # as a second model for co-distillation; must share the LLM's tokenizer
    companion_slm_name: str = ""  # display name; defaults to the path's name


@dataclass
class LoraConfig:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    seed: int = 0


@dataclass
class TrainingConfig:
    lr: float = 2e-4
    batch_size: int = 8
    max_length: int = 256
    seed: int = 0


@dataclass
class DataConfig:
    public: str = ""          # JSONL of Example rows (cotune.data)
    private: str = ""         # this party's private training data (SLM clients)
    eval: str = ""            # held-out evaluation set


@dataclass
class EvaluationConfig:
    """How a party scores its eval set (cotune.party.tasks.evaluate). metric "" = multiple choice by log-likelihood
    (the eval set's items carry choices); "exact_match" (GSM8K's final number) or "rouge_l" (ROUGE-L F) = greedy
    generation of up to max_new_tokens tokens, cut at the first of `stop`, scored against each item's response.
    cotune.data.tasks.evaluation_config_for_task(task) gives the section that fits a task."""

    mc_scoring: str = "shared_prompt"  # multiple choice: shared_prompt (prompt run once per item) | per_choice
    metric: str = ""             # "" (multiple choice) | exact_match | rouge_l (generate and score)
    max_new_tokens: int = 256    # generation: tokens generated per item at most
    stop: list[str] = field(default_factory=list)  # generation: the text is cut at the first of these
    # keep evaluations here by the content of the evaluated model, items and settings, and answer a repeat from it
    # (cotune.lm.eval_cache); "" = off. The experiment harness sets it: every cell's round 0 evaluates the same models
    cache_dir: str = ""

    def validate(self) -> None:
        if self.mc_scoring not in ("shared_prompt", "per_choice"):
            raise ConfigError(f"evaluation.mc_scoring must be shared_prompt or per_choice, got {self.mc_scoring!r}")
        from cotune.data.tasks import GENERATION_METRICS

        if self.metric and self.metric not in GENERATION_METRICS:
            raise ConfigError("evaluation.metric must be empty (multiple choice, scored by log-likelihood), "
                              f"exact_match (GSM8K) or rouge_l (DialogSum), got {self.metric!r}")
        if not 1 <= self.max_new_tokens <= 4096:
            raise ConfigError(f"evaluation.max_new_tokens must be in 1..4096, got {self.max_new_tokens}")
        for i, s in enumerate(self.stop):
            if not s:
                raise ConfigError(f"evaluation.stop[{i}] is empty; a stop sequence must have at least one character")
        if not self.metric and self.stop:
            raise ConfigError("evaluation.stop is set but evaluation.metric is not: stop sequences end generation, "
                              "which only a generation metric (exact_match, rouge_l) uses")


@dataclass
class PartyConfig:
    party_id: str = ""
    listen: str = "127.0.0.1:0"
    health_address: str = ""  # plaintext listener serving grpc.health.v1 only (probes without a certificate); empty = off
    metrics_address: str = ""  # plaintext HTTP listener serving Prometheus metrics (cotune.metrics); empty = off
    workdir: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    companion_lora: LoraConfig = field(default_factory=LoraConfig)  # the companion SLM's LoRA: match the clients' `lora`
    training: TrainingConfig = field(default_factory=TrainingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    insecure: bool = False    # plaintext on a loopback address, for development only (default: mTLS required)
    blob_quota_gib: float = 0.0  # disk quota of the blob store; 0 = what it holds at start + 80% of the free space
    auth: AuthConfig = field(default_factory=AuthConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)

    def validate(self, role: str) -> None:
        if not self.party_id:
            raise ConfigError("party_id is required")
        if role == "slm":
            from cotune.security.identity import NAME_RE

            if not NAME_RE.match(self.party_id):
                raise ConfigError(f"party_id of an SLM client must be 1-63 lower-case letters, digits or '-' (it is the "
                                  f"client's identity, client/<party_id>, carried in its certificate), got "
                                  f"{self.party_id!r:.70}")
        self.evaluation.validate()
        if not self.workdir:
            raise ConfigError("workdir is required (blob store and caches live there)")
        if not self.model.path:
            raise ConfigError("model.path is required (an HF model directory or a .gguf file)")
        if not self.data.public:
            raise ConfigError("data.public is required (every party holds the public set)")
        if role == "slm" and not self.data.private:
            raise ConfigError("data.private is required for an SLM client")
        for name in ("public", "private", "eval"):
            value = getattr(self.data, name)
            if value and not Path(value).exists():
                raise ConfigError(f"data.{name}: file not found: {value}")
        if not Path(self.model.path).exists():
            raise ConfigError(f"model.path: not found: {self.model.path}")
        if self.model.companion_slm_path:
            if role != "llm":
                raise ConfigError("model.companion_slm_path is for the LLM server (FedCoLLM); an SLM client trains its own model")
            if not Path(self.model.companion_slm_path).exists():
                raise ConfigError(f"model.companion_slm_path: not found: {self.model.companion_slm_path}")


@dataclass
class AlignmentConfig:
    listen: str = "127.0.0.1:0"
    health_address: str = ""  # plaintext listener serving grpc.health.v1 only (probes without a certificate); empty = off
    metrics_address: str = ""  # plaintext HTTP listener serving Prometheus metrics (cotune.metrics); empty = off
    workdir: str = ""
    workers: int = 1          # concurrent builds; each build uses every core
    tls: TlsConfig = field(default_factory=TlsConfig)
    insecure: bool = False
    blob_quota_gib: float = 0.0
    auth: AuthConfig = field(default_factory=AuthConfig)

    def validate(self) -> None:
        if not self.workdir:
            raise ConfigError("workdir is required (the map cache lives there)")


@dataclass
class ClientEntry:
    client_id: str = ""
    address: str = ""


@dataclass
class CoordinatorConfig:
    listen: str = "127.0.0.1:0"
    health_address: str = ""  # plaintext listener serving grpc.health.v1 only (probes without a certificate); empty = off
    metrics_address: str = ""  # plaintext HTTP listener serving Prometheus metrics (cotune.metrics); empty = off
    workdir: str = ""
    llm: str = ""             # address of the LLM server
    alignment: str = ""       # address of the alignment service
    clients: list[ClientEntry] = field(default_factory=list)  # clients known at start (more can RegisterClient)
    # where RegisterClient may point a client (fnmatch patterns of host:port); the configured clients' own addresses
    # are always allowed. The coordinator dials what is registered, so this keeps it from being told to dial anywhere.
    client_addresses: list[str] = field(default_factory=lambda: ["127.0.0.1:*", "[::1]:*"])
    tls: TlsConfig = field(default_factory=TlsConfig)
    insecure: bool = False
    blob_quota_gib: float = 0.0
    auth: AuthConfig = field(default_factory=AuthConfig)
    # how long a run waits for a party (or the alignment service) that is unreachable or still loading its model before
    # giving up on it: a client is then dropped from the step (quorum permitting), the LLM server or the alignment
    # service fail the run. Longer than a model load, so a restarted service is waited for.
    party_grace_s: float = 900.0

    def validate(self) -> None:
        if not self.workdir:
            raise ConfigError("workdir is required (state database and artifact store live there)")
        if not 0 <= self.party_grace_s <= 7 * 24 * 3600:
            raise ConfigError(f"party_grace_s must be in 0..604800 seconds, got {self.party_grace_s}")
        if not self.llm:
            raise ConfigError("llm is required: the address of the LLM server")
        for i, entry in enumerate(self.clients):
            if not entry.client_id or not entry.address:
                raise ConfigError(f"clients[{i}]: client_id and address are both required")


def from_dict(cls, data, where: str = ""):
    """Build dataclass `cls` from plain data, rejecting unknown keys and mistyped values."""
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where or 'config'}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, f"{where}.{name}" if where else name)
    return cls(**kwargs)


def _coerce(tp, value, where):
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list")
        (item,) = typing.get_args(tp)
        return [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping")
        return {str(k): str(v) for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        return value
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    if tp is bool and isinstance(value, bool):
        return value
    raise ConfigError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {value!r:.60}")


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    return data or {}


def load_config(cls, path: str | Path):
    return from_dict(cls, load_yaml(path))


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)
