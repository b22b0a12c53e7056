"""The Store conformance suite: every rule documented in vmcluster.clusterstate.store, checked
against every implementation (the ``backend`` fixture: FakeStore and EtcdStore on a real etcd).

Each test runs one async scenario with ``asyncio.run`` (through ``backend.run``) under a timeout.
Every key is under the test's unique prefix ``p``. Watches are consumed with async iteration under
``asyncio.timeout`` and closed with ``contextlib.aclosing`` (see ``watching``). Exactly-once
delivery is checked with a sentinel: after the changes under test, a sentinel key is put and the
events up to and including the sentinel must be exactly the expected ones.

At the end: scenarios for one implementation only (FakeStore's ``available`` and ``compact``;
EtcdStore's endpoint failover, dead endpoints, watch resumption after a lost connection or on
another endpoint, and a slow endpoint). The etcd-only network faults go through ``_Proxy``, a TCP
proxy the test controls, so no private EtcdStore method is called.

Known bugs are strict xfails for the implementation that has them (``backend.known_bug``).
"""

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable

import pytest
from tests.clusterstate.store_backends import Backend, EtcdServer, free_port, settle_grpc

from vmcluster.clusterstate.etcd import EtcdStore
from vmcluster.clusterstate.fake import FakeStore
from vmcluster.clusterstate.store import (
    Commit,
    Entry,
    EventKind,
    LeaseExpired,
    Put,
    Store,
    StoreUnavailable,
    WatchCompacted,
    WatchEvent,
)

WATCH_TIMEOUT_S = 5.0
EXPIRY_WAIT_S = 4.0  # a 1 s lease must be gone within this (etcd rounds TTLs up to its minimum)
UNKNOWN_LEASE = 0x5EED_0000_0000_0001
SENTINEL = "~sentinel"


# ----- helpers -----


def put_event(key: str, value: bytes, revision: int) -> WatchEvent:
    return WatchEvent(kind=EventKind.PUT, key=key, value=value, revision=revision)


def delete_event(key: str, revision: int) -> WatchEvent:
    return WatchEvent(kind=EventKind.DELETE, key=key, value=b"", revision=revision)


def watching(
    events: AsyncIterator[WatchEvent],
) -> contextlib.aclosing[AsyncGenerator[WatchEvent, None]]:
    """``async with watching(store.watch_prefix(...)) as watch``: closed when the block ends."""
    assert isinstance(events, AsyncGenerator)  # what both implementations return
    return contextlib.aclosing(events)


async def take(
    watch: AsyncIterator[WatchEvent], n: int, *, within: float = WATCH_TIMEOUT_S
) -> list[WatchEvent]:
    """The next ``n`` events of ``watch``."""
    events: list[WatchEvent] = []
    if n == 0:
        return events
    async with asyncio.timeout(within):
        async for watch_event in watch:
            events.append(watch_event)
            if len(events) == n:
                break
    return events


async def take_until(
    watch: AsyncIterator[WatchEvent], key: str, *, within: float = WATCH_TIMEOUT_S
) -> list[WatchEvent]:
    """The events of ``watch`` up to and including the first one on ``key``."""
    events: list[WatchEvent] = []
    async with asyncio.timeout(within):
        async for watch_event in watch:
            events.append(watch_event)
            if watch_event.key == key:
                break
    return events


async def put_sentinel(store: Store, prefix: str) -> WatchEvent:
    """Put the sentinel key under ``prefix``; returns the event a watcher must see for it."""
    key = prefix + SENTINEL
    revision = await store.put(key, b"end")
    return put_event(key, b"end", revision)


async def wait_gone(store: Store, key: str, *, within: float = EXPIRY_WAIT_S) -> None:
    """Poll until ``key`` is absent (fails after ``within`` seconds)."""
    deadline = time.monotonic() + within
    while await store.get(key) is not None:
        assert time.monotonic() < deadline, f"{key} still exists after {within} s"
        await asyncio.sleep(0.1)


async def current_revision(store: Store, p: str) -> int:
    return (await store.get_prefix(p + "nothing-here/")).revision


# ----- get / put -----


def test_get_missing_key_is_none(backend: Backend) -> None:
    async def scenario(store: Store, p: str) -> None:
        assert await store.get(p + "missing") is None
        await store.put(p + "other", b"x")
        assert await store.get(p + "missing") is None
        assert await store.get(p + "oth") is None  # a prefix of a key is not that key

    backend.run(scenario)


def test_put_get_round_trip_and_revisions(backend: Backend) -> None:
    async def scenario(store: Store, p: str) -> None:
        key = p + "k"
        r1 = await store.put(key, b"v1")
        assert await store.get(key) == Entry(
            key=key, value=b"v1", create_revision=r1, mod_revision=r1, lease=0
        )

        r2 = await store.put(key, b"v2")
        assert r2 > r1
        got = await store.get(key)
        assert got is not None
        assert (got.value, got.create_revision, got.mod_revision) == (b"v2", r1, r2)

        # Same value again is still a change with a new revision.
        r3 = await store.put(key, b"v2")
        assert r3 > r2
        got = await store.get(key)
        assert got is not None
        assert (got.create_revision, got.mod_revision) == (r1, r3)

        # Any bytes round-trip, including empty and non-UTF-8 values.
        for value in (b"", bytes(range(256)), b"\x00" * 1000):
            revision = await store.put(p + "bin", value)
            got = await store.get(p + "bin")
            assert got is not None
            assert (got.value, got.mod_revision) == (value, revision)

    backend.run(scenario)


