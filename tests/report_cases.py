"""Synthetic top-k results for the report tests: random, but shaped and summed like the real ones
(each explanation's positions and groups add up to the pair's SDI, whose steps add up to TracIn)."""

from __future__ import annotations

import torch

from sdi import PairExplanation, TopInfluences

GROUPS = ("attention", "mlp")
NASTY = '</script><script>window.pwned=1</script><b onmouseover="x">&amp;'


def split(total: torch.Tensor, parts: int, gen: torch.Generator) -> torch.Tensor:
    """``(parts, S)`` random shares adding up to ``total (S,)``."""
    shares = torch.randn(parts, total.shape[0], generator=gen, dtype=torch.float64)
    return shares - shares.mean(0) + total / parts


def train_tokens(n_train: int, length: int) -> list[list[int]]:
    return [[(i * 7 + p * 3) % 5 for p in range(length)] for i in range(n_train)]


def make_top(n_query=3, k=4, steps=5, n_train=40, length=6, explain=True, seed=0):
    """A TopInfluences over ``n_train`` train rows and ``n_query`` queries, with explanations."""
    gen = torch.Generator().manual_seed(seed)
    fields, explanations = {}, {}
    for side, sign in (("most", 1.0), ("least", -1.0)):
        idx = torch.stack([torch.randperm(n_train, generator=gen)[:k] for _ in range(n_query)])
        sdi = torch.randn(n_query, k, steps, generator=gen, dtype=torch.float64) * 1e-3
        sdi += sign * 2e-3
        tracin = sdi.sum(-1)
        order = tracin.argsort(dim=1, descending=side == "most")
        idx, tracin = idx.gather(1, order), tracin.gather(1, order)
        sdi = sdi.gather(1, order[..., None].expand_as(sdi))
        fields.update({f"{side}_indices": idx, f"{side}_tracin": tracin, f"{side}_sdi": sdi})
        explanations[f"{side}_explanations"] = [
            [
                PairExplanation(
                    train=int(idx[j, r]),
                    query=j,
                    sdi=sdi[j, r],
                    positions_train=split(sdi[j, r], length, gen),
                    positions_query=split(sdi[j, r], length, gen),
                    by_parameter=split(sdi[j, r], len(GROUPS), gen),
                    groups=GROUPS,
                )
                for r in range(k)
            ]
            for j in range(n_query)
        ]
    if explain:
        fields.update(explanations)
    return TopInfluences(**fields, n_excluded=torch.zeros(n_query, dtype=torch.int64))


def texts(n: int, prefix: str) -> list[str]:
    """``n`` texts, each naming its row; row 1 holds markup that must stay text."""
    return [f"{prefix} {i}: " + ("bits 1 0 1" if i != 1 else NASTY) for i in range(n)]


class Node:
    """An element of a parsed page: tag, attributes, children and its own text."""

    def __init__(self, tag: str, attrs: dict[str, str]):
        self.tag, self.attrs, self.children, self.own_text = tag, attrs, [], []

    def classes(self) -> set[str]:
        return set(self.attrs.get("class", "").split())

    def text(self) -> str:
        return "".join(self.own_text) + "".join(c.text() for c in self.children)

    def iter(self):
        yield self
        for child in self.children:
            yield from child.iter()

    def find_all(self, tag: str | None = None, cls: str | None = None, **attrs) -> list[Node]:
        return [
            n
            for n in self.iter()
            if (tag is None or n.tag == tag)
            and (cls is None or cls in n.classes())
            and all(n.attrs.get(k.replace("_", "-")) == v for k, v in attrs.items())
        ]


_VOID = {"meta", "input", "br", "img", "link", "hr", "col", "source", "area", "base", "wbr"}


def parse_page(markup: str) -> Node:
    """A tree of :class:`Node` from HTML (the stdlib parser; enough for the report's pages)."""
    from html.parser import HTMLParser

    root = Node("#root", {})
    stack = [root]

    class Builder(HTMLParser):
        def handle_starttag(self, tag, attrs):
            node = Node(tag, {k: v or "" for k, v in attrs})
            stack[-1].children.append(node)
            if tag not in _VOID:
                stack.append(node)

        def handle_startendtag(self, tag, attrs):
            stack[-1].children.append(Node(tag, {k: v or "" for k, v in attrs}))

        def handle_endtag(self, tag):
            for depth in range(len(stack) - 1, 0, -1):  # close up to the matching element
                if stack[depth].tag == tag:
                    del stack[depth:]
                    return

        def handle_data(self, data):
            stack[-1].own_text.append(data)

    Builder(convert_charrefs=True).feed(markup)
    return root
