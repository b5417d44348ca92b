#!/usr/bin/env bash
# What building and testing Iris needs beyond the Rust toolchain: a C compiler (the JPEG
# decoder is built from C), protoc (the gRPC code is generated at build time), etcd
# (the cluster tests start a real one) and iproute2's `ip` (the partition tests put
# each member in a network namespace). Installed with apt when missing.
set -euo pipefail
missing=()
command -v cc >/dev/null 2>&1 || missing+=(build-essential)
command -v protoc >/dev/null 2>&1 || [ -n "${PROTOC:-}" ] || missing+=(protobuf-compiler)
command -v etcd >/dev/null 2>&1 || [ -n "${IRIS_ETCD:-}" ] || missing+=(etcd-server)
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq && apt-get install -y -qq "${missing[@]}"
fi
