# Sourced by ./sas, the Makefile and .ci/run: where the environment lives and the variables
# ROS 2 (from PyPI wheels) and our sas_interfaces build need. Exports only; installs nothing.
SAS_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SAS_VENV="${SAS_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/sas-ros/venv-py311}"
# The interfaces are built once per content of msg/ and shared by every clone.
SAS_MSG_HASH="$(cat "$SAS_ROOT"/msg/CMakeLists.txt "$SAS_ROOT"/msg/package.xml "$SAS_ROOT"/msg/msg/* "$SAS_ROOT"/msg/srv/* 2>/dev/null | sha256sum | cut -c1-12)"
SAS_MSG_PREFIX="$SAS_VENV/sas_interfaces/$SAS_MSG_HASH/install"
SAS_SITE="$SAS_VENV/lib/python3.11/site-packages"
export SAS_ROOT SAS_VENV SAS_MSG_PREFIX
export PATH="$SAS_VENV/bin:$PATH"
export PYTHONPATH="$SAS_ROOT:$SAS_MSG_PREFIX/lib/python3.11/site-packages:$SAS_MSG_PREFIX/local/lib/python3.11/dist-packages${PYTHONPATH:+:$PYTHONPATH}"
export LD_LIBRARY_PATH="$SAS_MSG_PREFIX/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export AMENT_PREFIX_PATH="$SAS_MSG_PREFIX:$SAS_VENV${AMENT_PREFIX_PATH:+:$AMENT_PREFIX_PATH}"
export RMW_IMPLEMENTATION="${RMW_IMPLEMENTATION:-rmw_fastrtps_cpp}"
# Discovery stays on this machine unless the user says otherwise.
export ROS_AUTOMATIC_DISCOVERY_RANGE="${ROS_AUTOMATIC_DISCOVERY_RANGE:-LOCALHOST}"
# tf2_msgs (TFMessage only, scripts/tf2_msgs/) is built by setup_env.sh only where no tf2_msgs is
# importable; its paths go AFTER everything else, so a sourced ROS install's own tf2_msgs wins.
SAS_TF2_HASH="$(cat "$SAS_ROOT"/scripts/tf2_msgs/CMakeLists.txt "$SAS_ROOT"/scripts/tf2_msgs/package.xml "$SAS_ROOT"/scripts/tf2_msgs/msg/* 2>/dev/null | sha256sum | cut -c1-12)"
SAS_TF2_PREFIX="$SAS_VENV/tf2_msgs/$SAS_TF2_HASH/install"
export SAS_TF2_PREFIX
if [ -f "$SAS_TF2_PREFIX/.built" ]; then
  export PYTHONPATH="$PYTHONPATH:$SAS_TF2_PREFIX/lib/python3.11/site-packages:$SAS_TF2_PREFIX/local/lib/python3.11/dist-packages"
  export LD_LIBRARY_PATH="$LD_LIBRARY_PATH:$SAS_TF2_PREFIX/lib"
  export AMENT_PREFIX_PATH="$AMENT_PREFIX_PATH:$SAS_TF2_PREFIX"
fi