def test_revisions_strictly_increase_across_operations(backend: Backend) -> None:
    async def scenario(store: Store, p: str) -> None:
        seen = [await current_revision(store, p)]

        async def changed() -> None:
            revision = await current_revision(store, p)
            assert revision > seen[-1], f"no new revision after a change: {seen} then {revision}"
            seen.append(revision)

        assert await store.put(p + "a", b"1") > seen[-1]
        await changed()
        assert await store.create(p + "b", b"1")
        await changed()
        entry = await store.get(p + "b")
        assert entry is not None
        assert entry.mod_revision == seen[-1]
        assert await store.replace(p + "b", b"2", mod_revision=entry.mod_revision)
        await changed()
        assert await store.commit(Commit(puts={p + "c": Put(value=b"1")}, deletes=(p + "a",)))
        await changed()
        assert await store.delete(p + "c")
        await changed()
        entry = await store.get(p + "b")
        assert entry is not None
        assert await store.delete_if(p + "b", mod_revision=entry.mod_revision)
        await changed()
        lease = await store.grant_lease(30)
        try:
            assert await store.put(p + "l", b"1", lease=lease) > seen[-1]
            await changed()
        finally:
            await store.revoke_lease(lease)
        await changed()  # the revocation deleted p/l
        assert await store.get(p + "l") is None

    backend.run(scenario)


# ----- get_prefix -----


def test_get_prefix_is_exact_sorted_snapshot(backend: Backend) -> None:
    async def scenario(store: Store, p: str) -> None:
        d = p + "dir/"
        inside = [d + "b", d + "a", d + "a/x", d, d + "ab", d + "\u00e9t\u00e9", d + "Z"]
        outside = [p + "dir", p + "dirx", p + "di", p + "dis/a", p + "a"]
        revisions = {}
        for key in inside + outside:
            revisions[key] = await store.put(key, key.encode())
        updated = await store.put(d + "a", b"again")  # a later mod_revision than others
        revisions[d + "a"] = updated

        snap = await store.get_prefix(d)
        assert [e.key for e in snap.entries] == sorted(inside, key=lambda k: k.encode())
        for entry in snap.entries:
            assert entry.mod_revision == revisions[entry.key]
            assert entry.value == (b"again" if entry.key == d + "a" else entry.key.encode())
            assert snap.revision >= entry.mod_revision
        assert snap.revision >= max(revisions.values())
        assert snap.get(d + "b") == await store.get(d + "b")
        assert snap.get(p + "dirx") is None

        empty = await store.get_prefix(p + "none/")
        assert empty.entries == ()
        assert empty.revision >= max(revisions.values())

        # After deleting, the key is gone from the next snapshot, which is at a later revision.
        assert await store.delete(d + "b")
        later = await store.get_prefix(d)
        assert d + "b" not in [e.key for e in later.entries]
        assert len(later.entries) == len(inside) - 1
        assert later.revision > snap.revision

    backend.run(scenario)


# ----- delete -----


def test_delete_reports_whether_the_key_existed(backend: Backend) -> None:
    async def scenario(store: Store, p: str) -> None:
        key = p + "k"
        assert await store.delete(key) is False
        await store.put(key, b"v")
        await store.put(key + "/child", b"v")
        assert await store.delete(key) is True
        assert await store.get(key) is None
        assert await store.get(key + "/child") is not None  # delete is not a prefix delete
        assert await store.delete(key) is False

    backend.run(scenario)


# ----- create / replace / delete_if -----


def test_create_succeeds_once(backend: Backend) -> None:
    async def scenario(store: Store, p: str) -> None:
        key = p + "owner"
        assert await store.create(key, b"first") is True
        first = await store.get(key)
        assert first is not None
        assert first.value == b"first"
        assert first.create_revision == first.mod_revision

        assert await store.create(key, b"second") is False
        assert await store.get(key) == first  # unchanged

        assert await store.delete(key)
        assert await store.create(key, b"third") is True
        third = await store.get(key)
        assert third is not None
        assert third.value == b"third"
        assert third.create_revision > first.create_revision  # a new life of the key

    backend.run(scenario)


def test_concurrent_creates_have_one_winner(backend: Backend) -> None:
    async def scenario(store: Store, p: str) -> None:
        key = p + "leader"
        results = await asyncio.gather(*(store.create(key, b"%d" % i) for i in range(8)))
        assert sorted(results) == [False] * 7 + [True]
        got = await store.get(key)
        assert got is not None
        assert got.value == b"%d" % results.index(True)

    backend.run(scenario)


