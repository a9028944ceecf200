"""
Strict decoding and size-bounded encoding of mDNS packets on
``twisted.names.dns.Message``.

``dns.Message.decode`` is lenient: a truncated question or record ends the
parse silently and keeps what was read, and an rdata decoder may read more
or less than the record's rdlength.  :func:`decode` refuses all of that
(:class:`MalformedPacket`), so that a packet is either wholly understood or
dropped.  Compression-pointer loops and pointer floods are refused by
Twisted's own decoder (``ValueError`` / ``DNSDecodeError``), which
:func:`decode` turns into :class:`MalformedPacket` as well.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from io import BytesIO
from typing import IO, Any

from twisted.names import dns

from piccolod.mdns.records import NSEC, Record_NSEC

__all__ = [
    "MAX_PACKET",
    "MIN_PACKET",
    "RESPONSE_BUDGET",
    "MalformedPacket",
    "decode",
    "encode_responses",
]

#: Smallest possible DNS message: the 12-byte header.
MIN_PACKET = 12
#: RFC 6762 §17: a packet (with IP and UDP headers) may be up to 9000 bytes.
MAX_PACKET = 9000
#: Responses are split to stay within one Ethernet frame where possible
#: (1500 - 20 IPv4 - 8 UDP); a single larger record is sent alone.
RESPONSE_BUDGET = 1472

_HEADER = struct.Struct("!HHHHHH")


class MalformedPacket(ValueError):
    """The bytes are not one complete, consistent DNS message."""


class _StrictMessage(dns.Message):
    """
    A ``dns.Message`` whose record parsing refuses short or inconsistent
    rdata, and that knows NSEC (which twisted.names does not).
    """

    def lookupRecordType(self, type: int) -> Any:
        if type == NSEC:
            return Record_NSEC
        return super().lookupRecordType(type)  # type: ignore[no-untyped-call]

    def parseRecords(self, list: list[dns.RRHeader], num: int, strio: IO[bytes]) -> None:
        for _ in range(num):
            header = dns.RRHeader(auth=bool(self.auth))
            header.decode(strio)  # type: ignore[no-untyped-call]  # EOFError: short section
            start = strio.tell()
            rdlength = int(header.rdlength or 0)
            payload = self.lookupRecordType(header.type)(ttl=header.ttl)
            payload.decode(strio, rdlength)  # type: ignore[no-untyped-call]
            if strio.tell() != start + rdlength:
                raise MalformedPacket(
                    f"rdata of type {header.type} used {strio.tell() - start} of {rdlength} bytes"
                )
            header.payload = payload
            list.append(header)


def decode(data: bytes) -> dns.Message:
    """
    Decode one mDNS packet.  Raises :class:`MalformedPacket` for anything
    that is not exactly one well-formed message (too short, truncated,
    counts larger than the content, trailing bytes, bad compression).
    """
    if len(data) < MIN_PACKET:
        raise MalformedPacket("shorter than a DNS header")
    qdcount = _HEADER.unpack_from(data)[2]
    message = _StrictMessage()
    strio = BytesIO(data)
    try:
        message.decode(strio)
    except MalformedPacket:
        raise
    except Exception as e:  # a decoder may raise anything on hostile input
        raise MalformedPacket(f"{type(e).__name__}: {e}") from e
    if len(message.queries) != qdcount:
        raise MalformedPacket("question section shorter than its count")
    if strio.tell() != len(data):
        raise MalformedPacket(f"{len(data) - strio.tell()} trailing bytes")
    return message


def _size(rr: dns.RRHeader | dns.Query) -> int:
    out = BytesIO()
    rr.encode(out, None)  # type: ignore[no-untyped-call]
    return len(out.getvalue())


def _message(
    *,
    message_id: int,
    answer: bool,
    queries: Sequence[dns.Query],
    answers: Sequence[dns.RRHeader],
    authority: Sequence[dns.RRHeader],
    additional: Sequence[dns.RRHeader],
) -> bytes:
    m = dns.Message(id=message_id, answer=answer, auth=answer, maxSize=0)
    m.queries = list(queries)
    m.answers = list(answers)
    m.authority = list(authority)
    m.additional = list(additional)
    return m.toStr()


def encode_query(queries: Sequence[dns.Query], authority: Sequence[dns.RRHeader] = ()) -> bytes:
    """A query (probe) packet: questions and proposed records, id 0."""
    return _message(
        message_id=0, answer=False, queries=queries, answers=(), authority=authority, additional=()
    )


def encode_responses(
    answers: Sequence[dns.RRHeader],
    additional: Sequence[dns.RRHeader] = (),
    message_id: int = 0,
    queries: Sequence[dns.Query] = (),
    budget: int = RESPONSE_BUDGET,
) -> list[bytes]:
    """
    Response packets carrying every answer, split so that each packet's
    uncompressed size stays within ``budget`` (a lone oversized answer gets
    a packet of its own).  Additional records go where they fit and are
    dropped otherwise (they are optional).  Returns ``[]`` for no answers.
    """
    if not answers:
        return []
    whole = _message(
        message_id=message_id,
        answer=True,
        queries=queries,
        answers=answers,
        authority=(),
        additional=additional,
    )
    if len(whole) <= budget:
        return [whole]  # the common case: one encoding, no size estimates
    fixed = MIN_PACKET + sum(_size(q) for q in queries)
    packets: list[list[dns.RRHeader]] = [[]]
    used = fixed
    for rr in answers:
        size = _size(rr)
        if packets[-1] and used + size > budget:
            packets.append([])
            used = fixed
        packets[-1].append(rr)
        used += size
    extra: list[dns.RRHeader] = []
    for rr in additional:
        size = _size(rr)
        if used + size <= budget:
            extra.append(rr)
            used += size
    out: list[bytes] = []
    for i, chunk in enumerate(packets):
        last = i == len(packets) - 1
        out.append(
            _message(
                message_id=message_id,
                answer=True,
                queries=queries,
                answers=chunk,
                authority=(),
                additional=extra if last else (),
            )
        )
    return out
