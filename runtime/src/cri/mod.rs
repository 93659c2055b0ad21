//! CRI gRPC services.
