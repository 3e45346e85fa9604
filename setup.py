"""SAS-ROS: `pip install .` for the library and `sas` command; `colcon build` in a ROS 2 workspace."""

from glob import glob

from setuptools import find_packages, setup

PACKAGE = "sas_ros"

setup(
    name=PACKAGE,
    version="0.1.0",
    description="Open-vocabulary 3D segmentation (SAS) with ROS 2 nodes",
    packages=find_packages(include=["sas_core", "sas_core.*", "sas_ros", "sas_ros.*", "sas_app", "sas_app.*"]),
    python_requires=">=3.10",
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        (f"share/{PACKAGE}/launch", glob("launch/*.py")),
        (f"share/{PACKAGE}/config", glob("config/*.yaml")),
    ],
    install_requires=["numpy", "scipy", "torch", "tqdm", "pyyaml"],
    zip_safe=True,
    entry_points={
        "console_scripts": [
            "sas = sas_app.cli:main",
            "sas_mapping_node = sas_ros.mapping_node:main",
            "sas_query_client = sas_ros.query_client:main",
        ],
    },
)
