"""Development certificates for service identities: a local CA and one certificate per identity.

`ensure` is the "first use" path of local clusters; `cotune certs` (certs_cli) the hand-driven one. Every certificate
carries its identity as subject CN (`client/client-1`) and as the first SAN DNS name (`client-1.client.id.cotune`),
then the hosts it is reachable at, so TLS hostname checks also work when dialling those hosts directly.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import re
import tempfile
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterable, Iterator

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cotune.security.identity import DOMAIN, Identity

CA_CERT, CA_KEY, LOCK = "ca.crt", "ca.key", ".lock"
DEFAULT_HOSTS = ("localhost", "127.0.0.1")
RENEW_BEFORE = timedelta(days=7)
# backdate certificates a little so a peer whose clock is slightly behind still accepts them
CLOCK_SKEW = timedelta(minutes=5)
_HOST_RE = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?)*$")


class CertError(ValueError):
    pass


@dataclass(frozen=True)
class CertFiles:
    ca: Path
    cert: Path
    key: Path


def cert_stem(identity: Identity) -> str:
    return str(identity).replace("/", "-")


def cert_files(directory: str | os.PathLike, identity: Identity) -> CertFiles:
    d, stem = Path(directory), cert_stem(identity)
    return CertFiles(d / CA_CERT, d / f"{stem}.crt", d / f"{stem}.key")


# -- files ------------------------------------------------------------------------------------------------------
def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    # mkstemp creates the file 0600, so a key is never readable by others, not even while being written
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if mode != 0o600:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    _write_atomic(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()), 0o600)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    _write_atomic(path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _mkdir(directory: str | os.PathLike) -> Path:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    return d


@contextlib.contextmanager
def locked(directory: str | os.PathLike) -> Iterator[Path]:
    """Holds an exclusive lock on `<directory>/.lock` (creating the directory), so concurrent writers serialize."""
    d = _mkdir(directory)
    with open(d / LOCK, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield d
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError as exc:
        raise CertError(f"{path}: not a PEM certificate ({exc})") from exc


def _load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    missing = [p.name for p in (cert_path, key_path) if not p.exists()]
    if missing:
        raise CertError(f"no CA in {directory} ({' and '.join(missing)} missing): create one with "
                        f"`cotune certs --dir {directory} IDENTITY...` (or certs.make_ca)")
    cert = _load_cert(cert_path)
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise CertError(f"{key_path}: not an unencrypted PEM private key ({exc})") from exc
    if _spki(key.public_key()) != _spki(cert.public_key()):
        raise CertError(f"{key_path} is not the key of {cert_path}: restore the matching pair, or remove both "
                        "to start a new CA (every certificate must then be reissued)")
    return cert, key



def _spki(public_key) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _now() -> datetime:
    return datetime.now(timezone.utc)


# -- CA and issuing ---------------------------------------------------------------------------------------------
def make_ca(directory: str | os.PathLike, *, days: int = 3650, common_name: str = "Cotune development CA",
            overwrite: bool = False) -> tuple[Path, Path]:
    """Creates `ca.crt` and `ca.key` in `directory`; returns their paths. Refuses to replace an existing CA unless
    `overwrite` (replacing it invalidates every certificate it signed)."""
    d = _mkdir(directory)
    cert_path, key_path = d / CA_CERT, d / CA_KEY
    if cert_path.exists() and not overwrite:
        raise CertError(f"{cert_path} already exists: every certificate in {d} is signed by it. Pass overwrite=True "
                        "to replace it (then reissue every certificate), or use another directory")
    if days <= 0:
        raise CertError(f"CA validity must be a positive number of days, got {days}")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    cert = (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW).not_valid_after(now + timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    # key first: a crash in between leaves no ca.crt, so the next make_ca/ensure simply starts over
    _write_key(key_path, key)
    _write_cert(cert_path, cert)
    return cert_path, key_path


def _host_san(host: str) -> x509.GeneralName:
    host = host.strip()
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not _HOST_RE.match(host):
        raise CertError(f"host {host!r:.80} is neither an IP address nor a DNS name")
    lower = host.lower().rstrip(".")
    # a host inside id.cotune would let this certificate pass for another identity
    if lower == DOMAIN or lower.endswith("." + DOMAIN):
        raise CertError(f"host {host!r} is in the reserved identity domain {DOMAIN}; hosts must be real "
                        "addresses (identities are added by `cotune certs` itself)")
    return x509.DNSName(lower)


def _sans(identity: Identity, hosts: Iterable[str]) -> list[x509.GeneralName]:
    sans: list[x509.GeneralName] = [x509.DNSName(identity.dns_name)]
    for host in hosts:
        san = _host_san(host)
        if san not in sans:
            sans.append(san)
    return sans


def issue(directory: str | os.PathLike, identity: Identity, *, hosts: Iterable[str] = DEFAULT_HOSTS, days: int = 825,
          not_before: datetime | None = None, not_after: datetime | None = None) -> CertFiles:
    """Issues (or replaces) the certificate and key of `identity`, signed by the CA in `directory`."""
    d = Path(directory)
    ca_cert, ca_key = _load_ca(d)
    sans = _sans(identity, hosts)
    now = _now()
    not_before = not_before or now - CLOCK_SKEW
    not_after = not_after or min(now + timedelta(days=days), ca_cert.not_valid_after_utc)
    if not_after <= not_before:
        raise CertError(f"certificate for {identity} would expire ({not_after:%Y-%m-%d}) before it starts "
                        f"({not_before:%Y-%m-%d}); is the CA in {d} expired? Replace it with a new one")
    key = ec.generate_private_key(ec.SECP256R1())
    ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(identity))]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before).not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=True, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
            .sign(ca_key, hashes.SHA256()))
    files = cert_files(d, identity)
    # key first: a crash in between leaves the old certificate with a new key, which `problems` flags as a mismatch
    _write_key(files.key, key)
    _write_cert(files.cert, cert)
    return files


# -- inspecting -------------------------------------------------------------------------------------------------
def san_strings(cert: x509.Certificate) -> list[str]:
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(n.value) for n in names if isinstance(n, (x509.DNSName, x509.IPAddress))]


def identity_of_cert(pem_bytes: bytes) -> Identity | None:
    """The identity a certificate's SAN DNS names carry; None if none, or if they name more than one identity."""
    cert = x509.load_pem_x509_certificate(pem_bytes)
    found = {i for i in map(Identity.from_dns_name, san_strings(cert)) if i is not None}
    return found.pop() if len(found) == 1 else None


