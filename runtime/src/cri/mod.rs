//! CRI gRPC services.

pub mod image_service;

pub use image_service::CriImageService;
