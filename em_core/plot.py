"""A small line chart drawn with PIL, so reports need no plotting library."""
from __future__ import annotations

from PIL import Image, ImageDraw

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def line_chart(series: dict, title: str = "", xlabel: str = "", ylabel: str = "", size=(640, 400),
               ylim: tuple | None = None) -> Image.Image:
    """`series`: name -> list of (x, y). A flat series (one y for all x) is drawn dashed."""
    w, h = size
    left, right, top, bottom = 60, 150, 30, 45
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    pts = [p for s in series.values() for p in s]
    if not pts:
        return img
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = ylim or (min(p[1] for p in pts), max(p[1] for p in pts))
    x1 = x1 if x1 > x0 else x0 + 1
    y1 = y1 if y1 > y0 else y0 + 1e-6

    def at(x, y):
        return (left + (x - x0) / (x1 - x0) * (w - left - right), h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom))

    d.rectangle([left, top, w - right, h - bottom], outline="black")
    for k in range(5):
        y = y0 + (y1 - y0) * k / 4
        _, py = at(x0, y)
        d.line([left - 4, py, left, py], fill="black")
        d.text((5, py - 6), f"{y:.2f}", fill="black")
        x = x0 + (x1 - x0) * k / 4
        px, _ = at(x, y0)
        d.line([px, h - bottom, px, h - bottom + 4], fill="black")
        d.text((px - 10, h - bottom + 6), f"{x:.0f}", fill="black")
    for i, (name, s) in enumerate(series.items()):
        colour = PALETTE[i % len(PALETTE)]
        xy = [at(x, y) for x, y in sorted(s)]
        if len(xy) > 1:
            d.line(xy, fill=colour, width=2)
        for px, py in xy:
            d.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
        d.text((w - right + 10, top + 16 * i), name, fill=colour)
    d.text((left, 8), title, fill="black")
    d.text((w // 2 - 40, h - 16), xlabel, fill="black")
    d.text((5, top - 20), ylabel, fill="black")
    return img
