"""Rating -> 1..10 scale -> 10-bin distribution, against hand-computed values."""

import numpy as np
import pytest

from alignment.data import rating_to_distribution, rating_to_scale10


@pytest.mark.parametrize(
    ("x", "f"),
    [(0.0, 1.0), (4.0, 10.0), (2.0, 5.5), (1.0, 3.25), (3.4, 8.65), (2.2, 5.95), (0.4, 1.9)],
)
def test_scale_is_2_25x_plus_1(x, f):
    assert rating_to_scale10(x) == pytest.approx(f, abs=1e-12)


@pytest.mark.parametrize(
    ("x", "expected"),
    [
        (0.0, {1: 1.0}),              # f = 1
        (4.0, {10: 1.0}),             # f = 10: all mass on 10, nothing past the end
        (2.0, {5: 0.5, 6: 0.5}),      # f = 5.5
        (1.0, {3: 0.75, 4: 0.25}),    # f = 3.25
        (3.4, {8: 0.35, 9: 0.65}),    # f = 8.65 (mean of ratings 4,4,4,3,2)
        (2.2, {5: 0.05, 6: 0.95}),    # f = 5.95
        (4 / 9, {2: 1.0}),            # f = 2 exactly: one bin
    ],
)
def test_distribution_hand_cases(x, expected):
    dist = rating_to_distribution(x)
    want = np.zeros(10)
    for rating, p in expected.items():
        want[rating - 1] = p
    np.testing.assert_allclose(dist, want, atol=1e-12)
    assert dist.sum() == pytest.approx(1.0, abs=1e-12)
    # The distribution's mean is f(x) itself.
    assert float(np.dot(dist, np.arange(1, 11))) == pytest.approx(rating_to_scale10(x), abs=1e-9)


def test_other_scales_map_to_the_same_range():
    assert rating_to_scale10(1.0, 1.0, 5.0) == 1.0
    assert rating_to_scale10(5.0, 1.0, 5.0) == 10.0
    np.testing.assert_allclose(rating_to_distribution(3.0, 1.0, 5.0)[[4, 5]], [0.5, 0.5])


@pytest.mark.parametrize("x", [-0.1, 4.01, float("nan")])
def test_out_of_range_is_an_error(x):
    with pytest.raises(ValueError, match="outside"):
        rating_to_distribution(x)
