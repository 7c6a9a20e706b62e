"""Rate strings, beat entries and occurrences, unique keys: the pure parts of issue 13's
features, without Redis (t/integration/test_features.py runs them in real workers)."""

import json
from datetime import datetime, timedelta, timezone

import pytest
from celery import Celery, schedules

from celery_sheppy import beat, keys, unique
from celery_sheppy.transport import claims, limits


@pytest.fixture
def app():
    app = Celery("features", set_as_current=False)
    yield app
    app.close()


# -- rate limits -------------------------------------------------------------------------


def test_rate_strings_follow_celerys_syntax_with_the_jitter_guard():
    guard = limits.JITTER_GUARD_MS
    assert limits.slot_ms("20/s") == pytest.approx((1000 + guard) / 20)
    assert limits.slot_ms("100/m") == pytest.approx((60000 + guard) / 100)
    assert limits.slot_ms("3/h") == pytest.approx((3600000 + guard) / 3)
    assert limits.slot_ms(5) == pytest.approx((1000 + guard) / 5)
    assert limits.slot_ms("5") == limits.slot_ms("5/s")
    assert limits.slot_ms(None) is None and limits.slot_ms("0/s") is None


@pytest.mark.parametrize("bad", ["fast", "10/d", "x/s"])
def test_a_bad_rate_string_is_refused_by_name(bad):
    with pytest.raises(ValueError, match=bad.replace("/", ".")):
        limits.slot_ms(bad)


def test_feature_keys_live_in_the_queues_key_family():
    queue = "{celery}"
    for key in (keys.rate_limit(queue, "proj.fetch"), keys.unique_lock(queue, "k"),
                keys.beat_occurrence(queue, "o"), keys.cron_table(queue)):
        assert "{celery}" in key
    assert keys.cron_table("celery") == "sheppy:cron:celery"


# -- beat ----------------------------------------------------------------------------------


def test_sheppy_cron_expressions_of_celery_schedules(app):
    def expression(sched):
        return beat.entry_record("e", "t", schedules.maybe_schedule(sched, False, app))[2][
            "expression"]

    assert expression(1) == "* * * * * *"
    assert expression(timedelta(seconds=15)) == "* * * * * */15"
    assert expression(timedelta(minutes=1)) == "* * * * *"
    assert expression(timedelta(minutes=10)) == "*/10 * * * *"
    assert expression(timedelta(hours=6)) == "0 */6 * * *"
    assert expression(schedules.crontab(minute=30, hour=3, day_of_week="1-5")) == "30 3 * * 1-5"


def test_an_entry_id_is_its_definition(app):
    def entry_id(**changes):
        spec = dict(name="e", task="t", sched=schedules.schedule(5, app=app), args=(1,))
        spec.update(changes)
        return beat.entry_record(**spec)[0]

    assert entry_id() == entry_id()
    assert len({entry_id(), entry_id(name="f"), entry_id(args=(2,)), entry_id(task="u"),
                entry_id(sched=schedules.schedule(6, app=app)),
                entry_id(options={"queue": "q"})}) == 6


def test_a_record_is_a_sheppy_task_cron(app):
    _, queue, record = beat.entry_record("e", "proj.t", schedules.crontab(minute="*/5", app=app),
                                         (1,), {"a": 2}, {"queue": "reports"})
    assert queue == "reports"
    assert record["spec"] == {"func": "celery_sheppy:celery_task", "args": [1], "kwargs": {"a": 2}}
    assert record["config"] == {} and record["celery"]["task"] == "proj.t"


@pytest.mark.sheppy_tools
def test_a_cron_record_is_a_valid_sheppy_task_cron(app):
    from sheppy.models import TaskCron

    _, _, record = beat.entry_record("e", "proj.t", schedules.crontab(minute="*/5", app=app),
                                     (1,), {"a": 2}, {"queue": "reports"})
    TaskCron.model_validate(json.loads(json.dumps(record)))


def test_interval_occurrences_are_multiples_of_the_interval_since_the_epoch(app):
    entry = _entry(app, timedelta(seconds=10), now=1000.5)
    assert entry.next == 1010
    assert entry.after(1010) == 1020


def test_crontab_occurrences_follow_the_apps_timezone(app):
    app.conf.timezone = "Europe/Berlin"
    now = datetime(2026, 12, 2, 8, 0, tzinfo=timezone.utc).timestamp()
    entry = _entry(app, schedules.crontab(minute=30, hour=3, app=app), now=now)
    # 03:30 in Berlin is 02:30 UTC in winter, the next day
    assert datetime.fromtimestamp(entry.next, timezone.utc) == datetime(
        2026, 12, 3, 2, 30, tzinfo=timezone.utc)
    assert entry.after(entry.next) - entry.next == 24 * 3600


def test_solar_occurrences_are_the_suns_events(app):
    pytest.importorskip("ephem")
    now = datetime(2026, 6, 21, 12, 0, tzinfo=timezone.utc).timestamp()
    entry = _entry(app, schedules.solar("sunrise", 52.52, 13.40, app=app), now=now)
    # Berlin's sunrise around midsummer: about 02:43 UTC, the next morning
    sunrise = datetime.fromtimestamp(entry.next, timezone.utc)
    assert sunrise.date().isoformat() == "2026-06-22" and 2 <= sunrise.hour < 4


def test_occurrence_ids_are_deterministic_uuids():
    first = beat.occurrence_id("e", 1010.0)
    assert first == beat.occurrence_id("e", 1010) != beat.occurrence_id("e", 1011)
    assert len(first) == 36 and first == first.lower()


def _entry(app, sched, now):
    entry_id, queue, record = beat.entry_record(
        "e", "t", schedules.maybe_schedule(sched, False, app))
    return beat.Entry(entry_id, queue, record, app, now)


# -- unique tasks --------------------------------------------------------------------------


def test_the_default_unique_key_is_the_name_and_the_arguments():
    key = unique.unique_key("proj.t", (1, 2), {"b": 1, "a": 2})
    assert key == unique.unique_key("proj.t", [1, 2], {"a": 2, "b": 1})
    assert key != unique.unique_key("proj.t", (1, 3), {"b": 1, "a": 2})
    assert key.startswith("proj.t:")


def test_a_claim_is_read_from_the_message_headers():
    claim = {"kind": "unique", "key": "k", "ttl": 5}
    assert claims.of({"headers": {claims.HEADER: claim}}) == claim
    assert claims.of({"headers": {claims.HEADER: {"kind": "other", "key": "k"}}}) is None
    assert claims.of({"headers": {}}) is None
    assert claims.key_of(dict(claim, queue="celery")) == "sheppy:celery:celery:unique:k"