def test_replace_is_compare_and_swap(backend: Backend) -> None:
    async def scenario(store: Store, p: str) -> None:
        key = p + "k"
        r1 = await store.put(key, b"v1")
        assert await store.replace(key, b"v2", mod_revision=r1) is True
        v2 = await store.get(key)
        assert v2 is not None
        assert v2.value == b"v2"
        assert v2.mod_revision > r1
        assert v2.create_revision == r1

        # r1 is stale now: nothing changes.
        assert await store.replace(key, b"v3", mod_revision=r1) is False
        assert await store.get(key) == v2
        # A revision that was never the key's is stale too.
        assert await store.replace(key, b"v3", mod_revision=v2.mod_revision + 1000) is False
        assert await store.get(key) == v2

        # Two writers with the same revision: exactly one wins.
        results = await asyncio.gather(
            store.replace(key, b"w1", mod_revision=v2.mod_revision),
            store.replace(key, b"w2", mod_revision=v2.mod_revision),
        )
        assert sorted(results) == [False, True]
        got = await store.get(key)
        assert got is not None
        assert got.value == (b"w1" if results[0] else b"w2")

        # mod_revision 0 means "absent": a create on a missing key, a failure on a present one.
        assert await store.replace(p + "new", b"n", mod_revision=0) is True
        assert await store.replace(p + "new", b"n2", mod_revision=0) is False
        assert await store.replace(p + "absent", b"x", mod_revision=r1) is False
        assert await store.get(p + "absent") is None

    backend.run(scenario)


def test_delete_if_is_compare_and_delete(backend: Backend) -> None:
    async def scenario(store: Store, p: str) -> None:
        key = p + "k"
        r1 = await store.put(key, b"v1")
        r2 = await store.put(key, b"v2")
        assert await store.delete_if(key, mod_revision=r1) is False  # stale
        got = await store.get(key)
        assert got is not None
        assert (got.value, got.mod_revision) == (b"v2", r2)

        assert await store.delete_if(key, mod_revision=r2) is True
        assert await store.get(key) is None
        assert await store.delete_if(key, mod_revision=r2) is False  # gone: its revision is 0

    backend.run(scenario)


# ----- commit -----


def test_commit_applies_everything_at_one_revision(backend: Backend) -> None:
    async def scenario(store: Store, p: str) -> None:
        ra = await store.put(p + "a", b"a0")
        rb = await store.put(p + "b", b"b0")
        rc = await store.put(p + "c", b"c0")
        await store.put(p + "untouched", b"u")
        before = await store.get(p + "untouched")

        applied = await store.commit(
            Commit(
                expect={p + "a": ra, p + "b": rb, p + "c": rc, p + "new1": 0},
                puts={p + "a": Put(value=b"a1"), p + "new1": Put(value=b"n1"),
                      p + "new2": Put(value=b"n2")},
                deletes=(p + "b", p + "c", p + "never-existed"),
            )
        )  # fmt: skip
        assert applied is True

        a, new1, new2 = [await store.get(p + k) for k in ("a", "new1", "new2")]
        assert a is not None
        assert new1 is not None
        assert new2 is not None
        revision = a.mod_revision
        assert revision > rc
        assert (a.value, a.create_revision) == (b"a1", ra)
        assert (new1.value, new1.create_revision, new1.mod_revision) == (b"n1", revision, revision)
        assert (new2.value, new2.create_revision, new2.mod_revision) == (b"n2", revision, revision)
        assert await store.get(p + "b") is None
        assert await store.get(p + "c") is None
        assert await store.get(p + "untouched") == before
        snap = await store.get_prefix(p)
        assert snap.revision >= revision
        assert max(e.mod_revision for e in snap.entries) == revision

    backend.run(scenario)


@pytest.mark.parametrize(
    "failing",
    ["stale", "present-but-expected-absent", "absent-but-expected-present", "last-of-many"],
)
def test_commit_is_all_or_nothing(backend: Backend, failing: str) -> None:
    async def scenario(store: Store, p: str) -> None:
        ra = await store.put(p + "a", b"a0")
        rb = await store.put(p + "b", b"b0")
        await store.put(p + "b", b"b1")
        b = await store.get(p + "b")
        assert b is not None
        expect = {
            "stale": {p + "a": ra, p + "b": rb},
            "present-but-expected-absent": {p + "a": ra, p + "b": 0},
            "absent-but-expected-present": {p + "a": ra, p + "gone": ra},
            "last-of-many": {p + "a": ra, p + "b": b.mod_revision, p + "c": 0, p + "d": 5},
        }[failing]
        snap_before = await store.get_prefix(p)

        applied = await store.commit(
            Commit(
                expect=expect,
                puts={p + "a": Put(value=b"changed"), p + "new": Put(value=b"n")},
                deletes=(p + "b",),
            )
        )
        assert applied is False
        snap_after = await store.get_prefix(p)
        assert snap_after.entries == snap_before.entries  # values and revisions unchanged
        assert await store.get(p + "new") is None

    backend.run(scenario)


def test_commit_expecting_absent_key(backend: Backend) -> None:
    async def scenario(store: Store, p: str) -> None:
        key = p + "k"
        assert await store.commit(Commit(expect={key: 0}, puts={key: Put(value=b"v")})) is True
        got = await store.get(key)
        assert got is not None
        assert got.value == b"v"
        assert await store.commit(Commit(expect={key: 0}, puts={key: Put(value=b"w")})) is False
        assert await store.get(key) == got
        # An expectation alone (no changes) is a check that passes or not.
        assert await store.commit(Commit(expect={p + "absent": 0})) is True
        assert await store.commit(Commit(expect={key: got.mod_revision})) is True
        assert await store.commit(Commit(expect={key: 0})) is False

    backend.run(scenario)


