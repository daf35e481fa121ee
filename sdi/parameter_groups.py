"""Parameter groups: which columns of the flat feature tensor each named group of parameters owns.

Every selected parameter owns a block of columns (:class:`sdi.featurize.ParamBlock`), and influence
is a sum over parameters, so restricting a contraction to a group's columns gives that group's share
and the groups' shares add up to the whole (to float rounding).

``by_parameter`` is ``True`` (one group per selected parameter, named by its model name) or a dict
``{group: regex}``. A parameter belongs to the **first** group (dict order) whose regex
``re.search``-es its name; a parameter no regex matches goes to ``"other"``. So every parameter
falls in exactly one group. A group that ends up with no parameter is refused (a regex that matches
nothing, or only parameters an earlier group took): its share would be a silent zero.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

OTHER = "other"  # the group of the parameters no regex matched


@dataclass(frozen=True)
class ParameterGroup:
    """One group: its name, its parameters' names and the feature columns they own."""

    name: str
    params: tuple[str, ...]
    columns: tuple[slice, ...]

    def select(self, features: torch.Tensor) -> torch.Tensor:
        """``features (..., D)`` restricted to this group's columns: ``(..., D_group)``."""
        if len(self.columns) == 1:
            return features[..., self.columns[0]]
        return torch.cat([features[..., c] for c in self.columns], dim=-1)


def parameter_groups(
    blocks: Sequence, by_parameter: bool | Mapping[str, str]
) -> list[ParameterGroup]:
    """The groups of ``blocks`` (the featurizer's :class:`sdi.featurize.ParamBlock` list) that
    ``by_parameter`` names, in order (``"other"`` last, when a parameter fell in no group).

    Raises ``TypeError`` / ``ValueError`` naming the culprit for a ``by_parameter`` that is not
    ``True`` or a non-empty ``{str: regex}`` dict, an invalid regex, or a group with no parameter.
    """
    if by_parameter is True:
        return [ParameterGroup(b.name, (b.name,), (b.columns,)) for b in blocks]
    if not isinstance(by_parameter, Mapping) or not by_parameter:
        raise TypeError(
            f"by_parameter must be True or a non-empty dict {{group: regex}}, got {by_parameter!r}"
        )
    patterns = {}
    for name, regex in by_parameter.items():
        if not isinstance(name, str) or not isinstance(regex, str):
            raise TypeError(
                f"by_parameter must map group names to regex strings, got {name!r}: {regex!r}"
            )
        try:
            patterns[name] = re.compile(regex)
        except re.error as err:
            raise ValueError(
                f"by_parameter[{name!r}] = {regex!r} is not a valid regex: {err}"
            ) from err
    members: dict[str, list] = {name: [] for name in patterns}
    for block in blocks:
        group = next((n for n, p in patterns.items() if p.search(block.name)), OTHER)
        members.setdefault(group, []).append(block)
    empty = [n for n, bs in members.items() if not bs]
    if empty:
        raise ValueError(
            f"by_parameter groups {empty} hold no selected parameter (a parameter goes to the first "
            f"group whose regex matches its name); selected: {[b.name for b in blocks]}"
        )
    return [
        ParameterGroup(n, tuple(b.name for b in bs), tuple(b.columns for b in bs))
        for n, bs in members.items()
    ]
