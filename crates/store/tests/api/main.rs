//! Integration tests of the store on real databases: a fresh SQLite file or a fresh
//! PostgreSQL database (127.0.0.1:5432, or `ATLAS_TEST_POSTGRES_URL`) per test.

mod helpers;
mod sanitize;
mod tool_calls;
