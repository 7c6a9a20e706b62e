"""The read-ahead buffer: entries a :class:`~.reading.Reader` read and has not yet
delivered, in delivery order. No Redis; the reader owns one and is its only user.
"""

from collections import deque, namedtuple


#: An entry read and not yet delivered.
Buffered = namedtuple("Buffered", "queue stream entry_id data")


class ReadBuffer:
    """Entries read and not yet delivered, in delivery order."""

    def __init__(self):
        self._items = deque()

    def extend(self, items):
        self._items.extend(Buffered(*item) for item in items)

    def append(self, item):
        self._items.append(Buffered(*item))

    def popleft(self):
        return self._items.popleft()

    def take(self, queue):
        """The first entry of ``queue``, removed from the buffer; None if there is none."""
        item = next((item for item in self._items if item.queue == queue), None)
        if item is not None:
            self._items.remove(item)  # not while iterating
        return item

    def remove_queue(self, queue):
        """Remove and return every entry of ``queue``."""
        taken = [item for item in self._items if item.queue == queue]
        if taken:
            self._items = deque(item for item in self._items if item.queue != queue)
        return taken

    def drain(self):
        """Remove and return every entry."""
        items = list(self._items)
        self._items.clear()
        return items

    def held(self):
        """``{stream: [entry id]}`` of the entries."""
        held = {}
        for item in self._items:
            held.setdefault(item.stream, []).append(item.entry_id)
        return held

    def __len__(self):
        return len(self._items)
