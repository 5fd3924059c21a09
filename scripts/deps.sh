#!/usr/bin/env bash
# Install the Debian 12 packages spoke needs to build, test and demo, if any is missing.
# Run as root (or with sudo available). Quiet when everything is there.
set -euo pipefail

pkgs=(
  build-essential cmake pkg-config
  libev-dev liblmdb-dev libprotobuf-c-dev protobuf-c-compiler
  libcurl4-openssl-dev libnghttp2-dev libyaml-dev libssl-dev
  libcmocka-dev libsqlite3-dev grpc-proto libmicrohttpd-dev prometheus
  liblua5.4-dev
  python3 python3-grpcio python3-protobuf protobuf-compiler nghttp2-client
  postgresql postgresql-client pgbouncer haproxy procps
  clang libfuzzer-14-dev libclang-rt-14-dev systemd
)

missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

echo "spoke: installing missing packages: ${missing[*]}"
sudo=""
[ "$(id -u)" -ne 0 ] && sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
