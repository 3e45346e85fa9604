#!/usr/bin/env bash
# The `sas` command from a clone: sets up the environment if needed, then runs the CLI.
#   ./sas --help        ./sas synth --out /tmp/world        ./sas bench fusion --json
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
"$here/scripts/setup_env.sh"
source "$here/scripts/env.sh"
exec python -m sas_core.cli "$@"
