"""The chaos verdict: a pure function from what was recorded to PASS or FAIL.

Everything it judges is evidence collected by the harness (``evidence.py``): one row per
execution of a handler's side effect (``chaos_effects``, with the handler's start time), the
kill log (daemon pids with the moment each was confirmed dead; service faults with when they
began and when the service was back), the daemons' own JSON log lines, the result rows, the
dead letters, and the ``completed`` events read from the events exchange. Nothing is assumed:
a re-run of a side effect is excused only by one named cause whose evidence belongs to the
*earlier* execution and predates the *later* one:

``SIGKILL``
    the earlier execution's daemon was confirmed dead before the later execution started (it
    died between its effect and the commit of its result: at-least-once, no scheme closes it);
``handler failed``
    the earlier execution's daemon logged ``task.failed`` for that share and attempt before the
    later one started (the handler raised after its effect, e.g. its own write was cut by the
    Postgres kill; retried by design);
``lock state lost``
    the earlier execution started within ``AOF_LOSS_WINDOW_S`` before a ``redis_kill`` and the
    later one after it: its lock write may be among the last second of writes an ``appendfsync
    everysec`` Redis loses;
``lease lost``
    the earlier execution's daemon logged ``lock.lost`` for that share before the later one
    started (its lock lapsed unrenewed: a starved or cut-off event loop).

Anything else is a duplicate effect and fails the run. A forced verdict with two overlapping
executions and no such evidence must FAIL (``tests/unit/test_chaos_verdict.py``).
"""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict
from dataclasses import dataclass, field

#: ``appendfsync everysec`` loses up to about one second of writes, two in the worst case
#: (Redis documentation); half a second more for the lock-to-handler gap and clock reading.
AOF_LOSS_WINDOW_S = 2.5
#: Results that count as "the pipeline works again" after a fault.
RECOVERY_RESULTS = 20

SIGKILL = "SIGKILL"
FAILED = "handler failed"
LOCK_STATE_LOST = "lock state lost"
LEASE_LOST = "lease lost"
CAUSES = (SIGKILL, FAILED, LOCK_STATE_LOST, LEASE_LOST)


@dataclass(frozen=True)
class Execution:
    """One run of a handler's side effect, as the handler recorded it."""

    share_id: str
    pid: int
    attempt: int
    #: Handler entry and effect time, epoch seconds (same machine clock as the kill log).
    started: float
    at: float
    kind: str = "effect"


@dataclass(frozen=True)
class LogLine:
    """A daemon log line that can excuse a re-run."""

    pid: int
    event: str
    share_id: str
    attempt: int | None
    at: float
    detail: str = ""


@dataclass(frozen=True)
class Fault:
    name: str
    began: float
    #: The service is back (restarted, re-elected); for faults without an outage, = began.
    returned: float
    #: When ``RECOVERY_RESULTS`` more results had arrived after ``returned`` (None: never).
    recovered: float | None
    note: str = ""


@dataclass(frozen=True)
class DeadLetter:
    message_id: str | None
    share_id: str | None
    reason: str
    attempts: int | None


@dataclass
class Evidence:
    #: Genuine tasks, by share: how often ``publish`` raised, and whether one was confirmed.
    published: list[str] = field(default_factory=list)
    raised: Counter[str] = field(default_factory=Counter)
    confirmed: set[str] = field(default_factory=set)
    #: Result rows per share (more than one is impossible with the unique key, still counted)
    #: and the pid that stored it.
    results: Counter[str] = field(default_factory=Counter)
    winner_pid: dict[str, int] = field(default_factory=dict)
    executions: list[Execution] = field(default_factory=list)
    #: Daemon pid -> epoch second it was confirmed dead (SIGKILL by the harness).
    kills: dict[int, float] = field(default_factory=dict)
    logs: list[LogLine] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)
    #: ``completed`` events per share: distinct event ids, and deliveries (copies) in all.
    completed_ids: dict[str, set[str]] = field(default_factory=dict)
    completed_copies: int = 0
    #: Hostile messages sent: message id -> kind (``network`` for the canary set).
    hostile: dict[str, str] = field(default_factory=dict)
    canary_hits: int = 0
    canary_requests: list[str] = field(default_factory=list)
    withheld_targets: list[str] = field(default_factory=list)
    daemon_crashes: int = 0
    #: Faults the scale asked for: each must appear in the recovery line.
    planned_faults: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0


