"""`cotune certs`: make a development CA and certificates for service identities."""

from __future__ import annotations

import sys
from pathlib import Path


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "certs", help="make a development CA and a certificate per service identity",
        description="Creates DIR/ca.crt and ca.key if absent, then a certificate and key per identity "
                    "(coordinator, llm, alignment, client/<id>, operator/<name>), named like client-client-1.crt. "
                    "Each carries its identity as CN and as the SAN <name>.<kind>.id.cotune, plus its hosts.")
    p.add_argument("identities", nargs="*", metavar="IDENTITY",
                   help="identities to issue: coordinator, llm, alignment, client/<id>, operator/<name>")
    p.add_argument("--dir", required=True, help="where the CA, certificates and keys go")
    p.add_argument("--days", type=int, default=825, help="validity of new certificates (default 825)")
    p.add_argument("--host", action="append", default=[], metavar="[IDENTITY=]HOST",
                   help="an extra DNS name or IP address for every certificate, or with IDENTITY= for that one "
                        "(repeatable; localhost and 127.0.0.1 are always included)")
    p.add_argument("--force", action="store_true", help="reissue certificates that already exist")
    p.add_argument("--show", action="store_true", help="list the identities of the certificates in DIR")
    p.set_defaults(fn=cmd_certs)


def _line(identity, path: Path, cert, note: str) -> str:
    from cotune.security.certs import san_strings

    return (f"{str(identity):24s} {note:8s} {path}  SANs: {', '.join(san_strings(cert))}  "
            f"expires {cert.not_valid_after_utc:%Y-%m-%d}")


def _show(directory: Path) -> int:
    from cryptography import x509

    from cotune.security.certs import CA_CERT, identity_of_cert

    certs = sorted(p for p in directory.glob("*.crt") if p.name != CA_CERT) if directory.is_dir() else []
    if not certs:
        print(f"no certificates in {directory}")
    for path in certs:
        pem = path.read_bytes()
        print(_line(identity_of_cert(pem) or "(no identity)", path, x509.load_pem_x509_certificate(pem), ""))
    return 0


def cmd_certs(args) -> int:
    from cryptography import x509

    from cotune.security import certs
    from cotune.security.identity import Identity, IdentityError

    directory = Path(args.dir)
    try:
        if args.show:
            return _show(directory)
        if not args.identities:
            raise certs.CertError("name at least one IDENTITY (coordinator, llm, alignment, client/<id>, "
                                  "operator/<name>), or pass --show")
        if args.days <= 0:
            raise certs.CertError(f"--days must be positive, got {args.days}")
        ids = list(dict.fromkeys(Identity.parse(text) for text in args.identities))
        extra: dict[Identity | None, list[str]] = {}
        for spec in args.host:
            who, sep, host = spec.rpartition("=")
            target = Identity.parse(who) if sep else None
            if target is not None and target not in ids:
                raise certs.CertError(f"--host {spec}: {target} is not among the identities to issue")
            extra.setdefault(target, []).append(host)
        with certs.locked(directory):
            if not (directory / certs.CA_CERT).exists():
                ca_cert, _ = certs.make_ca(directory)
                print(f"created CA {ca_cert} (give it to every party as their trust root; keep ca.key private)")
            for identity in ids:
                hosts = [*certs.DEFAULT_HOSTS, *extra.get(None, []), *extra.get(identity, [])]
                files = certs.cert_files(directory, identity)
                if files.cert.exists() and not args.force:
                    note = "kept"
                    issues = certs.problems(files, identity, hosts)
                else:
                    files, note, issues = certs.issue(directory, identity, hosts=hosts, days=args.days), "issued", []
                print(_line(identity, files.cert, x509.load_pem_x509_certificate(files.cert.read_bytes()), note))
                if issues:
                    print(f"  warning: {'; '.join(issues)} (reissue with --force)", file=sys.stderr)
    except (IdentityError, certs.CertError) as exc:
        print(f"cotune certs: {exc}", file=sys.stderr)
        return 2
    return 0
