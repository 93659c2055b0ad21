//! podvisor runtime.
