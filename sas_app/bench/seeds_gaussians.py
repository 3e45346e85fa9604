"""Gaussian segmentation rows for `sas bench seeds` (#15 item 3 beside items 1-2, one run).

For each seed, the seed's own world (the same rooms, teachers and capability table as the other
rows) is turned into splat scenes and scored as :func:`sas_app.bench.gaussians.gaussian_rows` does:
2D mIoU of the labelled Gaussians rendered into novel views, labelled from the network distilled on
the Gaussian centres (SAS) and from the single best teacher. ``sas bench seeds --no-gaussians``
leaves these rows out; ``sas bench gaussians`` runs them alone.
"""

from __future__ import annotations

SETTING = "gaussians_2d"


def seed_rows(ctx) -> list:
    if not ctx.extra.get("gaussians", True):
        return []
    from sas_app.bench.gaussians import ROWS, gaussian_rows

    out = gaussian_rows(ctx.world, ctx.work_dir / "gaussians", teacher_distill=True)
    rows = []
    for key, label in ROWS:
        if key in out["rows"]:
            rows.append({"setting": SETTING, "key": f"gaussians_{key}", "method": f"Gaussians: {label}",
                         **out["rows"][key]})
    best = out["best_teacher"]
    if best in out["rows"]:
        rows.append({"setting": SETTING, "key": "gaussians_best_teacher",
                     "method": f"Gaussians: the best single teacher's fused features ({best})", **out["rows"][best]})
    return rows
