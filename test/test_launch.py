"""Launch files and parameter files, checked structurally (and run for real where `launch` exists)."""

import ast
import importlib.util
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_FILES = sorted((ROOT / "launch").glob("*.launch.py"))
CONFIG_FILES = sorted(p for p in (ROOT / "config").glob("*.yaml")
                      if p.name != "models.yaml")  # the models file is no parameter file (test_models.py)
NODE_INPUTS = {"color/image_raw", "depth/image_raw", "color/camera_info", "pose", "points",
               "semantic/image_raw", "instance/image_raw"}


def _entry_points():
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "entry_points":
            scripts = ast.literal_eval(node.value)["console_scripts"]
            return {s.split("=")[0].strip(): s.split("=")[1].strip() for s in scripts}
    raise AssertionError("setup.py has no entry_points")


def _calls(tree, name):
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call)
            and getattr(n.func, "id", getattr(n.func, "attr", None)) == name]


def _kw(call, name):
    return next((k.value for k in call.keywords if k.arg == name), None)


def test_files_exist():
    assert {p.name for p in LAUNCH_FILES} >= {"rgbd.launch.py", "lidar.launch.py", "bag_replay.launch.py"}
    assert {p.name for p in CONFIG_FILES} >= {"rgbd.yaml", "lidar.yaml", "bag_replay.yaml"}


@pytest.mark.parametrize("path", LAUNCH_FILES, ids=lambda p: p.name)
def test_launch_file_structure(path):
    tree = ast.parse(path.read_text())
    assert any(isinstance(n, ast.FunctionDef) and n.name == "generate_launch_description" for n in tree.body)
    entry = _entry_points()
    nodes = _calls(tree, "Node")
    assert nodes, "no launch_ros Node"
    for call in nodes:
        assert ast.literal_eval(_kw(call, "package")) == "sas_ros"
        exe = ast.literal_eval(_kw(call, "executable"))
        assert exe in entry, f"{exe} is not a console_scripts entry point"
        module, func = entry[exe].split(":")
        spec = importlib.util.find_spec(module)
        assert spec is not None and func in (ROOT / (module.replace(".", "/") + ".py")).read_text()
        remaps = _kw(call, "remappings")
        assert isinstance(remaps, ast.List) and remaps.elts
        sources = {ast.literal_eval(t.elts[0]) for t in remaps.elts}
        assert sources <= NODE_INPUTS, sources - NODE_INPUTS
        assert _kw(call, "parameters") is not None
    args = {ast.literal_eval(c.args[0]) for c in _calls(tree, "DeclareLaunchArgument")}
    assert "params_file" in args
    # the default parameter file named in the launch file exists
    names = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
             and n.value.endswith(".yaml")]
    assert names and all((ROOT / "config" / n).exists() for n in names)


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_parameter_files(path):
    data = yaml.safe_load(path.read_text())
    params = data["/**"]["ros__parameters"]
    source = (ROOT / "sas_ros" / "mapping_node.py").read_text()
    tree = ast.parse(source)
    declared = next(ast.literal_eval(n.value) for n in tree.body
                    if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "PARAMETERS")
    assert set(params) <= set(declared), set(params) - set(declared)
    for name, value in params.items():
        default, description = declared[name]
        assert description.strip(), name
        assert type(value) is type(default), f"{name}: {value!r} vs default {default!r}"


def test_every_parameter_declared_once_with_description():
    source = (ROOT / "sas_ros" / "mapping_node.py").read_text()
    assert source.count("declare_parameter(") == 1  # one loop over PARAMETERS
    defaults = yaml.safe_load((ROOT / "config" / "rgbd.yaml").read_text())["/**"]["ros__parameters"]
    tree = ast.parse(source)
    declared = next(ast.literal_eval(n.value) for n in tree.body
                    if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "PARAMETERS")
    assert set(defaults) == set(declared)  # the default file lists every parameter
    assert all(defaults[k] == v[0] for k, v in declared.items())


def _real_package(name: str):
    """The installed ROS package ``name``, never the repository's own ``launch/`` folder (which is
    importable as a namespace package from the clone); a skip with the reason where it is absent."""
    module = pytest.importorskip(name, reason=f"{name} has no PyPI wheel (a full ROS 2 install has it)")
    origin = getattr(module, "__file__", None)
    if origin is None or Path(origin).resolve().is_relative_to(ROOT):
        pytest.skip(f"{name} is not installed (only the repository's {name}/ folder is importable)")
    return module


@pytest.mark.parametrize("path", LAUNCH_FILES, ids=lambda p: p.name)
def test_launch_runs_where_available(path):
    _real_package("launch")
    _real_package("launch_ros")
    spec = importlib.util.spec_from_file_location(path.stem.replace(".", "_"), path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    description = module.generate_launch_description()
    assert description.entities
