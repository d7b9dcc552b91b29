#!/usr/bin/env bash
# Install Debian's `chromium`, the headless browser the report tests drive through Playwright
# (Playwright's own browser download is not used). Idempotent: does nothing when it is there.
set -euo pipefail

if command -v chromium >/dev/null 2>&1; then
    echo "chromium is installed: $(command -v chromium)"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "chromium is not installed; the report tests will be skipped." >&2
    echo "Install it as root: apt-get update && apt-get install -y chromium" >&2
    echo "(or your system's package of Chromium, with a 'chromium' command on PATH)" >&2
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "chromium is not installed and this system has no apt-get; install Chromium with your" >&2
    echo "package manager so that a 'chromium' command is on PATH." >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get install -y --no-install-recommends chromium
echo "chromium is installed: $(command -v chromium)"
