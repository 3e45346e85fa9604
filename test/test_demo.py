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
    md = (out / "table.md").read_text()
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
