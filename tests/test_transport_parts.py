"""Parts of the transport that hold state without Redis: the read buffer, the in-flight
ledger, the declared queues and the delivery tag."""

import threading

from celery_sheppy import keys
from celery_sheppy.transport.acks import InflightLedger, ack_commands, merged
from celery_sheppy.transport.buffer import ReadBuffer
from celery_sheppy.transport.streams import Queues, QueueStreams

A, B = keys.pending_stream("a"), keys.pending_stream("b")


def test_read_buffer_hands_out_entries_in_read_order():
    buffer = ReadBuffer()
    buffer.extend([("a", A, "1-0", b"x"), ("b", B, "2-0", b"y")])
    buffer.append(("a", A, "3-0", b"z"))
    assert len(buffer) == 3
    first = buffer.popleft()
    assert (first.queue, first.stream, first.entry_id, first.data) == ("a", A, "1-0", b"x")
    assert [item.entry_id for item in buffer.drain()] == ["2-0", "3-0"]
    assert len(buffer) == 0


def test_taking_a_queues_entry_leaves_the_other_queues_entries_in_order():
    buffer = ReadBuffer()
    buffer.extend([("a", A, "1-0", None), ("b", B, "2-0", None), ("a", A, "3-0", None)])
    assert buffer.take("b").entry_id == "2-0"
    assert buffer.take("b") is None
    assert [item.entry_id for item in buffer.remove_queue("a")] == ["1-0", "3-0"]
    assert len(buffer) == 0


def test_read_buffer_tells_which_entries_it_holds_per_stream():
    buffer = ReadBuffer()
    buffer.extend([("a", A, "1-0", None), ("b", B, "2-0", None), ("a", A, "3-0", None)])
    assert buffer.held() == {A: ["1-0", "3-0"], B: ["2-0"]}


def test_a_delivery_tag_names_its_stream_entry_and_the_backend_can_split_it():
    ledger = InflightLedger()
    tag = ledger.add(A, "5-1", {"id": "x"}, 2)
    assert tag == keys.delivery_tag(A, "5-1")
    assert keys.entry_of_tag(tag) == (A, "5-1")
    assert keys.entry_of_tag("no-space") is None
    assert keys.entry_of_tag(None) is None


def test_ledger_settles_each_delivery_once():
    ledger = InflightLedger()
    first = ledger.add(A, "1-0", {"id": "x"}, 1)
    second = ledger.add(A, "2-0", {"id": "y"}, 3)
    assert ledger.held() == {A: ["1-0", "2-0"]}
    assert ledger.pop(second) == ((A, "2-0", {"id": "y"}), 3)
    assert ledger.pop(second) == (None, None)
    assert ledger.take([first, second]) == ({A: ["1-0"]}, 1)  # the second was settled before
    assert ledger.held() == {}


def test_ledger_hands_everything_over_when_cleared():
    ledger = InflightLedger()
    tag = ledger.add(B, "1-0", {"id": "x"}, 1)
    inflight, deliveries = ledger.clear()
    assert inflight == {tag: (B, "1-0", {"id": "x"})} and deliveries == {tag: 1}
    assert ledger.pop(tag) == (None, None)


def test_concurrent_acks_of_one_delivery_settle_it_once():
    ledger = InflightLedger()
    tags = [ledger.add(A, f"{n}-0", {}, 1) for n in range(1000)]
    settled = []

    def ack_all():
        settled.append(ledger.take(tags)[0].get(A, []))

    threads = [threading.Thread(target=ack_all) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(entry for ids in settled for entry in ids) == sorted(f"{n}-0" for n in range(1000))


def test_acks_of_several_batches_merge_into_one_xack_and_xdel_per_stream():
    by_stream = merged([{A: ["1-0"]}, {A: ["2-0"], B: ["3-0"]}])
    assert by_stream == {A: ["1-0", "2-0"], B: ["3-0"]}
    assert ack_commands(by_stream) == [
        ("XACK", A, keys.CONSUMER_GROUP, "1-0", "2-0"), ("XDEL", A, "1-0", "2-0"),
        ("XACK", B, keys.CONSUMER_GROUP, "3-0"), ("XDEL", B, "3-0")]


def test_declared_expiring_queue_has_one_stream_and_is_not_leased():
    queues = Queues(QueueStreams([0, 5]))
    queues.declare("reply", {"x-expires": 60000, "x-message-ttl": 1000}, auto_delete=True)
    queues.declare("work")
    assert queues.streams("reply") == [keys.pending_stream("reply")]
    assert queues.streams("work") == [keys.pending_stream("work"), keys.priority_stream("work", 5)]
    assert queues.leased(["reply", "work"]) == ["work"]
    assert queues.message_ttl == {"reply": 1000} and queues.auto_delete == {"reply"}
    # A binding saying the queue expires wins over what this channel declared.
    assert queues.stream_for("work", 7, expires=60000) == keys.pending_stream("work")
    assert queues.stream_for("work", 7) == keys.priority_stream("work", 5)


def test_redeclaring_a_queue_without_expiry_makes_it_an_ordinary_queue():
    queues = Queues(QueueStreams())
    queues.declare("q", {"x-expires": 1000})
    queues.declare("q", {})
    assert not queues.expiring("q")
    assert len(queues.streams("q")) == 4
