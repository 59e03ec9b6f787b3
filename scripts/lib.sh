# shellcheck shell=bash
# Shared helpers for the scripts in this folder; sourced, never executed.
# Every value below can be overridden from the environment so a second checkout (or CI on a
# shared machine) can keep its own state without editing files.

OCIWORKER_REPO="${OCIWORKER_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
# Host-wide dev state (registry storage, base image layout). Deliberately not under the repo:
# the registry outlives a checkout and is shared by every clone on the machine.
OCIWORKER_DEV_STATE="${OCIWORKER_DEV_STATE:-/var/lib/ociworker-dev}"
OCIWORKER_REGISTRY_ADDR="${OCIWORKER_REGISTRY_ADDR:-127.0.0.1:5000}"
OCIWORKER_BASE_IMAGE="${OCIWORKER_BASE_IMAGE:-${OCIWORKER_REGISTRY_ADDR}/busybox:latest}"
OCIWORKER_VENV="${OCIWORKER_VENV:-${OCIWORKER_REPO}/.venv}"

export DEBIAN_FRONTEND=noninteractive

log() { printf '==> %s\n' "$*" >&2; }
warn() { printf 'WARNING: %s\n' "$*" >&2; }
die() {
	printf 'ERROR: %s\n' "$*" >&2
	exit 1
}

require_root() {
	[[ "$(id -u)" == 0 ]] || die "$(basename "$0") must run as root (it installs packages and mounts cgroups)"
}

# http_ok URL: true when URL answers 2xx within 2 seconds.
http_ok() {
	curl -fsS -m 2 -o /dev/null "$1" 2>/dev/null
}

registry_up() {
	http_ok "http://${OCIWORKER_REGISTRY_ADDR}/v2/"
}

# pkg_installed NAME: dpkg -s also succeeds for removed-but-configured packages, so read the
# status word instead.
pkg_installed() {
	[[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" == "install ok installed" ]]
}

# find_python: print the first interpreter >= 3.11 (the project's floor) that can make a venv.
find_python() {
	local cand
	for cand in python3.13 python3.12 python3.11 python3; do
		command -v "$cand" >/dev/null 2>&1 || continue
		if "$cand" -c 'import sys, ensurepip, venv; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
			command -v "$cand"
			return 0
		fi
	done
	return 1
}

venv_python() {
	printf '%s\n' "${OCIWORKER_VENV}/bin/python"
}
