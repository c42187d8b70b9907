#!/usr/bin/env bash
# Regenerate r1kit/serve/proto/r1kit_pb2{,_grpc}.py(i) from r1kit/serve/proto/r1kit.proto (needs the dev extra
# grpcio-tools). Run from anywhere; commit the outputs. The generated stub refuses a grpcio older than the
# grpcio-tools that generated it: keep the grpcio floor in pyproject.toml at that version.
set -euo pipefail
cd "$(dirname "$0")/.."
# -I . keeps the package path in the generated imports (from r1kit.serve.proto import r1kit_pb2).
python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. r1kit/serve/proto/r1kit.proto
echo "generated: $(ls r1kit/serve/proto/r1kit_pb2*)"