def problems(files: CertFiles, identity: Identity, hosts: Iterable[str] = DEFAULT_HOSTS,
             ca_cert: x509.Certificate | None = None) -> list[str]:
    """Why the certificate in `files` is unfit for `identity` at `hosts` (empty: it is fine)."""
    if not files.cert.exists() or not files.key.exists():
        return ["missing"]
    try:
        cert = _load_cert(files.cert)
        key = serialization.load_pem_private_key(files.key.read_bytes(), password=None)
    except (CertError, ValueError, TypeError) as exc:
        return [f"unreadable ({exc})"]
    found = []
    if _spki(key.public_key()) != _spki(cert.public_key()):
        found.append("key does not match certificate")
    ca_cert = ca_cert or _load_cert(files.ca)
    try:
        cert.verify_directly_issued_by(ca_cert)
    except Exception:  # noqa: BLE001 - ValueError, TypeError or InvalidSignature: all mean "not this CA's"
        found.append("not signed by the current CA")
    if cert.not_valid_after_utc - _now() < RENEW_BEFORE:
        found.append(f"expires {cert.not_valid_after_utc:%Y-%m-%d}")
    have = {s.lower() for s in san_strings(cert)}
    want = [str(s.value).lower() for s in _sans(identity, hosts)]
    lacking = [w for w in want if w not in have]
    if lacking:
        found.append("SANs lack " + ", ".join(lacking))
    return found


def ensure(directory: str | os.PathLike, identities: Iterable[Identity | str], *,
           hosts: Iterable[str] = DEFAULT_HOSTS) -> dict[str, CertFiles]:
    """Creates the CA if absent and a certificate for each identity that lacks a fit one (see `problems`); reuses the
    rest. Safe to call from several processes at once. Returns {str(identity): CertFiles}."""
    ids = [i if isinstance(i, Identity) else Identity.parse(i) for i in identities]
    hosts = tuple(hosts)
    out: dict[str, CertFiles] = {}
    with locked(directory) as d:
        if not (d / CA_CERT).exists():
            make_ca(d)
        ca_cert = _load_cert(d / CA_CERT)
        for identity in ids:
            files = cert_files(d, identity)
            if problems(files, identity, hosts, ca_cert):
                files = issue(d, identity, hosts=hosts)
            out[str(identity)] = files
    return out
