//! FastCGI record codec (placeholder; see issue 6).
