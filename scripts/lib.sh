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

# The user the rootless leg of the integration suite builds as (integration/conftest.py),
# with one fixed subordinate range so what the tests expect does not depend on the host.
OCIWORKER_TEST_USER="${OCIWORKER_TEST_USER:-ociw-test}"
OCIWORKER_TEST_SUBID="${OCIWORKER_TEST_SUBID:-200000:65536}"

# has_subid FILE USER START COUNT: the exact entry is there
has_subid() {
	grep -qxF "$2:$3:$4" "$1" 2>/dev/null
}

ensure_test_user() {
	local user="$OCIWORKER_TEST_USER" start="${OCIWORKER_TEST_SUBID%%:*}" count="${OCIWORKER_TEST_SUBID##*:}"
	local kind last=$((start + count - 1)) holder
	# Checked before anything changes: another owner of an overlapping range would share ids
	# with the test user's images.
	for kind in uid gid; do
		holder="$(awk -F: -v s="$start" -v e="$((start + count))" -v u="$user" \
			'$1 != u && $2 < e && $2 + $3 > s { print $1; exit }' "/etc/sub$kind" 2>/dev/null || true)"
		[[ -z "$holder" ]] || die "sub$kind range $start-$last of $user overlaps $holder's in /etc/sub$kind"
	done
	if ! getent passwd "$user" >/dev/null; then
		log "test user: creating $user"
		# SUB_*_COUNT=0: no automatic range from useradd; the fixed one below is what the
		# tests expect (and a second range would only make the first-block mapping ambiguous).
		useradd --create-home --home-dir "/home/$user" --shell /bin/sh \
			-K SUB_UID_COUNT=0 -K SUB_GID_COUNT=0 "$user"
	fi
	for kind in uid gid; do
		if ! has_subid "/etc/sub$kind" "$user" "$start" "$count"; then
			log "test user: adding sub${kind}s $start-$last to $user"
			usermod "--add-sub${kind}s" "$start-$last" "$user"
		fi
	done
	log "test user: $user ready (sub-ids $start-$last)"
}
