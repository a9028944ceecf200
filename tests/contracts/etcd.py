"""
The contract of etcd's JSON gateway as :class:`EtcdClient` sees it.

:class:`EtcdClientContract` is a mixin: bind it by subclassing it together
with ``SynchronousTestCase`` and defining

- ``make_client() -> EtcdClient`` (a client of the etcd under test),
- ``wait(d)`` (the Deferred's result) and ``wait_failure(d, *types)``,
- ``elapse(seconds)`` (let that much time pass for etcd and the client),
- ``settle(predicate, what, timeout)`` (poll until true or fail).

Unit tests bind it to :class:`piccolod.testing.etcd.FakeEtcd` through
StubTreq and a ``Clock``; integration tests bind it to a real etcd with
``pytest_twisted.blockon``.  So the fake behaves like etcd wherever the
consensus code looks.  Every test works under its own key prefix, so one
real etcd serves them all.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from twisted.internet.defer import Deferred

from piccolod.consensus.etcd_client import (
    EtcdClient,
    EtcdError,
    LeaseNotFound,
    WatchCanceled,
    WatchEvent,
    compare,
    op_delete,
    op_put,
    op_range,
    prefix_end,
    txn_ranges,
)

if TYPE_CHECKING:
    from twisted.trial.unittest import SynchronousTestCase

    _Base = SynchronousTestCase
else:
    _Base = object

T = TypeVar("T")


class EtcdClientContract(_Base):
    """What both the fake and a real etcd must do for :class:`EtcdClient`."""

    #: Lease TTL used where leases must expire (etcd's minimum is about 2 s).
    SHORT_TTL = 2

    def make_client(self) -> EtcdClient:
        raise NotImplementedError

    def wait(self, d: Deferred[T]) -> T:
        raise NotImplementedError

    def wait_failure(self, d: Deferred[Any], *types: type[BaseException]) -> BaseException:
        raise NotImplementedError

    def elapse(self, seconds: float) -> None:
        raise NotImplementedError

    def settle(self, predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
        raise NotImplementedError

    def setUp(self) -> None:
        super().setUp()
        self.client = self.make_client()
        self.prefix = f"/contract/{uuid.uuid4().hex[:12]}/".encode()
        self.addCleanup(lambda: self.wait(self.client.close()))

    def k(self, name: str) -> bytes:
        return self.prefix + name.encode()

    # -- KV ---------------------------------------------------------------------------

    def test_put_get_and_revisions(self) -> None:
        """A put returns a greater revision each time; get shows create/mod revision and version."""
        first = self.wait(self.client.put(self.k("a"), b"1"))
        second = self.wait(self.client.put(self.k("a"), b"2"))
        self.assertGreater(second, first)
        kv = self.wait(self.client.get(self.k("a")))
        assert kv is not None
        self.assertEqual(
            (kv.key, kv.value, kv.create_revision, kv.mod_revision, kv.version),
            (self.k("a"), b"2", first, second, 2),
        )
        self.assertIsNone(self.wait(self.client.get(self.k("missing"))))

    def test_prefix_range_and_delete(self) -> None:
        """A prefix range lists the keys in order and not a sibling; delete reports the count."""
        for name in ("b", "a", "c"):
            self.wait(self.client.put(self.k("dir/" + name), name.encode()))
        self.wait(self.client.put(self.k("dir0"), b"sibling"))
        found = self.wait(self.client.get_prefix(self.k("dir/")))
        self.assertEqual([kv.value for kv in found.kvs], [b"a", b"b", b"c"])
        self.assertEqual(found.count, 3)
        self.assertEqual(
            self.wait(self.client.delete(self.k("dir/"), prefix_end(self.k("dir/")))), 3
        )
        self.assertEqual(self.wait(self.client.delete(self.k("dir/"))), 0)
        self.assertEqual(self.wait(self.client.get_prefix(self.k("dir/"))).kvs, ())

    def test_values_are_bytes(self) -> None:
        """Any bytes, including NUL, newlines and invalid UTF-8, round-trip."""
        value = bytes(range(256))
        self.wait(self.client.put(self.k("bin"), value))
        kv = self.wait(self.client.get(self.k("bin")))
        assert kv is not None
        self.assertEqual(kv.value, value)

    # -- leases ---------------------------------------------------------------------------

    def test_grant_keepalive_and_ttl(self) -> None:
        """A granted lease renews to its TTL and reports its remaining time."""
        lease = self.wait(self.client.grant(5))
        self.assertGreater(lease.id, 0)
        self.assertGreaterEqual(lease.ttl, 5)
        self.assertEqual(self.wait(self.client.keepalive(lease.id)), lease.ttl)
        remaining = self.wait(self.client.time_to_live(lease.id))
        self.assertTrue(0 < remaining <= lease.ttl, remaining)
        self.assertTrue(self.wait(self.client.revoke(lease.id)))

    def test_unknown_lease(self) -> None:
        """Keepalive of an unknown lease answers 0, revoke False, TTL -1, a put with it fails."""
        unknown = 0x1234567
        self.assertEqual(self.wait(self.client.keepalive(unknown)), 0)
        self.assertFalse(self.wait(self.client.revoke(unknown)))
        self.assertEqual(self.wait(self.client.time_to_live(unknown)), -1)
        error = self.wait_failure(self.client.put(self.k("x"), b"1", lease=unknown), LeaseNotFound)
        self.assertEqual(getattr(error, "code", None), 5)
        self.assertIsNone(self.wait(self.client.get(self.k("x"))))

    def test_revoke_deletes_attached_keys(self) -> None:
        """Revoking a lease deletes its keys at once; other keys stay."""
        lease = self.wait(self.client.grant(30))
        self.wait(self.client.put(self.k("leased"), b"1", lease=lease.id))
        self.wait(self.client.put(self.k("plain"), b"1"))
        self.assertTrue(self.wait(self.client.revoke(lease.id)))
        self.assertIsNone(self.wait(self.client.get(self.k("leased"))))
        self.assertIsNotNone(self.wait(self.client.get(self.k("plain"))))
        self.assertEqual(self.wait(self.client.keepalive(lease.id)), 0)

    def test_lease_expiry_deletes_keys_and_is_watched(self) -> None:
        """A lease not kept alive expires: its key disappears and a watcher sees DELETE."""
        lease = self.wait(self.client.grant(self.SHORT_TTL))
        won = self.wait(self.client.create_if_absent(self.k("leader"), b"me", lease.id))
        seen: list[WatchEvent] = []
        watch = self.client.watch(
            self.k("leader"),
            lambda events, _rev: seen.extend(events),
            start_revision=won.revision + 1,
        )
        self.wait(watch.when_created())
        self.settle(lambda: any(e.type == "DELETE" for e in seen), "lease expiry", timeout=10)
        self.assertIsNone(self.wait(self.client.get(self.k("leader"))))
        self.assertEqual(self.wait(self.client.keepalive(lease.id)), 0)
        watch.cancel()

    def test_keepalive_defers_expiry(self) -> None:
        """Keepalives sent within the TTL keep the key past several TTLs."""
        lease = self.wait(self.client.grant(self.SHORT_TTL))
        self.wait(self.client.put(self.k("kept"), b"1", lease=lease.id))
        for _ in range(5):
            self.elapse(self.SHORT_TTL / 2)
            self.assertGreater(self.wait(self.client.keepalive(lease.id)), 0)
        self.assertIsNotNone(self.wait(self.client.get(self.k("kept"))))
        self.wait(self.client.revoke(lease.id))

    # -- election transactions ----------------------------------------------------------------

    def test_create_if_absent(self) -> None:
        """The first create wins at its revision; a second sees the holder and its lease."""
        mine = self.wait(self.client.grant(30))
        theirs = self.wait(self.client.grant(30))
        first = self.wait(self.client.create_if_absent(self.k("lead"), b"a", mine.id))
        self.assertTrue(first.won)
        self.assertEqual(first.holder.create_revision, first.revision)
        self.assertEqual(first.holder.lease, mine.id)
        second = self.wait(self.client.create_if_absent(self.k("lead"), b"b", theirs.id))
        self.assertFalse(second.won)
        self.assertEqual(
            (second.holder.value, second.holder.lease, second.holder.create_revision),
            (b"a", mine.id, first.revision),
        )
        again = self.wait(self.client.create_if_absent(self.k("lead"), b"a", mine.id))
        self.assertFalse(again.won)
        self.assertEqual(again.holder.lease, mine.id)
        for lease in (mine, theirs):
            self.wait(self.client.revoke(lease.id))

    def test_create_if_absent_with_a_dead_lease(self) -> None:
        """Campaigning with a revoked lease fails with LeaseNotFound and creates nothing."""
        lease = self.wait(self.client.grant(30))
        self.wait(self.client.revoke(lease.id))
        self.wait_failure(
            self.client.create_if_absent(self.k("lead"), b"a", lease.id), LeaseNotFound
        )
        self.assertIsNone(self.wait(self.client.get(self.k("lead"))))

    def test_fenced_writes(self) -> None:
        """A write fenced on the key's create revision lands only while that incarnation lives."""
        lease = self.wait(self.client.grant(30))
        won = self.wait(self.client.create_if_absent(self.k("lead"), b"a", lease.id))
        term = won.holder.create_revision
        revision = self.wait(self.client.put_if_created_at(self.k("lead"), term, self.k("d"), b"1"))
        assert revision is not None
        self.assertGreater(revision, term)
        kv = self.wait(self.client.get(self.k("d")))
        assert kv is not None
        self.assertEqual((kv.value, kv.mod_revision), (b"1", revision))
        # A new incarnation of the key (another leader) defeats the old fence.
        self.wait(self.client.revoke(lease.id))
        other = self.wait(self.client.grant(30))
        self.wait(self.client.create_if_absent(self.k("lead"), b"b", other.id))
        late = self.client.put_if_created_at(self.k("lead"), term, self.k("d"), b"late")
        self.assertIsNone(self.wait(late))
        kv = self.wait(self.client.get(self.k("d")))
        assert kv is not None
        self.assertEqual(kv.value, b"1")
        self.wait(self.client.revoke(other.id))

    def test_delete_if_created_at(self) -> None:
        """Only the named incarnation of a key is deleted."""
        first = self.wait(self.client.put(self.k("k"), b"1"))
        self.assertFalse(self.wait(self.client.delete_if_created_at(self.k("k"), first + 1000)))
        self.assertTrue(self.wait(self.client.delete_if_created_at(self.k("k"), first)))
        self.assertIsNone(self.wait(self.client.get(self.k("k"))))

    def test_txn_value_compare_and_failure_reads(self) -> None:
        """A VALUE compare decides the branch; the failure branch's reads come back in order."""
        self.wait(self.client.put(self.k("head"), b"5"))
        lease = self.wait(self.client.grant(30))
        won = self.wait(self.client.create_if_absent(self.k("lead"), b"a", lease.id))
        term = won.holder.create_revision
        fence = compare(self.k("lead"), "CREATE", "EQUAL", term)
        reads = [op_range(self.k("lead")), op_range(self.k("head")), op_range(self.k("none"))]
        refused = self.wait(
            self.client.txn(
                [fence, compare(self.k("head"), "VALUE", "EQUAL", b"4")],
                [op_put(self.k("head"), b"5"), op_put(self.k("e/5"), b"x")],
                reads,
            )
        )
        self.assertFalse(refused.get("succeeded", False))
        holder, head, none = txn_ranges(refused)
        self.assertEqual([kv.create_revision for kv in holder.kvs], [term])
        self.assertEqual([kv.value for kv in head.kvs], [b"5"])
        self.assertEqual(none.kvs, ())
        self.assertIsNone(self.wait(self.client.get(self.k("e/5"))))
        accepted = self.wait(
            self.client.txn(
                [fence, compare(self.k("head"), "VALUE", "EQUAL", b"5")],
                [op_put(self.k("e/6"), b"six"), op_put(self.k("head"), b"6")],
                reads,
            )
        )
        self.assertTrue(accepted.get("succeeded"))
        six = self.wait(self.client.get(self.k("e/6")))
        head_kv = self.wait(self.client.get(self.k("head")))
        assert six is not None and head_kv is not None
        self.assertEqual(six.mod_revision, head_kv.mod_revision)  # one revision for both
        self.assertEqual(head_kv.value, b"6")
        self.wait(self.client.revoke(lease.id))

    def test_txn_compares_on_missing_keys(self) -> None:
        """A VALUE compare of a missing key is false (even with b""); MOD and VERSION read 0."""

        def decided(*compares: dict[str, Any]) -> bool:
            answer = self.wait(self.client.txn(list(compares), [], []))
            return bool(answer.get("succeeded"))

        missing = self.k("missing")
        self.assertFalse(decided(compare(missing, "VALUE", "EQUAL", b"")))
        self.assertFalse(decided(compare(missing, "VALUE", "NOT_EQUAL", b"x")))
        self.assertTrue(decided(compare(missing, "MOD", "EQUAL", 0)))
        self.assertTrue(decided(compare(missing, "VERSION", "EQUAL", 0)))
        revision = self.wait(self.client.put(missing, b"now"))
        self.assertFalse(decided(compare(missing, "MOD", "EQUAL", 0)))
        self.assertTrue(decided(compare(missing, "MOD", "EQUAL", revision)))
        self.assertTrue(decided(compare(missing, "VALUE", "LESS", b"nox")))

    def test_txn_delete_range_and_limited_reads(self) -> None:
        """A txn deletes a key range with its puts; a read-only txn's limited range says more."""
        for i in range(1, 6):
            self.wait(self.client.put(self.k(f"log/{i:03d}"), b"%d" % i))
        answer = self.wait(
            self.client.txn(
                [],
                [
                    op_put(self.k("snap"), b"3"),
                    op_delete(self.k("log/"), self.k("log/004")),
                ],
            )
        )
        self.assertTrue(answer.get("succeeded"))
        left = self.wait(self.client.get_prefix(self.k("log/")))
        self.assertEqual([kv.value for kv in left.kvs], [b"4", b"5"])
        read = self.wait(
            self.client.txn(
                [],
                [
                    op_range(self.k("log/"), prefix_end(self.k("log/")), limit=1),
                    op_range(self.k("snap")),
                ],
            )
        )
        logs, snap = txn_ranges(read)
        self.assertEqual([kv.value for kv in logs.kvs], [b"4"])
        self.assertTrue(logs.more)
        self.assertEqual([kv.value for kv in snap.kvs], [b"3"])
        # A txn that changes nothing (deleting nothing) keeps the store's revision.
        before = self.wait(self.client.range(self.k("snap"))).revision
        self.wait(self.client.txn([], [op_delete(self.k("nothing/"), self.k("nothing0"))]))
        self.assertEqual(self.wait(self.client.range(self.k("snap"))).revision, before)

    # -- watches ------------------------------------------------------------------------------

    def _collect(self) -> tuple[list[WatchEvent], Callable[[Sequence[WatchEvent], int], None]]:
        seen: list[WatchEvent] = []

        def on_events(events: Sequence[WatchEvent], _revision: int) -> None:
            seen.extend(events)

        return seen, on_events

    def test_watch_prefix_in_order(self) -> None:
        """A prefix watch sees every put and delete under the prefix, in revision order."""
        seen, on_events = self._collect()
        watch = self.client.watch(self.k("w/"), on_events, range_end=prefix_end(self.k("w/")))
        created = self.wait(watch.when_created())
        self.assertGreater(created, 0)
        r1 = self.wait(self.client.put(self.k("w/a"), b"1"))
        self.wait(self.client.put(self.k("other"), b"x"))
        r2 = self.wait(self.client.put(self.k("w/b"), b"2"))
        self.wait(self.client.delete(self.k("w/a")))
        self.settle(lambda: len(seen) >= 3, "three events")
        self.assertEqual(
            [(e.type, e.kv.key) for e in seen],
            [("PUT", self.k("w/a")), ("PUT", self.k("w/b")), ("DELETE", self.k("w/a"))],
        )
        self.assertEqual([e.kv.mod_revision for e in seen[:2]], [r1, r2])
        self.assertTrue(watch.active)
        watch.cancel()
        self.assertIsNone(self.wait(watch.when_done()))
        self.assertFalse(watch.active)

    def test_watch_replays_from_a_revision(self) -> None:
        """A watch from an old revision first replays the changes since then."""
        r1 = self.wait(self.client.put(self.k("r"), b"1"))
        self.wait(self.client.put(self.k("r"), b"2"))
        seen, on_events = self._collect()
        watch = self.client.watch(self.k("r"), on_events, start_revision=r1, prev_kv=True)
        self.settle(lambda: len(seen) >= 2, "replayed events")
        self.assertEqual([e.kv.value for e in seen], [b"1", b"2"])
        prev = seen[1].prev_kv
        assert prev is not None
        self.assertEqual(prev.value, b"1")
        watch.cancel()

    def test_watch_of_compacted_history_is_canceled(self) -> None:
        """Watching from a compacted revision fails with WatchCanceled naming the compaction."""
        r1 = self.wait(self.client.put(self.k("c"), b"1"))
        r2 = self.wait(self.client.put(self.k("c"), b"2"))
        self.wait(self.client.call("kv/compaction", {"revision": str(r2)}))
        seen, on_events = self._collect()
        watch = self.client.watch(self.k("c"), on_events, start_revision=r1)
        error = self.wait_failure(watch.when_done(), WatchCanceled)
        assert isinstance(error, WatchCanceled)
        self.assertGreaterEqual(error.compact_revision, r2)
        self.assertEqual(seen, [])

    def test_bad_requests_are_etcd_errors(self) -> None:
        """A request etcd refuses (bad base64) is an EtcdError, not an endpoint failure."""
        error = self.wait_failure(self.client.call("kv/range", {"key": "!!!"}), EtcdError)
        assert isinstance(error, EtcdError)
        self.assertEqual(error.http_status, 400)
        self.assertTrue(all(s.healthy is not False for s in self.client.endpoint_states()))

    def test_health(self) -> None:
        """Every endpoint of a healthy cluster reports healthy."""
        for url in self.client.endpoints:
            self.assertTrue(self.wait(self.client.health(url)))