# ----- leases -----


def test_lease_grant_put_and_keepalive(backend: Backend) -> None:
    async def scenario(store: Store, p: str) -> None:
        lease = await store.grant_lease(5)
        try:
            assert lease != 0
            other = await store.grant_lease(5)
            assert other not in (0, lease)
            await store.revoke_lease(other)

            await store.put(p + "k", b"v", lease=lease)
            got = await store.get(p + "k")
            assert got is not None
            assert (got.value, got.lease) == (b"v", lease)
            assert await store.create(p + "c", b"v", lease=lease)
            got = await store.get(p + "c")
            assert got is not None
            assert got.lease == lease

            assert await store.keepalive(lease) == 5.0

            # A put without a lease detaches the key from it.
            await store.put(p + "c", b"v2")
            got = await store.get(p + "c")
            assert got is not None
            assert got.lease == 0
        finally:
            await store.revoke_lease(lease)
        assert await store.get(p + "k") is None
        assert await store.get(p + "c") is not None  # detached: survives the revocation

    backend.run(scenario)


def test_keepalive_extends_a_lease(backend: Backend) -> None:
    async def scenario(store: Store, p: str) -> None:
        lease = await store.grant_lease(2)
        try:
            await store.put(p + "k", b"v", lease=lease)
            started = time.monotonic()
            while time.monotonic() - started < 4.5:  # more than twice the TTL
                await asyncio.sleep(0.5)
                assert await store.keepalive(lease) > 0
            assert await store.get(p + "k") is not None
        finally:
            await store.revoke_lease(lease)

    backend.run(scenario)


def test_revoke_deletes_the_lease_keys(backend: Backend) -> None:
    async def scenario(store: Store, p: str) -> None:
        lease = await store.grant_lease(30)
        await store.put(p + "k1", b"v", lease=lease)
        await store.put(p + "k2", b"v", lease=lease)
        await store.put(p + "free", b"v")
        await store.revoke_lease(lease)
        assert await store.get(p + "k1") is None
        assert await store.get(p + "k2") is None
        assert await store.get(p + "free") is not None
        await store.revoke_lease(lease)  # already gone: no error
        with pytest.raises(LeaseExpired):
            await store.keepalive(lease)
        with pytest.raises(LeaseExpired):
            await store.put(p + "k3", b"v", lease=lease)
        assert await store.get(p + "k3") is None

    backend.run(scenario)


def test_expired_lease_deletes_its_keys(backend: Backend) -> None:
    async def scenario(store: Store, p: str) -> None:
        lease = await store.grant_lease(1)
        await store.put(p + "k", b"v", lease=lease)
        await store.put(p + "free", b"v")
        await wait_gone(store, p + "k")  # no keepalive
        assert await store.get(p + "free") is not None
        with pytest.raises(LeaseExpired):
            await store.keepalive(lease)
        with pytest.raises(LeaseExpired):
            await store.put(p + "again", b"v", lease=lease)

    backend.run(scenario)


def test_unknown_lease_is_rejected(backend: Backend) -> None:
    async def scenario(store: Store, p: str) -> None:
        with pytest.raises(LeaseExpired):
            await store.put(p + "k", b"v", lease=UNKNOWN_LEASE)
        assert await store.get(p + "k") is None
        with pytest.raises(LeaseExpired):
            await store.create(p + "k", b"v", lease=UNKNOWN_LEASE)
        assert await store.get(p + "k") is None
        with pytest.raises(LeaseExpired):
            await store.keepalive(UNKNOWN_LEASE)
        await store.revoke_lease(UNKNOWN_LEASE)  # no error

    backend.run(scenario)


# ----- watch -----


def test_watch_delivers_later_changes_in_order_exactly_once(backend: Backend) -> None:
    async def scenario(store: Store, p: str) -> None:
        w = p + "w/"
        start = await current_revision(store, p) + 1
        async with watching(store.watch_prefix(w, start_revision=start)) as watch:
            r1 = await store.put(w + "a", b"a1")
            assert await take(watch, 1) == [put_event(w + "a", b"a1", r1)]  # live

            r2 = await store.put(w + "b", b"b1")
            await store.put(p + "w", b"outside")  # the prefix without its slash
            await store.put(p + "wx/a", b"outside")
            await store.put(p + "v/a", b"outside")
            r3 = await store.put(w + "a", b"a2")
            assert await store.delete(w + "b")
            after_delete = await store.put(p + "outside", b"x")
            r5 = await store.put(w + "sub/c", b"c1")
            assert await store.delete(p + "outside")  # outside: no event
            sentinel = await put_sentinel(store, w)

            events = await take_until(watch, sentinel.key)
            deletion = events[2] if len(events) > 2 else None
            assert deletion is not None
            assert r3 < deletion.revision < after_delete
            assert events == [
                put_event(w + "b", b"b1", r2),
                put_event(w + "a", b"a2", r3),
                delete_event(w + "b", deletion.revision),
                put_event(w + "sub/c", b"c1", r5),
                sentinel,
            ]

    backend.run(scenario)


