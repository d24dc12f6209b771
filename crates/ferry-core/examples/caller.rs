//! A Rust peer that connects to a listening peer (such as a Node `RpcServer`) and calls it.
//!
//! ```text
//! cargo run --release -p ferry-core --example caller -- <socket-path> call <function> '<json params>'
//! cargo run --release -p ferry-core --example caller -- <socket-path> route <handler_id> '<json request>'
//! ```
//!
//! Prints the result as JSON on stdout and exits 0, or prints `error <code> <message>` on
//! stderr and exits 1.

use std::time::Duration;

use ferry_core::{CallOptions, Connection};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [path, kind, name, rest @ ..] = &args[..] else {
        eprintln!("usage: caller <socket-path> call|route <name> [json]");
        std::process::exit(2);
    };
    let input: serde_json::Value = match rest.first() {
        Some(json) => serde_json::from_str(json).unwrap_or_else(|e| {
            eprintln!("caller: params are not JSON: {e}");
            std::process::exit(2)
        }),
        None => serde_json::Value::Null,
    };
    let result = async {
        let conn = Connection::connect(path).await?;
        let out = match kind.as_str() {
            "call" => {
                let options = CallOptions::timeout(Duration::from_secs(10));
                conn.call_with::<_, serde_json::Value>(name, &input, options)
                    .await?
            }
            "route" => serde_json::to_value(conn.invoke_handler(name, &input).await?)
                .map_err(|e| ferry_core::Error::Decode(e.to_string()))?,
            other => {
                eprintln!("caller: unknown kind `{other}`: use call or route");
                std::process::exit(2)
            }
        };
        conn.close();
        Ok::<_, ferry_core::Error>(out)
    }
    .await;
    match result {
        Ok(v) => println!("{v}"),
        Err(e) => {
            eprintln!("error {} {}", e.code(), e);
            std::process::exit(1);
        }
    }
}