@dataclass
class Report:
    published: int = 0
    confirmed: int = 0
    publish_raised: int = 0
    raised_shares: int = 0
    raised_accounted: int = 0
    results: int = 0
    genuine_dead: list[str] = field(default_factory=list)
    dead_reasons: dict[str, int] = field(default_factory=dict)
    lost: list[str] = field(default_factory=list)
    never_seen: list[str] = field(default_factory=list)
    unconfirmed: list[str] = field(default_factory=list)
    #: Re-runs by cause: share -> why, with the evidence.
    reruns: dict[str, dict[str, str]] = field(default_factory=lambda: {c: {} for c in CAUSES})
    duplicate_effects: dict[str, str] = field(default_factory=dict)
    events_completed: int = 0
    events_copies: int = 0
    events_wrong: dict[str, int] = field(default_factory=dict)
    hostile_sent: int = 0
    hostile_dead_lettered: int = 0
    hostile_missing: list[str] = field(default_factory=list)
    network_sent: int = 0
    network_dead_lettered: int = 0
    network_reasons: dict[str, int] = field(default_factory=dict)
    withheld_targets: list[str] = field(default_factory=list)
    media_fetched: int = 0
    canary_hits: int = 0
    canary_requests: list[str] = field(default_factory=list)
    daemon_crashes: int = 0
    faults: list[Fault] = field(default_factory=list)
    faults_not_run: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0

    @property
    def lease_lost(self) -> int:
        return len(self.reruns[LEASE_LOST])

    @property
    def failures(self) -> list[str]:
        """Every condition that fails the run, in words (empty: PASS)."""
        out = []
        checks = [
            (self.lost, "lost"), (self.never_seen, "confirmed publishes never seen again"),
            (self.unconfirmed, "publishes never confirmed even re-published"),
            (self.genuine_dead, "genuine tasks dead-lettered"),
            (self.duplicate_effects, "duplicate effects"),
            (self.events_wrong, "results without exactly one completed event"),
            (self.hostile_missing, "hostile inputs not dead-lettered"),
            (self.withheld_targets, "network targets withheld (the guard would connect)"),
        ]
        out += [f"{what}: {len(bad)}" for bad, what in checks if bad]
        if self.raised_accounted != self.raised_shares:
            out.append("raised publishes not accounted for")
        if self.media_fetched:
            out.append(f"media fetched (hostile): {self.media_fetched}")
        if self.canary_hits:
            out.append(f"canary hits: {self.canary_hits}")
        if self.daemon_crashes:
            out.append(f"daemon crashes: {self.daemon_crashes}")
        out += [f"{f.name} never recovered" for f in self.faults if f.recovered is None]
        out += [f"{name} not run" for name in self.faults_not_run]
        return out

    @property
    def passed(self) -> bool:
        return not self.failures

    def render(self) -> str:
        reruns = [
            (SIGKILL, "the earlier run's daemon was SIGKILLed before the later run started"),
            (FAILED, "the earlier run raised after its effect and logged task.failed: retried "
                     "by design"),
            (LOCK_STATE_LOST, "the earlier run's lock was among the writes a Redis kill "
                              "lost (appendfsync everysec)"),
            (LEASE_LOST, "the earlier run's daemon logged lock.lost: its lease lapsed "
                         "unrenewed"),
        ]
        recovery = ", ".join(
            f"{f.name} {_s(f.recovered, f.began)} ({_s(f.recovered, f.returned)} after return)"
            for f in self.faults)
        lines = [
            f"tasks published          {self.published}",
            f"  confirmed              {self.confirmed}",
            f"  publishes raised       {self.publish_raised} (of {self.raised_shares} tasks, "
            f"each re-published; accounted for {self.raised_accounted})",
            f"  never confirmed        {len(self.unconfirmed)}  (must be 0)",
            f"results                  {self.results}",
            f"genuine tasks dead-lettered {len(self.genuine_dead)}  (must be 0) "
            f"{self.dead_reasons} {self.genuine_dead[:5]}",
            f"lost                     {len(self.lost)}  (must be 0) {self.lost[:10]}",
            f"confirmed publishes never seen again {len(self.never_seen)}  (must be 0)",
            f"completed events         {self.events_completed} for {self.results} results, "
            f"{self.events_copies} deliveries; results without exactly one "
            f"{len(self.events_wrong)}  (must be 0) {dict(list(self.events_wrong.items())[:5])}",
            f"duplicate effects        {len(self.duplicate_effects)}  (must be 0)",
            *(f"    {share}: {why}" for share, why in sorted(self.duplicate_effects.items())[:10]),
            *(line for cause, meaning in reruns for line in [
                f"  re-runs, {cause + ':':17}{len(self.reruns[cause])}  ({meaning})",
                *(f"    {share}: {why}" for share, why in
                  sorted(self.reruns[cause].items())[:8])]),
            f"hostile inputs           {self.hostile_sent}, dead-lettered "
            f"{self.hostile_dead_lettered} (must be all) {self.hostile_missing[:10]}",
            f"  network (canary set)   {self.network_sent}, dead-lettered "
            f"{self.network_dead_lettered} {self.network_reasons}",
            f"  network targets withheld {len(self.withheld_targets)}  (must be 0) "
            f"{self.withheld_targets}",
            f"media fetched (hostile)  {self.media_fetched}  (must be 0)",
            f"canary hits              {self.canary_hits}  (must be 0) "
            f"{self.canary_requests[:5]}",
            f"daemon crashes on input  {self.daemon_crashes}  (must be 0)",
            f"recovery after faults    {recovery}",
            *([f"faults not run           {self.faults_not_run}  (must be none)"]
              if self.faults_not_run else []),
            f"elapsed                  {self.elapsed_s:.0f}s",
            f"VERDICT                  {'PASS' if self.passed else 'FAIL'}",
        ]
        if self.failures:
            lines.append("  because: " + "; ".join(self.failures))
        return "\n".join(lines)