def test_watch_delete_event_has_the_revision_of_the_deletion(backend: Backend) -> None:
    async def scenario(store: Store, p: str) -> None:
        start = await current_revision(store, p) + 1
        await store.put(p + "k", b"v")
        await store.put(p + "j", b"v")
        assert await store.delete(p + "k")
        snap = await store.get_prefix(p)  # nothing else changed since the delete
        assert snap.get(p + "j") is not None
        r = await store.put(p + "j", b"w")
        entry = await store.get(p + "j")
        assert entry is not None
        assert await store.delete_if(p + "j", mod_revision=entry.mod_revision)
        after = await store.get_prefix(p)
        async with watching(store.watch_prefix(p, start_revision=start)) as watch:
            events = await take(watch, 5)
        assert events[2] == delete_event(p + "k", snap.revision)
        assert events[3] == put_event(p + "j", b"w", r)
        assert events[4] == delete_event(p + "j", after.revision)

    backend.run(scenario)


@pytest.mark.parametrize("how", ["commit", "lease-revocation"])
def test_watch_delivers_every_change_of_a_multi_key_revision(backend: Backend, how: str) -> None:
    async def scenario(store: Store, p: str) -> None:
        w = p + "w/"
        await store.put(w + "old", b"o")
        start = await current_revision(store, p) + 1
        lease = await store.grant_lease(30)
        try:
            async with watching(store.watch_prefix(w, start_revision=start)) as watch:
                if how == "commit":
                    assert await store.commit(
                        Commit(puts={w + "x": Put(value=b"1"), w + "y": Put(value=b"2"),
                                     w + "z": Put(value=b"3"), p + "out": Put(value=b"4")},
                               deletes=(w + "old",))
                    )  # fmt: skip
                    entry = await store.get(w + "x")
                    assert entry is not None
                    revision = entry.mod_revision
                    expected = {
                        put_event(w + "x", b"1", revision),
                        put_event(w + "y", b"2", revision),
                        put_event(w + "z", b"3", revision),
                        delete_event(w + "old", revision),
                    }
                else:
                    for key in ("x", "y", "z"):
                        await store.put(w + key, b"v", lease=lease)
                    await store.put(p + "out", b"v", lease=lease)
                    await store.revoke_lease(lease)
                    revision = await current_revision(store, p)
                    expected = {
                        *(put_event(w + k, b"v", revision - 4 + i) for i, k in enumerate("xyz")),
                        *(delete_event(w + k, revision) for k in "xyz"),
                    }
                sentinel = await put_sentinel(store, w)
                events = await take_until(watch, sentinel.key)
                assert events[-1] == sentinel
                assert set(events[:-1]) == expected
                assert len(events) == len(expected) + 1
                assert [e.revision for e in events] == sorted(e.revision for e in events)
        finally:
            await store.revoke_lease(lease)

    backend.run(scenario)


def test_watch_from_an_older_revision_replays_history(backend: Backend) -> None:
    async def scenario(store: Store, p: str) -> None:
        r1 = await store.put(p + "a", b"1")
        r2 = await store.put(p + "b", b"1")
        r3 = await store.put(p + "a", b"2")
        assert await store.delete(p + "b")
        r5 = await store.put(p + "c", b"1")
        history = [
            put_event(p + "a", b"1", r1),
            put_event(p + "b", b"1", r2),
            put_event(p + "a", b"2", r3),
        ]
        async with watching(store.watch_prefix(p, start_revision=r1)) as watch:
            events = await take(watch, 5)
        assert events[:3] == history
        assert events[3].kind is EventKind.DELETE
        assert (events[3].key, events[3].value) == (p + "b", b"")
        assert r3 < events[3].revision < r5
        assert events[4] == put_event(p + "c", b"1", r5)

        # start_revision is inclusive, and replay continues with live changes.
        async with watching(store.watch_prefix(p, start_revision=r3)) as watch:
            assert await take(watch, 3) == [history[2], events[3], events[4]]
            r6 = await store.put(p + "d", b"1")
            sentinel = await put_sentinel(store, p)
            assert await take_until(watch, sentinel.key) == [put_event(p + "d", b"1", r6), sentinel]

    backend.run(scenario)


def test_two_concurrent_watchers_both_see_everything(backend: Backend) -> None:
    async def scenario(store: Store, p: str) -> None:
        start = await current_revision(store, p) + 1
        sentinel_key = p + SENTINEL

        async def watcher() -> list[WatchEvent]:
            async with watching(store.watch_prefix(p, start_revision=start)) as watch:
                return await take_until(watch, sentinel_key, within=10)

        async def writer() -> list[WatchEvent]:
            expected = []
            for i in range(20):
                key = p + f"k{i % 4}"
                if i % 5 == 4:
                    assert await store.delete(key)
                    expected.append(delete_event(key, await current_revision(store, p)))
                else:
                    value = b"%d" % i
                    expected.append(put_event(key, value, await store.put(key, value)))
                await asyncio.sleep(0.01 * (i % 3))
            expected.append(await put_sentinel(store, p))
            return expected

        async with asyncio.TaskGroup() as tg:
            first = tg.create_task(watcher())
            second = tg.create_task(watcher())
            expected = tg.create_task(writer())
        assert first.result() == expected.result()
        assert second.result() == expected.result()

    backend.run(scenario)


