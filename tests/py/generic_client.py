"""A generic gRPC client (grpcio, not our code): health, then reflection, then a call built
only from what reflection described. Prints one JSON line; exits non-zero on any failure."""
import json
import sys

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

socket = sys.argv[1]
# A Unix socket's path is not a valid HTTP/2 authority; say a plain one.
channel = grpc.insecure_channel(
    f"unix:{socket}", options=[("grpc.default_authority", "localhost")]
)
health = health_pb2_grpc.HealthStub(channel)
overall = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
api = health.Check(
    health_pb2.HealthCheckRequest(service="reclaimd.v1.Reclaimd"), timeout=5
).status

db = ProtoReflectionDescriptorDatabase(channel)
services = sorted(db.get_services())
pool = descriptor_pool.DescriptorPool(db)
svc = pool.FindServiceByName("reclaimd.v1.Reclaimd")
method = svc.FindMethodByName("GetStatus")
request_cls = message_factory.GetMessageClass(method.input_type)
response_cls = message_factory.GetMessageClass(method.output_type)
call = channel.unary_unary(
    f"/{svc.full_name}/{method.name}",
    request_serializer=lambda m: m.SerializeToString(),
    response_deserializer=response_cls.FromString,
)
status = json_format.MessageToDict(call(request_cls(), timeout=5))
print(
    json.dumps(
        {
            "health": health_pb2.HealthCheckResponse.ServingStatus.Name(overall),
            "api_health": health_pb2.HealthCheckResponse.ServingStatus.Name(api),
            "services": services,
            "methods": [m.name for m in svc.methods],
            "status": status,
        }
    )
)
