"""A queue's streams and priority steps (celery_sheppy.transport.streams), without Redis."""

import pytest

from celery_sheppy import keys
from celery_sheppy.transport.streams import QueueStreams


def test_default_steps_give_sheppys_pending_stream_first_then_the_priority_streams():
    streams = QueueStreams()
    assert streams.of("q") == [keys.pending_stream("q"), *(keys.priority_stream("q", n)
                                                           for n in (3, 6, 9))]


def test_a_message_goes_to_the_highest_step_not_above_its_priority():
    streams = QueueStreams([0, 3, 6, 9])
    assert [streams.for_message("q", p) for p in (None, 0, 2, 3, 8, 9, 200)] == [
        keys.pending_stream("q"), keys.pending_stream("q"), keys.pending_stream("q"),
        keys.priority_stream("q", 3), keys.priority_stream("q", 6),
        keys.priority_stream("q", 9), keys.priority_stream("q", 9)]


def test_the_lowest_step_is_the_pending_stream_even_when_it_is_not_zero():
    streams = QueueStreams([5, 1])
    assert streams.steps == (1, 5)
    assert streams.of("q") == [keys.pending_stream("q"), keys.priority_stream("q", 5)]
    assert streams.for_message("q", None) == keys.pending_stream("q")
    assert streams.for_message("q", 4) == keys.pending_stream("q")
    assert streams.for_message("q", 5) == keys.priority_stream("q", 5)


def test_an_expiring_queue_has_the_pending_stream_only():
    streams = QueueStreams()
    assert streams.of("reply", expiring=True) == [keys.pending_stream("reply")]
    assert streams.for_message("reply", 9, expiring=True) == keys.pending_stream("reply")


def test_every_stream_a_queue_may_have_is_known_for_deleting_it():
    assert set(QueueStreams([1, 5]).all_known("q")) == {
        keys.pending_stream("q"), keys.priority_stream("q", 1), keys.priority_stream("q", 5)}


def test_bad_steps_and_bad_queue_names_are_refused():
    with pytest.raises(ValueError, match="priority_steps"):
        QueueStreams(["high"])
    assert QueueStreams([]).steps == (0,)
    with pytest.raises(keys.InvalidQueueName):
        QueueStreams().of("a:b")
