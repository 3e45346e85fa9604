"""The end-to-end demo: a tiny run (--quick) completes and writes every report file."""

import json

import pytest

torch = pytest.importorskip("torch")


@pytest.mark.slow
def test_quick_demo_writes_the_report(tmp_path):
    from sas_app.demo import ROWS, demo_config, run_demo

    out = tmp_path / "demo"
    summary = run_demo(demo_config("quick", out=str(out), ros=False, progress=False))
    for name in ("table.md", "table.json", "ablation.png", "topdown.png", "query_1.png", "query_2.png",
                 "model.pt", "README.md", "summary.json", "capability.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    table = json.loads((out / "table.json").read_text())
    assert table["synthetic"] is True and "SYNTHETIC" in table["note"]
    # every row in both settings: the distillation rooms (own map, transductive) and held-out rooms
    keys = [k for k, _, _ in ROWS]
    assert [(r["setting"], r["key"]) for r in table["rows"]] == [(s, k) for s in ("own_map", "held_out") for k in keys]
    assert set(table["settings"]) == {"own_map", "held_out"} and set(table["per_class"]) == {"own_map", "held_out"}
    for r in table["rows"]:
        assert 0.0 <= r["miou"] <= 100.0 and 0.0 <= r["macc"] <= 100.0
    # every row's figures are the means of its per-class results (OpenScene averaging: the sum of
    # present classes' IoU over all K classes; "present": over the present ones)
    from sas_core.text import SCANNET_20

    n_classes = len(SCANNET_20)  # the demo's vocabulary
    for r in table["rows"]:
        per_class = table["per_class"][r["setting"]][r["key"]]
        assert per_class, r
        ious = [c["iou"] for c in per_class.values()]
        assert r["miou"] == pytest.approx(100 * sum(ious) / n_classes, abs=1e-6), r
        assert r["miou_present"] == pytest.approx(100 * sum(ious) / len(ious), abs=1e-6), r
        assert r["macc"] == pytest.approx(100 * sum(c["acc"] for c in per_class.values()) / n_classes, abs=1e-6)
        # all settings evaluate the same points for every row
        assert sum(c["points"] for c in per_class.values()) == sum(
            c["points"] for c in table["per_class"][r["setting"]]["teacher_a"].values())
    md = (out / "table.md").read_text()
    # the Markdown table prints exactly the JSON rows, in order
    md_rows = [line.split("|")[1:-1] for line in md.splitlines() if line.startswith("| 2D") or line.startswith("| 3D")]
    assert len(md_rows) == len(table["rows"])
    for cells, r in zip(md_rows, table["rows"]):
        group, method, miou, macc, present = (c.strip() for c in cells)
        assert (group, method) == (r["group"], r["method"])
        assert (miou, macc, present) == (f"{r['miou']:.1f}", f"{r['macc']:.1f}", f"{r['miou_present']:.1f}")
    assert "SYNTHETIC" in md and "SP Dis. + TESD" in md and "Capability fusion" in md
    assert "own map, transductive" in md and "held-out rooms" in md and md.count("| Capability fusion") == 2
    assert (out / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the instance rows (ScanNet AP) and the top-down instance picture
    assert (out / "instances.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "3D instances on" in md and "Mask clustering over superpoints" in md and "baseline" in md
    assert [r["key"] for r in table["instances"]] == ["mask_clustering", "label_components"]
    # the distilled checkpoint is self-describing: architecture, text space, vocabulary
    from sas_core.nn import load_checkpoint

    model, config, extra = load_checkpoint(out / "model.pt")
    assert config["text_encoder"]["kind"] == "synthetic" and config["synthetic"] is True
    assert config["out_channels"] == config["text_encoder"]["dim"] and len(config["vocabulary"]) == 20
    assert extra["epoch"] == summary["config"]["epochs"]


def test_demo_cli_parses_config_fields():
    from sas_app.cli import build_parser

    args = build_parser().parse_args(["demo", "--quick", "--epochs", "7", "--queries", "a chair", "a bed"])
    assert args.preset == "quick" and args.epochs == 7 and args.queries == ["a chair", "a bed"]
    args = build_parser().parse_args(["distill", "--data", "d", "--features", "f", "--mode", "sp", "--epochs", "3"])
    assert args.mode == "sp" and args.epochs == 3 and args.lr == pytest.approx(1e-4)
