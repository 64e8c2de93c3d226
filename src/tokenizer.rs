//! GPT-2 byte-level BPE, with user text never read as special tokens.
//!
//! DialoGPT separates turns with `<|endoftext|>` (id 50256). If a user could
//! type that string and have it become id 50256 they could forge turn
//! boundaries, so text is always encoded as plain bytes: a typed
//! `<|endoftext|>` becomes the ids of `<|`, `endoftext` and `|>`. Only
//! [`crate::prompt`] places real separators.

use std::path::{Path, PathBuf};

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::Tokenizer;

use crate::model::EOS_TOKEN_ID;

/// Tokenizer failures.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("no tokenizer in {0}: expected tokenizer.json, or vocab.json and merges.txt")]
    Missing(PathBuf),
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("tokenizer: {0}")]
    Encode(String),
}

/// The GPT-2 tokenizer of a DialoGPT checkpoint.
#[derive(Clone)]
pub struct DialogTokenizer {
    inner: Tokenizer,
    eos_id: u32,
}

impl std::fmt::Debug for DialogTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DialogTokenizer").field("eos_id", &self.eos_id).finish_non_exhaustive()
    }
}

impl DialogTokenizer {
    /// Loads `tokenizer.json`, or else `vocab.json` + `merges.txt`, from a
    /// checkpoint folder (or the folder of a weights file).
    pub fn from_dir(dir: &Path) -> Result<Self, TokenizerError> {
        // A weights file given for a model: its tokenizer is beside it.
        let dir = if dir.is_file() { dir.parent().unwrap_or(Path::new(".")) } else { dir };
        let json = dir.join("tokenizer.json");
        if json.is_file() {
            return Self::from_tokenizer_json(&json);
        }
        let (vocab, merges) = (dir.join("vocab.json"), dir.join("merges.txt"));
        if vocab.is_file() && merges.is_file() {
            return Self::from_vocab_merges(&vocab, &merges);
        }
        Err(TokenizerError::Missing(dir.to_path_buf()))
    }

    /// A `tokenizer.json` as transformers writes it.
    pub fn from_tokenizer_json(path: &Path) -> Result<Self, TokenizerError> {
        let mut inner = Tokenizer::from_file(path)
            .map_err(|e| TokenizerError::File { path: path.to_path_buf(), message: e.to_string() })?;
        // Added tokens such as <|endoftext|> are matched as plain text.
        inner.set_encode_special_tokens(true);
        Self::checked(inner, path)
    }

    /// GPT-2's `vocab.json` and `merges.txt`.
    pub fn from_vocab_merges(vocab: &Path, merges: &Path) -> Result<Self, TokenizerError> {
        let file_err = |path: &Path, message: String| TokenizerError::File { path: path.to_path_buf(), message };
        let bpe = BPE::from_file(&vocab.to_string_lossy(), &merges.to_string_lossy())
            .build()
            .map_err(|e| file_err(vocab, format!("with {}: {e}", merges.display())))?;
        let mut inner = Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        Self::checked(inner, vocab)
    }

    fn checked(inner: Tokenizer, path: &Path) -> Result<Self, TokenizerError> {
        let eos_id = inner.token_to_id("<|endoftext|>").ok_or_else(|| TokenizerError::File {
            path: path.to_path_buf(),
            message: "has no <|endoftext|> token".into(),
        })?;
        Ok(Self { inner, eos_id })
    }

    /// The turn separator and end-of-reply id (50256 for GPT-2).
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Encodes text as plain bytes: never yields a special token.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let encoding = self.inner.encode_fast(text, false).map_err(|e| TokenizerError::Encode(e.to_string()))?;
        let ids = encoding.get_ids().to_vec();
        debug_assert!(!ids.contains(&self.eos_id) || self.eos_id != EOS_TOKEN_ID);
        Ok(ids)
    }

    /// Decodes ids, leaving out special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        self.inner.decode(ids, true).map_err(|e| TokenizerError::Encode(e.to_string()))
    }

    /// A decoder that turns ids into text as they are generated, holding
    /// back bytes until they form whole characters.
    pub fn stream(&self) -> TextStream<'_> {
        TextStream { tokenizer: self, ids: Vec::new(), emitted: 0 }
    }
}

/// Incremental decoding for replies shown as they are generated.
pub struct TextStream<'a> {
    tokenizer: &'a DialogTokenizer,
    ids: Vec<u32>,
    /// Bytes of the full decoding already handed out.
    emitted: usize,
}

impl TextStream<'_> {
    /// Adds one id; returns the new text that is now complete, if any.
    pub fn push(&mut self, id: u32) -> Result<Option<String>, TokenizerError> {
        self.ids.push(id);
        let text = self.tokenizer.decode(&self.ids)?;
        // An incomplete UTF-8 sequence decodes to U+FFFD at the end; wait
        // for the next id rather than print half a character.
        if text.ends_with('\u{FFFD}') || text.len() <= self.emitted || !text.is_char_boundary(self.emitted) {
            return Ok(None);
        }
        let new = text[self.emitted..].to_string();
        self.emitted = text.len();
        Ok(Some(new))
    }
}
