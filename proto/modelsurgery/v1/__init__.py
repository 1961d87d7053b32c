"""Generated gRPC stubs for the modelsurgery.v1 API (built from the .proto files beside this)."""
