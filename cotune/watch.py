"""Follow a run's events: in a terminal one progress bar for the work in flight, a line per step; elsewhere (a pipe, a
log file) plain lines only, a progress line per piece of work at most every PROGRESS_INTERVAL_S."""

from __future__ import annotations

import sys
import time

from cotune.rpc.clients import CoordinatorClient
from cotune.v1 import coordinator_pb2 as pb

TERMINAL = (pb.RUN_SUCCEEDED, pb.RUN_FAILED, pb.RUN_CANCELLED)
STREAM_DEADLINE_S = 300.0
# a stream's own deadline; the coordinator restarting; its watch cap full or its watchdog ending a stuck stream
RESUME_ON = {"DEADLINE_EXCEEDED", "UNAVAILABLE", "RESOURCE_EXHAUSTED", "CANCELLED"}


def watch_run(client: CoordinatorClient, run_id: str, *, stream=sys.stderr, quiet: bool = False,
              after_seq: int = 0) -> pb.Run:
    """Stream events (those after `after_seq`) until the run ends; returns the final run."""
    import grpc

    from cotune.cluster import Progress

    bar = None
    bar_key = None
    last_seq = after_seq
    plain = None if _is_terminal(stream) else Progress(stream)  # no bars (their \r updates) outside a terminal
    try:
        while True:
            try:
                events = client.watch_run(run_id, after_seq=last_seq, timeout=STREAM_DEADLINE_S)
                for event in events:
                    last_seq = event.seq
                    if not quiet:
                        bar, bar_key = _show(event, run_id, bar, bar_key, stream, plain)
            except grpc.RpcError as exc:  # every stream has a deadline; reconnect and resume after last_seq
                if exc.code().name not in RESUME_ON:
                    raise
                time.sleep(0.0 if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED else 1.0)
                continue
            run = client.get_run(run_id)
            if run.state in TERMINAL:
                return run
    finally:
        if bar is not None:
            bar.close()


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _show(event, run_id, bar, bar_key, stream, plain=None):
    """Render one event: progress updates one bar in place (with `plain`, a Progress: a line per piece of work at
    most every interval instead); anything else closes the bar and prints a line."""
    from tqdm import tqdm

    if event.kind == "progress" and event.total and plain is not None:
        label = f"r{event.round} {event.step} {event.party_id} {event.message}".strip()
        plain.every(label, lambda _first: f"[round {event.round}] {label[len(f'r{event.round} '):]}: "
                                          f"{event.done}/{event.total}")
        return bar, bar_key
    if event.kind == "progress" and event.total:
        key = (event.round, event.step, event.party_id, event.message)
        if key != bar_key:
            if bar is not None:
                bar.close()
            label = f"r{event.round} {event.step} {event.party_id} {event.message}".strip()
            bar = tqdm(total=event.total, desc=label, file=stream, leave=False, dynamic_ncols=True)
            bar_key = key
        bar.total = event.total
        bar.n = event.done
        bar.refresh()
        return bar, bar_key
    if bar is not None:
        bar.close()
        bar, bar_key = None, None
    if event.kind == "step":
        print(f"[round {event.round}] {event.step}", file=stream, flush=True)
    elif event.kind == "warning":
        print(f"[round {event.round}] warning: {event.message}", file=stream, flush=True)
    elif event.kind == "info":
        print(f"[round {event.round}] {event.message}", file=stream, flush=True)
    elif event.kind == "state":
        state = pb.RunState.Name(event.state)
        message = "" if event.message == state else event.message  # not "RUN_SUCCEEDED RUN_SUCCEEDED"
        print(f"run {run_id}: {state} {message}".rstrip(), file=stream, flush=True)
    return bar, bar_key


def last_event_seq(client: CoordinatorClient, run_id: str) -> int:
    """The sequence number of the last event of a run that has ended (its event stream closes at the end)."""
    return max((event.seq for event in client.watch_run(run_id, timeout=STREAM_DEADLINE_S)), default=0)
