//! Black-box integration tests of the whole system live in `tests/tests/`.
