"""The API contract: .proto files under modelsurgery/v1, stubs generated at build time."""
