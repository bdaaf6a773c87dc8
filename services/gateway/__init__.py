"""The wlcad gateway: one gRPC + HTTP/JSON front door routing to the per-capability services."""
