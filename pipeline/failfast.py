"""Fail fast across ranks: one line per failure, the traceback in a file, nobody left waiting.

    guard = RankGuard("simvlg train", run_dir / "logs", rank)
    with guard:                        # an exception: traceback -> logs/rank<R>.log, one line, exit 1
        init_process_group(...)
        guard.watch_peers(world_size)  # from here on a dead or failed peer ends this rank too
        ...
    # leaving the block normally calls guard.finish(): the watch stops without a false alarm

Why: a rank that raises leaves its peers blocked inside a collective until the backend's timeout
(30 minutes for gloo and NCCL), and a rank killed outright (SIGKILL, the OOM killer, a lost node)
says nothing at all. Each rank therefore runs a watch thread on the rendezvous store
(MASTER_ADDR:MASTER_PORT, the TCPStore every rank already talks to):
  - every POLL seconds it bumps its own heartbeat counter and reads its ring successor's (rank+1);
    a successor whose counter has not moved for PEER_TIMEOUT seconds is reported as gone;
  - it reads the shared failure record; once a peer has reported a failure this rank prints one line
    and exits with status 1 at once (os._exit: the main thread may be stuck in a collective);
  - if the store itself is unreachable, rank 0 (its host) is gone: same.
Watching only the ring successor keeps the store's load O(world size) per poll; whoever sees a death
first records it, and everyone reads that record.
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
import threading
import time
import traceback
from pathlib import Path

POLL = float(os.environ.get("SIMVLG_FAILFAST_POLL", "2"))  # seconds between store checks
PEER_TIMEOUT = float(os.environ.get("SIMVLG_PEER_TIMEOUT", "40"))  # heartbeat silence = peer gone
_KEY = "simvlg-failfast/"


def one_line(exc: BaseException) -> str:
    """`Type: message` on one line. A DataLoader worker re-raises with the worker's whole traceback
    in the message: its last line is the cause."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    if len(lines) > 1 and ":" in lines[-1]:
        return lines[-1]  # already "SomeError: what happened"
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def hard_exit(code: int) -> None:
    """Exit now: no atexit handlers, no joins on worker processes or collectives that may never end."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # exiting anyway
            pass
    logging.shutdown()
    os._exit(code)


class RankGuard:
    def __init__(self, what: str, log_dir: Path | None, rank: int):
        self.what, self.rank = what, rank
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self._store = None
        self._world = 1
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.on_failure = []  # callables run (best effort) before a failing rank exits

    # -- this rank's own failures ---------------------------------------------------------------
    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is None or (isinstance(exc, SystemExit) and exc.code in (0, None)):
            self.finish()
            return False
        if isinstance(exc, SystemExit):  # a deliberate exit: its message is the one line
            line = str(exc.code) if not isinstance(exc.code, int) else f"exit status {exc.code}"
            if not isinstance(exc.code, int):
                print(line, file=sys.stderr, flush=True)
            self._report(line)
            hard_exit(exc.code if isinstance(exc.code, int) else 1)
        where = self.write_traceback(exc_type, exc, tb)
        line = one_line(exc)
        print(
            f"{self.what}: rank {self.rank} failed: {line}" + (f" (traceback: {where})" if where else ""),
            file=sys.stderr,
            flush=True,
        )
        self._report(line)
        for fn in self.on_failure:
            try:
                fn()
            except Exception:  # best effort on the way out
                pass
        hard_exit(130 if isinstance(exc, KeyboardInterrupt) else 1)

    def write_traceback(self, exc_type, exc, tb) -> Path | None:
        if self.log_dir is None:
            traceback.print_exception(exc_type, exc, tb, file=sys.stderr)
            return None
        try:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            path = self.log_dir / f"rank{self.rank}.log"
            with open(path, "a") as f:
                f.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} rank {self.rank} failed\n")
                traceback.print_exception(exc_type, exc, tb, file=f)
            return path
        except OSError:
            traceback.print_exception(exc_type, exc, tb, file=sys.stderr)
            return None

    def _report(self, line: str) -> None:
        """Record the failure where every peer reads it; the store's host (rank 0) waits briefly so
        its peers read the cause before the store goes away with it."""
        if self._store is None:
            return
        self._stop.set()
        try:
            if self._store.add(_KEY + "failures", 1) == 1:
                self._store.set(_KEY + "cause", f"rank {self.rank} failed: {line}")
            if self.rank == 0:
                deadline = time.monotonic() + 3 * POLL
                while self._store.add(_KEY + "acks", 0) < self._world - 1 and time.monotonic() < deadline:
                    time.sleep(0.1)
        except Exception:  # the store may be gone already
            pass

    # -- peers ------------------------------------------------------------------------------------
    def watch_peers(self, world_size: int) -> None:
        """Start the watch thread (after the process group exists). A no-op on one rank."""
        self._world = world_size
        if world_size <= 1 or self._thread is not None:
            return
        import torch.distributed as dist

        host, port = os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ["MASTER_PORT"])
        self._store = dist.TCPStore(
            host,
            port,
            is_master=False,
            wait_for_workers=False,
            timeout=datetime.timedelta(seconds=max(10.0, 3 * POLL)),
        )
        self._thread = threading.Thread(target=self._watch, name="simvlg-failfast", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        store, me = self._store, self.rank
        nxt = (me + 1) % self._world
        last_seen, last_change = -1, time.monotonic()
        while not self._stop.wait(POLL):
            try:
                store.add(_KEY + f"beat{me}", 1)
                if store.check([_KEY + "cause"]):
                    cause = store.get(_KEY + "cause").decode()
                    store.add(_KEY + "acks", 1)
                    self._peer_failed(cause)
                beat = store.add(_KEY + f"beat{nxt}", 0)
            except Exception:  # connection refused/reset: the store's host is gone
                if not self._stop.is_set():
                    self._peer_failed("lost contact with rank 0 (its process is gone: failed or killed)")
                return
            now = time.monotonic()
            if beat != last_seen:
                last_seen, last_change = beat, now
            elif beat > 0 and now - last_change > PEER_TIMEOUT:
                cause = (
                    f"rank {nxt} stopped responding (no heartbeat for {now - last_change:.0f} s: "
                    "killed, out of memory, or its node is gone)"
                )
                try:
                    if store.add(_KEY + "failures", 1) == 1:
                        store.set(_KEY + "cause", cause)
                except Exception:
                    pass
                self._peer_failed(cause)

    def _peer_failed(self, cause: str) -> None:
        if self._stop.is_set():
            return
        print(f"{self.what}: rank {self.rank} stops: {cause}", file=sys.stderr, flush=True)
        for fn in self.on_failure:
            try:
                fn()
            except Exception:
                pass
        hard_exit(1)

    def finish(self, timeout: float = 60.0) -> None:
        """Normal end: stop watching, then (rank 0) keep the store up until every rank has stopped
        its watch, so nobody mistakes rank 0's exit for a failure."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        try:
            self._store.add(_KEY + "done", 1)
            if self.rank == 0:
                deadline = time.monotonic() + timeout
                while self._store.add(_KEY + "done", 0) < self._world and time.monotonic() < deadline:
                    time.sleep(0.05)
        except Exception:  # a peer's failure is reported by that peer
            pass
