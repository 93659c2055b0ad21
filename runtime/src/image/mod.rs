//! Images: see the crate documentation.
