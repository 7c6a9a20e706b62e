"""Root conftest.py of the prepared copy of Celery's t/integration suite (see run.py).

With ``TEST_BACKEND=sheppy://...`` it skips the tests that read the stock Redis
backend's own keys or pub/sub channels, which sheppy:// does not have (and, with
``TEST_BROKER=sheppy://...``, those listed for the broker). Each reason is repeated
in docs/celery-suite.md.
"""

import os

import pytest
from celery.app.control import Inspect

# The fixtures the suite's conftest imports need the rest of Celery's pytest plugin
# (celery_parameters, ...); Celery's own CI gets it from the pytest-celery package.
pytest_plugins = ("celery.contrib.pytest",)

# The suite runs exactly one worker (celery_session_worker), so a broadcast has all its
# replies after the first one. Without a limit every inspect waits out its whole timeout
# (1-3 s), and Manager.wait_until_idle runs one after every test: about 5 minutes a run.
_inspect_init = Inspect.__init__


def _inspect_init_one_reply(self, *args, limit=None, **kwargs):
    _inspect_init(self, *args, limit=1 if limit is None else limit, **kwargs)


Inspect.__init__ = _inspect_init_one_reply


@pytest.fixture(autouse=True)
def _stock_inspect_in_test_inspect(request, monkeypatch):
    """test_inspect.py tests the broadcasts themselves: there, Celery's own Inspect."""
    # With limit=1 its ``len(ret) == 1`` checks could never fail: the collection would
    # stop before a second reply (another node, a stale pidbox) could show up.
    if request.node.path.name == "test_inspect.py":
        monkeypatch.setattr(Inspect, "__init__", _inspect_init)


_STOCK_CHANNELS = ("reads PUBSUB CHANNELS for the stock backend's celery-task-meta-<id> "
                   "subscriptions; sheppy:// waits on the sheppy:finished:<q> stream, no pub/sub")

#: "backend" or "broker" -> {node id (without parameters): why it cannot apply when
#: that one is sheppy://}. The broker has no entry: its one redis-only gate is handled
#: by run.py's rewrite, as the backend's gates are.
NOT_APPLICABLE = {
    "backend": {
        "t/integration/test_canvas.py::test_chord::test_redis_subscribed_channels_leak":
            _STOCK_CHANNELS,
        "t/integration/test_canvas.py::test_chord::test_chord_on_error": (
            "reads the stock backend's chord join key <group key>.j (a zset of encoded part "
            "results); sheppy:// joins through sheppy:workflows:<q>:<gid>:pending and the "
            "records"),
        "t/integration/test_tasks.py::test_task_redis_result_backend::"
        "test_ignoring_result_no_subscriptions": _STOCK_CHANNELS + " (it would pass vacuously)",
        "t/integration/test_tasks.py::test_task_redis_result_backend::"
        "test_asyncresult_forget_cancels_subscription": _STOCK_CHANNELS,
        "t/integration/test_tasks.py::test_task_redis_result_backend::"
        "test_asyncresult_get_cancels_subscription": _STOCK_CHANNELS,
    },
    "broker": {},
}

#: Deselected by --ci-subset (run.py --subset), with seconds measured on 2 cores: tests
#: that mostly wait out timeouts to prove something does not happen, tests that are
#: expected to fail with either backend, and tests without a result backend in them.
#: run.py --full runs them.
SLOW = {
    "test_canvas.py::test_chord::test_disabling_flag_allow_error_cb_on_chord_header",  # 150
    "test_canvas.py::test_chord::test_enabling_flag_allow_error_cb_on_chord_header",  # 85
    "test_canvas.py::test_chord::test_flag_allow_error_cb_on_chord_header_on_upgraded_chord",  # 70
    "test_canvas.py::test_chord::test_error_propagates_from_chord",  # 60, xfail: times out
    "test_canvas.py::test_chord::test_redis_subscribed_channels_leak",  # 12, xfail
    *(f"test_canvas.py::test_chord::test_generator[{size}]" for size in range(5, 10)),  # 5-9
    "test_canvas.py::test_stamping_mechanism",  # 15, no result backend involved
    "test_tasks.py::test_tasks::test_revoked_by_headers_complex_canvas",  # 20, times out here
}


def _is_slow(item):
    # Whole node ids, not pytest's --deselect prefixes (test_revoked would take
    # test_revoked_by_headers_simple_canvas with it). A name without [...] stands
    # for all its parameters, a class for all its tests.
    node = item.nodeid.removeprefix("t/integration/")
    name = node.split("[")[0]
    return bool({node, name, name.rsplit("::", 1)[0]} & SLOW)


def pytest_addoption(parser):
    parser.addoption("--ci-subset", action="store_true", help="deselect the SLOW tests")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--ci-subset"):
        config.hook.pytest_deselected(items=[item for item in items if _is_slow(item)])
        items[:] = [item for item in items if not _is_slow(item)]
    for role, tests in NOT_APPLICABLE.items():
        if not os.environ.get(f"TEST_{role.upper()}", "").startswith("sheppy"):
            continue
        for item in items:
            reason = tests.get(item.nodeid.split("[")[0])
            if reason:
                item.add_marker(pytest.mark.skip(
                    reason=f"not applicable to a sheppy:// {role}: {reason}"))
