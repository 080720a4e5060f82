import pytest

from actors.pipeline import split
from rlaif_ray.feedback.stats import paired_change


def test_paired_change():
    mean, half = paired_change({"a": 0.0, "b": 1.0, "c": 0.5}, {"a": 1.0, "b": 1.0, "c": 1.5, "extra": 9})
    assert mean == pytest.approx(2 / 3)
    sd = ((1 / 3) ** 2 * 2 + (2 / 3) ** 2) ** 0.5 / 2 ** 0.5
    assert half == pytest.approx(4.302652729911275 * sd / 3 ** 0.5)  # t(0.975, 2 degrees of freedom), not 1.96


def test_split_covers_everything_in_order():
    assert split(list(range(7)), 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert split([1], 3) == [[1]]
