//! Iris services.
