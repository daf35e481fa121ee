"""The report's colour scale: a diverging blue-white-orange ramp, safe for colour-blind readers.

Blue (negative) and orange (positive) differ along the blue-yellow axis, which the common
red-green colour-vision deficiencies keep, and in lightness both halves fall steadily from a light
centre (0) to dark ends, so the sign and the size of a value read even in grey. The ramp is
written here as five anchor colours (sRGB 0..255) and interpolated linearly between them.
"""

from __future__ import annotations

# (position in [-1, 1], (r, g, b)): dark blue, light blue, near-white, light orange, dark orange.
ANCHORS: tuple[tuple[float, tuple[int, int, int]], ...] = (
    (-1.0, (33, 86, 157)),
    (-0.5, (122, 166, 211)),
    (0.0, (246, 246, 246)),
    (0.5, (241, 166, 94)),
    (1.0, (166, 79, 3)),
)

# The heatmaps use this many discrete stops (odd, so that one stop is exactly 0).
N_STOPS = 21

# The two sides of a query, in the ramp's hues: most influential orange, least blue.
MOST_COLOUR = "#b35806"
LEAST_COLOUR = "#2f6bb0"


def _hex(rgb: tuple[float, float, float]) -> str:
    return "#" + "".join(f"{round(c):02x}" for c in rgb)


def diverging(x: float) -> str:
    """The colour of ``x`` in ``[-1, 1]`` (clipped) as ``#rrggbb``: blue below 0, orange above."""
    x = min(1.0, max(-1.0, float(x)))
    for (x0, c0), (x1, c1) in zip(ANCHORS, ANCHORS[1:], strict=False):
        if x <= x1:
            w = (x - x0) / (x1 - x0)
            return _hex(tuple(a + w * (b - a) for a, b in zip(c0, c1, strict=True)))
    return _hex(ANCHORS[-1][1])


def diverging_stops(n: int = N_STOPS) -> list[str]:
    """``n`` colours evenly spaced over ``[-1, 1]`` (``n >= 2``); the page maps a value ``v`` of a
    heatmap with bound ``b`` to stop ``round((v / b + 1) / 2 * (n - 1))``."""
    if n < 2:
        raise ValueError(f"need at least 2 colour stops, got {n}")
    return [diverging(-1.0 + 2.0 * i / (n - 1)) for i in range(n)]