def _s(end: float | None, start: float) -> str:
    return "never" if end is None else f"{end - start:.1f}s"


def judge(ev: Evidence) -> Report:
    """Turn the evidence into the report; see the module docstring for the rules."""
    genuine = set(ev.published)
    r = Report(published=len(ev.published), confirmed=len(ev.confirmed),
               publish_raised=sum(ev.raised.values()), raised_shares=len(ev.raised),
               results=sum(1 for s in ev.results if s in genuine), faults=list(ev.faults),
               elapsed_s=ev.elapsed_s,
               daemon_crashes=ev.daemon_crashes, canary_hits=ev.canary_hits,
               canary_requests=list(ev.canary_requests),
               withheld_targets=list(ev.withheld_targets))
    ran = Counter(f.name for f in ev.faults)
    r.faults_not_run = list((Counter(ev.planned_faults) - ran).elements())
    hostile_ids = set(ev.hostile)
    dead_genuine = [d for d in ev.dead if d.message_id not in hostile_ids
                    and d.share_id in genuine]
    dead_shares = {d.share_id for d in dead_genuine if d.reason}
    r.genuine_dead = sorted({d.share_id or "?" for d in dead_genuine})
    r.dead_reasons = dict(Counter(d.reason for d in dead_genuine))
    executed = {e.share_id for e in ev.executions}
    r.unconfirmed = sorted(genuine - ev.confirmed)
    r.lost = sorted(s for s in ev.confirmed if s not in ev.results and s not in dead_shares)
    r.never_seen = sorted(s for s in r.lost if s not in executed
                          and s not in ev.completed_ids)
    r.raised_accounted = sum(1 for s in ev.raised if s in ev.results)
    _judge_reruns(ev, r)
    _judge_events(ev, r, genuine)
    _judge_hostile(ev, r, hostile_ids)
    return r


