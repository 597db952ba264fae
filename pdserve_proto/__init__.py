"""Generated gRPC stubs for the pdserve wire contract."""
