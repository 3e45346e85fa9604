#!/usr/bin/env bash
# Create or refresh the SAS-ROS environment; quick (a few seconds) when everything is in place.
#   1. the Debian library Open3D needs (libusb-1.0-0), when missing;
#   2. a Python 3.11 virtual environment outside the clone with requirements.txt (pinned),
#      reinstalled only when requirements.txt changes;
#   3. the sas_interfaces package (msg/) built with cmake from the rosidl wheels, once per
#      content of msg/;
#   4. Debian's chromium (the browser of `sas view --screenshot` and the browser test), when missing and
#      apt is usable; otherwise a note, and the browser test skips;
#   5. a tf2_msgs package (TFMessage only, scripts/tf2_msgs/) the same way, once per content,
#      and ONLY when `import tf2_msgs` fails (a full ROS install keeps its own).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
say() { printf '[setup] %s\n' "$*" >&2; }

# The Debian library Open3D links against. Checked without a pipe: `ldconfig -p | grep -q` under
# pipefail fails when grep exits early (SIGPIPE to ldconfig), which looked like a missing library.
libs="$(ldconfig -p 2>/dev/null || true)"
case "$libs" in
  *libusb-1.0.so.0*) ;;
  *)
    if [ "$(id -u)" -ne 0 ]; then
      say "Open3D needs the Debian package libusb-1.0-0, which is not installed; installing it needs root:"
      say "  sudo apt-get install libusb-1.0-0     (then run this command again)"
      exit 1
    fi
    say "installing libusb-1.0-0 (needed by open3d)"
    apt-get update -qq && apt-get install -y -qq libusb-1.0-0 >/dev/null ;;
esac

# Debian's chromium: Playwright drives it for `sas view --screenshot` and the browser test (Playwright's
# own browser downloads are blocked on these machines). Optional: without it only those two are missing.
if [ -z "${SAS_CHROMIUM:-}" ] && ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing chromium (for sas view --screenshot and the browser test)"
    { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } \
      || say "chromium could not be installed: sas view --screenshot is unavailable and the browser test skips"
  else
    say "chromium is not installed (sudo apt-get install chromium, or set SAS_CHROMIUM to a Chromium):"
    say "  sas view --screenshot is unavailable and the browser test skips"
  fi
fi

PY="${SAS_PYTHON:-$(command -v python3.11 || true)}"
[ -n "$PY" ] || { say "python3.11 not found; set SAS_PYTHON to a Python 3.11 interpreter"; exit 1; }
REQ_HASH="$(sha256sum "$SAS_ROOT/requirements.txt" | cut -c1-16)"
STAMP="$SAS_VENV/.sas-requirements"
if [ ! -x "$SAS_VENV/bin/python" ]; then
  say "creating $SAS_VENV"
  "$PY" -m venv "$SAS_VENV"
fi
if [ "$(cat "$STAMP" 2>/dev/null)" != "$REQ_HASH" ]; then
  say "installing pinned requirements into $SAS_VENV (on a fresh machine about 10 minutes and 7.5 GB; an update takes seconds)"
  start=$(date +%s)
  "$SAS_VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$SAS_ROOT/requirements.txt" 2>&1 \
    | grep -v "is ignored: it is neither a file nor a directory" || true
  "$SAS_VENV/bin/python" -c "import torch, torchvision, open3d, rclpy, rosbags, viser, playwright" \
    || { say "environment check failed"; exit 1; }
  echo "$REQ_HASH" > "$STAMP"
  say "requirements installed in $(( $(date +%s) - start )) s"
fi

# build_interfaces NAME SOURCE PREFIX: one rosidl interface package with cmake (the rosidl wheels)
build_interfaces() {
  local name="$1" src="$2" prefix="$3" build
  say "building $name ($src) into $prefix"
  build="$(mktemp -d)"
  cmake -S "$src" -B "$build" -DCMAKE_INSTALL_PREFIX="$prefix" \
    -DPython3_EXECUTABLE="$SAS_VENV/bin/python" -DBUILD_TESTING=OFF >"$build/cmake.log" 2>&1 \
    || { cat "$build/cmake.log" >&2; rm -rf "$build"; exit 1; }
  cmake --build "$build" -j 2 >"$build/build.log" 2>&1 || { tail -50 "$build/build.log" >&2; rm -rf "$build"; exit 1; }
  cmake --install "$build" >/dev/null
  rm -rf "$build"
  touch "$prefix/.built"
}
export CMAKE_PREFIX_PATH="$SAS_VENV:$SAS_SITE${CMAKE_PREFIX_PATH:+:$CMAKE_PREFIX_PATH}"

if [ ! -f "$SAS_MSG_PREFIX/.built" ]; then
  build_interfaces sas_interfaces "$SAS_ROOT/msg" "$SAS_MSG_PREFIX"
fi

# tf2_msgs: env.sh puts our build on the paths only once built (after any sourced ROS install),
# so this import finds a real tf2_msgs, or ours of this content, or nothing (then: build it).
if [ ! -f "$SAS_TF2_PREFIX/.built" ] && ! "$SAS_VENV/bin/python" -c "import tf2_msgs.msg" >/dev/null 2>&1; then
  build_interfaces tf2_msgs "$SAS_ROOT/scripts/tf2_msgs" "$SAS_TF2_PREFIX"
fi