def _judge_reruns(ev: Evidence, r: Report) -> None:
    runs: dict[str, list[Execution]] = defaultdict(list)
    for e in ev.executions:
        if e.kind == "media_fetch":
            r.media_fetched += 1
        else:
            runs[e.share_id].append(e)
    for share, execs in runs.items():
        execs.sort(key=lambda e: (e.started, e.at))
        for earlier, later in itertools.pairwise(execs):
            cause = excuse(ev, earlier, later)
            if cause is None:
                r.duplicate_effects[share] = (
                    f"pid {earlier.pid} attempt {earlier.attempt} started {earlier.started:.3f}"
                    f"{_killed(ev, earlier.pid)}, then pid {later.pid} attempt {later.attempt} "
                    f"started {later.started:.3f}; result stored by pid "
                    f"{ev.winner_pid.get(share)}")
            else:
                r.reruns[cause[0]][share] = cause[1]


def _killed(ev: Evidence, pid: int) -> str:
    return f" (killed {ev.kills[pid]:.3f})" if pid in ev.kills else ""


def excuse(ev: Evidence, earlier: Execution, later: Execution) -> tuple[str, str] | None:
    """The one cause (and its evidence) that explains ``later`` re-running ``earlier``'s
    effect, or None: then it is a duplicate."""
    killed = ev.kills.get(earlier.pid)
    if killed is not None and earlier.at <= killed < later.started:
        return SIGKILL, (f"pid {earlier.pid} killed {later.started - killed:.2f}s before the "
                         f"re-run started")
    for line in ev.logs:
        if (line.event == "task.failed" and line.pid == earlier.pid
                and line.share_id == earlier.share_id and line.attempt == earlier.attempt
                and earlier.started <= line.at < later.started):
            return FAILED, f"attempt {earlier.attempt} failed after its effect: {line.detail}"
    for f in ev.faults:
        if (f.name == "redis_kill" and f.began - AOF_LOSS_WINDOW_S <= earlier.started <= f.began
                and later.started > f.began):
            return LOCK_STATE_LOST, (f"run started {f.began - earlier.started:.2f}s before "
                                     "the Redis kill, re-run after it")
    for line in ev.logs:
        if (line.event == "lock.lost" and line.pid == earlier.pid
                and line.share_id == earlier.share_id
                and earlier.started <= line.at < later.started):
            return LEASE_LOST, f"pid {earlier.pid} logged lock.lost: {line.detail}"
    return None


def _judge_events(ev: Evidence, r: Report, genuine: set[str]) -> None:
    """Exactly one ``completed`` event (distinct event id; a re-sent copy of the same event
    is at-least-once delivery, not a second completion) per result, none without one."""
    r.events_completed = sum(len(ids) for s, ids in ev.completed_ids.items() if s in genuine)
    r.events_copies = ev.completed_copies
    for share in (set(ev.results) | set(ev.completed_ids)) & genuine:
        n = len(ev.completed_ids.get(share, ()))
        rows = ev.results.get(share, 0)
        if n != 1 or rows != 1:
            r.events_wrong[share] = n if rows == 1 else -rows


def _judge_hostile(ev: Evidence, r: Report, hostile_ids: set[str]) -> None:
    dead = {d.message_id: d for d in ev.dead if d.message_id in hostile_ids and d.reason}
    r.hostile_sent = len(hostile_ids)
    r.hostile_dead_lettered = len(dead)
    r.hostile_missing = sorted(hostile_ids - set(dead))
    network = [m for m, kind in ev.hostile.items() if kind == "network"]
    r.network_sent = len(network)
    r.network_dead_lettered = sum(1 for m in network if m in dead)
    r.network_reasons = dict(Counter(dead[m].reason for m in network if m in dead))
