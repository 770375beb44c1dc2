"""Protocol fuzzing of a secure tiny cluster: every RPC of the coordinator, the LLM server, one SLM client and the
alignment service gets COTUNE_FUZZ_COUNT (default 200) malformed, truncated, bit-flipped, field-mutated and wire-level
hostile messages (request streams: sequences of them) from a seeded RNG (COTUNE_FUZZ_SEED), sent as raw bytes by an
identity the policy allows, so they reach the handlers (tests/integration/fuzzing.py has the generator and runner).

Afterwards: no service process died, no call outlived its deadline (a DEADLINE_EXCEEDED on a method that is not a
long poll is re-sent alone and must then be answered), no INTERNAL or UNKNOWN status (a handler raised on bad input, or
gRPC itself could not parse the request; each is saved as a reproducer), every RPC still answers a valid request
without RESOURCE_EXHAUSTED or a timeout (no leaked worker or concurrency slot), every service still reports SERVING
over mTLS, nothing was written outside the services' workdirs, caches and logs (nor into /tmp), and malformed messages
cost the logs a bounded number of bytes. Work the fuzz legitimately started (runs, tasks, builds) is cancelled.

Prints a table service x RPC -> calls, messages, status codes, crashes, hangs, log bytes per message; with
COTUNE_FUZZ_JSON=path also writes it as JSON. Reproducers go to COTUNE_FUZZ_REPRO_DIR (default: under the test's
tmp dir); `fuzzing.replay(cluster, file)` sends one again.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from tests.integration.fuzzing import (
    BAD_PROBE_CODES,
    Fuzzer,
    allowed_roots,
    build_seeds,
    health,
    role_of,
    rpcs_of,
    snapshot,
    stray_files,
    summary,
    table,
    tmp_entries,
)

pytestmark = pytest.mark.integration

SERVICES = ("coordinator", "llm", "client-1", "alignment")
COUNT = int(os.environ.get("COTUNE_FUZZ_COUNT", "200"))
SEED = int(os.environ.get("COTUNE_FUZZ_SEED", "0"))
# Log growth per malformed message: refusals are logged at most once a second per (method, code) and internal errors
# ten times a minute, so a burst of hundreds of messages costs a few lines, not a traceback each (~400-800 bytes).
# Per service on average, and per RPC (where a short burst of few messages may cost a few whole lines).
MAX_LOG_BYTES_PER_MESSAGE = 50
MAX_LOG_BYTES_PER_RPC = 8192  # or MAX_LOG_BYTES_PER_MESSAGE per message, whichever is more


def test_every_rpc_survives_hostile_messages(cluster, tmp_path_factory):
    root = tmp_path_factory.getbasetemp()
    repro_dir = Path(os.environ.get("COTUNE_FUZZ_REPRO_DIR") or tmp_path_factory.mktemp("fuzz-reproducers"))
    t0 = time.monotonic()
    seeds = build_seeds(cluster, tmp_path_factory.mktemp("fuzz-seeds"), services=SERVICES, rng_seed=SEED)
    seeded = time.monotonic() - t0
    allowed = allowed_roots(cluster) + [repro_dir.resolve()]
    files_before, tmp_before = snapshot(root), tmp_entries()

    fuzzer = Fuzzer(cluster, seeds, count=COUNT, seed=SEED, repro_dir=repro_dir)
    stats, cleanup, probes = [], {}, {}
    try:
        for service in SERVICES:
            stats += fuzzer.fuzz_service(service)
            try:
                cleanup[service] = fuzzer.cleanup(service)
            except Exception as exc:  # noqa: BLE001 - e.g. the service died; reported below
                cleanup[service] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        for service in SERVICES:  # every RPC still answers a valid request (no leaked worker or concurrency slot)
            probes[service] = fuzzer.probe(service)
    finally:
        fuzzer.close()
    elapsed = time.monotonic() - t0

    statuses = {name: health(cluster, name) for name in cluster.services}
    alive = {name: svc.process.poll() is None for name, svc in cluster.services.items()}
    stray = stray_files(root, files_before, snapshot(root), allowed)
    new_tmp = sorted(tmp_entries() - tmp_before)
    per_service = summary(stats)

    print()
    print(table(stats))
    print()
    print(f"seeds {seeded:.1f}s, fuzz + cleanup + probes {elapsed - seeded:.1f}s; health {statuses}; cleanup {cleanup}")
    print(f"a valid request to every RPC afterwards: {probes}")
    unimplemented = [f"{s.service} {s.rpc}" for s in stats if s.codes["UNIMPLEMENTED"] and not s.codes["OK"]]
    if unimplemented:  # a rule in the policy table for a method the host does not serve: nothing to fuzz there
        print(f"note: UNIMPLEMENTED (every well-formed message): {', '.join(unimplemented)}")
    for service, row in per_service.items():
        print(f"{service}: {row['messages']} messages, {row['log_bytes']} log bytes "
              f"({row['log_bytes_per_message']} B/message), refusals {row['refusals']}")
    if fuzzer.reproducers:
        print(f"reproducers ({len(fuzzer.reproducers)}) in {repro_dir}:")
        for path in fuzzer.reproducers:
            print("  " + path)
    if os.environ.get("COTUNE_FUZZ_JSON"):
        Path(os.environ["COTUNE_FUZZ_JSON"]).write_text(json.dumps({
            "count": COUNT, "seed": SEED, "seconds": round(elapsed, 1), "services": per_service,
            "rpcs": [s.as_dict() for s in stats], "health": statuses, "alive": alive, "stray_files": stray,
            "new_tmp_entries": new_tmp, "reproducers": fuzzer.reproducers, "cleanup": cleanup, "probes": probes},
            indent=2))

    problems = []
    expected = {(service, rpc.name) for service in SERVICES for rpc in rpcs_of(role_of(service))}
    missing = sorted(expected - {(s.service, s.rpc) for s in stats})
    if missing or any(s.calls != COUNT for s in stats):
        problems.append(f"not fuzzed in full: {missing or [s.rpc for s in stats if s.calls != COUNT]}")
    problems += [f"cleanup of {service} failed: {c['error']}" for service, c in cleanup.items() if "error" in c]
    decode: dict[str, list] = {}
    for s in stats:
        if s.crashes:
            problems.append(f"{s.service} crashed while {s.rpc} was fuzzed")
        if s.hangs:
            problems.append(f"{s.service} {s.rpc}: {s.hangs} calls hung")
        if s.failing - s.decode_internal:
            problems.append(f"{s.service} {s.rpc}: {s.failing - s.decode_internal} INTERNAL/UNKNOWN from the handler "
                            f"(e.g. {s.samples.get('INTERNAL/handler') or s.samples.get('UNKNOWN/handler')!r}; "
                            f"reproducers in {repro_dir})")
        if s.decode_internal:
            decode.setdefault(s.service, []).append(s.decode_internal)
    for service, counts in decode.items():
        problems.append(f"{service}: {sum(counts)} malformed messages to {len(counts)} RPCs answered INTERNAL "
                        "'Exception deserializing request!' (gRPC's own parse failure, each logged with a traceback)")
    problems += [f"{service} {rpc}: a valid request afterwards was answered {code}"
                 for service, codes in probes.items() for rpc, code in codes.items() if code in BAD_PROBE_CODES]
    problems += [f"{name} died" for name, ok in alive.items() if not ok]
    problems += [f"{name} reports {status}" for name, status in statuses.items() if status != "SERVING"]
    problems += [f"written outside the services' directories: {p}" for p in stray[:20]]
    problems += [f"new in /tmp: {n}" for n in new_tmp]
    budget = lambda s: max(MAX_LOG_BYTES_PER_RPC, MAX_LOG_BYTES_PER_MESSAGE * s.messages)  # noqa: E731
    noisy = sorted((s for s in stats if s.log_bytes > budget(s)), key=lambda s: -s.log_bytes / s.messages)
    problems += [f"{s.service} {s.rpc}: {s.log_bytes} log bytes for {s.messages} messages "
                 f"({s.log_bytes / s.messages:.0f} B/message; a traceback per call?)" for s in noisy[:5]]
    if len(noisy) > 5:
        problems.append(f"... and {len(noisy) - 5} more RPCs over the log budget")
    for service, row in per_service.items():
        if row["log_bytes_per_message"] > MAX_LOG_BYTES_PER_MESSAGE:
            problems.append(f"{service}: {row['log_bytes_per_message']} log bytes per malformed message "
                            f"(at most {MAX_LOG_BYTES_PER_MESSAGE})")
    assert not problems, "\n".join(problems)
