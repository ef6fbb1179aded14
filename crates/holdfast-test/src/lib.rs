//! Loopback test fixtures (placeholder).
