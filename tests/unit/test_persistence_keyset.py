"""Tests for piccolod.persistence.keyset and .volume_keys: wraps, recovery keys, files."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import tempfile
from collections import Counter
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from piccolod.errors import Conflict, InvalidCommand
from piccolod.persistence import keyset as ks
from piccolod.persistence.errors import KeysetCorrupt, WrongPassword, WrongRecoveryKey
from piccolod.persistence.keyset import DataKey, KdfParams, Keyset, KeysetFile
from piccolod.persistence.volume_keys import VolumeKeys

FAST = KdfParams(time_cost=1, memory_kib=8, parallelism=1)
PASSWORD = "correct horse battery"


def _tmp(case: SynchronousTestCase) -> Path:
    path = Path(tempfile.mkdtemp(prefix="keyset-"))
    case.addCleanup(lambda: _rmtree(path))
    return path


def _rmtree(path: Path) -> None:
    for root, dirs, files in os.walk(path, topdown=False):
        for name in files:
            os.unlink(os.path.join(root, name))
        for name in dirs:
            os.rmdir(os.path.join(root, name))
    os.rmdir(path)


class RecoveryKeyTests(SynchronousTestCase):
    def test_wordlist_is_bip39_english(self) -> None:
        """The shipped list has the 2048 BIP39 English words, in order."""
        words = ks.wordlist()
        self.assertEqual(len(words), 2048)
        self.assertEqual((words[0], words[1], words[-1]), ("abandon", "ability", "zoo"))
        self.assertEqual(len({w[:4] for w in words}), 2048)

    def test_known_vectors(self) -> None:
        """Entropy encodes to the BIP39 test vectors (checksum in the last word)."""
        self.assertEqual(ks.encode_recovery_key(bytes(32)), ["abandon"] * 23 + ["art"])
        self.assertEqual(ks.encode_recovery_key(b"\xff" * 32), ["zoo"] * 23 + ["vote"])
        cycle = ["letter", "advice", "cage", "absurd", "amount", "doctor", "acoustic", "avoid"]
        self.assertEqual(ks.encode_recovery_key(b"\x80" * 32), [*(cycle * 3)[:23], "bless"])
        cycle = ["legal", "winner", "thank", "year", "wave", "sausage", "worth", "useful"]
        self.assertEqual(ks.encode_recovery_key(b"\x7f" * 32), [*(cycle * 3)[:23], "title"])

    def test_generated_key_round_trips(self) -> None:
        """A generated phrase has 24 list words and decodes to its entropy."""
        entropy, words = ks.generate_recovery_key()
        self.assertEqual(len(words), 24)
        self.assertTrue(set(words) <= set(ks.wordlist()))
        self.assertEqual(ks.decode_recovery_key(" ".join(words)), entropy)
        self.assertEqual(ks.decode_recovery_key(words), entropy)

    def test_decoding_is_forgiving_about_form(self) -> None:
        """Case, commas, hyphens, extra spaces and 4-letter prefixes are accepted."""
        entropy, words = ks.generate_recovery_key()
        messy = "  " + ",  ".join(w.upper() for w in words[:12]) + "\n" + "-".join(words[12:])
        self.assertEqual(ks.decode_recovery_key(messy), entropy)
        self.assertEqual(ks.decode_recovery_key(" ".join(w[:4] for w in words)), entropy)

    def test_malformed_phrases_are_invalid_without_echo(self) -> None:
        """Wrong count, unknown words and bad checksums are InvalidCommand; no word echoed."""
        _, words = ks.generate_recovery_key()
        with self.assertRaises(InvalidCommand) as count:
            ks.decode_recovery_key(" ".join(words[:23]))
        self.assertIn("23", count.exception.detail)
        bad = [*words[:5], "xylophonez", *words[6:]]
        with self.assertRaises(InvalidCommand) as unknown:
            ks.decode_recovery_key(" ".join(bad))
        self.assertIn("word 6", unknown.exception.detail)
        self.assertNotIn("xylophonez", unknown.exception.detail)
        swapped = [words[1], words[0], *words[2:]] if words[0] != words[1] else None
        if swapped is not None:
            # Swapping two words keeps every word valid; the checksum catches
            # it unless the swap happens to preserve the 8-bit checksum.
            try:
                ks.decode_recovery_key(swapped)
            except InvalidCommand as e:
                self.assertIn("checksum", e.detail)

    def test_checksum_catches_a_changed_last_word(self) -> None:
        """Changing the last word to another list word fails the checksum 255 times in 256."""
        _, words = ks.generate_recovery_key()
        accepted = 0
        for candidate in ks.wordlist()[:256]:
            try:
                ks.decode_recovery_key([*words[:23], candidate])
                accepted += 1
            except InvalidCommand as e:
                self.assertIn("checksum", e.detail)
        # 2048 last words = 3 entropy bits x 256 checksums: exactly 8 of the
        # 2048 candidates are valid, so among 256 of them only a few pass.
        self.assertLessEqual(accepted, 8)

    def test_words_are_uniform(self) -> None:
        """Every word position is uniform over the list (no modulo bias): a chi-square bound."""
        counts: Counter[int] = Counter()
        index = {w: i for i, w in enumerate(ks.wordlist())}
        for _ in range(700):
            _, words = ks.generate_recovery_key()
            for word in words[:23]:  # the last word carries the checksum
                counts[index[word] // 256] += 1  # 8 buckets of 256 words
        total = sum(counts.values())
        expected = total / 8
        chi2 = sum((counts[b] - expected) ** 2 / expected for b in range(8))
        # 7 degrees of freedom: p < 1e-6 above ~40.
        self.assertLess(chi2, 40.0, counts)


class WrapTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.keyset, self.key, self.words = ks.create_keyset(PASSWORD, FAST, now=100.0)
        self.addCleanup(self.key.wipe)

    def test_password_opens_the_same_key(self) -> None:
        """The password unwraps exactly the generated data key."""
        opened = ks.open_with_password(self.keyset, PASSWORD)
        self.assertTrue(opened.same_as(self.key))

    def test_recovery_key_opens_the_same_key(self) -> None:
        """The 24 words unwrap the same data key as the password."""
        opened = ks.open_with_recovery_key(self.keyset, " ".join(self.words))
        self.assertTrue(opened.same_as(self.key))

    def test_wrong_secrets_are_typed(self) -> None:
        """A wrong password is WrongPassword, a wrong valid phrase WrongRecoveryKey."""
        with self.assertRaises(WrongPassword):
            ks.open_with_password(self.keyset, PASSWORD + "x")
        _, other = ks.generate_recovery_key()
        with self.assertRaises(WrongRecoveryKey):
            ks.open_with_recovery_key(self.keyset, other)

    def test_password_is_normalised(self) -> None:
        """Composed and decomposed forms of one password are the same password."""
        keyset, key, _ = ks.create_keyset("caf\u00e9 au lait", FAST, now=0.0)
        self.assertTrue(ks.open_with_password(keyset, "cafe\u0301 au lait").same_as(key))

    def test_wraps_are_bound_to_their_keyset(self) -> None:
        """A wrap moved into another keyset (another id) does not open."""
        other, _, _ = ks.create_keyset(PASSWORD, FAST, now=0.0)
        moved = KeysetFile(
            keyset_id=other.keyset_id,
            generation=1,
            created_at=0.0,
            updated_at=0.0,
            password=self.keyset.password,
            recovery=None,
        )
        with self.assertRaises(WrongPassword):
            ks.open_with_password(moved, PASSWORD)

    def test_kdf_parameters_are_authenticated(self) -> None:
        """Editing the stored Argon2 parameters makes the wrap fail, not silently weaken."""
        raw = json.loads(self.keyset.to_bytes())
        raw["password"]["kdf"]["time_cost"] = 2
        tampered = KeysetFile.from_bytes(json.dumps(raw).encode())
        with self.assertRaises(WrongPassword):
            ks.open_with_password(tampered, PASSWORD)

    def test_rewrap_changes_only_the_password(self) -> None:
        """After a rewrap the new password and the old recovery key open; the old password not."""
        new = ks.rewrap_password(self.keyset, self.key, "a new password", FAST, now=200.0)
        self.assertEqual((new.generation, new.updated_at), (2, 200.0))
        self.assertTrue(ks.open_with_password(new, "a new password").same_as(self.key))
        self.assertTrue(ks.open_with_recovery_key(new, self.words).same_as(self.key))
        with self.assertRaises(WrongPassword):
            ks.open_with_password(new, PASSWORD)

    def test_rotation_retires_the_old_recovery_key(self) -> None:
        """After rotation the new words open and the old words fail."""
        new, words = ks.rotate_recovery_key(self.keyset, self.key, now=300.0)
        self.assertNotEqual(words, self.words)
        self.assertTrue(ks.open_with_recovery_key(new, words).same_as(self.key))
        with self.assertRaises(WrongRecoveryKey):
            ks.open_with_recovery_key(new, self.words)
        self.assertTrue(ks.open_with_password(new, PASSWORD).same_as(self.key))

    def test_file_round_trip_and_no_secret_in_it(self) -> None:
        """The file parses back; it holds neither the password, the key nor the words."""
        data = self.keyset.to_bytes()
        self.assertEqual(KeysetFile.from_bytes(data), self.keyset)
        self.assertNotIn(PASSWORD.encode(), data)
        self.assertNotIn(self.words[0].encode() + b" " + self.words[1].encode(), data)
        material = bytes(self.key._material())
        self.assertNotIn(material, data)
        self.assertNotIn(base64.b64encode(material), data)
        self.assertNotIn(material.hex().encode(), data)

    def test_bad_parameters_are_refused(self) -> None:
        """Zero or negative Argon2 costs are InvalidCommand at wrap time."""
        with self.assertRaises(InvalidCommand):
            ks.create_keyset(PASSWORD, KdfParams(time_cost=0), now=0.0)
        self.assertTrue(KdfParams(memory_kib=4, parallelism=1).problems())
        self.assertEqual(KdfParams().problems(), [])

    def test_empty_and_huge_passwords_are_refused(self) -> None:
        """Empty or over-long passwords are InvalidCommand before any KDF runs."""
        with self.assertRaises(InvalidCommand):
            ks.create_keyset("", FAST, now=0.0)
        with self.assertRaises(InvalidCommand):
            ks.open_with_password(self.keyset, "x" * 2000)


class DataKeyTests(SynchronousTestCase):
    def test_wipe_zeroes_in_place(self) -> None:
        """Wiping overwrites the key's bytearray with zeros and forgets it."""
        key = DataKey(b"\x07" * 32)
        buffer = key._material()
        key.wipe()
        self.assertEqual(bytes(buffer), bytes(32))
        self.assertTrue(key.wiped)
        with self.assertRaises(ValueError):
            key.derive("x")
        key.wipe()  # idempotent

    def test_repr_hides_the_key(self) -> None:
        """Neither repr nor str shows key material."""
        key = DataKey(b"\xab" * 32)
        self.assertNotIn("ab", repr(key).lower().replace("datakey", ""))
        self.assertEqual(str(key), "<DataKey>")

    def test_derive_separates_purposes(self) -> None:
        """Sub-keys differ per label and are deterministic per key."""
        key = DataKey(bytes(range(32)))
        self.assertNotEqual(key.derive("a"), key.derive("b"))
        self.assertEqual(key.derive("a"), DataKey(bytes(range(32))).derive("a"))
        self.assertNotEqual(key.derive("a"), bytes(range(32)))


class KeysetFileTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = _tmp(self)
        self.store = Keyset(self.dir)
        self.keyset, key, _ = ks.create_keyset(PASSWORD, FAST, now=1.0)
        key.wipe()

    def test_create_never_overwrites(self) -> None:
        """A second create fails with Conflict and leaves the first file intact."""
        self.store.create(self.keyset)
        before = self.store.path.read_bytes()
        other, _, _ = ks.create_keyset(PASSWORD, FAST, now=2.0)
        with self.assertRaises(Conflict):
            self.store.create(other)
        self.assertEqual(self.store.path.read_bytes(), before)
        self.assertEqual(sorted(p.name for p in self.dir.iterdir()), ["keyset.json"])
        self.assertEqual(self.store.path.stat().st_mode & 0o777, 0o600)

    def test_replace_is_compare_and_swap(self) -> None:
        """Replacing from a stale copy fails with Conflict and changes nothing."""
        self.store.create(self.keyset)
        key = ks.open_with_password(self.keyset, PASSWORD)
        first = ks.rewrap_password(self.keyset, key, "password two", FAST, now=2.0)
        self.store.replace(self.keyset, first)
        stale = ks.rewrap_password(self.keyset, key, "password three", FAST, now=3.0)
        with self.assertRaises(Conflict):
            self.store.replace(self.keyset, stale)
        self.assertEqual(self.store.load(), first)
        self.assertEqual([p.name for p in self.dir.iterdir()], ["keyset.json"])

    def test_corrupt_files_are_typed_errors(self) -> None:
        """Every kind of damage is KeysetCorrupt naming the problem, never a crash."""
        good = json.loads(self.keyset.to_bytes())
        cases: dict[str, bytes] = {
            "not valid JSON": b"{nope",
            "not a JSON object": b"[]",
            "format": json.dumps({**good, "format": "other"}).encode(),
            "unsupported version": json.dumps({**good, "version": 9}).encode(),
            "keyset_id": json.dumps({**good, "keyset_id": "xyz"}).encode(),
            "generation": json.dumps({**good, "generation": 0}).encode(),
            "created_at": json.dumps({**good, "created_at": "x"}).encode(),
            "password wrap is not an object": json.dumps({**good, "password": 1}).encode(),
            "nonce": json.dumps(
                {**good, "password": {**good["password"], "nonce": "AAAA"}}
            ).encode(),
            "ciphertext is not valid base64": json.dumps(
                {**good, "password": {**good["password"], "ciphertext": "@@"}}
            ).encode(),
            "argon2 parameters": json.dumps(
                {
                    **good,
                    "password": {
                        **good["password"],
                        "kdf": {**good["password"]["kdf"], "memory_kib": -1},
                    },
                }
            ).encode(),
            "unknown cipher": json.dumps(
                {**good, "recovery": {**good["recovery"], "cipher": "rot13"}}
            ).encode(),
            "not valid JSON (truncated)": self.keyset.to_bytes()[:100],
        }
        for expected, data in cases.items():
            self.store.path.write_bytes(data)
            with self.assertRaises(KeysetCorrupt, msg=expected) as raised:
                self.store.load()
            self.assertIn(expected.split(" (")[0], raised.exception.detail)
            self.assertEqual(self.store.path.read_bytes(), data)

    def test_stale_temps_are_removed(self) -> None:
        """Temp files a crash left behind are deleted, the keyset is kept."""
        self.store.create(self.keyset)
        (self.dir / ".keyset.json.abc.tmp").write_bytes(b"partial")
        self.assertEqual(self.store.remove_stale_temps(), 1)
        self.assertEqual([p.name for p in self.dir.iterdir()], ["keyset.json"])


class VolumeKeysTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = _tmp(self)
        self.keys = VolumeKeys(self.dir)
        self.key = DataKey(bytes(range(32)))
        self.keyset_id = "ab" * 16

    def test_ensure_creates_once_and_reloads(self) -> None:
        """Passphrases are created once, survive a reload and differ per volume."""
        first = self.keys.ensure(self.key, self.keyset_id, ["control", "bootstrap"])
        self.assertEqual(sorted(first), ["bootstrap", "control"])
        self.assertNotEqual(first["control"], first["bootstrap"])
        self.assertEqual(len(first["control"]), 64)
        again = self.keys.ensure(self.key, self.keyset_id, ["control", "app-web"])
        self.assertEqual(again["control"], first["control"])
        self.assertEqual(self.keys.load(self.key, self.keyset_id), again)
        text = self.keys.path.read_bytes()
        for passphrase in again.values():
            self.assertNotIn(passphrase, text)

    def test_wrong_key_or_keyset_is_an_error_not_a_reset(self) -> None:
        """Another data key or keyset id fails loudly and the file is untouched."""
        self.keys.ensure(self.key, self.keyset_id, ["control"])
        before = self.keys.path.read_bytes()
        with self.assertRaises(KeysetCorrupt):
            self.keys.ensure(DataKey(bytes(32)), self.keyset_id, ["control", "new"])
        with self.assertRaises(KeysetCorrupt):
            self.keys.ensure(self.key, "cd" * 16, ["control"])
        self.assertEqual(self.keys.path.read_bytes(), before)

    def test_corrupt_file_is_never_replaced(self) -> None:
        """A damaged file is KeysetCorrupt and stays as it is."""
        self.keys.path.write_bytes(b"garbage")
        with self.assertRaises(KeysetCorrupt):
            self.keys.ensure(self.key, self.keyset_id, ["control"])
        self.assertEqual(self.keys.path.read_bytes(), b"garbage")

    def test_bad_volume_ids_are_refused(self) -> None:
        """Ids outside ^[a-z0-9][a-z0-9-]{0,62}$ are InvalidCommand."""
        for bad in ("", "../x", "Control", "a_b", "x" * 64):
            with self.assertRaises(InvalidCommand):
                self.keys.ensure(self.key, self.keyset_id, [bad])

    def test_entry_moved_to_another_volume_fails(self) -> None:
        """A wrap copied under another volume id fails authentication."""
        self.keys.ensure(self.key, self.keyset_id, ["control", "bootstrap"])
        raw = json.loads(self.keys.path.read_bytes())
        raw["volumes"]["bootstrap"] = raw["volumes"]["control"]
        self.keys.path.write_bytes(json.dumps(raw).encode())
        with self.assertRaises(KeysetCorrupt):
            self.keys.load(self.key, self.keyset_id)


class AtomicWriteTests(SynchronousTestCase):
    def test_replace_and_exclusive(self) -> None:
        """write_atomically replaces content; exclusive refuses an existing file."""
        path = _tmp(self) / "f"
        ks.write_atomically(path, b"one")
        ks.write_atomically(path, b"two")
        self.assertEqual(path.read_bytes(), b"two")
        with self.assertRaises(FileExistsError):
            ks.write_atomically(path, b"three", exclusive=True)
        self.assertEqual(path.read_bytes(), b"two")
        self.assertEqual([p.name for p in path.parent.iterdir()], ["f"])

    def test_wordlist_hash_is_pinned(self) -> None:
        """The word list file matches the pinned sha256 (a tampered list would not load)."""
        data = (Path(ks.__file__).parent / "bip39_english.txt").read_bytes()
        self.assertEqual(hashlib.sha256(data).hexdigest(), ks._WORDLIST_SHA256)
