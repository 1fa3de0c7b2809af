//! The crash-safe on-disk spool. Placeholder until the durability work lands: `AVAILABLE`
//! is false, and `delivery.mode = "spool"` is refused at load.

use crate::config::DeliveryConfig;
use crate::delivery::Delivery;
use crate::sinks::Sink;
use std::collections::HashMap;
use std::sync::Arc;

pub const AVAILABLE: bool = false;

pub async fn open(
    _cfg: &DeliveryConfig,
    _sinks: &HashMap<String, Arc<dyn Sink>>,
) -> Result<Arc<dyn Delivery>, std::io::Error> {
    Err(std::io::Error::other("the spool is not available in this build"))
}
