#!/usr/bin/env bash
# The Python environment of the tests that drive Kiln from Python: the
# official MCP SDK (`mcp`) for tests/python/mcp_check.py and the Python
# client (clients/python, installed editable with its test extras).
# Idempotent: an existing environment with both is left as it is.
# Prints the environment's python on stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
env=${KILN_PYENV:-target/pyenv}
if [ ! -x "$env/bin/python" ]; then
    python3 -m venv "$env" >&2
fi
if ! "$env/bin/python" -c 'import mcp' 2>/dev/null; then
    "$env/bin/pip" install --quiet --disable-pip-version-check 'mcp>=2.3,<3' >&2
fi
if ! "$env/bin/python" -c 'import kiln_client, pytest, pika' 2>/dev/null; then
    "$env/bin/pip" install --quiet --disable-pip-version-check -e 'clients/python[test,amqp]' >&2
fi
echo "$(cd "$env" && pwd)/bin/python"
