//! Results to the Globus Compute SDK's `Executor`, which takes them only from a queue on an AMQP
//! 0-9-1 broker (RabbitMQ): the queue of its task group, declared before the submit that asks
//! for it is answered, and a message on it for each of the group's tasks as it finishes.
//!
//! Delivery survives a restart: a task that owes a message has a `q/` entry in the store from
//! before it is submitted until its message is published, and the entries are swept at start,
//! after a missed finish (the dispatcher's broadcast lagged) and while the broker is away.

use std::sync::Arc;
use std::time::Duration;

use amqprs::channel::{BasicPublishArguments, Channel, QueueDeclareArguments};
use amqprs::connection::{Connection, OpenConnectionArguments};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use super::{Compat, keys, wire};

/// The broker the node publishes results to.
pub(crate) struct Broker {
    url: String,
    open: Mutex<Option<(Connection, Channel)>>,
}

impl Broker {
    /// A broker at `url` (`amqp://user:password@host:port/vhost`); nothing is dialed yet.
    pub(crate) fn new(url: &str) -> Result<Broker, String> {
        OpenConnectionArguments::try_from(url)
            .map_err(|e| format!("compat.amqp_url `{url}` is not an AMQP URL: {e}"))?;
        Ok(Broker {
            url: url.to_owned(),
            open: Mutex::new(None),
        })
    }

    /// A channel on an open connection, dialing again if the last one closed.
    async fn channel(&self) -> Result<Channel, String> {
        let mut open = self.open.lock().await;
        if let Some((conn, ch)) = open.as_ref() {
            if conn.is_open() && ch.is_open() {
                return Ok(ch.clone());
            }
        }
        if let Some((conn, _)) = open.take() {
            let _ = conn.close().await;
        }
        let args = OpenConnectionArguments::try_from(self.url.as_str())
            .map_err(|e| format!("compat.amqp_url is not an AMQP URL: {e}"))?;
        let conn = tokio::time::timeout(Duration::from_secs(10), Connection::open(&args))
            .await
            .map_err(|_| "the broker did not answer within 10 s".to_owned())?
            .map_err(|e| format!("cannot connect to the broker: {e}"))?;
        let ch = conn
            .open_channel(None)
            .await
            .map_err(|e| format!("cannot open a channel on the broker: {e}"))?;
        *open = Some((conn, ch.clone()));
        Ok(ch)
    }

    /// Declares a task group's queue (durable, shared, kept when its consumers leave), so that
    /// the SDK, which only consumes, finds it.
    pub(crate) async fn declare(&self, queue: &str) -> Result<(), String> {
        let ch = self.channel().await?;
        ch.queue_declare(QueueDeclareArguments::durable_client_named(queue))
            .await
            .map(drop)
            .map_err(|e| format!("the broker refused to declare queue {queue}: {e}"))
    }

    /// Publishes one message to `queue` (through the default exchange).
    async fn publish(&self, queue: &str, body: Vec<u8>, timestamp_s: u64) -> Result<(), String> {
        let ch = self.channel().await?;
        let mut props = amqprs::BasicProperties::default();
        props.with_timestamp(timestamp_s).with_delivery_mode(2);
        ch.basic_publish(props, body, BasicPublishArguments::new("", queue))
            .await
            .map_err(|e| format!("cannot publish to {queue}: {e}"))
    }

    /// Closes the connection.
    pub(crate) async fn close(&self) {
        if let Some((conn, _)) = self.open.lock().await.take() {
            let _ = conn.close().await;
        }
    }
}

/// Publishes the results of the tasks that owe a message, as they finish, until `cancel`.
pub(crate) async fn publish_results(c: Arc<Compat>, cancel: CancellationToken) {
    let Some(broker) = c.broker.as_ref() else {
        return;
    };
    let mut finished = c.api.tasks.dispatcher.finished_tasks();
    let mut retry = tokio::time::interval(Duration::from_secs(2));
    // Whatever was owed before this start, or while the broker was away.
    let mut sweep = true;
    loop {
        if sweep {
            sweep = !c.sweep(broker).await;
        }
        tokio::select! {
            () = cancel.cancelled() => break,
            r = finished.recv() => match r {
                Ok(t) => {
                    if let Err(e) = c.publish_one(broker, &t).await {
                        tracing::warn!(task = %t.id, error = %e, "a Globus Compute result is not \
                            published yet; retrying");
                        sweep = true;
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => sweep = true,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            },
            _ = retry.tick(), if sweep => {}
        }
    }
    broker.close().await;
}

impl Compat {
    /// Publishes `t`'s result if it owes one; Ok if it owed none, or it is published.
    async fn publish_one(
        &self,
        broker: &Broker,
        t: &compute::submit::Submitted,
    ) -> Result<(), String> {
        let key = keys::queued(t.id.as_str());
        // Most finished tasks owe nothing: the bloom filters say so without a blocking read.
        if !self.api.store.may_hold(keys::CF, &key) {
            return Ok(());
        }
        let store = self.api.store.clone();
        let k = key.clone();
        let queue = tokio::task::spawn_blocking(move || store.get(keys::CF, &k))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        let Some(queue) = queue else {
            return Ok(());
        };
        let queue = String::from_utf8_lossy(&queue).into_owned();
        let value = self.value_of(t).await?;
        let Some(ending) = wire::ending(t, value.as_ref()) else {
            return Ok(());
        };
        let body = wire::result_message(&wire::uuid(t.id.as_str()), &ending);
        broker
            .publish(&queue, body, t.finished_us / 1_000_000)
            .await?;
        let store = self.api.store.clone();
        tokio::task::spawn_blocking(move || store.delete(keys::CF, &key))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())
    }

    /// Publishes every owed result whose task has finished; true if none is left unpublished
    /// for a reason a retry could cure.
    async fn sweep(&self, broker: &Broker) -> bool {
        let store = self.api.store.clone();
        let owed = match tokio::task::spawn_blocking(move || {
            store.scan_keys(keys::CF, keys::QUEUED_PREFIX.as_bytes())
        })
        .await
        {
            Ok(Ok(k)) => k,
            _ => return false,
        };
        let mut clean = true;
        for chunk in owed.chunks(256) {
            let ids: Vec<compute::TaskId> = chunk
                .iter()
                .filter_map(|k| {
                    let k = std::str::from_utf8(k).ok()?;
                    k.strip_prefix(keys::QUEUED_PREFIX)?.parse().ok()
                })
                .collect();
            let Ok(tasks) = self.api.tasks.dispatcher.get(ids.clone()).await else {
                return false;
            };
            for (id, t) in ids.iter().zip(tasks) {
                match t {
                    Some(t) if t.status.is_terminal() => {
                        if let Err(e) = self.publish_one(broker, &t).await {
                            tracing::warn!(task = %id, error = %e, "a Globus Compute result is \
                                not published yet; retrying");
                            clean = false;
                        }
                    }
                    Some(_) => {}
                    // Gone from the node (past its retention): nothing will ever be sent.
                    None => {
                        let (store, key) = (self.api.store.clone(), keys::queued(id.as_str()));
                        let _ =
                            tokio::task::spawn_blocking(move || store.delete(keys::CF, &key)).await;
                    }
                }
            }
        }
        clean
    }
}
