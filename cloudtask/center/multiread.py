"""Many znodes read in few requests: ZooKeeper's ``multiRead`` (3.6 and later).

kazoo has no call for it, so this module adds the request (opcode 22, the same framing as a
transaction, each operation a ``getData``) and sends it with the client's own ``_call``.
A new leader reads every assignment before it writes anything; at 100,000 assignments one
request each costs about 10 s of kazoo's Python per request, while 2,000 ``multiRead``
requests of 50 read the same nodes in about 1 s. A server without ``multiRead`` answers
with an error, and the nodes are then read one request each, as before.
"""

from __future__ import annotations

import logging
from collections import namedtuple
from collections.abc import Iterator, Sequence
from typing import Any

from kazoo.exceptions import EXCEPTIONS, NoNodeError, UnimplementedError
from kazoo.protocol.serialization import (
    GetData,
    MultiHeader,
    ZnodeStat,
    int_struct,
    multiheader_struct,
    read_buffer,
    stat_struct,
    write_string,
)

log = logging.getLogger(__name__)

BATCH = 50  # reads a request: an answer stays small even with large specs
IN_FLIGHT = 64  # requests sent before the first answer is awaited


class MultiRead(namedtuple("MultiRead", "paths")):
    """A ``multiRead`` request of ``getData`` operations (no watches)."""

    type = 22

    def serialize(self) -> bytearray:
        b = bytearray()
        for path in self.paths:
            b.extend(MultiHeader(GetData.type, False, -1).serialize())
            b.extend(write_string(path))
            b.append(0)  # no watch
        return b + multiheader_struct.pack(-1, True, -1)

    @classmethod
    def deserialize(cls, data: bytes, offset: int) -> list[Any]:
        """``(data, stat)`` per path, or the exception of a path that failed (NoNodeError)."""
        header, offset = MultiHeader.deserialize(data, offset)
        out: list[Any] = []
        while not header.done:
            if header.type == GetData.type:
                value, offset = read_buffer(data, offset)
                stat = ZnodeStat._make(stat_struct.unpack_from(data, offset))
                offset += stat_struct.size
                out.append((value, stat))
            else:  # an error: its code follows
                code = int_struct.unpack_from(data, offset)[0]
                offset += int_struct.size
                out.append(EXCEPTIONS[code]())
            header, offset = MultiHeader.deserialize(data, offset)
        return out


def read_many(zk: Any, paths: Sequence[str]) -> Iterator[tuple[str, bytes, Any]]:
    """``(path, data, stat)`` of each of ``paths`` that exists; a node that is gone is left
    out. Connection errors are the caller's."""
    root = zk.chroot or ""
    batches = [list(paths[i : i + BATCH]) for i in range(0, len(paths), BATCH)]
    sent: list[tuple[list[str], Any]] = []
    for n, batch in enumerate(batches):
        answer = zk.handler.async_result()
        zk._call(MultiRead([root + p for p in batch]), answer)
        sent.append((batch, answer))
        if len(sent) >= IN_FLIGHT or n == len(batches) - 1:
            for k, (done, pending) in enumerate(sent):
                try:
                    results = pending.get()
                except UnimplementedError:  # before ZooKeeper 3.6: one request a node
                    log.info("this ZooKeeper has no multiRead: reading one node a request")
                    rest = [p for b, _ in sent[k:] for p in b]
                    rest += [p for b in batches[n + 1 :] for p in b]
                    yield from _one_by_one(zk, rest)
                    return
                for path, result in zip(done, results):
                    if isinstance(result, NoNodeError):
                        continue
                    if isinstance(result, Exception):
                        raise result
                    yield path, result[0], result[1]
            sent = []


def _one_by_one(zk: Any, paths: list[str]) -> Iterator[tuple[str, bytes, Any]]:
    reads = [(p, zk.get_async(p)) for p in paths]
    for path, answer in reads:
        try:
            data, stat = answer.get()
        except NoNodeError:
            continue
        yield path, data, stat
