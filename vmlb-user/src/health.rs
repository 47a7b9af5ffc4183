//! Health checks of backends.
