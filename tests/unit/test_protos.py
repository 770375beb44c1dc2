import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_stubs_match_protos():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_proto_package_path_is_python_import_path():
    from cotune.v1 import coordinator_pb2, party_pb2

    assert party_pb2.DESCRIPTOR.package == "cotune.v1"
    assert coordinator_pb2.DESCRIPTOR.name == "cotune/v1/coordinator.proto"
