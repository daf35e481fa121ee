"""Parameter groups (sdi.parameter_groups): first matching regex wins, the rest in "other"."""

from __future__ import annotations

import pytest
import torch

from sdi.parameter_groups import OTHER, parameter_groups


class _Block:  # the two fields parameter_groups reads of a ParamBlock
    def __init__(self, name, columns):
        self.name, self.columns = name, columns


BLOCKS = [
    _Block("core.attn.qkv.weight", slice(0, 3)),
    _Block("core.mlp.fc1.weight", slice(3, 5)),
    _Block("core.attn.proj.weight", slice(5, 6)),
    _Block("core.norm.weight", slice(6, 8)),
]


def test_true_gives_one_group_per_parameter():
    groups = parameter_groups(BLOCKS, True)
    assert [g.name for g in groups] == [b.name for b in BLOCKS]
    assert [g.columns for g in groups] == [(b.columns,) for b in BLOCKS]


def test_first_matching_regex_wins_and_the_rest_go_to_other():
    groups = parameter_groups(BLOCKS, {"attention": r"attn", "projections": r"proj|fc"})
    assert [(g.name, g.params) for g in groups] == [
        ("attention", ("core.attn.qkv.weight", "core.attn.proj.weight")),  # proj: attention first
        ("projections", ("core.mlp.fc1.weight",)),
        (OTHER, ("core.norm.weight",)),
    ]
    features = torch.arange(8.0).expand(2, 8)
    torch.testing.assert_close(groups[0].select(features), features[:, [0, 1, 2, 5]])
    torch.testing.assert_close(groups[2].select(features), features[:, 6:8])
    # every column in exactly one group
    cols = torch.cat([g.select(torch.arange(8.0)) for g in groups]).sort().values
    torch.testing.assert_close(cols, torch.arange(8.0))


def test_a_group_named_other_takes_the_unmatched_too():
    groups = parameter_groups(BLOCKS, {"other": "norm", "attn": "attn"})
    assert [(g.name, len(g.params)) for g in groups] == [("other", 2), ("attn", 2)]


@pytest.mark.parametrize(
    "by_parameter, error, message",
    [
        ({}, TypeError, "non-empty dict"),
        ("attn", TypeError, "True or a non-empty dict"),
        ({"a": 3}, TypeError, "regex strings"),
        ({"a": "("}, ValueError, r"by_parameter\['a'\] = '\(' is not a valid regex"),
        ({"attn": "attn", "qkv": "qkv"}, ValueError, r"\['qkv'\] hold no selected parameter"),
    ],
)
def test_bad_groupings_are_named(by_parameter, error, message):
    with pytest.raises(error, match=message):
        parameter_groups(BLOCKS, by_parameter)
