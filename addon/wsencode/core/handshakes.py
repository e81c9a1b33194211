"""Every handshake the addon follows, from receipt to its one `handshake` record.

The core the addon class feeds. Events come in as calls — received, sent
upstream, answered (its status reached the response hooks), delivered (the
client got it), ended, a stall due — with times from an injected clock, and
records come out, for the addon to write, mark and log. What the proxy
observed of a handshake is read from its `StreamFacts`, where the bridge (or
the addon's hooks) noted it; its lifecycle is its `Progress`. When each stall
is due is the `StallWatch`'s, which calls `on_stall_due` with the flow's id.

A script reload hands every waiting handshake to the next copy of the addon
(`hand_over`, `take_over`): plain data, which that copy rebuilds with its own
classes, so its stalls are still reported on time and its record written.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from . import diagnosis
from .handshake import Handshake, Transport
from .lifecycle import EndCause, HandshakeEnded, Phase, Progress, Stage
from .policy import EncodingPolicy
from .records import HANDSHAKE, STALL, Outcome, Record
from .stallwatch import StallWatch
from .streamfacts import StreamFacts

REMEMBERED_STALLS = 1000


@dataclass
class FollowedHandshake:
    """One handshake the addon follows until its record."""

    flow_id: str
    client_id: str
    progress: Progress
    policy: EncodingPolicy
    url: str  # redacted
    accept_encoding_client: str | None
    accept_encoding_upstream: str | None
    upstream_transport: str | None = None
    stage: Stage = Stage.QUEUED  # where it was last seen
    # Its status reached the response hooks and waits to go out (an addon
    # after this one, or the user, may still hold it); whether that status's
    # accept fails to answer the key.
    answered: bool = False
    bad_accept: bool = False

    @property
    def transport(self) -> Transport:
        return self.progress.handshake.transport

    @property
    def facts(self) -> StreamFacts:
        return self.progress.facts

    def record(self, event: str, now: float, text: str, outcome: Outcome | None = None) -> Record:
        progress = self.progress
        waited = progress.waited(now)
        return Record(
            event=event,
            flow_id=self.flow_id,
            transport=self.transport.value,
            upstream_transport=self.upstream_transport,
            url=self.url,
            policy=self.policy.value,
            accept_encoding_client=self.accept_encoding_client,
            accept_encoding_upstream=self.accept_encoding_upstream,
            waited_s=None if waited is None else round(waited, 3),
            status=progress.status,
            upstream_status=progress.upstream_status,
            client_bytes_before_status=progress.client_bytes_before_status,
            stuck_in=self.stage.value,
            received_s=round(progress.received(now), 3),
            diagnosis=text,
            kind=progress.handshake.kind,
            outcome=outcome,
        )


@dataclass
class Summary:
    """Counts since the addon was loaded (and across reloads)."""

    outcomes: Counter[tuple[str, str]] = field(default_factory=Counter)  # (outcome, transport), WebSockets'
    event_streams: Counter[tuple[str, str]] = field(default_factory=Counter)  # (outcome, transport)
    stalls: int = 0
    slowest_s: float | None = None  # the longest time to a status a client got
    slowest_url: str | None = None

    def note(self, followed: FollowedHandshake, now: float) -> None:
        progress = followed.progress
        counts = self.outcomes if progress.handshake.is_websocket else self.event_streams
        counts[progress.phase.value, followed.transport.value] += 1
        if progress.status is not None:
            seconds = progress.received(now)
            if self.slowest_s is None or seconds > self.slowest_s:
                self.slowest_s, self.slowest_url = seconds, followed.url


@dataclass
class Handoff:
    """What a copy of the addon that is being unloaded leaves the next one:
    plain data and the live flows' ids, no object of its own classes but the
    facts (read by attribute name)."""

    waiting: list[dict[str, Any]]
    summary: Summary
    stalls: OrderedDict[str, tuple[str, str]]


class Handshakes:
    """The handshakes still waiting for their record, and what became of the rest."""

    def __init__(self, watch: StallWatch, on_stall_due: Callable[[str], None]) -> None:
        self.watch = watch
        self.on_stall_due = on_stall_due
        self.waiting: dict[str, FollowedHandshake] = {}
        # The waiting handshakes of each client connection, for its disconnect.
        self.of_client: dict[str, list[str]] = {}
        # The last stalls, each with its latest sentence (flow id -> (url, text)).
        self.stalls: OrderedDict[str, tuple[str, str]] = OrderedDict()
        self.summary = Summary()
        self.stall_after = 2.0

    def __iter__(self) -> Iterator[FollowedHandshake]:
        return iter(self.waiting.values())

    def __len__(self) -> int:
        return len(self.waiting)

    def get(self, flow_id: str) -> FollowedHandshake | None:
        return self.waiting.get(flow_id)

    def of(self, client_id: str) -> list[str]:
        return list(self.of_client.get(client_id, ()))

    def longest_wait(self, now: float) -> float | None:
        return max((f.progress.received(now) for f in self.waiting.values() if not f.answered), default=None)

    def without_status(self) -> int:
        """How many still wait for a status (not an opened event stream's first event)."""
        return sum(f.progress.status is None for f in self.waiting.values())

    # -- events ------------------------------------------------------------

    def received(self, flow_id: str, client_id: str, handshake: Handshake, facts: StreamFacts, now: float,
                 policy: EncodingPolicy, url: str, accept_encoding: str | None) -> FollowedHandshake:
        """The proxy has the handshake: the client waits from now."""
        followed = FollowedHandshake(
            flow_id, client_id, Progress(handshake, received_at=now, facts=facts), policy, url,
            accept_encoding_client=accept_encoding, accept_encoding_upstream=accept_encoding,
        )
        self._follow(followed)
        self.watch.arm(flow_id, self.stall_after, lambda: self.on_stall_due(flow_id))
        return followed

    def sent_upstream(self, flow_id: str, policy: EncodingPolicy, accept_encoding: str | None) -> None:
        """The request, as it goes upstream (after the request hook)."""
        followed = self.waiting.get(flow_id)
        if followed is not None:
            followed.policy, followed.accept_encoding_upstream = policy, accept_encoding

    def answered(self, flow_id: str, upstream_transport: str | None, bad_accept: bool) -> None:
        """Its status reached the response hooks; it goes out once they are
        all done, unless one of them (or the user) holds or kills it."""
        followed = self.waiting.get(flow_id)
        if followed is not None:
            followed.answered, followed.bad_accept = True, bad_accept
            followed.upstream_transport = upstream_transport

    def delivered(self, flow_id: str, status: int, content_encoding: str | None, now: float,
                  content_type: str | None = None) -> Record | None:
        """The client got `status`: the handshake's record. An event stream
        that opened has its record at its first event (`first_event`) or its
        end: it stays followed, with no stall due."""
        followed = self.waiting.get(flow_id)
        if followed is None or followed.progress.status is not None:
            return None
        phase = followed.progress.status_arrived(status, now, content_encoding=content_encoding,
                                                 bad_accept=followed.bad_accept, content_type=content_type)
        if phase is Phase.OPENED:
            followed.answered, followed.stage = True, Stage.DONE
            self.watch.disarm(flow_id)
            return None
        return self._finish(followed, Stage.DONE, now)

    def first_event(self, flow_id: str, now: float) -> Record | None:
        """An opened event stream's first event went through: its record."""
        followed = self.waiting.get(flow_id)
        if followed is None:
            return None
        try:
            followed.progress.first_event(now)
        except HandshakeEnded:
            return None
        return self._finish(followed, Stage.DONE, now)

    def ended(self, flow_id: str, cause: EndCause, stage: Stage, now: float, upstream_transport: str | None,
              reason: str | None = None) -> Record | None:
        """The flow ended without the client getting a status: the handshake's record."""
        followed = self.waiting.get(flow_id)
        if followed is None:
            return None
        try:
            followed.progress.end(cause, now, reason)
        except HandshakeEnded:
            return None
        if followed.progress.phase is Phase.OPENED:  # its head reached the client: it is nowhere stuck
            stage = Stage.DONE
        else:
            followed.upstream_transport = upstream_transport
        return self._finish(followed, stage, now)

    def stalled(self, flow_id: str, stage: Stage, now: float, upstream_transport: str | None) -> Record | None:
        """Its stall is due: the stall record, or None if it has ended."""
        followed = self.waiting.get(flow_id)
        if followed is None:
            return None
        try:
            followed.progress.stall()
        except HandshakeEnded:
            return None
        followed.stage, followed.upstream_transport = stage, upstream_transport
        text = diagnosis.stall(followed.progress, stage, now, followed.accept_encoding_upstream)
        self.summary.stalls += 1
        self._remember_stall(flow_id, followed.url, text)
        return followed.record(STALL, now, text)

    def stall_after_changed(self, stall_after: float) -> None:
        """The threshold changed: every handshake not yet reported stalls at
        the new one, counted from its receipt (now, if already past it)."""
        self.stall_after = stall_after
        for followed in self.waiting.values():
            if not followed.progress.stalled:
                self._arm_from_receipt(followed)

    def forget(self, flow_id: str) -> None:
        followed = self.waiting.pop(flow_id, None)
        if followed is None:
            return
        ids = self.of_client[followed.client_id]
        ids.remove(flow_id)
        if not ids:
            del self.of_client[followed.client_id]
        self.watch.disarm(flow_id)

    # -- a script reload ---------------------------------------------------------

    def hand_over(self) -> Handoff:
        waiting = [
            {"flow_id": f.flow_id, "client_id": f.client_id, "received_at": f.progress.received_at,
             "stalled": f.progress.stalled, "policy": f.policy.value, "url": f.url,
             "accept_encoding_client": f.accept_encoding_client,
             "accept_encoding_upstream": f.accept_encoding_upstream, "answered": f.answered,
             "bad_accept": f.bad_accept, "upstream_transport": f.upstream_transport,
             # an event stream that opened: its head (status, when, content-encoding)
             "opened": None if f.progress.phase is not Phase.OPENED
             else (f.progress.status, f.progress.status_at, f.progress.content_encoding)}
            for f in self.waiting.values()
        ]
        for flow_id in list(self.waiting):
            self.forget(flow_id)
        return Handoff(waiting, self.summary, self.stalls)

    def take_over(self, handoff: Handoff, classified: Callable[[str], tuple[Handshake, StreamFacts] | None]) -> None:
        """Follow what an earlier copy handed over; `classified` gives each
        flow's handshake and facts, or None for a flow that is gone."""
        self.summary = Summary(**vars(handoff.summary))
        self.stalls = OrderedDict(handoff.stalls)
        for item in handoff.waiting:
            found = classified(item["flow_id"])
            if found is None:
                continue
            handshake, facts = found
            followed = FollowedHandshake(
                item["flow_id"], item["client_id"], Progress(handshake, received_at=item["received_at"], facts=facts),
                EncodingPolicy(item["policy"]), item["url"], item["accept_encoding_client"],
                item["accept_encoding_upstream"], item.get("upstream_transport"), answered=item["answered"],
                bad_accept=item["bad_accept"],
            )
            if item["stalled"]:
                followed.progress.stall()
            self._follow(followed)
            if item.get("opened"):
                status, status_at, content_encoding = item["opened"]
                followed.progress.status_arrived(status, status_at, content_encoding)
                followed.stage = Stage.DONE
            elif not followed.progress.stalled:
                self._arm_from_receipt(followed)

    # -- -----------------------------------------------------------------------

    def _follow(self, followed: FollowedHandshake) -> None:
        self.waiting[followed.flow_id] = followed
        of_client = self.of_client.setdefault(followed.client_id, [])
        if followed.flow_id not in of_client:
            of_client.append(followed.flow_id)

    def _arm_from_receipt(self, followed: FollowedHandshake) -> None:
        flow_id = followed.flow_id
        self.watch.arm_at(flow_id, followed.progress.received_at + self.stall_after, self.stall_after,
                          lambda: self.on_stall_due(flow_id))

    def _remember_stall(self, flow_id: str, url: str, text: str) -> None:
        self.stalls[flow_id] = (url, text)
        while len(self.stalls) > REMEMBERED_STALLS:
            self.stalls.popitem(last=False)

    def _finish(self, followed: FollowedHandshake, stage: Stage, now: float) -> Record:
        self.forget(followed.flow_id)
        progress = followed.progress
        text = diagnosis.outcome(progress, stage, now, followed.accept_encoding_upstream)
        followed.stage = stage
        if followed.flow_id in self.stalls:
            self.stalls[followed.flow_id] = (followed.url, text)
        self.summary.note(followed, now)
        first_event_s = None if progress.first_event_s is None else round(progress.first_event_s, 3)
        return followed.record(HANDSHAKE, now, text, Outcome(progress.phase.value, progress.stalled,
                                                             progress.content_encoding, first_event_s))
