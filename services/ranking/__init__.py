"""The ranking service: gRPC `Score` and its REST twin, one serving object behind both."""
