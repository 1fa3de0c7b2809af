//! librdkafka's in-process mock cluster, kept running for `bench/run.sh` (and for trying the
//! Kafka sink on a laptop without a broker). Prints `bootstrap.servers=HOST:PORT,…` once up,
//! then runs until it is killed (SIGTERM/SIGINT).
//!
//! ```sh
//! cargo run --release --example kafka_mock            # 1 broker
//! cargo run --release --example kafka_mock -- 3       # 3 brokers
//! ```

use rdkafka::mocking::MockCluster;
use std::io::Write;

fn main() {
    let brokers: i32 = std::env::args().nth(1).map_or(1, |n| n.parse().expect("broker count"));
    let cluster = MockCluster::new(brokers).expect("mock cluster");
    println!("bootstrap.servers={}", cluster.bootstrap_servers());
    let _ = std::io::stdout().flush();
    // The cluster lives on librdkafka's threads; keep the process (and `cluster`) alive.
    loop {
        std::thread::park();
    }
}
