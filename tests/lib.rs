//! Cross-crate integration tests live in `all/`.
