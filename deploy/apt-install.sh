#!/bin/sh
# Installs Debian packages for `make setup` (the Makefile's mosquitto and datasets targets):
# apt-get as root, through sudo for any other user (a Raspberry Pi's `pi`, which sudo may
# ask for its password). With neither root nor sudo, or on a system without apt-get, it
# prints the one command to run and exits 2, having changed nothing.
set -eu
if [ "$#" -eq 0 ]; then
    echo "usage: sh deploy/apt-install.sh PACKAGE..." >&2
    exit 2
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "make: $* not installed and apt-get not found: install $* with this system's package manager, then run make again" >&2
    exit 2
fi
if [ "$(id -u)" -eq 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"
elif command -v sudo >/dev/null 2>&1; then
    echo "make: installing $* with sudo apt-get" >&2
    sudo apt-get update -qq
    sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"
else
    echo "make: $* not installed, and installing needs root (no sudo here): run as root: apt-get update && apt-get install -y $*  then run make again" >&2
    exit 2
fi
