"""Tests for piccolod.kernel.memory: handing start-up's freed heap back."""

from __future__ import annotations

import ctypes.util
import platform

from twisted.trial.unittest import SynchronousTestCase

from piccolod.kernel import memory


class TrimHeapTests(SynchronousTestCase):
    def setUp(self) -> None:
        memory._malloc_trim.cache_clear()
        self.addCleanup(memory._malloc_trim.cache_clear)

    def test_trims_on_glibc(self) -> None:
        """On glibc the heap is trimmed and trim_heap says so."""
        if platform.libc_ver()[0] != "glibc":
            self.skipTest("malloc_trim is a glibc function")
        self.assertIsNotNone(memory._malloc_trim())
        self.assertTrue(memory.trim_heap())

    def test_without_a_c_library_it_does_nothing(self) -> None:
        """When no C library is found, trim_heap does nothing and answers False."""
        self.patch(ctypes.util, "find_library", lambda name: None)
        self.assertFalse(memory.trim_heap())

    def test_without_malloc_trim_it_does_nothing(self) -> None:
        """A C library without malloc_trim (musl) is no error: trim_heap answers False."""

        class NoTrim:
            def __init__(self, name: str) -> None:
                self.name = name

            def __getattr__(self, attribute: str) -> object:
                raise AttributeError(attribute)

        self.patch(ctypes, "CDLL", NoTrim)
        self.assertFalse(memory.trim_heap())
