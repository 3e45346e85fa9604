#!/usr/bin/env bash
# The `sas` command from a clone: sets up the environment if needed, then runs the CLI.
#   ./sas --help        ./sas synth --out /tmp/world        ./sas bench fusion --json
#   ./sas node --ros-args --params-file config/rgbd.yaml -p checkpoint:=model.pt   (the ROS 2 node)
#   ./sas shell         (a shell with the environment and the ROS variables set)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
"$here/scripts/setup_env.sh"
source "$here/scripts/env.sh"
case "${1:-}" in
  node) shift; exec python -m sas_ros.mapping_node "$@" ;;
  shell) shift; exec bash "$@" ;;
  -h|--help|"")
    rc=0; python -m sas_app.cli "$@" || rc=$?
    printf '\nfrom a clone also:\n  ./sas node [--ros-args ...]   the ROS 2 mapping node (sas_mapping_node)\n  ./sas shell [ARGS]           a shell with the environment and the ROS variables set\n'
    exit "$rc" ;;
  *) exec python -m sas_app.cli "$@" ;;
esac
