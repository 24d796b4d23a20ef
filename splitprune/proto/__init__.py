"""Generated protobuf messages of the splitprune wire protocol.

Regenerate after editing the .proto files (from the repository root):
    python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. splitprune/proto/splitprune.proto
    python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. splitprune/proto/service.proto
(only service.proto defines a service: gRPC stubs for splitprune.proto would be an empty module)
"""
from splitprune.proto import splitprune_pb2 as pb

__all__ = ["pb"]
