"""Standalone blob-transfer processes for the transfer tests and benchmarks/wire.py.

    python -m tests.integration.blob_server serve --root DIR --port-file F [--port P] [--chunk-delay S]
    python -m tests.integration.blob_server push  --root DIR --address HOST:PORT --sha SHA [--chunk-delay S]
    python -m tests.integration.blob_server pull  --root DIR --address HOST:PORT --sha SHA [--attempts N]

`serve` runs a BlobStore service the way every Cotune service does (ServiceHost + add_blobs_and_operations, the
product's channel options) until SIGTERM/SIGKILL. `push` and `pull` run one push_blob / pull_blob and print one JSON
line: bytes moved, the remote's confirmed offset they started from, seconds, and peak-RSS growth of this process
during the transfer (VmHWM after minus VmRSS before; the peak is reset through /proc/self/clear_refs first).
`--chunk-delay` slows the chunks this process sends (a test can then kill it at a chosen point mid-stream).

`BlobServer` and `start_client` start these processes from Python (tests/integration/test_transfer_resume.py and the
transfer section of benchmarks/wire.py use them).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from cotune.rpc.limits import check_message
from cotune.wire.blobs import BlobStore

REPO = Path(__file__).resolve().parents[2]


def _argv(mode: str, root, *, chunk_delay: float = 0.0, grpc_options=(), **kw) -> list[str]:
    argv = [sys.executable, "-m", "tests.integration.blob_server", mode, "--root", str(root)]
    for key, value in kw.items():
        if value is not None:
            argv += [f"--{key.replace('_', '-')}", str(value)]
    if chunk_delay:
        argv += ["--chunk-delay", str(chunk_delay)]
    for opt in grpc_options:
        argv += ["--grpc-option", opt]
    return argv


def _env(extra: dict | None) -> dict | None:
    return None if not extra else {**os.environ, **extra}


class BlobServer:
    """A `serve` process: its pid, port and address; kill() is SIGKILL, restart() starts it again on the same port."""

    def __init__(self, root, *, port: int = 0, chunk_delay: float = 0.0, grpc_options=(), log=None,
                 start_timeout: float = 30.0, progress_file=None, env: dict | None = None):
        self.root = Path(root)
        self.env = env
        self.progress_file = progress_file
        self.chunk_delay = chunk_delay
        self.grpc_options = tuple(grpc_options)
        self.log = log
        self.start_timeout = start_timeout
        self.port = port
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        port_file = self.root.with_name(self.root.name + f".port.{time.monotonic_ns()}")
        self.proc = subprocess.Popen(
            _argv("serve", self.root, port=self.port, port_file=port_file, chunk_delay=self.chunk_delay,
                  grpc_options=self.grpc_options, progress_file=self.progress_file),
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=self.log or subprocess.DEVNULL, env=_env(self.env))
        deadline = time.monotonic() + self.start_timeout
        while not port_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"blob server did not start (exit code {self.proc.returncode})")
            time.sleep(0.02)
        self.port = int(port_file.read_text())
        port_file.unlink()

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait()

    def restart(self, *, chunk_delay: float | None = None) -> None:
        self.kill()
        if chunk_delay is not None:
            self.chunk_delay = chunk_delay
        self.start()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


def start_client(mode: str, root, address: str, sha: str, *, chunk_delay: float = 0.0, attempts: int | None = None,
                 grpc_options=(), progress_file=None, log=None, env: dict | None = None) -> subprocess.Popen:
    """Start a `push` or `pull` process; read its result with client_result()."""
    return subprocess.Popen(_argv(mode, root, address=address, sha=sha, attempts=attempts, chunk_delay=chunk_delay,
                                  grpc_options=grpc_options, progress_file=progress_file),
                            cwd=REPO, stdout=subprocess.PIPE, stderr=log or subprocess.PIPE, text=True, env=_env(env))


def client_result(proc: subprocess.Popen, timeout: float | None = None) -> dict:
    out, err = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"blob {proc.args[3]} process failed with exit code {proc.returncode}: {(err or '')[-2000:]}")
    return json.loads(out.strip().splitlines()[-1])


def proc_status_kib(pid: int | str = "self") -> dict[str, int]:
    """VmRSS / VmHWM (KiB) of a process, from /proc."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":", 1)
                out[key] = int(value.split()[0])
    return out


def cpu_seconds(pid: int | str = "self") -> float:
    """User + system CPU seconds of a process (all its threads), from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def reset_peak_rss(pid: int | str = "self") -> int:
    """Reset VmHWM to the current RSS (Linux >= 4.0); returns the current RSS in KiB."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return proc_status_kib(pid)["VmRSS"]


