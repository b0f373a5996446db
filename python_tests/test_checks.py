"""exml_fast._utils.checks.check_choice: the one wording of every "must be one of" error."""

from __future__ import annotations

import pytest

from exml_fast._utils.checks import check_choice


@pytest.mark.parametrize("choices", [("sgd", "adam"), {"sgd": 1, "adam": 2}, frozenset({"sgd", "adam"})])
def test_returns_a_member(choices):
    assert check_choice("adam", "optimizer", "distill", choices) == "adam"


@pytest.mark.parametrize("value", ["rmsprop", None, 3, ["sgd"], {"sgd": 1}, True])
def test_refuses_with_owner_name_choices_and_value(value):
    with pytest.raises(ValueError) as info:
        check_choice(value, "optimizer", "distill", {"sgd": 1, "adam": 2})
    assert str(info.value) == f"distill: optimizer must be one of sgd, adam; got {value!r}"


def test_a_bool_is_not_its_int():
    assert check_choice(3, "blur_kernel_size", "image_priors", (1, 3, 5)) == 3
    with pytest.raises(ValueError, match="blur_kernel_size must be one of 1, 3, 5; got True"):
        check_choice(True, "blur_kernel_size", "image_priors", (1, 3, 5))
