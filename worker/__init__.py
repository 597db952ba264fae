"""What both workers share: gRPC server start-up and health, the engine thread behind
asyncio, proto conversion, Prometheus metrics and the one StatusError."""
