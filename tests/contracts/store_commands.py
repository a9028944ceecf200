"""
The contract of the ``store.*`` commands the apps, services and remote
subsystems use (``piccolod.commands`` ``Store*``).

:class:`StoreCommandsContract` is a mixin: bind it by subclassing it with
``SynchronousTestCase`` and defining ``make()`` (an unlocked store whose
handlers are registered on ``self.dispatcher``), ``lock()`` and
``unlock()``.  The persistence service (the real SQLCipher store) and
:class:`piccolod.apps.store.MemoryStore` (what unit tests of the apps
subsystem stand on) both bind it, so the fake answers exactly as the real
store does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred

from piccolod.commands import (
    Command,
    StoreDeleteApp,
    StoreDeleteSetting,
    StoreDone,
    StoredSetting,
    StoreGetApp,
    StoreGetSetting,
    StoreListApps,
    StoreListSettings,
    StorePutApp,
    StoreSetSetting,
)
from piccolod.errors import InvalidCommand, Locked, NotFound

if TYPE_CHECKING:
    from twisted.trial.unittest import SynchronousTestCase

    from piccolod.interfaces import ICommandDispatcher

    _Base = SynchronousTestCase
else:
    _Base = object


class StoreCommandsContract(_Base):
    dispatcher: ICommandDispatcher

    def make(self) -> None:
        raise NotImplementedError

    def lock(self) -> None:
        raise NotImplementedError

    def unlock(self) -> None:
        raise NotImplementedError

    def setUp(self) -> None:
        super().setUp()
        self.make()

    def call(self, command: Command) -> Any:
        d: Deferred[Any] = self.dispatcher.dispatch(command)
        return self.successResultOf(d)

    def refused(self, command: Command, *errors: type[Exception]) -> Exception:
        d: Deferred[Any] = self.dispatcher.dispatch(command)
        return self.failureResultOf(d, *errors).value  # type: ignore[no-any-return]

    # -- apps

    def test_put_get_list(self) -> None:
        """A put app reads back as written; the list is sorted by name."""
        web = self.call(StorePutApp("web", {"image": "busybox", "env": {"A": "1"}}))
        self.assertEqual((web.name, web.generation, web.enabled), ("web", 1, True))
        self.call(StorePutApp("db", {"image": "pg"}, enabled=False))
        got = self.call(StoreGetApp("web"))
        self.assertEqual(got.spec, {"image": "busybox", "env": {"A": "1"}})
        listed = self.call(StoreListApps())
        self.assertEqual(
            [(a.name, a.enabled, a.generation) for a in listed.apps],
            [("db", False, 1), ("web", True, 1)],
        )

    def test_generation_moves_only_on_a_real_change(self) -> None:
        """Putting the same spec and flag again keeps the generation; a change bumps it by one."""
        self.call(StorePutApp("web", {"b": 1, "a": 2}))
        same = self.call(StorePutApp("web", {"a": 2, "b": 1}))  # key order is no change
        self.assertEqual(same.generation, 1)
        spec = self.call(StorePutApp("web", {"a": 3}))
        self.assertEqual(spec.generation, 2)
        flag = self.call(StorePutApp("web", {"a": 3}, enabled=False))
        self.assertEqual(flag.generation, 3)
        self.assertEqual(self.call(StoreGetApp("web")).generation, 3)

    def test_missing_app(self) -> None:
        """Reading a missing app is NotFound; deleting one is done (idempotent, safe to retry)."""
        self.refused(StoreGetApp("ghost"), NotFound)
        self.assertEqual(self.call(StoreDeleteApp("ghost")), StoreDone())

    def test_delete_app(self) -> None:
        """A deleted app is gone from get and list; deleting it again is done."""
        self.call(StorePutApp("web", {"image": "busybox"}))
        self.call(StorePutApp("db", {"image": "pg"}))
        self.assertEqual(self.call(StoreDeleteApp("web")), StoreDone())
        self.refused(StoreGetApp("web"), NotFound)
        self.assertEqual([a.name for a in self.call(StoreListApps()).apps], ["db"])
        self.assertEqual(self.call(StoreDeleteApp("web")), StoreDone())
        again = self.call(StorePutApp("web", {"image": "busybox"}))
        self.assertEqual(again.generation, 1)

    def test_answers_are_copies(self) -> None:
        """Changing an answer (or the command's spec after the put) changes nothing stored."""
        spec: dict[str, Any] = {"image": "busybox", "env": {"A": "1"}}
        self.call(StorePutApp("web", spec))
        spec["env"]["A"] = "changed"
        got = self.call(StoreGetApp("web"))
        got.spec["env"]["A"] = "also changed"
        self.assertEqual(self.call(StoreGetApp("web")).spec["env"], {"A": "1"})

    # -- settings

    def test_settings(self) -> None:
        """Settings are set, read, replaced, listed by prefix and deleted idempotently."""
        self.call(StoreSetSetting("ports/web/http", {"host": 15000}))
        self.call(StoreSetSetting("ports/db/pg", {"host": 15001}))
        self.call(StoreSetSetting("theme", "dark"))
        self.call(StoreSetSetting("theme", "light"))
        self.assertEqual(
            self.call(StoreGetSetting("theme")), StoredSetting(key="theme", value="light")
        )
        listed = self.call(StoreListSettings("ports/"))
        self.assertEqual(
            listed.items, {"ports/db/pg": {"host": 15001}, "ports/web/http": {"host": 15000}}
        )
        self.assertEqual(list(listed.items), sorted(listed.items))
        self.assertEqual(len(self.call(StoreListSettings("")).items), 3)
        self.assertEqual(self.call(StoreDeleteSetting("theme")), StoreDone())
        self.assertEqual(self.call(StoreDeleteSetting("theme")), StoreDone())
        self.refused(StoreGetSetting("theme"), NotFound)

    def test_setting_values_are_json(self) -> None:
        """A value JSON cannot hold is InvalidCommand and nothing is stored."""
        self.refused(StoreSetSetting("bad", {"x": object()}), InvalidCommand)
        self.refused(StoreGetSetting("bad"), NotFound)
        value: dict[str, Any] = {"list": [1, 2], "nested": {"ok": True}, "none": None}
        self.call(StoreSetSetting("good", value))
        value["list"].append(3)
        self.assertEqual(self.call(StoreGetSetting("good")).value["list"], [1, 2])

    # -- lock

    def test_locked_store_refuses_every_command_and_keeps_its_data(self) -> None:
        """While locked every store command is Locked; after unlocking the data is intact."""
        self.call(StorePutApp("web", {"image": "busybox"}))
        self.call(StoreSetSetting("k", 1))
        self.lock()
        for command in (
            StoreGetApp("web"),
            StoreListApps(),
            StorePutApp("x", {}),
            StoreDeleteApp("web"),
            StoreGetSetting("k"),
            StoreSetSetting("k", 2),
            StoreDeleteSetting("k"),
            StoreListSettings(""),
        ):
            self.refused(command, Locked)
        self.unlock()
        self.assertEqual([a.name for a in self.call(StoreListApps()).apps], ["web"])
        self.assertEqual(self.call(StoreGetSetting("k")).value, 1)
