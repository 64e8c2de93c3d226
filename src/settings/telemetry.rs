//! `[telemetry]`: logs and the metrics endpoint.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::{invalid, socket_addr, SettingsError};

/// `[telemetry]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTelemetry {
    pub log_format: String,
    pub log_filter: String,
    pub metrics_listen: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Serialize)]
pub struct TelemetrySettings {
    pub log_format: LogFormat,
    pub log_filter: String,
    /// `None`: no metrics endpoint.
    pub metrics_listen: Option<SocketAddr>,
}

impl RawTelemetry {
    pub(super) fn validate(self) -> Result<TelemetrySettings, SettingsError> {
        let t = self;
        let log_format = match t.log_format.as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => return Err(invalid("telemetry.log_format", format!("{other:?} is not \"text\" or \"json\""))),
        };
        tracing_subscriber::EnvFilter::try_new(&t.log_filter)
            .map_err(|e| invalid("telemetry.log_filter", e.to_string()))?;
        let metrics_listen = match t.metrics_listen.trim() {
            "" => None,
            addr => Some(socket_addr("telemetry.metrics_listen", addr)?),
        };
        Ok(TelemetrySettings { log_format, log_filter: t.log_filter, metrics_listen })
    }
}
