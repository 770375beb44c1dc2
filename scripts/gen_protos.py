"""Regenerate cotune/v1/*_pb2*.py from protos/cotune/v1/*.proto (the one command: python scripts/gen_protos.py).

With --check, generate into a temporary directory and exit 1 if the committed stubs differ (drift).
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = ROOT / "protos"
OUT_PACKAGE = ROOT / "cotune" / "v1"


def generate(out_root: Path) -> list[Path]:
    import grpc_tools
    from grpc_tools import protoc

    protos = sorted((PROTO_ROOT / "cotune" / "v1").glob("*.proto"))
    include = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *[str(p.relative_to(PROTO_ROOT)) for p in protos],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted((out_root / "cotune" / "v1").glob("*_pb2*.py*"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if committed stubs differ from the .proto files")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        generated = generate(Path(tmp))
        names = {p.name for p in generated}
        if args.check:
            committed = {p.name for p in OUT_PACKAGE.glob("*_pb2*.py*")}
            drift = sorted(names ^ committed)
            drift += [n for n in sorted(names & committed) if not filecmp.cmp(Path(tmp) / "cotune/v1" / n, OUT_PACKAGE / n, shallow=False)]
            if drift:
                print("generated stubs drifted from protos/: " + ", ".join(drift) + "\nrun: python scripts/gen_protos.py")
                return 1
            print(f"stubs up to date ({len(names)} files)")
            return 0
        for stale in OUT_PACKAGE.glob("*_pb2*.py*"):
            if stale.name not in names:
                stale.unlink()
        for path in generated:
            (OUT_PACKAGE / path.name).write_bytes(path.read_bytes())
        print(f"wrote {len(generated)} files to {OUT_PACKAGE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
