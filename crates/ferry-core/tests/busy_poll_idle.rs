//! A busy-polling connection stops polling once nothing has come for `busy_poll`: an idle
//! connection costs no CPU. A test binary of its own, because it reads the CPU time of the
//! whole process, which tests running beside it would add to.

mod common;

use std::time::Duration;

use common::TestServer;
use ferry_core::{Connection, ConnectionConfig, IoMode, Router};

/// User plus system CPU time of this process.
fn cpu_time() -> Duration {
    // SAFETY: getrusage fills the struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) }, 0);
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

#[test]
fn an_idle_busy_polling_connection_stops_polling() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    common::on_own_thread(runtime, "the idle check did not finish", async {
        for io in [IoMode::Reactor, IoMode::Threads] {
            let config = ConnectionConfig {
                io,
                busy_poll: Duration::from_millis(20),
                ..ConnectionConfig::default()
            };
            let router = Router::new().sync_fn("inc", |n: u64| Ok::<_, String>(n + 1));
            let server = TestServer::start_with(router, config.clone(), None).await;
            let conn = Connection::connect_with(&server.path, Router::new(), config)
                .await
                .unwrap();
            for i in 0..50u64 {
                assert_eq!(conn.call::<_, u64>("inc", &i).await.unwrap(), i + 1);
            }
            // Idle: each end polls for at most 20 ms after what it last read, then waits
            // without using the CPU. Polling that went on would burn most of these 400 ms on
            // each end.
            let before = cpu_time();
            tokio::time::sleep(Duration::from_millis(400)).await;
            let used = cpu_time() - before;
            assert!(
                used < Duration::from_millis(200),
                "{io:?}: {used:?} of CPU while idle for 400 ms"
            );
            conn.close();
        }
    });
}
