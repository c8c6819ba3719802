//! Fresh databases and records for the tests (the store's `testing` support), and the macro
//! that runs a scenario on both backends.

pub use atlas_store::testing::{TestDb as Db, call, snapshot, sorted};

/// Runs each scenario `async fn name(db: Db)` on both backends, as two tests: `name::sqlite`
/// on a fresh SQLite file and `name::postgres` on a fresh PostgreSQL database.
macro_rules! on_both_backends {
    ($($name:ident),+ $(,)?) => {$(
        mod $name {
            #[tokio::test]
            async fn sqlite() {
                super::$name($crate::helpers::Db::sqlite()).await;
            }

            #[tokio::test]
            async fn postgres() {
                super::$name($crate::helpers::Db::postgres().await).await;
            }
        }
    )+};
}
pub(crate) use on_both_backends;
