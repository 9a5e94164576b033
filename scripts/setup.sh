#!/usr/bin/env bash
# Set up edgekit on a fresh Debian machine (bookworm, Python 3.11): the Debian packages the tests and
# the demo need, then a virtual environment in .venv with edgekit and every extra installed.
# Safe to run again: it installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

apt_pkgs=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || apt_pkgs+=(mosquitto)
# a real OpenSSH server and client for the ssh push tests (tests/sshd.py runs its own sshd on a free port)
[ -x /usr/sbin/sshd ] || apt_pkgs+=(openssh-server)
command -v ssh >/dev/null 2>&1 && command -v ssh-keygen >/dev/null 2>&1 || apt_pkgs+=(openssh-client)
"$PY" -c "import ensurepip, venv" >/dev/null 2>&1 || apt_pkgs+=(python3-venv)
# the ARM64 test tier (tests/test_arm64.py, tools/arm64-env): an arm64 Debian root filesystem run under qemu
# user emulation (no binfmt_misc needed); the tier is skipped with the reason when these are missing
command -v qemu-aarch64-static >/dev/null 2>&1 || apt_pkgs+=(qemu-user-static)
command -v debootstrap >/dev/null 2>&1 || [ -x /usr/sbin/debootstrap ] || apt_pkgs+=(debootstrap)
if [ ${#apt_pkgs[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then sudo=""; elif command -v sudo >/dev/null 2>&1; then sudo="sudo"; else
    echo "setup: need root (or sudo) to install the Debian packages: ${apt_pkgs[*]}" >&2; exit 1
  fi
  echo "setup: installing Debian packages: ${apt_pkgs[*]}"
  $sudo apt-get update -q
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${apt_pkgs[@]}"
  # Where systemd runs, Debian enables and starts the packaged mosquitto and ssh services (containers
  # without systemd do not); edgekit's tests start their own broker and sshd on free loopback ports.
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $("$PY" --version)"
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
echo "setup: installing edgekit[all,dev] into .venv (the first time downloads ~600 MB)"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[all,dev]"
.venv/bin/python -m pip check
