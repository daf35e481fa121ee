"""Argument and input checks (sdi.validation): integers, seeds, re-iterable loaders, NaN rows."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from sdi.validation import (
    SEED_RANGE,
    NonFiniteRows,
    check_int,
    check_reiterable,
    check_seed,
    non_finite_rows,
    warn_outside_package,
)


@pytest.mark.parametrize("value", [3, np.int64(3), torch.tensor(3).item()])
def test_check_int_accepts_integers_and_returns_an_int(value):
    got = check_int("n", value, minimum=1)
    assert got == 3 and type(got) is int


@pytest.mark.parametrize("value", [2.5, 4.0, True, "3", None, torch.tensor(3)])
def test_check_int_refuses_what_is_not_an_integer(value):
    with pytest.raises(TypeError, match=r"^n must be an integer, got "):
        check_int("n", value)


def test_check_int_ranges_name_the_argument():
    with pytest.raises(ValueError, match=r"^k must be positive, got 0$"):
        check_int("k", 0, minimum=1)
    with pytest.raises(ValueError, match=r"^n must be >= -2, got -3$"):
        check_int("n", -3, minimum=-2)
    with pytest.raises(ValueError, match=r"^n must be <= 7, got 8$"):
        check_int("n", 8, maximum=7)
    assert check_int("n", -2, minimum=-2) == -2 and check_int("n", 7, maximum=7) == 7


def test_seed_range_is_what_torch_generators_accept():
    low, high = SEED_RANGE
    for seed in (low, 0, high):
        assert check_seed(seed) == seed
        torch.Generator().manual_seed(seed)  # torch takes every seed check_seed passes
    for seed in (low - 1, high + 1, 2**70):
        with pytest.raises(ValueError, match="seed must be"):
            check_seed(seed)
        with pytest.raises((ValueError, RuntimeError, OverflowError)):
            torch.Generator().manual_seed(seed)  # ... and refuses the ones it refuses
    with pytest.raises(TypeError, match="seed must be an integer, got 1.5"):
        check_seed(1.5)


class _Reiterable:
    def __iter__(self):
        return iter([1, 2])


@pytest.mark.parametrize(
    "loader", [[1, 2], (1, 2), _Reiterable(), DataLoader(list(range(4)), batch_size=2)]
)
def test_reiterable_loaders_pass(loader):
    check_reiterable(loader, "train_loader")
    assert str(list(loader)) == str(list(loader))  # the property the check stands for


@pytest.mark.parametrize(
    "loader", [(b for b in [1, 2]), iter([1, 2]), map(int, "12"), iter(DataLoader([1, 2]))]
)
def test_one_shot_iterators_are_refused_with_the_reason(loader):
    with pytest.raises(
        TypeError, match="query_loader is an iterator, which can be iterated only once"
    ):
        check_reiterable(loader, "query_loader")


def test_a_non_iterable_loader_is_refused():
    with pytest.raises(TypeError, match=r"loader is not iterable \(int\)"):
        check_reiterable(5, "loader")


def test_non_finite_rows_finds_nan_and_inf_rows():
    values = torch.randn(9, 3, 4)
    values[2, 1, 3] = torch.nan
    values[5, 0, 0] = torch.inf
    values[7, 2, 1] = -torch.inf
    assert non_finite_rows(values).tolist() == [2, 5, 7]
    assert non_finite_rows(torch.randn(6, 2)).tolist() == []
    assert non_finite_rows(torch.zeros(0, 5)).tolist() == []


def test_non_finite_report_counts_loader_rows_and_warns_once_per_pass():
    report = NonFiniteRows("train_loader")
    report.add_losses(torch.tensor([0.5, torch.nan, 1.0]), offset=0)
    features = torch.randn(4, 6)
    features[3, 2] = torch.inf
    report.add_features(features, offset=3)  # the second batch starts at loader row 3
    with pytest.warns(RuntimeWarning) as record:
        report.warn()
    assert len(record) == 1
    message = str(record[0].message)
    assert message.startswith(
        "train_loader: NaN or infinite loss at rows [1] and features at rows [6]"
    )
    assert record[0].filename == __file__  # reported at the caller outside sdi


def test_non_finite_report_is_silent_when_all_is_finite_and_shortens_long_lists():
    report = NonFiniteRows("loader")
    report.add_features(torch.randn(5, 2), offset=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report.warn()
    report.add_losses(torch.full((13,), torch.nan), offset=0)
    with pytest.warns(RuntimeWarning, match=r"loss at rows \[0, 1, .*, 9\] and 3 more"):
        report.warn()


def test_warn_outside_package_points_at_the_caller():
    with pytest.warns(RuntimeWarning) as record:
        warn_outside_package("look here")
    assert record[0].filename == __file__


class _OwnIterator:
    """Its own iterator (``__iter__`` returns ``self``): one pass, even if it looks like a class."""

    def __init__(self):
        self.left = [1, 2]

    def __iter__(self):
        return self

    def __next__(self):
        if not self.left:
            raise StopIteration
        return self.left.pop()


def test_an_object_that_is_its_own_iterator_is_refused():
    loader = _OwnIterator()
    with pytest.raises(TypeError, match=r"returns a new iterator \(not itself\)"):
        check_reiterable(loader, "train_loader")
    assert list(loader) == [2, 1] and list(loader) == []  # why: a second pass sees nothing
