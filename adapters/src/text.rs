//! Text rules the chat platforms share: command words, the command list,
//! splitting long replies at clean boundaries, and scrubbing secrets from
//! text that is about to be logged.

/// The commands users see, with the description platforms show in their
/// command menus. The names are a fixed interface (settings and docs name
/// them).
pub const COMMANDS: &[(&str, &str)] = &[
    ("start", "Say hello and see what I can do"),
    ("help", "List the commands"),
    ("ask", "Ask me something (in groups)"),
    ("reset", "Forget this channel's conversation"),
    ("forget", "Delete everything stored about you"),
    ("optout", "Never learn from your messages (and delete what was collected)"),
    ("optin", "Allow learning from your messages"),
    ("mute", "Moderators: stop me answering in this channel"),
    ("unmute", "Moderators: let me answer in this channel again"),
    ("persona", "Moderators: list, create or choose my persona (list, use NAME, create NAME SEED, off)"),
    ("train", "Moderators: fine-tune me on this channel's conversations (status, cancel, rollback)"),
    ("collect", "Moderators: collect this channel's conversations for training (on, off, status)"),
    ("block", "Moderators: refuse these words here, in and out (WORD…)"),
    ("unblock", "Moderators: stop refusing these words (WORD…)"),
    ("allow", "Moderators: let these words past the filter here (WORD…)"),
    ("disallow", "Moderators: stop allowing these words (WORD…)"),
    ("blocklist", "Moderators: show the words blocked and allowed here"),
];

/// Commands only moderators may use.
pub const MODERATOR_COMMANDS: &[&str] =
    &["mute", "unmute", "persona", "train", "collect", "block", "unblock", "allow", "disallow", "blocklist"];

