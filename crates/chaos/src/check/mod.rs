//! Checkers that judge a chaos history (pure: no I/O).
