"""A TCP proxy that injects network faults between a client and a server.

:class:`TcpProxy` listens on ``127.0.0.1`` and relays every connection to one upstream
server (ZooKeeper, MongoDB, anything spoken over TCP). From any thread, at any moment, it
switches the link between faults that apply to the connections already open and to new ones:

* :meth:`~TcpProxy.forward`: relay normally (clears every fault);
* :meth:`~TcpProxy.cut`: a network partition: nothing flows, but every socket stays open;
* :meth:`~TcpProxy.reset`: every connection is reset (RST) and new ones are refused;
* :meth:`~TcpProxy.latency`: every chunk, both ways, arrives that many seconds late;
* :meth:`~TcpProxy.drop_next_reply`: the next request reaches the server, its reply is
  lost and that connection goes silent, as when a link fails just after the server acted.

:class:`ProxyGroup` puts one proxy in front of each server of a list (a ZooKeeper ensemble)
and applies a fault to all of them. One thread per proxy serves every connection (a
selector), so dozens of pooled connections stay responsive.

Example::

    from kazoo.client import KazooClient
    from pymongo import MongoClient

    from cloudtask.testing import TcpProxy

    with TcpProxy(zk_server.hosts) as proxy:  # "127.0.0.1:2181" or ("127.0.0.1", 2181)
        zk = KazooClient(proxy.address, timeout=6)
        zk.start()
        proxy.cut()  # partition: after 2/3 of its session the client is SUSPENDED
        ...
        proxy.forward()  # the partition heals: held data flows, CONNECTED again
        zk.stop()

    with TcpProxy(("127.0.0.1", mongo_server.port)) as proxy:
        mongo = MongoClient(proxy.mongo_uri)  # "mongodb://127.0.0.1:PORT/?directConnection=true"
        proxy.latency(0.2)  # every round trip now takes at least 0.4 s
        mongo.admin.command("ping")
        mongo.close()

A fault switch returns once the proxy's thread applies it: after ``proxy.cut()`` returns, not
one more byte is relayed.

Longer than most modules on purpose: :class:`TcpProxy` is one job, a one-thread selector loop
whose fault switches, connection states and delayed buffers all act on the same sockets.
"""

from __future__ import annotations

import errno
import logging
import selectors
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType

from cloudtask.localservers import free_port

__all__ = ["ProxyGroup", "TcpProxy"]

logger = logging.getLogger(__name__)

CHUNK_SIZE = 65536
"""Bytes read from a socket at once."""

MAX_BUFFERED = 1 << 20
"""Bytes held for one direction of a connection before the proxy stops reading its source.

Beyond it the kernel buffers, then TCP flow control slows the sender, as without a proxy.
"""

CONTROL_TIMEOUT = 10.0
"""Seconds a fault switch waits for the proxy's thread to apply it."""

# The link's states; latency is a separate setting that applies whenever data flows.
FORWARD = "forward"
CUT = "cut"
RESET = "reset"

# A connection's upstream side: not opened yet (accepted during a cut), opening, open.
_PENDING = "pending"
_CONNECTING = "connecting"
_OPEN = "open"

# What the selector's keys carry: the listener, or (connection, side).
_LISTENER = "listener"
_CLIENT = "client"
_UPSTREAM = "upstream"

_CONNECT_IN_PROGRESS = {0, errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN}


