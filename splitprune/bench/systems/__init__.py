"""The runtime's benchmarks: step cost (step), in-process against gRPC (transport), the torch-free device
package (device), structured fuzzing (fuzzing, fuzz), many clients (soak), server throughput (scale,
scale_report, scale_replicas)."""