/// A command's word and the bot it is addressed to: `/reset` is
/// `("reset", None)`, `/reset@dialogd_bot now` is `("reset", Some("dialogd_bot"))`.
pub fn command_word(text: &str) -> Option<(&str, Option<&str>)> {
    let first = text.trim_start().strip_prefix('/')?.split(char::is_whitespace).next()?;
    let (word, bot) = match first.split_once('@') {
        Some((word, bot)) => (word, Some(bot)),
        None => (first, None),
    };
    (!word.is_empty() && word.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')).then_some((word, bot))
}

/// What follows the command word (`/ask how are you` → `how are you`).
pub fn command_argument(text: &str) -> &str {
    let text = text.trim_start();
    text.find(char::is_whitespace).map_or("", |at| text[at..].trim())
}

/// Whether the text is a moderator-only command.
pub fn is_moderator_command(text: &str) -> bool {
    command_word(text).is_some_and(|(word, _)| MODERATOR_COMMANDS.contains(&word.to_ascii_lowercase().as_str()))
}

/// Splits `text` into pieces of at most `limit` units as `measure` counts
/// them (characters on Discord, UTF-16 code units on Telegram), in order.
/// A piece ends, by preference, at a paragraph break, a line break, a
/// sentence end or a space in its second half; only a word longer than
/// the limit is cut inside. No character is ever cut in two, and joining
/// the pieces (with the whitespace at each cut) gives back the text.
pub fn split_message(text: &str, limit: usize, measure: fn(char) -> usize) -> Vec<String> {
    assert!(limit >= 4, "a limit under 4 cannot hold every character");
    let mut pieces = Vec::new();
    let mut rest = text.trim();
    while !rest.is_empty() {
        // The longest prefix within the limit, as a byte index.
        let mut units = 0;
        let mut fit = rest.len();
        for (at, c) in rest.char_indices() {
            units += measure(c);
            if units > limit {
                fit = at;
                break;
            }
        }
        if fit == rest.len() {
            pieces.push(rest.to_string());
            break;
        }
        let window = &rest[..fit];
        let half = fit / 2;
        let cut = ["\n\n", "\n", ". ", "! ", "? ", " "]
            .iter()
            .find_map(|sep| window.rfind(sep).filter(|&at| at >= half).map(|at| at + sep.len()))
            .unwrap_or(fit);
        let piece = rest[..cut].trim_end();
        if !piece.is_empty() {
            pieces.push(piece.to_string());
        }
        rest = rest[cut..].trim_start();
    }
    pieces
}

/// `text` without the bot's own addressing: every occurrence of each of
/// `mentions` (ASCII case-insensitive) with the whitespace after it, then a
/// leading `,` or `:`, trimmed. Whitespace elsewhere stays as typed (the
/// core normalises every turn the same way, whatever its platform).
pub fn strip_addressing(text: &str, mentions: &[&str]) -> String {
    let mut out = text.to_string();
    for mention in mentions.iter().filter(|m| !m.is_empty()) {
        while let Some(at) = out.to_ascii_lowercase().find(&mention.to_ascii_lowercase()) {
            let end = at + mention.len();
            let after = out[end..].len() - out[end..].trim_start().len();
            out.replace_range(at..end + after, "");
        }
    }
    out.trim().trim_start_matches([',', ':']).trim().to_string()
}

/// Counts a character as one: Discord's limit is in Unicode code points
/// (its API is Python 3; discord/discord-api-docs#1315), so an emoji
/// outside the BMP is one character, not two UTF-16 units.
pub fn chars(_: char) -> usize {
    1
}

/// Counts a character in UTF-16 code units (Telegram's limit).
pub fn utf16_units(c: char) -> usize {
    c.len_utf16()
}

/// `text` with every occurrence of `secret` (and of its part after the
/// first `:`, Telegram's token secret) replaced, for logging errors that a
/// client library may have built from a URL.
pub fn scrub(text: &str, secret: &str) -> String {
    let mut text = text.to_string();
    if secret.len() >= 8 {
        text = text.replace(secret, "[redacted]");
        if let Some((_, tail)) = secret.split_once(':') {
            if tail.len() >= 8 {
                text = text.replace(tail, "[redacted]");
            }
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addressing_is_removed_and_other_whitespace_kept() {
        assert_eq!(strip_addressing("<@700> how are you?", &["<@700>", "<@!700>"]), "how are you?");
        assert_eq!(strip_addressing("hey <@!700>, line one\nline  two", &["<@700>", "<@!700>"]), "hey , line one\nline  two");
        assert_eq!(strip_addressing("@Dialogd_Bot: hi", &["@dialogd_bot"]), "hi");
        assert_eq!(strip_addressing("ask <@1> about <@700>", &["<@700>"]), "ask <@1> about");
    }

    #[test]
    fn discord_counts_code_points() {
        // 2000 emoji are 4000 UTF-16 units and 8000 bytes, and one Discord
        // message; the 2001st starts a second one.
        let emoji = "🙂".repeat(2000);
        assert_eq!(split_message(&emoji, 2000, chars), vec![emoji.clone()]);
        let pieces = split_message(&format!("{emoji}🙂"), 2000, chars);
        assert_eq!(pieces.iter().map(|p| p.chars().count()).collect::<Vec<_>>(), vec![2000, 1]);
        // Telegram counts UTF-16 units: the same text takes two messages
        // of 4096.
        assert_eq!(split_message(&emoji, 4096, utf16_units).len(), 1);
        assert_eq!(split_message(&"🙂".repeat(2049), 4096, utf16_units).len(), 2);
    }

    #[test]
    fn command_words_and_arguments() {
        assert_eq!(command_word("/reset"), Some(("reset", None)));
        assert_eq!(command_word("/ask@dialogd_bot how?"), Some(("ask", Some("dialogd_bot"))));
        assert_eq!(command_word("hello /reset"), None);
        assert_eq!(command_word("/ hi"), None);
        assert_eq!(command_argument("/ask  how are you "), "how are you");
        assert_eq!(command_argument("/ask"), "");
        assert!(is_moderator_command("/Mute"));
        assert!(!is_moderator_command("/reset"));
    }

    #[test]
    fn long_text_splits_at_clean_boundaries_in_order() {
        let sentence = "The quick brown fox jumps over the lazy dog. ";
        let text = sentence.repeat(100);
        let pieces = split_message(&text, 200, chars);
        assert!(pieces.len() > 1);
        for piece in &pieces {
            assert!(piece.chars().count() <= 200, "{piece}");
            assert!(piece.ends_with('.'), "cut inside a sentence: {piece:?}");
        }
        let joined: String = pieces.join(" ");
        assert_eq!(joined, text.trim());
    }

    #[test]
    fn a_word_longer_than_the_limit_is_cut_without_breaking_characters() {
        let text = "é".repeat(25) + "😀".repeat(10).as_str();
        let pieces = split_message(&text, 8, utf16_units);
        assert!(pieces.iter().all(|p| p.encode_utf16().count() <= 8), "{pieces:?}");
        assert_eq!(pieces.concat(), text);
        assert_eq!(split_message("  ", 8, chars), Vec::<String>::new());
    }

    #[test]
    fn secrets_are_scrubbed() {
        let token = "123456:ABCdefGHIjklMNO";
        let line = "error sending request for url (https://api/bot123456:ABCdefGHIjklMNO/GetMe)";
        assert_eq!(scrub(line, token), "error sending request for url (https://api/bot[redacted]/GetMe)");
        assert!(!scrub("ABCdefGHIjklMNO", token).contains("ABCdef"));
    }
}
