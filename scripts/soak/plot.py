"""A small SVG plot of the daemon's samples (descriptors, threads, RSS over
time), written by hand so that the soak needs no plotting library."""

from xml.sax.saxutils import escape

W, PANEL_H, LEFT, RIGHT, TOP, GAP = 900, 150, 70, 20, 40, 40


def write_svg(path, samples, marks, title):
    """`samples`: rows (t_s, fds, threads, rss_kib, jobs_done); `marks`:
    (t_s, label) drawn as vertical lines."""
    series = [
        ("open descriptors", [(r[0], r[1]) for r in samples], "#1f77b4"),
        ("threads", [(r[0], r[2]) for r in samples], "#2ca02c"),
        ("RSS (MiB)", [(r[0], r[3] / 1024) for r in samples], "#d62728"),
        ("jobs done", [(r[0], r[4]) for r in samples], "#7f7f7f"),
    ]
    h = TOP + len(series) * (PANEL_H + GAP) + 10
    t_max = max([r[0] for r in samples] + [1])
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{h}" '
           f'font-family="sans-serif" font-size="11">',
           f'<rect width="{W}" height="{h}" fill="white"/>',
           f'<text x="{LEFT}" y="20" font-size="13">{escape(title)}</text>']
    x = lambda t: LEFT + (W - LEFT - RIGHT) * t / t_max  # noqa: E731
    for k, (name, pts, color) in enumerate(series):
        y0 = TOP + k * (PANEL_H + GAP)
        vals = [v for _, v in pts] or [0]
        lo, hi = 0, max(vals) * 1.1 or 1
        y = lambda v: y0 + PANEL_H - PANEL_H * (v - lo) / (hi - lo)  # noqa: E731,B023
        out.append(f'<rect x="{LEFT}" y="{y0}" width="{W - LEFT - RIGHT}" height="{PANEL_H}" '
                   'fill="none" stroke="#ccc"/>')
        out.append(f'<text x="{LEFT + 4}" y="{y0 - 4}">{escape(name)}: min {min(vals):.0f},'
                   f' max {max(vals):.0f}, last {vals[-1]:.0f}</text>')
        for frac in (0, 0.5, 1):
            v = lo + (hi - lo) * frac
            out.append(f'<text x="{LEFT - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{v:.0f}</text>')
        for j, (t, label) in enumerate(marks):
            out.append(f'<line x1="{x(t):.1f}" y1="{y0}" x2="{x(t):.1f}" y2="{y0 + PANEL_H}" '
                       'stroke="#999" stroke-dasharray="3,3"/>')
            if k == 0:
                out.append(f'<text x="{x(t) + 3:.1f}" y="{y0 + 12 + 12 * (j % 4)}" fill="#555">'
                           f'{escape(label)}</text>')
        if pts:
            d = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in pts)
            out.append(f'<polyline points="{d}" fill="none" stroke="{color}" stroke-width="1.2"/>')
        if k == len(series) - 1:
            for frac in (0, 0.5, 1):
                t = t_max * frac
                out.append(f'<text x="{x(t):.1f}" y="{y0 + PANEL_H + 14}" '
                           f'text-anchor="middle">{t:.0f} s</text>')
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")
