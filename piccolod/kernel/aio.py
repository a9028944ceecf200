"""
Normalising what user code returns, and small attrs/zope helpers.

Bus subscribers, command handlers and reconcilers may be plain functions,
``async def`` coroutines or Deferred-returning; :func:`call` turns any of
them into a Deferred.  Under ``twistd --reactor=asyncio`` a handler may also
return an ``asyncio`` future, which is bridged with ``Deferred.fromFuture``.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.python.failure import Failure
from zope.interface.interface import InterfaceClass

P = ParamSpec("P")
T = TypeVar("T")


def to_deferred(result: object) -> Deferred[Any]:
    """Wrap a plain value, Deferred, coroutine or asyncio future."""
    if isinstance(result, Deferred):
        return result
    if inspect.iscoroutine(result):
        return Deferred.fromCoroutine(result)
    if isinstance(result, asyncio.Future):
        return Deferred.fromFuture(result)
    if inspect.isawaitable(result):
        return Deferred.fromCoroutine(_await(result))
    return succeed(result)


async def _await(awaitable: Any) -> Any:
    return await awaitable


def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
    """
    Call ``fn`` and return a Deferred of its outcome; a synchronous
    exception becomes a failed Deferred (``maybeDeferred`` that also knows
    coroutines).
    """
    try:
        result = fn(*args, **kwargs)
    except BaseException:
        return fail(Failure())
    return to_deferred(result)


def async_to_deferred(
    fn: Callable[P, Coroutine[Any, Any, T]],
) -> Callable[P, Deferred[T]]:
    """Expose an ``async def`` as a Deferred-returning function."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> Deferred[T]:
        return Deferred.fromCoroutine(fn(*args, **kwargs))

    return wrapper


def from_asyncio(awaitable: Any) -> Deferred[Any]:
    """
    Await an asyncio awaitable (``asyncio.sleep``, an aiohttp call, an
    asyncio library's coroutine) from Twisted code.

    Only under ``twistd --reactor=asyncio``, where the reactor runs on the
    asyncio loop; ``async def`` handlers are run as Twisted coroutines (they
    await Deferreds directly) and use this for asyncio-native work::

        async def handler(command, context):
            data = await from_asyncio(some_asyncio_client.fetch())
    """
    return Deferred.fromFuture(asyncio.ensure_future(awaitable))


def provides(interface: InterfaceClass) -> Callable[[Any, attrs.Attribute[Any], Any], None]:
    """attrs validator: the value provides ``interface`` (klein's helper)."""

    def _validate(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if not interface.providedBy(value):
            raise TypeError(f"{attribute.name!r} must provide {interface.__name__}, got {value!r}")

    return _validate