def _parse_address(address: str | tuple[str, int]) -> tuple[str, int]:
    """``"host:port"``, ``"[::1]:port"`` or ``(host, port)`` as ``(host, port)``."""
    if isinstance(address, tuple):
        host, port_text = address[0], str(address[1])
    else:
        text = address.strip()
        if text.startswith("["):
            host, _, rest = text[1:].partition("]")
            port_text = rest[1:] if rest.startswith(":") else ""
        else:
            host, _, port_text = text.rpartition(":")
    try:
        port = int(port_text)
    except ValueError:
        port = 0
    if not host or not 0 < port < 65536 or "/" in port_text:
        raise ValueError(f"upstream {address!r} is not a 'host:port' address")
    return host, port


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _rst_close(sock: socket.socket) -> None:
    """Close ``sock`` with a TCP RST instead of a FIN: the peer sees "connection reset"."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass  # already broken: close() is all that is left
    sock.close()


def _no_delay(sock: socket.socket) -> None:
    # Small requests and replies must not wait for Nagle's algorithm: latency() would lie.
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass


class _Pipe:
    """One direction of a connection: chunks read from one side, due on the other side."""

    __slots__ = ("chunks", "size", "eof_read", "eof_sent")

    def __init__(self) -> None:
        # (monotonic time when due, data); None as data is the end of the stream.
        self.chunks: deque[tuple[float, bytes | None]] = deque()
        self.size = 0
        self.eof_read = False
        self.eof_sent = False

    def push(self, due: float, data: bytes | None) -> None:
        self.chunks.append((due, data))
        if data is None:
            self.eof_read = True
        else:
            self.size += len(data)

    def next_due(self) -> float | None:
        return self.chunks[0][0] if self.chunks else None


class _Connection:
    """A client's connection and the proxy's connection to the upstream for it."""

    __slots__ = (
        "client",
        "peer",
        "upstream",
        "state",
        "to_upstream",
        "to_client",
        "silent",
        "reply_after",
        "bytes_from_client",
        "bytes_to_upstream",
    )

    def __init__(self, client: socket.socket, peer: str) -> None:
        self.client = client
        self.peer = peer
        self.upstream: socket.socket | None = None
        self.state = _PENDING
        self.to_upstream = _Pipe()
        self.to_client = _Pipe()
        # Silenced by drop_next_reply: nothing reaches the client any more.
        self.silent = False
        # drop_next_reply picked this connection: once this many bytes from the client have
        # reached the upstream, what the upstream sends next is the reply to swallow.
        self.reply_after: int | None = None
        self.bytes_from_client = 0
        self.bytes_to_upstream = 0


class TcpProxy:
    """Relays TCP connections to ``upstream`` and injects faults on demand.

    ``upstream`` is ``"host:port"`` or ``(host, port)``; the proxy listens on ``host`` and
    ``port`` (a free port, chosen now, when None). The fault switches (:meth:`forward`,
    :meth:`cut`, :meth:`reset`, :meth:`latency`, :meth:`drop_next_reply`) may be called from
    any thread and apply at once to open and new connections. :meth:`stop` closes every
    socket and ends the proxy's thread; :meth:`start` may then open it again on the same port.

    What each fault does to data in flight:

    * ``cut()`` stops reading from both sides and writing to both sides; the kernel buffers
      what clients and server send, and TCP flow control stalls them once buffers fill. New
      connections are accepted and held silent too (their upstream connection is opened only
      when the link heals). After ``forward()`` everything held flows, in order, unchanged:
      what a partition that heals looks like to TCP, which retransmits. So a request a client
      sent during the cut and then gave up on still reaches the server. A connection opened
      during the cut whose client closed it before the cut ended is dropped without reaching
      the server (like a connection attempt lost in the partition).
    * ``reset()`` discards held data and RSTs both sides of every connection.
    * ``latency(s)`` delays each chunk by ``s`` seconds after it was read, both ways: a chunk
      read at ``t`` is delivered at ``t + s``, whatever came before it, order kept. A round
      trip takes at least ``2 * s`` more.
    * ``drop_next_reply()``: see there. ``forward()`` resets (RST) the connections it
      silenced: their stream lost a reply, so it cannot go on.
    """

    def __init__(
        self,
        upstream: str | tuple[str, int],
        host: str = "127.0.0.1",
        port: int | None = None,
    ) -> None:
        self.upstream = _parse_address(upstream)
        self.host = host
        self._auto_port = port is None
        self._port = free_port(host) if port is None else int(port)
        self._cond = threading.Condition()
        # Desired state, written by the fault switches under _cond, read by the loop.
        self._link = FORWARD
        self._latency = 0.0
        self._heal_epoch = 0  # forward() calls: the loop resets silenced connections
        self._drops: deque[bytes | None] = deque()  # drop_next_reply() calls not used yet
        self._generation = 0  # changes made ...
        self._applied = 0  # ... and applied by the loop
        self._stopping = False
        self._loop_ended = True
        self._dropped_replies = 0
        # Owned by the loop's thread while it runs.
        self._thread: threading.Thread | None = None
        self._listener: socket.socket | None = None
        self._selector: selectors.BaseSelector | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._upstream_address: tuple[str, int] | tuple[str, int, int, int] = self.upstream
        self._upstream_family = socket.AF_INET
        self._connections: set[_Connection] = set()
        self._events: dict[socket.socket, int] = {}

    # -- public ----------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._port

    @property
    def address(self) -> str:
        """Where clients connect: ``"127.0.0.1:PORT"`` (usable as a kazoo hosts string)."""
        return _host_port(self.host, self._port)

    @property
    def mongo_uri(self) -> str:
        """A pymongo URI through the proxy; direct, so pymongo keeps to this address."""
        return f"mongodb://{self.address}/?directConnection=true"

    @property
    def connections(self) -> int:
        """Proxied connections open now (held ones included)."""
        return len(self._connections)

    @property
    def dropped_replies(self) -> int:
        """How many replies :meth:`drop_next_reply` swallowed so far."""
        return self._dropped_replies

    @property
    def mode(self) -> str:
        """The link's state: ``"forward"``, ``"cut"`` or ``"reset"`` (latency aside)."""
        return self._link

    @property
    def delay(self) -> float:
        """The latency set by :meth:`latency`, in seconds."""
        return self._latency

    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Listen and start relaying; no-op when it already runs.

        Raises OSError when the port cannot be bound (after trying other free ports when the
        port was chosen automatically).
        """
        if self.is_running():
            return
        infos = socket.getaddrinfo(*self.upstream, type=socket.SOCK_STREAM)
        if not infos:
            raise OSError(f"cannot resolve the upstream {_host_port(*self.upstream)}")
        self._upstream_family, _, _, _, self._upstream_address = infos[0][:5]
        self._listener = self._listen()
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._listener, selectors.EVENT_READ, _LISTENER)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        with self._cond:
            self._stopping = False
            self._loop_ended = False
        self._thread = threading.Thread(
            target=self._run, name=f"TcpProxy-{self._port}", daemon=True
        )
        self._thread.start()
        logger.info("proxy %s -> %s started", self.address, _host_port(*self.upstream))

    def stop(self, timeout: float = 10.0) -> None:
        """Close every connection and the listening socket, and end the proxy's thread."""
        thread = self._thread
        if thread is None:
            return
        with self._cond:
            self._stopping = True
        self._wake()
        thread.join(timeout)
        if thread.is_alive():  # never seen; the loop closes its sockets when it ends
            logger.warning("proxy %s: its thread did not end within %g s", self.address, timeout)
            return
        self._thread = None
        logger.info("proxy %s -> %s stopped", self.address, _host_port(*self.upstream))

    def forward(self) -> None:
        """Relay normally: ends a cut or a reset, removes latency.

        Connections silenced by :meth:`drop_next_reply` are reset (RST): their stream lost a
        reply. Data held during a cut flows.
        """

        def change() -> None:
            self._link = FORWARD
            self._latency = 0.0
            self._heal_epoch += 1

        self._control(FORWARD, change)

    def cut(self) -> None:
        """Partition: nothing flows either way, every socket (new ones too) is held open."""
        self._control(CUT, lambda: setattr(self, "_link", CUT))

    def reset(self) -> None:
        """Reset (RST) every connection, and new ones as soon as accepted, until :meth:`forward`."""
        self._control(RESET, lambda: setattr(self, "_link", RESET))

    def latency(self, seconds: float) -> None:
        """Deliver each chunk, both ways, ``seconds`` after it was read (0: no delay).

        It does not end a cut or a reset; :meth:`forward` removes it.
        """
        seconds = float(seconds)
        if not seconds >= 0:  # also NaN
            raise ValueError(f"latency must be a number of seconds >= 0, not {seconds!r}")
        self._control(f"latency {seconds:g} s", lambda: setattr(self, "_latency", seconds))

    def drop_next_reply(self, match: bytes | None = None) -> None:
        """Lose the reply to the next request: it reaches the server, its answer does not.

        The next chunk a client sends (with ``match``: the next one containing those bytes)
        is relayed; the next bytes the server sends on that connection once it has it are
        swallowed and the connection goes silent: nothing more reaches the client, what it
        sends is discarded, and its socket stays open (until the client closes it, or
        :meth:`forward`, :meth:`reset` or :meth:`stop`). Other connections keep working.
        :attr:`dropped_replies` counts the replies swallowed. Each call drops one reply.
        """
        self._control("drop the next reply", lambda: self._drops.append(match))

    def __enter__(self) -> TcpProxy:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"{self._link}, {len(self._connections)} connections"
        if self._latency:
            state += f", latency {self._latency:g} s"
        if not self.is_running():
            state = "stopped"
        return f"<TcpProxy {self.address} -> {_host_port(*self.upstream)} {state}>"

    # -- control ---------------------------------------------------------------------

    def _control(self, what: str, change: Callable[[], object]) -> None:
        """Change the desired state (``change()``, under the lock); wait until it applies."""
        with self._cond:
            change()
            self._generation += 1
            target = self._generation
        logger.info("proxy %s: %s", self.address, what)
        thread = self._thread
        if thread is None or threading.current_thread() is thread:
            return  # not running: start() begins in this state
        self._wake()
        with self._cond:
            applied = self._cond.wait_for(
                lambda: self._applied >= target or self._loop_ended, CONTROL_TIMEOUT
            )
        if not applied:
            raise RuntimeError(
                f"proxy {self.address}: its thread did not apply {what!r} "
                f"within {CONTROL_TIMEOUT:g} s"
            )

    def _wake(self) -> None:
        wake_w = self._wake_w
        if wake_w is None:
            return
        try:
            wake_w.send(b"x")
        except (BlockingIOError, OSError):
            pass  # already full of wake-ups, or closed because the loop ended

    def _listen(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        attempts = 3 if self._auto_port else 1
        for attempt in range(1, attempts + 1):
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                # Bind again at once after stop(): connections it closed linger in TIME_WAIT.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((self.host, self._port))
                sock.listen(128)
            except OSError as e:
                sock.close()
                if e.errno == errno.EADDRINUSE and attempt < attempts:
                    self._port = free_port(self.host)  # taken since chosen: pick another
                    continue
                raise OSError(
                    e.errno, f"proxy cannot listen on {self.address}: {e.strerror}"
                ) from e
            sock.setblocking(False)
            return sock
        raise AssertionError("unreachable")

    # -- the loop (its own thread) ---------------------------------------------------

    def _run(self) -> None:
        selector = self._selector
        assert selector is not None
        heal_epoch = self._heal_epoch
        try:
            while True:
                with self._cond:
                    if self._stopping:
                        break
                    link, latency = self._link, self._latency
                    new_heal_epoch, generation = self._heal_epoch, self._generation
                now = time.monotonic()
                if link == RESET:
                    for conn in list(self._connections):
                        self._close(conn, reset=True)
                if new_heal_epoch != heal_epoch:
                    heal_epoch = new_heal_epoch
                    for conn in [c for c in self._connections if c.silent]:
                        self._close(conn, reset=True)
                if link != CUT:
                    for conn in [c for c in self._connections if c.state == _PENDING]:
                        self._resume(conn, latency, now)
                with self._cond:
                    self._applied = generation
                    self._cond.notify_all()
                timeout = self._update_events(link, now)
                for key, mask in selector.select(timeout):
                    self._handle(key, mask, link, latency)
        except Exception:
            logger.exception("proxy %s failed; closing it", self.address)
        finally:
            self._shut_down()

    def _handle(self, key: selectors.SelectorKey, mask: int, link: str, latency: float) -> None:
        if key.data is None:  # wake-up: the loop's next round reads the new state
            try:
                while self._wake_r is not None and self._wake_r.recv(4096):
                    pass
            except (BlockingIOError, OSError):
                pass
            return
        if key.data == _LISTENER:
            self._accept(link)
            return
        conn, side = key.data
        if conn not in self._connections:
            return  # closed earlier in this round
        try:
            if mask & selectors.EVENT_WRITE:
                self._writable(conn, side)
            if mask & selectors.EVENT_READ and conn in self._connections:
                self._readable(conn, side, latency)
        except Exception:
            logger.exception("proxy %s: connection from %s failed", self.address, conn.peer)
            self._close(conn, reset=True)

    def _update_events(self, link: str, now: float) -> float | None:
        """Register what each socket waits for; return the seconds until a chunk is due."""
        read, write = selectors.EVENT_READ, selectors.EVENT_WRITE
        next_due: float | None = None
        for conn in self._connections:
            client_events = upstream_events = 0
            if conn.silent:
                client_events = read  # discard what it sends, notice when it closes
            elif link == CUT or conn.state == _PENDING:
                pass  # held: not a byte read or written, the kernel buffers
            elif conn.state == _CONNECTING:
                upstream_events = write  # writable once connected (or failed)
            else:
                if not conn.to_upstream.eof_read and conn.to_upstream.size < MAX_BUFFERED:
                    client_events |= read
                if not conn.to_client.eof_read and conn.to_client.size < MAX_BUFFERED:
                    upstream_events |= read
                for pipe, is_upstream in ((conn.to_upstream, True), (conn.to_client, False)):
                    due = pipe.next_due()
                    if due is None:
                        continue
                    if due <= now:
                        if is_upstream:
                            upstream_events |= write
                        else:
                            client_events |= write
                    elif next_due is None or due < next_due:
                        next_due = due
            self._set_events(conn.client, client_events, (conn, _CLIENT))
            if conn.upstream is not None:
                self._set_events(conn.upstream, upstream_events, (conn, _UPSTREAM))
        return None if next_due is None else max(0.0, next_due - now)

    def _set_events(self, sock: socket.socket, events: int, data: object) -> None:
        selector = self._selector
        assert selector is not None
        current = self._events.get(sock, 0)
        if events == current:
            return
        if not events:
            selector.unregister(sock)
            del self._events[sock]
        elif not current:
            selector.register(sock, events, data)
            self._events[sock] = events
        else:
            selector.modify(sock, events, data)
            self._events[sock] = events

    def _accept(self, link: str) -> None:
        listener = self._listener
        assert listener is not None
        while True:
            try:
                sock, peer = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # out of file descriptors, say: the client retries
                logger.warning("proxy %s cannot accept a connection: %s", self.address, e)
                return
            if link == RESET:
                _rst_close(sock)  # refused: the client sees "connection reset"
                continue
            sock.setblocking(False)
            _no_delay(sock)
            conn = _Connection(sock, _host_port(*peer[:2]))
            self._connections.add(conn)
            logger.debug("proxy %s: connection from %s", self.address, conn.peer)
            if link != CUT:
                self._connect_upstream(conn)

    def _resume(self, conn: _Connection, latency: float, now: float) -> None:
        """Open the upstream side of a connection accepted during a cut that just ended."""
        while conn.to_upstream.size < MAX_BUFFERED:
            try:
                data = conn.client.recv(CHUNK_SIZE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._close(conn, reset=True)
                return
            if not data:
                # The client gave up during the cut: its connection never reaches the server,
                # like a connection attempt lost in the partition.
                self._close(conn, reset=False)
                return
            self._received(conn, _CLIENT, data, now + latency)
        self._connect_upstream(conn)

    def _connect_upstream(self, conn: _Connection) -> None:
        try:
            upstream = socket.socket(self._upstream_family, socket.SOCK_STREAM)
        except OSError as e:
            logger.warning("proxy %s cannot open a socket: %s", self.address, e)
            self._close(conn, reset=True)
            return
        upstream.setblocking(False)
        conn.upstream = upstream
        conn.state = _CONNECTING
        code = upstream.connect_ex(self._upstream_address)
        if code not in _CONNECT_IN_PROGRESS:
            self._upstream_failed(conn, code)

    def _upstream_failed(self, conn: _Connection, code: int) -> None:
        # The client already has a connection to the proxy: reset it, the nearest thing to
        # the "connection refused" it would have had from the server.
        logger.debug(
            "proxy %s: upstream %s refused %s: %s",
            self.address,
            _host_port(*self.upstream),
            conn.peer,
            errno.errorcode.get(code, code),
        )
        self._close(conn, reset=True)

    def _readable(self, conn: _Connection, side: str, latency: float) -> None:
        sock = conn.client if side == _CLIENT else conn.upstream
        assert sock is not None
        try:
            data = sock.recv(CHUNK_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # reset by the peer: reset the other side too
            self._close(conn, reset=True)
            return
        if conn.silent:
            if not data:
                self._close(conn, reset=False)
            return  # discarded
        due = time.monotonic() + latency
        if not data:
            (conn.to_upstream if side == _CLIENT else conn.to_client).push(due, None)
            return
        self._received(conn, side, data, due)

    def _received(self, conn: _Connection, side: str, data: bytes, due: float) -> None:
        if side == _CLIENT:
            conn.bytes_from_client += len(data)
            if self._drops and conn.reply_after is None:
                with self._cond:
                    if self._drops and (self._drops[0] is None or self._drops[0] in data):
                        self._drops.popleft()
                        conn.reply_after = conn.bytes_from_client
            conn.to_upstream.push(due, data)
            return
        if conn.reply_after is not None and conn.bytes_to_upstream >= conn.reply_after:
            # The server has the whole request and answers it: the answer is lost.
            conn.silent = True
            conn.to_client.chunks.clear()
            conn.to_client.size = 0
            with self._cond:
                self._dropped_replies += 1
            logger.info(
                "proxy %s: dropped a reply (%d bytes) to %s; that connection is now silent",
                self.address,
                len(data),
                conn.peer,
            )
            return
        conn.to_client.push(due, data)

    def _writable(self, conn: _Connection, side: str) -> None:
        if side == _UPSTREAM and conn.state == _CONNECTING:
            assert conn.upstream is not None
            code = conn.upstream.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                self._upstream_failed(conn, code)
                return
            conn.state = _OPEN
            _no_delay(conn.upstream)
            return
        pipe = conn.to_upstream if side == _UPSTREAM else conn.to_client
        sock = conn.upstream if side == _UPSTREAM else conn.client
        assert sock is not None
        now = time.monotonic()
        while pipe.chunks:
            due, data = pipe.chunks[0]
            if due > now:
                return
            if data is None:
                pipe.chunks.popleft()
                pipe.eof_sent = True
                try:
                    sock.shutdown(socket.SHUT_WR)  # pass the end of the stream on
                except OSError:
                    pass
                if conn.to_upstream.eof_sent and conn.to_client.eof_sent:
                    self._close(conn, reset=False)
                return
            try:
                sent = sock.send(data)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._close(conn, reset=True)
                return
            pipe.size -= sent
            if side == _UPSTREAM:
                conn.bytes_to_upstream += sent
            if sent < len(data):
                pipe.chunks[0] = (due, data[sent:])
                return
            pipe.chunks.popleft()

    def _close(self, conn: _Connection, reset: bool) -> None:
        """Close both sides of ``conn``; with ``reset``, by RST (the peers see a reset)."""
        self._connections.discard(conn)
        for sock in (conn.client, conn.upstream):
            if sock is None:
                continue
            if self._events.pop(sock, 0) and self._selector is not None:
                self._selector.unregister(sock)
            if reset:
                _rst_close(sock)
            else:
                sock.close()
        logger.debug(
            "proxy %s: connection from %s %s",
            self.address,
            conn.peer,
            "reset" if reset else "closed",
        )

    def _shut_down(self) -> None:
        """Close every socket the loop owns (the loop ends)."""
        for conn in list(self._connections):
            self._close(conn, reset=False)
        self._events.clear()
        for sock in (self._listener, self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
        if self._selector is not None:
            self._selector.close()
        self._listener = self._selector = self._wake_r = self._wake_w = None
        with self._cond:
            self._loop_ended = True
            self._cond.notify_all()  # a fault switch waiting on a loop that ended


class ProxyGroup:
    """One :class:`TcpProxy` per upstream, for a cluster such as a ZooKeeper ensemble.

    ``upstreams`` is a list of ``"host:port"`` (or ``(host, port)``) or a comma-separated
    string of them (``ensemble.hosts``). :attr:`hosts` lists the proxies the same way, for
    kazoo. The fault switches apply to every proxy; ``group[i]`` is the proxy of the i-th
    upstream, for a fault on one server only.

    Example::

        with ProxyGroup(ensemble.hosts) as group:
            zk = KazooClient(group.hosts)
            zk.start()
            group.cut()  # the client is partitioned from the whole ensemble
            group[0].reset()  # ... or, after forward(), from the first server only
    """

    def __init__(
        self, upstreams: Iterable[str | tuple[str, int]] | str, host: str = "127.0.0.1"
    ) -> None:
        if isinstance(upstreams, str):
            upstreams = [u for u in upstreams.split(",") if u.strip()]
        self.proxies = [TcpProxy(upstream, host=host) for upstream in upstreams]
        if not self.proxies:
            raise ValueError("a ProxyGroup needs at least one upstream")

    @property
    def hosts(self) -> str:
        """The proxies' addresses, comma-separated: ``"127.0.0.1:P1,127.0.0.1:P2,..."``."""
        return ",".join(proxy.address for proxy in self.proxies)

    @property
    def connections(self) -> int:
        return sum(proxy.connections for proxy in self.proxies)

    def start(self) -> None:
        try:
            for proxy in self.proxies:
                proxy.start()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for proxy in self.proxies:
            proxy.stop()

    def forward(self) -> None:
        for proxy in self.proxies:
            proxy.forward()

    def cut(self) -> None:
        for proxy in self.proxies:
            proxy.cut()

    def reset(self) -> None:
        for proxy in self.proxies:
            proxy.reset()

    def latency(self, seconds: float) -> None:
        for proxy in self.proxies:
            proxy.latency(seconds)

    def __getitem__(self, index: int) -> TcpProxy:
        return self.proxies[index]

    def __len__(self) -> int:
        return len(self.proxies)

    def __iter__(self) -> Iterator[TcpProxy]:
        return iter(self.proxies)

    def __enter__(self) -> ProxyGroup:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<ProxyGroup {self.hosts}>"
