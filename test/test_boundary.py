"""sas_core must never import ROS: every module imports with rclpy and *_msgs made unimportable."""

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_sas_core_imports_without_ros():
    code = textwrap.dedent(
        """
        import importlib, pkgutil, sys

        class BlockRos:
            def find_spec(self, name, path=None, target=None):
                top = name.split(".")[0]
                if top in ("rclpy", "rosidl_runtime_py", "sas_interfaces", "tf2_ros",
                           "message_filters", "sensor_msgs_py") or top.endswith("_msgs") \\
                        or top.endswith("_srvs"):
                    raise ImportError(f"ROS module {name} is blocked in this test")
                return None

        sys.meta_path.insert(0, BlockRos())
        import sas_core
        names = [m.name for m in pkgutil.walk_packages(sas_core.__path__, "sas_core.")]
        assert len(names) > 5, names
        for name in names:
            importlib.import_module(name)
        leaked = [m for m in sys.modules if m.split(".")[0] in ("rclpy",) or m.endswith("_msgs")]
        assert not leaked, leaked
        print("imported", len(names))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("imported")


def test_import_sas_core_is_light():
    """`import sas_core` (and the CLI parser) must not pull in torch or open3d."""
    code = "import sys, sas_core, sas_app.cli; sas_app.cli.build_parser(); " \
           "print(sorted(m for m in ('torch', 'open3d', 'open_clip', 'diffusers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# ---- static checks: every import statement in the source, inside functions too
ROS_TOPS = ("rclpy", "rosidl_runtime_py", "rcl_interfaces", "builtin_interfaces", "sas_interfaces", "tf2_ros",
            "message_filters", "sensor_msgs_py", "rosbag2_py", "cv_bridge", "launch", "launch_ros")


def _imported_modules(path: Path):
    """(line, dotted name) of every module an ``import``/``from ... import`` in ``path`` names."""
    import ast

    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) \
                == "import_module" and node.args and isinstance(node.args[0], ast.Constant):
            yield node.lineno, str(node.args[0].value)


def _violations(package: str, forbidden) -> list:
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for line, name in _imported_modules(path):
            if forbidden(name.split(".")[0]):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    return bad


def _is_ros(top: str) -> bool:
    return top in ROS_TOPS or top.endswith("_msgs") or top.endswith("_srvs")


def test_sas_core_source_names_no_ros_and_no_upper_layer():
    """No module under sas_core/ imports ROS, sas_ros or the application layer, anywhere in its
    source (also inside functions, where the dynamic test above cannot see)."""
    assert _violations("sas_core", lambda top: _is_ros(top) or top in ("sas_ros", "sas_app")) == []


def test_sas_ros_does_not_import_the_application_layer():
    assert _violations("sas_ros", lambda top: top == "sas_app") == []


def test_the_static_scan_sees_imports_inside_functions(tmp_path):
    """The scanner itself: a lazy import inside a function is found (the case the issue names)."""
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from sas_ros.query_client import run_cli\n    import rclpy\n")
    assert [n for _, n in _imported_modules(probe)] == ["sas_ros.query_client", "rclpy"]