def test_watch_sees_the_delete_of_a_lease_revocation(backend: Backend) -> None:
    async def scenario(store: Store, p: str) -> None:
        lease = await store.grant_lease(30)
        r1 = await store.put(p + "k", b"v", lease=lease)
        async with watching(store.watch_prefix(p, start_revision=r1)) as watch:
            assert await take(watch, 1) == [put_event(p + "k", b"v", r1)]
            await store.revoke_lease(lease)
            revision = await current_revision(store, p)
            sentinel = await put_sentinel(store, p)
            assert await take_until(watch, sentinel.key) == [
                delete_event(p + "k", revision),
                sentinel,
            ]

    backend.run(scenario)


@pytest.mark.parametrize("other_lease", [False, True], ids=["alone", "with-a-longer-lease"])
def test_watch_sees_the_delete_of_a_lease_expiry(backend: Backend, other_lease: bool) -> None:
    async def scenario(store: Store, p: str) -> None:
        longer = await store.grant_lease(30) if other_lease else 0
        await asyncio.sleep(0.1)  # time passes between the two grants
        try:
            lease = await store.grant_lease(1)
            r1 = await store.put(p + "k", b"v", lease=lease)
            async with watching(store.watch_prefix(p, start_revision=r1)) as watch:
                assert await take(watch, 1) == [put_event(p + "k", b"v", r1)]
                # No store operation until the expiry: only the lease's end may delete the key.
                [deletion] = await take(watch, 1, within=EXPIRY_WAIT_S)
                assert (deletion.kind, deletion.key, deletion.value) == (
                    EventKind.DELETE,
                    p + "k",
                    b"",
                )
                assert deletion.revision > r1
                assert await store.get(p + "k") is None
        finally:
            if longer:
                await store.revoke_lease(longer)

    backend.run(scenario)


def test_watch_from_a_compacted_revision_raises(backend: Backend) -> None:
    async def scenario(store: Store, p: str) -> None:
        r1 = await store.put(p + "a", b"1")
        await store.put(p + "a", b"2")
        r3 = await store.put(p + "b", b"1")
        await backend.compact(store, r3)
        with pytest.raises(WatchCompacted) as caught:
            async with watching(store.watch_prefix(p, start_revision=r1)) as watch:
                await take(watch, 1)
        assert caught.value.compact_revision == r3

        # The documented recovery: re-read, then watch from the snapshot's revision + 1.
        snap = await store.get_prefix(p)
        assert [(e.key, e.value) for e in snap.entries] == [(p + "a", b"2"), (p + "b", b"1")]
        start = snap.revision + 1
        async with watching(store.watch_prefix(p, start_revision=start)) as watch:
            r4 = await store.put(p + "c", b"1")
            assert await take(watch, 1) == [put_event(p + "c", b"1", r4)]

    backend.run(scenario)


# ===== FakeStore only =====


def run_alone(scenario: Callable[[], Awaitable[None]], *, timeout: float = 30.0) -> None:
    """Run a scenario for one implementation only in a new event loop, under a timeout."""

    async def main() -> None:
        async with asyncio.timeout(timeout):
            try:
                await scenario()
            finally:
                await settle_grpc()

    asyncio.run(main())


def test_fake_unavailable_fails_operations_and_watches() -> None:
    async def scenario() -> None:
        store = FakeStore()
        try:
            r1 = await store.put("/k", b"v")
            lease = await store.grant_lease(30)
            async with watching(store.watch_prefix("/", start_revision=r1)) as watch:
                assert await take(watch, 1) == [put_event("/k", b"v", r1)]
                store.available = False
                with pytest.raises(StoreUnavailable):
                    await take(watch, 1)  # the open watch ends
            operations: list[Callable[[], Awaitable[object]]] = [
                lambda: store.get("/k"),
                lambda: store.get_prefix("/"),
                lambda: store.put("/k", b"w"),
                lambda: store.delete("/k"),
                lambda: store.commit(Commit(puts={"/x": Put(value=b"1")})),
                lambda: store.create("/y", b"1"),
                lambda: store.replace("/k", b"w", mod_revision=r1),
                lambda: store.delete_if("/k", mod_revision=r1),
                lambda: store.grant_lease(5),
                lambda: store.keepalive(lease),
                lambda: store.revoke_lease(lease),
            ]
            for operation in operations:
                with pytest.raises(StoreUnavailable):
                    await operation()
            with pytest.raises(StoreUnavailable):
                async with watching(store.watch_prefix("/", start_revision=1)) as watch:
                    await take(watch, 1)

            store.available = True  # nothing happened while unavailable
            snap = await store.get_prefix("/")
            assert [(e.key, e.value, e.mod_revision) for e in snap.entries] == [("/k", b"v", r1)]
            assert snap.revision == r1
            assert await store.keepalive(lease) == 30.0
        finally:
            await store.close()

    run_alone(scenario)


