"""Service identities and how certificates carry them.

Every party of a deployment has one identity: `coordinator`, `llm`, `alignment`, `client/<id>` (one per SLM client)
or `operator/<name>` (people and scripts that start runs). A certificate made by `cotune certs` carries its identity
twice: as the subject's common name (for people reading it) and as a DNS subject-alternative name in the reserved
domain `id.cotune` (for machines): `coordinator.id.cotune`, `llm.id.cotune`, `client-1.client.id.cotune`,
`alice.operator.id.cotune`. A server learns its caller's identity from that SAN; a caller checks that the server it
dialled is the identity it meant by asking TLS to verify the server's certificate against that DNS name (gRPC's
`ssl_target_name_override`), so a registered address can never stand in for another identity's service.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DOMAIN = "id.cotune"
SINGLETONS = ("coordinator", "llm", "alignment")  # one per deployment
NAMED = ("client", "operator")                    # many, each with a name
KINDS = SINGLETONS + NAMED
# a DNS label, lower case: names travel in certificates as DNS names, which compare case-insensitively
NAME_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")


class IdentityError(ValueError):
    pass


@dataclass(frozen=True, order=True)
class Identity:
    kind: str
    name: str = ""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise IdentityError(f"identity kind must be one of {', '.join(KINDS)}, got {self.kind!r:.40}")
        if self.kind in SINGLETONS and self.name:
            raise IdentityError(f"{self.kind} is a single identity and takes no name, got {self.name!r:.70}")
        if self.kind in NAMED and not NAME_RE.match(self.name):
            raise IdentityError(f"{self.kind} names must be 1-63 lower-case letters, digits or '-' (a DNS label, since "
                                f"certificates carry them as DNS names), got {self.name!r:.70}")

    @classmethod
    def parse(cls, text: str) -> "Identity":
        """'coordinator', 'llm', 'alignment', 'client/<id>' or 'operator/<name>'."""
        kind, _, name = text.partition("/")
        return cls(kind, name)

    def __str__(self) -> str:
        return f"{self.kind}/{self.name}" if self.name else self.kind

    @property
    def dns_name(self) -> str:
        """The SAN DNS name a certificate of this identity carries."""
        return f"{self.name}.{self.kind}.{DOMAIN}" if self.name else f"{self.kind}.{DOMAIN}"

    @classmethod
    def from_dns_name(cls, dns: str) -> "Identity | None":
        """The identity a SAN DNS name stands for, or None if the name is outside `id.cotune`."""
        dns = dns.lower().rstrip(".")
        if not dns.endswith("." + DOMAIN):
            return None
        labels = dns[: -len(DOMAIN) - 1].split(".")
        try:
            if len(labels) == 1:
                return cls(labels[0])
            if len(labels) == 2:
                return cls(labels[1], labels[0])
        except IdentityError:
            return None
        return None


def client_identity(client_id: str) -> Identity:
    return Identity("client", client_id)


COORDINATOR = Identity("coordinator")
LLM = Identity("llm")
ALIGNMENT = Identity("alignment")
