#!/usr/bin/env bash
# Regenerate the Python gRPC code in pomona/proto/ from protos/*.proto.
# Usage: deploy/gen_protos.sh [OUT_DIR]   (default: the repository root)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$root}
mkdir -p "$out/pomona/proto"
python -m grpc_tools.protoc -I"pomona/proto=$root/protos" \
  --python_out="$out" --grpc_python_out="$out" --pyi_out="$out" \
  pomona/proto/worker.proto pomona/proto/coordinator.proto