def test_fake_compact_then_watch_from_before_raises() -> None:
    async def scenario() -> None:
        store = FakeStore()
        try:
            r1 = await store.put("/a", b"1")
            r2 = await store.put("/a", b"2")
            store.compact(r2)
            with pytest.raises(WatchCompacted) as caught:
                async with watching(store.watch_prefix("/", start_revision=r1)) as w:
                    await take(w, 1)
            assert caught.value.compact_revision == r2
            async with watching(store.watch_prefix("/", start_revision=r2)) as w:
                assert await take(w, 1) == [put_event("/a", b"2", r2)]
        finally:
            await store.close()

    run_alone(scenario)


# ===== EtcdStore only =====


class _Proxy:
    """A TCP proxy to etcd that the test can cut (resetting every connection), block (new
    connections are reset at once) and slow down (requests reach etcd ``delay_s`` late)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.up = True
        self.delay_s = 0.0
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)
        handler.add_done_callback(self._handlers.discard)
        if not self.up:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        pair = (writer, up_writer)
        self._pairs.add(pair)
        try:
            await asyncio.gather(
                self._pipe(reader, up_writer, delayed=True), self._pipe(up_reader, writer)
            )
        finally:
            self._pairs.discard(pair)

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, delayed: bool = False
    ) -> None:
        try:
            while data := await reader.read(65536):
                if delayed and self.delay_s:
                    await asyncio.sleep(self.delay_s)  # in order: the stream stays intact
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.transport.abort()

    def cut(self) -> None:
        for client_side, etcd_side in list(self._pairs):
            client_side.transport.abort()
            etcd_side.transport.abort()

    async def close(self) -> None:
        self.up = False
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        if self._handlers:  # every connection was reset: the handlers end on their own
            await asyncio.wait(self._handlers, timeout=5)


@pytest.mark.integration
def test_etcd_fails_over_to_the_next_endpoint(etcd_server: EtcdServer) -> None:
    p = f"/t/failover-{uuid.uuid4().hex}/"

    async def scenario() -> None:
        dead = f"http://127.0.0.1:{free_port()}"  # nothing listens: connections are refused
        store = EtcdStore([dead, etcd_server.endpoint], timeout_s=2)
        try:
            assert await store.get(p + "k") is None
            assert store.endpoint == etcd_server.endpoint
            revision = await store.put(p + "k", b"v")
            assert await store.create(p + "c", b"v")
            got = await store.get(p + "k")
            assert got is not None
            assert got.mod_revision == revision
        finally:
            await store.close()

    run_alone(scenario)


def _dead_store_operations(store: Store) -> dict[str, Callable[[], Awaitable[object]]]:
    key = "/t/dead/k"
    return {
        "get": lambda: store.get(key),
        "get_prefix": lambda: store.get_prefix("/t/dead/"),
        "put": lambda: store.put(key, b"v"),
        "delete": lambda: store.delete(key),
        "commit": lambda: store.commit(Commit(expect={key: 0}, puts={key: Put(value=b"v")})),
        "create": lambda: store.create(key, b"v"),
        "grant_lease": lambda: store.grant_lease(5),
        "keepalive": lambda: store.keepalive(UNKNOWN_LEASE),
        "revoke_lease": lambda: store.revoke_lease(UNKNOWN_LEASE),
    }


@pytest.mark.integration
@pytest.mark.parametrize(
    "operation",
    [
        "get",
        "get_prefix",
        "put",
        "delete",
        "commit",
        "create",
        "grant_lease",
        "keepalive",
        "revoke_lease",
    ],
)
def test_etcd_with_only_a_dead_endpoint_is_unavailable(
    etcd_server: EtcdServer, operation: str
) -> None:
    async def scenario() -> None:
        store = EtcdStore([f"http://127.0.0.1:{free_port()}"], timeout_s=2)
        try:
            started = time.monotonic()
            with pytest.raises(StoreUnavailable):
                await _dead_store_operations(store)[operation]()
            assert time.monotonic() - started < store.timeout_s + 2
        finally:
            await store.close()

    run_alone(scenario)


@pytest.mark.integration
def test_etcd_watch_resumes_after_losing_its_connection(
    etcd_server: EtcdServer, caplog: pytest.LogCaptureFixture
) -> None:
    """While a watch is being consumed, its connection is reset and its endpoint refuses
    connections for a while; an operation on the store meanwhile fails with StoreUnavailable.
    Others change keys during the outage. Once the endpoint is back, the watch must deliver every
    change exactly once, in order (resuming from the revision after the last one delivered).
    """
    caplog.set_level(logging.INFO, logger="vmcluster.clusterstate.etcd")
    p = f"/t/resume-{uuid.uuid4().hex}/"

    async def scenario() -> None:
        proxy = _Proxy(EtcdStore([etcd_server.endpoint]).endpoints[0])
        await proxy.start()
        direct = EtcdStore([etcd_server.endpoint])
        remote = EtcdStore([f"http://127.0.0.1:{proxy.port}"], timeout_s=2)
        try:
            start = await current_revision(direct, p) + 1
            async with watching(remote.watch_prefix(p, start_revision=start)) as watch:
                r1 = await direct.put(p + "a", b"1")
                assert await take(watch, 1) == [put_event(p + "a", b"1", r1)]
                consumer = asyncio.create_task(take_until(watch, p + SENTINEL, within=25))
                try:
                    proxy.up = False
                    proxy.cut()
                    with pytest.raises(StoreUnavailable):
                        await remote.get(p + "a")

                    r2 = await direct.put(p + "b", b"1")
                    assert await direct.delete(p + "a")
                    r_del = await current_revision(direct, p)
                    assert await direct.commit(
                        Commit(puts={p + "c": Put(value=b"1"), p + "e": Put(value=b"1")})
                    )
                    c = await direct.get(p + "c")
                    assert c is not None
                    await asyncio.sleep(1.5)  # the watch retries while the endpoint refuses it
                    proxy.up = True
                    r5 = await direct.put(p + "d", b"1")
                    sentinel = await put_sentinel(direct, p)

                    events = await consumer
                finally:
                    consumer.cancel()  # only still running if the scenario failed
                    await asyncio.gather(consumer, return_exceptions=True)
                assert events[:2] == [put_event(p + "b", b"1", r2), delete_event(p + "a", r_del)]
                assert set(events[2:4]) == {
                    put_event(p + "c", b"1", c.mod_revision),
                    put_event(p + "e", b"1", c.mod_revision),
                }
                assert events[4:] == [put_event(p + "d", b"1", r5), sentinel]
                got = await remote.get(p + "d")  # the store works again too
                assert got is not None
                assert got.mod_revision == r5
        finally:
            await remote.close()
            await direct.close()
            await proxy.close()

    run_alone(scenario, timeout=45)
    assert any("store.watch.resume" in r.getMessage() for r in caplog.records), (
        "the watch never lost its stream: the scenario did not test a resumption"
    )


@pytest.mark.integration
def test_etcd_watch_moves_to_another_endpoint(etcd_server: EtcdServer) -> None:
    """The watch's endpoint goes away for good: the watch continues on the next endpoint (two
    proxies to the one etcd stand for two members), from the revision after the last delivered.
    """
    p = f"/t/watch-failover-{uuid.uuid4().hex}/"

    async def scenario() -> None:
        target = EtcdStore([etcd_server.endpoint]).endpoints[0]
        first, second = _Proxy(target), _Proxy(target)
        await first.start()
        await second.start()
        direct = EtcdStore([etcd_server.endpoint])
        remote = EtcdStore(
            [f"http://127.0.0.1:{first.port}", f"http://127.0.0.1:{second.port}"], timeout_s=2
        )
        try:
            start = await current_revision(direct, p) + 1
            async with watching(remote.watch_prefix(p, start_revision=start)) as watch:
                r1 = await direct.put(p + "a", b"1")
                assert await take(watch, 1) == [put_event(p + "a", b"1", r1)]
                assert remote.endpoint.endswith(f":{first.port}")

                first.up = False
                first.cut()
                r2 = await direct.put(p + "b", b"1")
                r3 = await direct.put(p + "a", b"2")
                sentinel = await put_sentinel(direct, p)
                assert await take_until(watch, sentinel.key, within=20) == [
                    put_event(p + "b", b"1", r2),
                    put_event(p + "a", b"2", r3),
                    sentinel,
                ]
                assert remote.endpoint.endswith(f":{second.port}")
        finally:
            await remote.close()
            await direct.close()
            await first.close()
            await second.close()

    run_alone(scenario, timeout=45)


@pytest.mark.integration
def test_etcd_put_through_a_slow_endpoint_is_one_change(etcd_server: EtcdServer) -> None:
    """The preferred endpoint is alive but slow. One put must still be one change: one revision,
    the one it returns (a later CAS on that revision must succeed), and one watch event."""
    p = f"/t/slow-{uuid.uuid4().hex}/"

    async def scenario() -> None:
        slow = _Proxy(EtcdStore([etcd_server.endpoint]).endpoints[0])
        await slow.start()
        direct = EtcdStore([etcd_server.endpoint])
        store = EtcdStore([f"http://127.0.0.1:{slow.port}", etcd_server.endpoint], timeout_s=3)
        try:
            assert await store.get(p + "warm-up") is None  # connected through the proxy
            assert store.endpoint == f"http://127.0.0.1:{slow.port}"
            start = await current_revision(direct, p) + 1
            slow.delay_s = 0.5
            revision = await store.put(p + "k", b"v")
            await asyncio.sleep(1.5)  # anything still in flight arrives
            slow.delay_s = 0.0
            got = await direct.get(p + "k")
            assert got is not None
            sentinel = await put_sentinel(direct, p)
            async with watching(direct.watch_prefix(p, start_revision=start)) as watch:
                events = await take_until(watch, sentinel.key)
            assert events == [put_event(p + "k", b"v", revision), sentinel]
            assert got.mod_revision == revision
            assert await store.replace(p + "k", b"w", mod_revision=revision)
        finally:
            await store.close()
            await direct.close()
            await slow.close()

    run_alone(scenario)
