"""A real OTLP receiver for traces and metrics (grpcio + opentelemetry-proto, not our code):
`grpc PORT` or `http PORT`. Prints "ready" once listening, then one JSON object per received
span ({"name": ...}) or metric ({"metric": ...})."""
import json
import sys
from concurrent import futures
from http.server import BaseHTTPRequestHandler, HTTPServer

from opentelemetry.proto.collector.metrics.v1 import (
    metrics_service_pb2,
    metrics_service_pb2_grpc,
)
from opentelemetry.proto.collector.trace.v1 import (
    trace_service_pb2,
    trace_service_pb2_grpc,
)


def value(v):
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


def emit(request):
    for rs in request.resource_spans:
        resource = {a.key: value(a.value) for a in rs.resource.attributes}
        for ss in rs.scope_spans:
            for s in ss.spans:
                print(
                    json.dumps(
                        {
                            "name": s.name,
                            "trace_id": s.trace_id.hex(),
                            "span_id": s.span_id.hex(),
                            "parent_span_id": s.parent_span_id.hex(),
                            "start_ns": s.start_time_unix_nano,
                            "end_ns": s.end_time_unix_nano,
                            "attributes": {a.key: value(a.value) for a in s.attributes},
                            "events": [e.name for e in s.events],
                            "status": s.status.code,
                            "resource": resource,
                        }
                    ),
                    flush=True,
                )


def emit_metrics(request):
    for rm in request.resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                kind = m.WhichOneof("data")
                points = getattr(m, kind).data_points if kind else []
                print(
                    json.dumps(
                        {
                            "metric": m.name,
                            "kind": kind,
                            "points": [
                                {
                                    "attributes": {a.key: value(a.value) for a in p.attributes},
                                    "value": getattr(p, "as_int", 0) or getattr(p, "as_double", 0)
                                    if kind in ("sum", "gauge")
                                    else p.count,
                                }
                                for p in points
                            ],
                        }
                    ),
                    flush=True,
                )


class Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
    def Export(self, request, context):
        emit_metrics(request)
        return metrics_service_pb2.ExportMetricsServiceResponse()


class Traces(trace_service_pb2_grpc.TraceServiceServicer):
    def Export(self, request, context):
        emit(request)
        return trace_service_pb2.ExportTraceServiceResponse()


class Http(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path == "/v1/traces":
            request = trace_service_pb2.ExportTraceServiceRequest()
            request.ParseFromString(body)
            emit(request)
            out = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
        elif self.path == "/v1/metrics":
            request = metrics_service_pb2.ExportMetricsServiceRequest()
            request.ParseFromString(body)
            emit_metrics(request)
            out = metrics_service_pb2.ExportMetricsServiceResponse().SerializeToString()
        else:
            self.send_response(404)
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass


protocol, port = sys.argv[1], int(sys.argv[2])
if protocol == "grpc":
    import grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Traces(), server)
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(Metrics(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print("ready", flush=True)
    server.wait_for_termination()
else:
    httpd = HTTPServer(("127.0.0.1", port), Http)
    print("ready", flush=True)
    httpd.serve_forever()
