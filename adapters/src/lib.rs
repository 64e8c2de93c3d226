//! Platform adapters for dialogd, behind one neutral message type.
//!
//! Only this crate knows platforms (Discord, Telegram, HTTP, the console);
//! the daemon's core knows dialogue. They meet at [`ChannelKey`],
//! [`Inbound`] and [`Outbound`]: adding a platform touches only this crate.

use std::fmt;

/// The platforms dialogd speaks on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Platform {
    Discord,
    Telegram,
    Http,
    Console,
}

impl Platform {
    pub fn as_str(self) -> &'static str {
        match self {
            Platform::Discord => "discord",
            Platform::Telegram => "telegram",
            Platform::Http => "http",
            Platform::Console => "console",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        [Platform::Discord, Platform::Telegram, Platform::Http, Platform::Console]
            .into_iter()
            .find(|p| p.as_str() == text)
    }
}

/// One channel: a platform and that platform's id for the channel (a
/// Discord channel or DM, a Telegram chat, an HTTP path segment).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChannelKey {
    pub platform: Platform,
    pub channel_id: String,
}

impl ChannelKey {
    pub fn new(platform: Platform, channel_id: impl Into<String>) -> Self {
        Self { platform, channel_id: channel_id.into() }
    }

    /// Parses the `platform:channel_id` form that [`fmt::Display`] writes.
    pub fn parse(text: &str) -> Option<Self> {
        let (platform, id) = text.split_once(':')?;
        if id.is_empty() {
            return None;
        }
        Some(Self::new(Platform::parse(platform)?, id))
    }
}

impl fmt::Display for ChannelKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.platform.as_str(), self.channel_id)
    }
}

/// A message that reached the bot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inbound {
    pub channel: ChannelKey,
    /// The platform's id for the author.
    pub author: String,
    pub text: String,
    /// The platform's id for the message, used to drop duplicate deliveries.
    pub msg_id: Option<String>,
    /// Whether the bot was addressed (DM, mention, reply to the bot, command).
    pub addressed_to_bot: bool,
}

/// A reply for an adapter to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outbound {
    pub channel: ChannelKey,
    pub text: String,
    /// The message this answers, when the platform can thread replies.
    pub reply_to: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_keys_round_trip_through_text() {
        let key = ChannelKey::new(Platform::Telegram, "-100123:45");
        assert_eq!(key.to_string(), "telegram:-100123:45");
        assert_eq!(ChannelKey::parse(&key.to_string()), Some(key));
        assert_eq!(ChannelKey::parse("slack:1"), None);
        assert_eq!(ChannelKey::parse("discord:"), None);
    }
}
