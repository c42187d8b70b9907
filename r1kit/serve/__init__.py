"""Serving: `EngineService` (one engine behind a thread-safe text API), the OpenAI-compatible HTTP server
(`r1kit.serve.openai_api`, with the chat page in `web/`) and the gRPC service (`r1kit.serve.grpc_service`).

The servers are imported from their modules (they need the `serve` extra: fastapi/uvicorn, grpcio);
importing this package only needs r1kit itself.
"""

from r1kit.serve.engine_service import EngineService, QueueFullError, RequestHandle, ServiceClosedError, TextDelta

__all__ = ["EngineService", "RequestHandle", "TextDelta", "QueueFullError", "ServiceClosedError"]
