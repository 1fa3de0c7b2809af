//! Prepares RabbitMQ for the benchmark's AMQP row: declares the topic exchange the router
//! publishes to (durable, as the router declares it) and a queue bound to it with `#`, so
//! that `mandatory` publishes are routable. The queue is bounded (`x-max-length`, oldest
//! dropped) and expires once unused (`x-expires`, 15 minutes: publishing alone does not count as
//! use, and a row of five pairs that waits for each run's backlog outlasts two minutes, after
//! which every publish came back `NO_ROUTE`), so nothing is left behind. The queue is named
//! `<name>-queue` (before: `<name>`, with a two-minute expiry; a queue of that name left by an
//! older run would refuse the new arguments).
//!
//! ```sh
//! cargo run --release --example amqp_queue -- amqp://guest:guest@127.0.0.1:5672/%2f webio-bench
//! ```

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties, ExchangeKind};

fn main() {
    let mut args = std::env::args().skip(1);
    let url = args.next().unwrap_or_else(|| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let name = args.next().unwrap_or_else(|| "webio-bench".into());
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let result: Result<(), lapin::Error> = rt.block_on(async {
        let conn = Connection::connect(&url, ConnectionProperties::default()).await?;
        let ch = conn.create_channel().await?;
        let durable = ExchangeDeclareOptions { durable: true, ..ExchangeDeclareOptions::default() };
        ch.exchange_declare(name.as_str().into(), ExchangeKind::Topic, durable, FieldTable::default()).await?;
        let mut args = FieldTable::default();
        args.insert("x-max-length".into(), AMQPValue::LongLongInt(200_000));
        args.insert("x-expires".into(), AMQPValue::LongLongInt(900_000));
        let queue = format!("{name}-queue");
        ch.queue_declare(queue.as_str().into(), QueueDeclareOptions::default(), args).await?;
        ch.queue_bind(
            queue.as_str().into(),
            name.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
        conn.close(200, "bench ready".into()).await?;
        Ok(())
    });
    match result {
        Ok(()) => println!("exchange and queue {name} ready"),
        Err(e) => {
            eprintln!("amqp_queue: {e}");
            std::process::exit(1);
        }
    }
}
