"""The examples in the pure modules' docstrings run as written."""

from __future__ import annotations

import doctest

import pytest

from cloudtask import clock, runmodel


@pytest.mark.parametrize("module", [clock, runmodel], ids=lambda m: m.__name__)
def test_the_examples_run(module) -> None:
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0
