"""The `cotune` command line: serve a service, run a local cluster, drive runs, build alignments, run the demo.

Heavy modules (grpc, torch, transformers, the demo, the services) are imported inside the commands that need them,
so `cotune --help` and argument errors answer at once. Errors a user can fix print one line each ("cotune: ...",
exit 2) instead of a traceback; a reader that stops early (`cotune run list | head`) ends the command quietly with
exit code 141 (128 + SIGPIPE, what a shell reports for a tool killed by SIGPIPE).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

from cotune.security import certs_cli

EXIT_USER_ERROR = 2
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE
# the run states after which nothing changes any more (cotune.v1.RunState names; see cmd_run_cancel)
FINISHED_STATES = ("RUN_SUCCEEDED", "RUN_FAILED", "RUN_CANCELLED")


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


# -- serve ------------------------------------------------------------------------------------------------------
def cmd_serve(args) -> int:
    from cotune.config import AlignmentConfig, CoordinatorConfig, ConfigError, PartyConfig, load_config

    _setup_logging(args.verbose)
    configs = args.config
    if len(configs) > 1 and args.service != "slm":
        raise ConfigError(f"serve {args.service}: one --config (only `serve slm` hosts several, one client per config)")
    if args.service == "coordinator":
        from coordinator.service import serve

        serve(load_config(CoordinatorConfig, configs[0]), args.port_file)
    elif args.service == "alignment":
        from alignment.service import serve

        serve(load_config(AlignmentConfig, configs[0]), args.port_file)
    elif args.service == "llm":
        from llm_server.service import serve

        serve(load_config(PartyConfig, configs[0]), args.port_file)
    else:
        from slm_client.service import serve

        serve([load_config(PartyConfig, path) for path in configs], args.port_file)
    return 0


# -- cluster ----------------------------------------------------------------------------------------------------
def cmd_cluster_up(args) -> int:
    import time

    from cotune.cluster import ClusterConfig, ClusterConfigError, LocalCluster, Progress, default_cluster_dirs

    try:  # every problem of the config (settings, model paths, data files), before anything starts
        cluster = LocalCluster(ClusterConfig.load(args.config), progress=Progress())
    except ClusterConfigError as exc:
        for problem in exc.problems:
            print(f"cotune: {args.config}: {problem}", file=sys.stderr)
        print(f"cotune: {len(exc.problems)} problem(s) in {args.config}; nothing was started", file=sys.stderr)
        return EXIT_USER_ERROR
    addresses = cluster.up()
    for name, address in addresses.items():
        print(f"{name:12s} {address}")
    print(f"state: {cluster.workdir / 'cluster.json'}; logs: {cluster.workdir / 'logs'}")
    if cluster.workdir in [path.resolve() for path in default_cluster_dirs()]:
        print("the `cotune run ...` commands started from this folder find the coordinator and the operator's "
              "certificate there")
    else:
        print(f"export COTUNE_CLUSTER_DIR={cluster.workdir}   # the `cotune run ...` commands find the coordinator "
              "and the operator's certificate there")
    if args.detach:
        print(f"stop it with `cotune cluster down --config {args.config}`")
        return 0
    print("cluster running; Ctrl-C stops every service")
    try:
        while all(s.process.poll() is None for s in cluster.services.values()):
            time.sleep(1)
        print("a service exited; stopping the cluster", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        cluster.down()


def cmd_cluster_down(args) -> int:
    from cotune.cluster import ClusterConfig, down_detached, find_cluster_dir

    if args.config:
        workdir = ClusterConfig.load(args.config).workdir
        if not workdir:
            print(f"cotune: {args.config}: workdir is required (it names the cluster to stop)", file=sys.stderr)
            return EXIT_USER_ERROR
    else:  # --workdir stops whatever is recorded there, even a cluster.json whose processes all exited
        workdir = args.workdir or find_cluster_dir()
    stopped = down_detached(workdir)
    print("stopped: " + (", ".join(stopped) or "nothing was running"))
    return 0


# -- runs -------------------------------------------------------------------------------------------------------
def _coordinator(args):
    """A coordinator client from the flags, else the environment, else the running local cluster (find_cluster_dir:
    --cluster-dir, $COTUNE_CLUSTER_DIR, var/cluster, var/demo/*/cluster): its address and its operator's certificate."""
    from cotune.cluster import ClusterNotFound, find_cluster_dir, operator_credentials
    from cotune.rpc.channel import Credentials, TlsFiles
    from cotune.rpc.clients import CoordinatorClient

    address = args.coordinator or os.environ.get("COTUNE_COORDINATOR", "")
    try:
        local = operator_credentials(find_cluster_dir(args.cluster_dir))
    except ClusterNotFound as exc:
        if not address:
            raise ClusterNotFound(f"no coordinator: pass --coordinator HOST:PORT (or set $COTUNE_COORDINATOR), or "
                                  f"reach a local cluster; {exc}") from None
        local = None
    if not address and local is None:  # its cluster.json went away since it was found
        raise ClusterNotFound("no coordinator: the local cluster stopped; pass --coordinator HOST:PORT or start one")
    address = address or local[0]
    tls = TlsFiles(*(getattr(args, f"tls_{n}") or os.environ.get(f"COTUNE_TLS_{n.upper()}", "") for n in ("ca", "cert", "key")))
    if tls.enabled:
        creds = Credentials(tls)
    elif local and local[0] == address:
        creds = local[1]
    else:
        creds = Credentials()
    token = args.token or os.environ.get("COTUNE_TOKEN", "")
    if token:
        creds = Credentials(creds.tls, {"coordinator": token})
    return CoordinatorClient(address, creds=creds)


def _load_spec(path: str):
    from cotune.algorithms.config import SpecError, spec_from_dict
    from cotune.config import ConfigError, load_yaml

    try:
        return spec_from_dict(load_yaml(path), where=path)
    except (ConfigError, SpecError) as exc:
        raise SystemExit(f"{path}: {exc}") from exc


def cmd_algorithms(args) -> int:
    """Every registered algorithm with its settings, defaults and their documentation."""
    import dataclasses

    from cotune.algorithms.config import RunConfig
    from cotune.algorithms.registry import STRATEGIES

    def fields(cls, indent: str) -> None:
        for f in dataclasses.fields(cls):
            print(f"{indent}{f.name} = {f.default!r}: {f.metadata.get('help', '')}")

    print("settings every run spec takes:")
    fields(RunConfig, "  ")
    for name, strategy in sorted(STRATEGIES.items()):
        config = strategy.config_class
        print(f"\n{name}: {strategy.summary}")
        if config.section:
            print(f"  settings (run spec key `{config.section}`):")
            fields(config, "    ")
    return 0


def cmd_run_start(args) -> int:
    from cotune.watch import watch_run

    client = _coordinator(args)
    run = client.start_run(_load_spec(args.spec))
    print(run.run_id)
    if args.watch:
        run = watch_run(client, run.run_id)
        _print_run(run)
    return 0


def _print_run(run) -> None:
    from cotune.report import bytes_table, markdown_table
    from cotune.v1 import coordinator_pb2 as pb

    print(f"run {run.run_id} ({run.spec.algorithm}): {pb.RunState.Name(run.state)}"
          f", round {run.current_round}/{run.spec.rounds}, step {run.current_step or '-'}")
    if run.error:
        print(f"error: {run.error}")
    if run.rounds:
        print()
        print(markdown_table(run))
        traffic = bytes_table(run)
        if traffic:
            print("\nbytes moved by the coordinator (sent / received):\n")
            print(traffic)


def cmd_run_watch(args) -> int:
    from cotune.watch import watch_run

    run = watch_run(_coordinator(args), args.run_id)
    _print_run(run)
    return 0


def cmd_run_status(args) -> int:
    from cotune.report import run_summary

    run = _coordinator(args).get_run(args.run_id)
    if args.json:
        print(json.dumps(run_summary(run), indent=2))
    else:
        _print_run(run)
    return 0


def cmd_run_list(args) -> int:
    from cotune.v1 import coordinator_pb2 as pb

    for run in _coordinator(args).list_runs(args.limit):
        print(f"{run.run_id}  {pb.RunState.Name(run.state):14s} {run.spec.algorithm:9s} round {run.current_round}/{run.spec.rounds}  {run.spec.name}")
    return 0


def cmd_run_cancel(args) -> int:
    """Cancel a run. Exit 0 both when the cancel was requested and when the run had already finished (its state is
    printed: there is nothing left to cancel, which is what was asked); errors (unknown run, no coordinator) exit 2."""
    from cotune.v1 import coordinator_pb2 as pb

    client = _coordinator(args)
    before = client.get_run(args.run_id)
    if pb.RunState.Name(before.state) in FINISHED_STATES:
        print(f"{before.run_id}: already finished ({pb.RunState.Name(before.state)}); nothing to cancel")
        return 0
    run = client.cancel_run(args.run_id)
    state = pb.RunState.Name(run.state)
    if state == "RUN_CANCELLED":
        print(f"{run.run_id}: RUN_CANCELLED")
    elif state in FINISHED_STATES:  # it ended on its own while the cancel was on its way
        print(f"{run.run_id}: already finished ({state}); nothing to cancel")
    else:
        print(f"{run.run_id}: cancel requested ({state}); it stops at its next step (`cotune run watch {run.run_id}` "
              "follows it)")
    return 0


def cmd_run_resume(args) -> int:
    from cotune.v1 import coordinator_pb2 as pb
    from cotune.watch import last_event_seq, watch_run

    client = _coordinator(args)
    before = client.get_run(args.run_id)
    # --watch shows what the resumed run does, not its history again
    seq = last_event_seq(client, args.run_id) if args.watch and before.state in (pb.RUN_FAILED, pb.RUN_CANCELLED) else 0
    run = client.resume_run(args.run_id)
    print(f"{run.run_id}: {pb.RunState.Name(run.state)} (resumed at round {run.current_round} step "
          f"{run.current_step or '-'})")
    if args.watch:
        run = watch_run(client, run.run_id, after_seq=seq)
        _print_run(run)
    return 0


def cmd_run_export(args) -> int:
    """ExportRun, then each adapter from the coordinator's artifact store into --out, and the model card beside them."""
    import tempfile

    from cotune.export import download
    from cotune.v1 import common_pb2_grpc
    from cotune.wire.blobs import BlobStore, pull_blob

    client = _coordinator(args)
    try:
        response = client.export_run(args.run_id)
        blobs = common_pb2_grpc.BlobStoreStub(client.channel)
        with tempfile.TemporaryDirectory(prefix="cotune-export-") as tmp:
            store = BlobStore(tmp)  # pull_blob checks every chunk and the whole blob against its sha256

            def fetch(sha: str) -> bytes:
                pull_blob(blobs, store, sha)
                return store.read_bytes(sha)

            written = download(response, fetch, args.out)
    finally:
        client.close()
    for path in written:
        print(path)
    return 0


def cmd_run_report(args) -> int:
    """REPORT.md, data.json and PNG plots of a run (cotune.run_report) in --out; prints the files written."""
    from cotune.run_report import fetch, write_report

    client = _coordinator(args)
    try:
        run, events = fetch(client, args.run_id)
    finally:
        client.close()
    for path in write_report(run, events, args.out):
        print(path)
    return 0


def cmd_clients(args) -> int:
    client = _coordinator(args)

    def show(rec):
        print(f"{rec.client.client_id:16s} {rec.client.address:22s} {rec.info.model_name} tokenizer "
              f"{rec.info.tokenizer_hash[:12]}")

    if args.action == "register":  # a client may register itself but not list the others: show what was registered
        show(client.register_client(args.client_id, args.address))
        return 0
    if args.action == "remove":
        client.deregister_client(args.client_id)
        print(f"removed {args.client_id}")
        return 0
    for rec in client.list_clients():
        show(rec)
    return 0


# -- alignment --------------------------------------------------------------------------------------------------
def cmd_align_build(args) -> int:
    from tqdm import tqdm

    from cotune.align.mined import build_vocab_map
    from cotune.align.tokenizers import load_tokenizer, tokenizer_hash

    src, dst = load_tokenizer(args.src), load_tokenizer(args.dst)
    bar = tqdm(desc="MinED", unit="tok", file=sys.stderr)

    def progress(done, total):
        bar.total = total
        bar.n = done
        bar.refresh()

    vmap = build_vocab_map(src, dst, progress=progress)
    bar.close()
    vmap = dataclasses.replace(vmap, src_hash=tokenizer_hash(src), dst_hash=tokenizer_hash(dst))
    Path(args.out).write_bytes(vmap.to_bytes())
    exact = int((vmap.distance == 0).sum())
    print(f"wrote {args.out}: {len(vmap.ids)} source tokens, {exact} exact matches, mean distance {vmap.distance.mean():.3f}")
    return 0


def cmd_align_normalize(args) -> int:
    from cotune.align.normalize import normalized_forms
    from cotune.align.tokenizers import load_tokenizer

    forms = normalized_forms(load_tokenizer(args.tokenizer))
    with open(args.out, "w") as f:
        for i, form in enumerate(forms):
            f.write(json.dumps({"id": i, "hex": form.hex()}) + "\n")
    print(f"wrote {len(forms)} normalized forms to {args.out}")
    return 0


# -- demo -------------------------------------------------------------------------------------------------------
def cmd_demo(args) -> int:
    from cotune.demo import run_demo

    return run_demo(preset=args.preset, algorithm=args.algorithm, rounds=args.rounds, json_path=args.json,
                    cross_tokenizer=args.cross_tokenizer,
                    workdir=args.workdir, setting=args.setting)


def cmd_experiment(args) -> int:
    from cotune.experiment import run_experiment

    return run_experiment(args.config, args.out, only=args.only, seeds=args.seed, report_only=args.report_only,
                          plan=args.plan, budget_hours=args.budget)


def _add(sub, name: str, helptext: str, **kwargs) -> argparse.ArgumentParser:
    """A subcommand whose --help starts with the same text its parent's list shows."""
    return sub.add_parser(name, help=helptext, description=kwargs.pop("description", helptext), **kwargs)


def build_parser() -> argparse.ArgumentParser:
    """The command line. Builds without importing anything heavy: each command imports what it needs when it runs."""
    from cotune.demo import ALGORITHMS  # a constant of a light module (cotune.demo imports its machinery lazily)

    parser = argparse.ArgumentParser(prog="cotune", description="Federated co-tuning of a server LLM and client SLMs.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", help="what to do")

    p = _add(sub, "serve", "run one service until SIGTERM (slm: one or several clients in this process)")
    p.add_argument("service", choices=["coordinator", "llm", "slm", "alignment"], help="which service to run")
    p.add_argument("--config", required=True, action="append",
                   help="the service's YAML config; `serve slm` takes it repeatedly to host several logical clients "
                        "in one process, each on its own port (models load one after another)")
    p.add_argument("--port-file", help="write the bound port here (used by the cluster launcher); with several "
                                       "--config, client i (0-based, in --config order) writes PORT_FILE.i")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.set_defaults(fn=cmd_serve)

    cluster = _add(sub, "cluster", "a local cluster of separate processes on loopback").add_subparsers(
        dest="action", required=True, metavar="ACTION", help="up or down")
    p = _add(cluster, "up", "check a cluster config (settings, model paths, data files), then start every service "
                            "and wait for health")
    p.add_argument("--config", required=True, help="the cluster config (YAML: workdir, llm, clients, alignment, "
                                                   "coordinator, security; `cotune demo` writes one)")
    p.add_argument("--detach", action="store_true", help="leave the services running and return")
    p.set_defaults(fn=cmd_cluster_up)
    p = _add(cluster, "down", "stop a detached cluster")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--config", help="the cluster config it was started with (its workdir names the cluster)")
    which.add_argument("--workdir", "--cluster-dir", dest="workdir",
                       help="the cluster's workdir (holds cluster.json); default: $COTUNE_CLUSTER_DIR, else the "
                            "running cluster in var/cluster or var/demo/*/cluster")
    p.set_defaults(fn=cmd_cluster_down)

    def coordinator_args(p):
        p.add_argument("--coordinator", default="", help="HOST:PORT (default: $COTUNE_COORDINATOR or the local cluster's)")
        p.add_argument("--cluster-dir", default=None,
                       help="a local cluster's workdir: its cluster.json names the coordinator and the operator's "
                            "certificate (default: $COTUNE_CLUSTER_DIR, else the running cluster in var/cluster or "
                            "var/demo/*/cluster, where `cotune demo` runs its clusters)")
        p.add_argument("--token", default="", help="bearer token bound to your identity (default: $COTUNE_TOKEN)")
        p.add_argument("--tls-ca", default="", help="CA certificate (default: $COTUNE_TLS_CA, or the local cluster's)")
        p.add_argument("--tls-cert", default="", help="your operator certificate (default: $COTUNE_TLS_CERT, ...)")
        p.add_argument("--tls-key", default="", help="its key (default: $COTUNE_TLS_KEY, ...)")

    run = _add(sub, "run", "start and follow runs through the coordinator").add_subparsers(
        dest="action", required=True, metavar="ACTION", help="what to do with runs")
    p = _add(run, "start", "start a run from a YAML spec (fields of cotune.v1.RunSpec)")
    p.add_argument("--spec", required=True, help="the run spec (YAML; e.g. deploy/run-fedmkt.yaml; `cotune algorithms` "
                                                 "lists every setting)")
    p.add_argument("--watch", action="store_true", help="follow progress until the run ends")
    coordinator_args(p)
    p.set_defaults(fn=cmd_run_start)
    for name, fn, helptext in (
            ("watch", cmd_run_watch, "follow a run's progress until it ends"),
            ("status", cmd_run_status, "show a run's state and metrics"),
            ("cancel", cmd_run_cancel, "cancel a run; one that already finished is left as it is and its state "
                                       "printed (exit 0 in both cases)")):
        p = _add(run, name, helptext)
        p.add_argument("run_id", help="the run's id (as `run start` and `run list` print it)")
        if name == "status":
            p.add_argument("--json", action="store_true", help="print the run's summary as JSON (for scripts)")
        coordinator_args(p)
        p.set_defaults(fn=fn)
    p = _add(run, "resume", "resume a FAILED or CANCELLED run from its last completed step")
    p.add_argument("run_id", help="the run's id")
    p.add_argument("--watch", action="store_true", help="follow progress until the run ends")
    coordinator_args(p)
    p.set_defaults(fn=cmd_run_resume)
    p = _add(run, "export", "export a SUCCEEDED run's final adapters (safetensors) and its model card")
    p.add_argument("run_id", help="the run's id")
    p.add_argument("--out", required=True, help="folder for <party>[-<target>].safetensors and MODEL_CARD.md")
    coordinator_args(p)
    p.set_defaults(fn=cmd_run_export)
    p = _add(run, "report", "write a run's report: REPORT.md with PNG plots (accuracy, public loss, KD loss, bytes "
                            "per round, step timeline) and data.json with the numbers each plot drew")
    p.add_argument("run_id", help="the run's id (a run still going is reported as far as it got)")
    p.add_argument("--out", required=True, help="folder for REPORT.md, data.json and the PNGs (created if missing)")
    coordinator_args(p)
    p.set_defaults(fn=cmd_run_report)
    p = _add(run, "list", "list runs, newest first")
    p.add_argument("--limit", type=int, default=50, help="at most this many runs (default 50)")
    coordinator_args(p)
    p.set_defaults(fn=cmd_run_list)

    clients = _add(sub, "clients", "list, register or remove SLM clients at the coordinator "
                   "(coordinator flags go before the action: cotune clients --coordinator H:P remove ID)")
    clients_sub = clients.add_subparsers(dest="action", metavar="ACTION", help="list (the default), register or remove")
    for name, helptext in (("list", "list the registered clients (the default)"),
                           ("register", "register a client (or re-point it) at HOST:PORT"),
                           ("remove", "deregister a client (runs already started keep it)")):
        p = _add(clients_sub, name, helptext)
        if name != "list":
            p.add_argument("client_id", help="the client's party_id (its identity is client/<client_id>)")
        if name == "register":
            p.add_argument("address", help="HOST:PORT where the client's service listens")
        p.set_defaults(fn=cmd_clients)
    coordinator_args(clients)
    clients.set_defaults(fn=cmd_clients, action="list")

    align = _add(sub, "align", "token alignment tools").add_subparsers(dest="action", required=True, metavar="ACTION",
                                                                        help="which tool")
    p = _add(align, "build", "build a MinED vocabulary map")
    p.add_argument("--src", required=True, help="the source tokenizer: tokenizer.json(.gz), tokenizer.model, HF dir "
                                                "or GGUF")
    p.add_argument("--dst", required=True, help="the target tokenizer (same forms as --src)")
    p.add_argument("--out", required=True, help="output .safetensors")
    p.set_defaults(fn=cmd_align_build)
    p = _add(align, "normalize", "write each token id's normalized bytes as hex JSONL")
    p.add_argument("tokenizer", help="a tokenizer (same forms as `align build --src`)")
    p.add_argument("--out", required=True, help="the JSONL file to write")
    p.set_defaults(fn=cmd_align_normalize)

    p = _add(sub, "algorithms", "list the algorithms with their settings and defaults")
    p.set_defaults(fn=cmd_algorithms)

    p = _add(sub, "demo", "run a complete demo on a local cluster (progress on stderr, results on stdout)")
    p.add_argument("--preset", choices=["small", "tiny"], default="small",
                   help="small: Gemma 3 270M and SmolLM2-135M (minutes); tiny: random-init tiny models (about a minute)")
    p.add_argument("--algorithm", default="fedmkt", choices=list(ALGORITHMS),
                   help="centralized is the non-federated reference (one client holds every private shard)")
    p.add_argument("--setting", default="heterogeneous", choices=["heterogeneous", "homogeneous", "one_to_one", "llm_to_slm"],
                   help="fedmkt only")
    p.add_argument("--cross-tokenizer", action="store_true",
                   help="fedcollm only: the LLM keeps its own tokenizer, co-distilling with the SLM through MinED maps")
    p.add_argument("--rounds", type=int, default=2, help="federated rounds (default 2)")
    p.add_argument("--json", help="also write the per-round results here")
    p.add_argument("--workdir", help="where data, models and cluster state go (default var/demo)")
    p.set_defaults(fn=cmd_demo)

    p = _add(sub, "experiment", "run a grid of algorithms x tasks x seeds on fresh local clusters and write a report "
                                "(JSON, markdown mean ± s.e., plots); resumes where it stopped")
    p.add_argument("--config", required=True,
                   help="an experiment YAML, or a ready config by name: cpu-small, gpu, smoke (cotune/experiment/configs)")
    p.add_argument("--out", help="the report directory (default var/experiments/<name>); a rerun skips its finished cells")
    p.add_argument("--only", action="append", metavar="TASK_OR_VARIANT",
                   help="run only the cells of this task or variant; repeat it to name several (cells of any named "
                        "task and any named variant; the report covers every cell present)")
    p.add_argument("--seed", action="append", type=int, metavar="N",
                   help="run only the cells of this seed; repeat it to name several (a seed-free variant such as "
                        "zero-shot runs with the config's first seed)")
    p.add_argument("--report-only", action="store_true", help="rewrite the report from the cells present; run nothing")
    p.add_argument("--plan", action="store_true",
                   help="list the cells left with their time estimated from the finished ones, and whether this "
                        "host may run them; run and write nothing")
    p.add_argument("--budget", type=float, metavar="HOURS",
                   help="start a cell only if its expected time (estimated from the finished cells, at this "
                        "host's pace so far) fits in what is left of HOURS; one without an estimate, only if the "
                        "longest cell known fits (the first cell of a fresh grid starts to measure); the rest wait "
                        "for the next run")
    p.set_defaults(fn=cmd_experiment)
    certs_cli.add_parser(sub)
    return parser


def _print_error(exc: BaseException) -> None:
    """One line per problem (a ClusterConfigError or ClusterNotFound carries one per line); a YAML syntax error,
    which PyYAML spreads over several lines with a drawing of the spot, becomes one line with its position."""
    lines = str(exc).splitlines() or [type(exc).__name__]
    cause = exc.__cause__
    mark = getattr(cause, "problem_mark", None)
    if mark is not None:  # "<file>: not valid YAML: <PyYAML's first line>" -> "<file>: not valid YAML: line L, ..."
        first = str(cause).splitlines()[0]
        head = lines[0][: -len(first)] if lines[0].endswith(first) else f"{lines[0]}: "
        where = f" ({cause.context})" if getattr(cause, "context", None) else ""
        lines = [f"{head}line {mark.line + 1}, column {mark.column + 1}: {cause.problem}{where}"]
    for line in lines:
        print(f"cotune: {line}", file=sys.stderr)


def _run(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        raise
    except Exception as exc:  # noqa: BLE001 - one clear line instead of a traceback for user errors
        import grpc

        from cotune.align.tokenizers import TokenizerLoadError
        from cotune.config import ConfigError

        if isinstance(exc, grpc.RpcError) and hasattr(exc, "code"):
            print(f"cotune: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return EXIT_USER_ERROR
        if isinstance(exc, (ConfigError, TokenizerLoadError, FileNotFoundError)):
            _print_error(exc)
            return EXIT_USER_ERROR
        raise


def main(argv: list[str] | None = None) -> int:
    """Every command's entry point (also `python -m cotune.cli`). A reader that goes away (`cotune run status X |
    head`) ends the command quietly with EXIT_BROKEN_PIPE, whichever command was writing."""
    try:
        try:
            return _run(argv)
        finally:
            sys.stdout.flush()  # a reader that went away shows here rather than at interpreter exit
    except BrokenPipeError:
        # what is still buffered for stdout would fail again at exit ("Exception ignored ... BrokenPipeError"):
        # point stdout at /dev/null, as Python's documentation on SIGPIPE recommends
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):  # stdout without a file descriptor (e.g. captured in-process)
            pass
        return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
