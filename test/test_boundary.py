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
    code = "import sys, sas_core, sas_core.cli; sas_core.cli.build_parser(); " \
           "print(sorted(m for m in ('torch', 'open3d', 'open_clip', 'diffusers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
