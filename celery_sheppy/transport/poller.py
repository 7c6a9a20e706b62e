"""The transport's poller: waits on the blocking reads of every channel of a transport.

Channels register with :meth:`Poller.add` and leave with :meth:`Poller.discard`. A
registered member (a channel) offers the poller exactly these calls:

* ``on_tick()``: send due acks, deliver what it buffered, start a read if there is room;
  returns the file descriptors of its outstanding reads (one, or one per slot on a
  Redis Cluster; none when no read is outstanding);
* ``read_ready(fd)``: ``fd`` is readable: read the reply; False if ``fd`` is not its read;
* ``deliver(limit=None)``: hand buffered messages to consumers; returns how many;
* ``start_read()``: start a read if there is room; returns the outstanding reads' fds;
* ``maintain()``: run the upkeep jobs;
* ``drop_overdue_read()``: ``(dropped, fd)``: drop a read whose reply is too late;
* ``connection_errors``.

With Celery's hub each outstanding read's socket is a hub reader; without one,
:meth:`Poller.get` polls them (``Connection.drain_events``).
"""

from queue import Empty
from threading import get_ident
from time import monotonic, sleep

from kombu.log import get_logger
from kombu.utils.eventio import ERR, READ, poll

logger = get_logger(__name__)

#: Seconds between upkeep runs without a hub (drain_events).
DRAIN_UPKEEP_INTERVAL = 1.0


class Poller:
    def __init__(self):
        self._members = []
        self.hub = None
        self._registered = {}  # fd -> member, in the hub
        self.loop_thread = None  # the thread running the hub's loop (seen in on_tick)
        self._maintained_at = 0.0

    # -- registration ----------------------------------------------------------------------

    def add(self, member):
        self._members.append(member)

    def discard(self, member):
        if member in self._members:
            self._members.remove(member)
        self._unwatch(member)

    def attach(self, hub):
        """Celery's event loop took over: reads are registered with ``hub`` from now on."""
        self.hub = hub
        self._registered.clear()

    def close(self):
        for fd in list(self._registered):
            self._unregister(fd)
        self._members = []

    def _watch(self, member, fds):
        for fd, registered in list(self._registered.items()):
            if registered is member and fd not in fds:
                self._unregister(fd)
        for fd in fds:
            if self._registered.get(fd) is not member:
                self._unregister(fd)
                self._registered[fd] = member
                self.hub.add_reader(fd, self.on_readable, fd)

    def _unwatch(self, member):
        self._watch(member, ())

    def forget(self, fd):
        """``fd`` is about to be closed: stop watching it (its number may come back)."""
        self._unregister(fd)

    def _unregister(self, fd):
        self._registered.pop(fd, None)
        if self.hub is not None:
            try:
                self.hub.remove_reader(fd)
            except (KeyError, ValueError, OSError):
                pass

    # -- with a hub ------------------------------------------------------------------------

    def on_tick(self):
        self.loop_thread = get_ident()
        for member in list(self._members):
            fds = member.on_tick()
            # A read may be outstanding from before the hub existed (mingle's broadcast
            # is read with drain_events): register it too, or nobody reads its reply.
            if fds:
                self._watch(member, fds)

    def on_readable(self, fd):
        member = self._registered.get(fd)
        if member is None:
            return
        try:
            ready = member.read_ready(fd)
        except member.connection_errors:
            self._unregister(fd)
            raise
        if not ready:
            self._unregister(fd)
            return
        member.deliver()

    def maintain(self):
        for member in list(self._members):
            try:
                member.maintain()
                dropped, fd = member.drop_overdue_read()
                if dropped:
                    logger.warning("sheppy: read got no reply in time; dropping the connection")
                    if fd is not None:
                        self._unregister(fd)
            except member.connection_errors:
                logger.debug("sheppy: upkeep failed, will retry", exc_info=True)

    # -- without a hub (drain_events) ---------------------------------------------------------

    def get(self, callback, timeout=None):
        for member in list(self._members):
            if member.deliver(limit=1):
                return
        if monotonic() - self._maintained_at >= DRAIN_UPKEEP_INTERVAL:
            self._maintained_at = monotonic()
            self.maintain()
        waiting = {}
        for member in list(self._members):
            for fd in member.start_read():
                waiting[fd] = member
        if not waiting:
            sleep(min(timeout, 0.1) if timeout is not None else 0.1)
            raise Empty()
        poller = poll()
        try:
            for fd in waiting:
                poller.register(fd, READ | ERR)
            events = poller.poll(timeout)
        finally:
            poller.close()
        for fd, _ in events or ():
            member = waiting.get(fd)
            if member is not None:
                member.read_ready(fd)
        for member in list(self._members):
            if member.deliver(limit=1):
                return
        raise Empty()
