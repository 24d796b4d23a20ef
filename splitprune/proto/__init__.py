"""Generated protobuf messages of the splitprune wire protocol.

Regenerate after editing the .proto files (from the repository root):
    python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. splitprune/proto/*.proto
"""
from splitprune.proto import splitprune_pb2 as pb

__all__ = ["pb"]
