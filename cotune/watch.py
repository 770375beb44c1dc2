"""Follow a run's events: in a terminal one progress bar for the work in flight, a line per step; elsewhere (a pipe, a
log file) plain lines only: per piece of work its first report, its completion and in between at most one line every
PROGRESS_INTERVAL_S of the run's time (never carriage-return frames).

Progress reads "<done>/<total> <unit>": what the reporting stage counts (UNITS; the stage is the party's or the
alignment service's Operation.progress.stage, carried in the event's message), so "2/2 batches" of training is not
mistaken for two evaluation items."""

from __future__ import annotations

import sys
import time

from cotune.rpc.clients import CoordinatorClient
from cotune.v1 import coordinator_pb2 as pb

TERMINAL = (pb.RUN_SUCCEEDED, pb.RUN_FAILED, pb.RUN_CANCELLED)
STREAM_DEADLINE_S = 300.0
# a stream's own deadline; the coordinator restarting; its watch cap full or its watchdog ending a stuck stream
RESUME_ON = {"DEADLINE_EXCEEDED", "UNAVAILABLE", "RESOURCE_EXHAUSTED", "CANCELLED"}
PROGRESS_INTERVAL_S = 10.0  # outside a terminal: at most one progress line per piece of work this often (run time)
# what done/total counts, by progress stage (Operation.progress.stage: cotune/party/tasks.py, cotune/algorithms/*,
# alignment/service.py); a stage not listed shows bare numbers
UNITS = {
    "evaluate": "items",       # public samples whose loss is measured, then multiple-choice items scored
    "train": "batches",        # optimizer steps over all epochs (cotune.lm.train: progress after each batch)
    "distill": "batches",
    "co-distill": "batches",
    "logits": "samples",       # public samples whose top-k logits are computed
    "own-loss": "samples",
    "mined": "tokens",         # source-vocabulary tokens matched by MinED
    "align": "samples",        # public samples aligned across two tokenizers
    "compress": "stages", "pack": "stages", "load": "stages",
}


def watch_run(client: CoordinatorClient, run_id: str, *, stream=sys.stderr, quiet: bool = False,
              after_seq: int = 0) -> pb.Run:
    """Stream events (those after `after_seq`) until the run ends; returns the final run."""
    import grpc

    bar = None
    bar_key = None
    last_seq = after_seq
    plain = None if _is_terminal(stream) else PlainProgress(stream)  # no bars (their \r updates) outside a terminal
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


def progress_label(event) -> str:
    """"<step> <party> <stage>" of a progress event (the stage left out where it repeats the step)."""
    stage = event.message if event.message != event.step else ""
    return " ".join(part for part in (event.step, event.party_id, stage) if part)


def progress_count(done: int, total: int, stage: str) -> str:
    """"40/224 items": the numbers as reported, with what the stage counts (UNITS)."""
    unit = UNITS.get(stage, "")
    return f"{done}/{total}" + (f" {unit}" if unit else "")


class PlainProgress:
    """Progress lines for a stream that is not a terminal. A piece of work is (round, step, party, stage); for each it
    prints its first report, its completion (done == total) and in between at most one line every `interval_s` of
    the run's time (the events' own times, so a run read back later prints what it printed live), never the same
    numbers twice in a row, with the seconds since the piece of work was first reported."""

    def __init__(self, stream, *, interval_s: float = PROGRESS_INTERVAL_S):
        self.stream = stream
        self.interval_s = interval_s
        self._work: dict[tuple, dict] = {}  # key -> first, last (printed at), shown (done, total), total

    def show(self, event) -> bool:
        """Print a line for this progress event if it is due; returns whether it printed one."""
        now = event.time or time.time()
        key = (event.round, event.step, event.party_id, event.message)
        work = self._work.get(key)
        again = work is not None and (event.total != work["total"]
                                      or (work["shown"][0] == work["total"] and event.done < event.total))
        if work is None or again:  # new work (another total, or one that completed starting over)
            work = self._work[key] = {"first": now, "last": None, "shown": None, "total": event.total}
        numbers = (event.done, event.total)
        due = (work["last"] is None or (event.done >= event.total and numbers != work["shown"])
               or (now - work["last"] >= self.interval_s and numbers != work["shown"]))
        if not due:
            return False
        took = now - work["first"]
        line = (f"[round {event.round}] {progress_label(event)}: {progress_count(event.done, event.total, event.message)}"
                + (f" ({took:.0f} s)" if work["last"] is not None else ""))
        print(line, file=self.stream, flush=True)
        work["last"], work["shown"] = now, numbers
        return True


def _show(event, run_id, bar, bar_key, stream, plain=None):
    """Render one event: progress updates one bar in place (with `plain`, a PlainProgress: the lines it finds due
    instead); anything else closes the bar and prints a line."""
    from tqdm import tqdm

    if event.kind == "progress" and event.total and plain is not None:
        plain.show(event)
        return bar, bar_key
    if event.kind == "progress" and event.total:
        key = (event.round, event.step, event.party_id, event.message)
        if key != bar_key:
            if bar is not None:
                bar.close()
            bar = tqdm(total=event.total, desc=f"r{event.round} {progress_label(event)}", file=stream, leave=False,
                       dynamic_ncols=True, unit=f" {UNITS[event.message]}" if event.message in UNITS else "it")
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
