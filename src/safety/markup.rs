//! Platform markup taken out of a text before the filter reads it.
//!
//! Discord writes a mention of a member as `<@123456789012345678>` (or
//! `<@!…>`), of a role as `<@&…>`, of a channel as `<#…>`, a custom emoji as
//! `<:name:id>` or `<a:name:id>`, a timestamp as `<t:…>` and a slash command
//! as `</name:id>`; messages carry URLs, code spans (`` `…` ``, ```` ```…``` ````)
//! and spoilers (`||…||`). Read as text, the digits of an id are leetspeak
//! (`<@455>` reads "ass") and a URL is a string of letters in which bad words
//! hide, so a filter that sees them flags every message that names a member.
//!
//! [`neutralise`] replaces mentions, timestamps and URLs with a space, a custom
//! emoji or slash command with its name (a name can be abusive too), removes
//! the backticks and bars of code spans and spoilers (their content is
//! still read) and turns brackets into spaces (`(ok)` is the word "ok", not
//! an obfuscated letter). Telegram's `@username` is left alone: the filter's
//! whole-word matching copes with it.

use std::borrow::Cow;
use std::sync::LazyLock;

use regex::Regex;

/// Discord's angle-bracket markup: mentions, channels, roles, timestamps
/// (`name` empty: replaced by a space), custom emoji and slash commands
/// (replaced by their `name`).
static ANGLE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"<(?:@[!&]?\d+|#\d+|t:-?\d+(?::[tTdDfFR])?|a?:(?P<emoji>\w{1,64}):\d+|/(?P<command>[\w\- ]{1,100}):\d+)>")
        .expect("valid pattern")
});

/// URLs with a scheme, and bare `www.` hosts, up to the next whitespace.
static URL: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?i)\b(?:https?|ftp)://\S+|\bwww\.\S+").expect("valid pattern"));

/// The text the filter reads: platform markup neutralised (see the module
/// docs). Borrowed unchanged when there is no markup.
pub fn neutralise(text: &str) -> Cow<'_, str> {
    let needs = text.contains(['<', '`', '(', ')', '[', ']', '{', '}']) || text.contains("||") || text.contains("://") || text.contains("www.");
    if !needs {
        return Cow::Borrowed(text);
    }
    let without_tags = ANGLE.replace_all(text, |caps: &regex::Captures<'_>| {
        match caps.name("emoji").or_else(|| caps.name("command")) {
            Some(name) => format!(" {} ", name.as_str().replace(['_', '-'], " ")),
            None => " ".to_string(),
        }
    });
    let without_urls = URL.replace_all(&without_tags, " ");
    let out = without_urls.replace("||", " ").replace(['`', '(', ')', '[', ']', '{', '}'], " ");
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markup_is_neutralised_and_text_is_kept() {
        let cases = [
            ("<@123456789012345678> thanks", "  thanks"),
            ("hey <@!98>, <@&77> and <#66>!", "hey  ,   and  !"),
            ("nice <:pepe_ok:1122> <a:party:99>", "nice  pepe ok   party "),
            ("at <t:1700000000:R>", "at  "),
            ("run </ask:123>", "run  ask "),
            ("see https://example.com/a?b=455 now", "see   now"),
            ("www.example.org/x and HTTP://X.Y", "  and  "),
            ("`fuck you` and ```code```", " fuck you  and    code   "),
            ("||spoiler|| (ok) [x] {y}", " spoiler   ok   x   y "),
            ("plain text stays", "plain text stays"),
            ("<3 and a < b > c", "<3 and a < b > c"),
        ];
        for (text, want) in cases {
            assert_eq!(neutralise(text), want, "{text}");
        }
        assert!(matches!(neutralise("no markup here"), Cow::Borrowed(_)));
    }
}