class InstrumentedStore(BlobStore):
    """A BlobStore whose chunk reads can be slowed (`delay` seconds each, so a test can kill the process at a chosen
    point mid-stream) and counted: `progress_file` holds, as a little-endian int64, the bytes this process has handed
    to gRPC so far (readable after the process is killed: what was in flight when it died)."""

    def __init__(self, root, *, delay: float = 0.0, progress_file: str | None = None):
        super().__init__(root)
        self.delay = delay
        self._progress = None
        if progress_file:
            import mmap

            with open(progress_file, "wb") as f:
                f.write(bytes(8))
            with open(progress_file, "r+b") as f:
                self._progress = mmap.mmap(f.fileno(), 8)
        self._handed = 0

    def iter_chunks(self, sha, offset=0, chunk_size=None):
        kwargs = {} if chunk_size is None else {"chunk_size": chunk_size}
        for chunk in super().iter_chunks(sha, offset, **kwargs):
            if self.delay:
                time.sleep(self.delay)
            self._handed += len(chunk)
            if self._progress is not None:
                self._progress[:8] = self._handed.to_bytes(8, "little")
            yield chunk


def read_progress(path) -> int:
    """Bytes a process started with `--progress-file path` had handed to gRPC (0 if it never started sending)."""
    try:
        return int.from_bytes(Path(path).read_bytes()[:8], "little")
    except FileNotFoundError:
        return 0


def _apply_grpc_options(options: list[str]) -> None:
    """Extra channel/server options (`key=int`), appended in place to the product's CHANNEL_OPTIONS."""
    from cotune.rpc.channel import CHANNEL_OPTIONS

    for opt in options:
        key, value = opt.split("=", 1)
        CHANNEL_OPTIONS[:] = [o for o in CHANNEL_OPTIONS if o[0] != key] + [(key, int(value))]


def _store(args) -> BlobStore:
    if args.chunk_delay > 0 or args.progress_file:
        return InstrumentedStore(args.root, delay=args.chunk_delay, progress_file=args.progress_file)
    return BlobStore(args.root)


def serve(args) -> None:
    from cotune.rpc.server import ServiceHost

    _apply_grpc_options(args.grpc_option)
    host = ServiceHost("blobs", f"127.0.0.1:{args.port}", role="llm", check=check_message)
    host.add_blobs_and_operations(_store(args), None)
    host.set_serving(True)
    host.start(args.port_file)
    host.wait_for_termination_signal()


def transfer(args) -> None:
    from cotune.rpc.channel import make_channel
    from cotune.v1 import common_pb2, common_pb2_grpc
    from cotune.wire.blobs import pull_blob, push_blob

    _apply_grpc_options(args.grpc_option)
    store = _store(args)
    channel = make_channel(args.address)
    stub = common_pb2_grpc.BlobStoreStub(channel)
    if args.mode == "push":
        start = stub.StatBlob(common_pb2.StatBlobRequest(sha256=args.sha), timeout=30).received
    else:
        start = store.received(args.sha)
    rss0 = reset_peak_rss()
    cpu0 = cpu_seconds()
    t0 = time.perf_counter()
    if args.mode == "push":
        moved = push_blob(stub, store, args.sha, attempts=args.attempts)
    else:
        moved = pull_blob(stub, store, args.sha, attempts=args.attempts)
    seconds = time.perf_counter() - t0
    cpu = cpu_seconds() - cpu0
    hwm = proc_status_kib()["VmHWM"]
    channel.close()
    print(json.dumps({"mode": args.mode, "bytes": moved, "start_offset": start, "seconds": seconds, "cpu_seconds": cpu,
                      "rss_before_kib": rss0, "rss_peak_growth_kib": hwm - rss0}), flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mode", choices=("serve", "push", "pull"))
    ap.add_argument("--root", required=True)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--port-file")
    ap.add_argument("--address")
    ap.add_argument("--sha")
    ap.add_argument("--attempts", type=int, default=5)
    ap.add_argument("--chunk-delay", type=float, default=0.0)
    ap.add_argument("--progress-file", help="keep the bytes handed to gRPC here (int64, little-endian)")
    ap.add_argument("--grpc-option", action="append", default=[], help="extra channel/server option key=int")
    args = ap.parse_args(argv)
    if args.mode == "serve":
        serve(args)
    else:
        transfer(args)


if __name__ == "__main__":
    sys.exit(main())
