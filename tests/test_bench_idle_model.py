"""The idle bench's cost model (bench/idle.py): the fit it projects deployments with, without Redis."""

import pytest

from bench import idle

GRID = [(w, q) for w in idle.WORKERS for q in idle.QUEUES]


def test_the_fit_recovers_the_coefficients_of_a_model_it_was_given():
    # Given commands/s made by a known model at every point of the grid
    known = {"a": 0.5, "b": 1.5, "c": 2.0, "d": 0.57, "e": 0.03}
    points = [(w, q, idle.predict(known, w, q)) for w, q in GRID]
    # When the model is fitted to them
    fitted = idle.fit(points)
    # Then it finds the same coefficients, and projects what the model would
    assert fitted == pytest.approx(known, rel=1e-6, abs=1e-9)
    assert idle.predict(fitted, 500, 500) == pytest.approx(idle.predict(known, 500, 500))


def test_the_fit_weighs_points_by_their_relative_error():
    # Given a linear cost per worker, and one large point 10 % off it
    points = [(w, q, 1.5 * w) for w, q in GRID]
    points[-1] = (points[-1][0], points[-1][1], points[-1][2] * 1.1)
    fitted = idle.fit(points)
    # Then the small points are still fitted within a few per cent of what was measured
    for w, q, value in points[:3]:
        assert idle.predict(fitted, w, q) == pytest.approx(value, rel=0.05)


def test_no_fit_from_fewer_points_than_terms_or_from_a_zero_value():
    assert idle.fit([(1, 1, 1.0), (10, 1, 10.0)]) is None
    assert idle.fit([(w, q, 0.0 if w == 1 else 1.0) for w, q in GRID]) is None


def test_a_cost_that_does_not_exist_is_fitted_as_zero_not_as_a_negative_one():
    # Given stock's idle cost, 1.5 commands/s per worker, measured a little low at 20 workers
    points = [(w, q, 1.5 * w * (0.985 if w == 20 else 1.0)) for w, q in GRID]
    # When the model is fitted and projected to 500 workers
    fitted = idle.fit(points)
    # Then no coefficient is negative, and the projection stays near 1.5 per worker
    assert min(fitted.values()) >= 0
    assert idle.predict(fitted, 500, 500) == pytest.approx(750, rel=0.05)
