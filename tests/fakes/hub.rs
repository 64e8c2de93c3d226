//! A loopback fake of the Hugging Face hub's file endpoint, for `HF_ENDPOINT`:
//! `GET /{repo}/resolve/main/{file}` with the headers hf-hub reads (`etag`,
//! `x-repo-commit`, `content-range`) and byte ranges, over raw HTTP/1.1
//! (one request per connection). A file named as stalling sends the first
//! half of its bytes and then nothing, holding the connection open.

use std::path::{Path, PathBuf};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

pub struct FakeHub {
    /// `http://127.0.0.1:PORT`, for `HF_ENDPOINT`.
    pub url: String,
    task: tokio::task::JoinHandle<()>,
}

impl FakeHub {
    /// Serves the files of `dir` as the model repository `repo`
    /// (`owner/name`); `stall`: the file whose download stalls halfway.
    pub async fn start(repo: &str, dir: &Path, stall: Option<&str>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (prefix, dir, stall) = (format!("/{repo}/resolve/main/"), dir.to_path_buf(), stall.map(str::to_string));
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve(stream, prefix.clone(), dir.clone(), stall.clone()));
            }
        });
        Self { url, task }
    }
}

impl Drop for FakeHub {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(mut stream: TcpStream, prefix: String, dir: PathBuf, stall: Option<String>) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).await.unwrap_or(0) == 0 {
            return;
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let path = head.split_whitespace().nth(1).unwrap_or_default().to_string();
    let range = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("range: bytes=").map(str::to_string))
        .and_then(|r| r.trim().split_once('-').map(|(a, b)| (a.parse::<usize>().ok(), b.parse::<usize>().ok())));
    let file = path.strip_prefix(&prefix).filter(|f| !f.contains('/') && !f.is_empty());
    let Some(bytes) = file.and_then(|f| std::fs::read(dir.join(f)).ok()) else {
        let _ = stream.write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").await;
        return;
    };
    let file = file.unwrap();
    let len = bytes.len();
    let (start, end) = match range {
        Some((Some(a), Some(b))) => (a.min(len), b.min(len.saturating_sub(1))),
        _ => (0, len.saturating_sub(1)),
    };
    let body = &bytes[start..=end.max(start).min(len - 1)];
    let header = format!(
        "HTTP/1.1 206 Partial Content\r\netag: \"etag-{}\"\r\nx-repo-commit: 0123456789abcdef0123456789abcdef01234567\r\n\
         content-range: bytes {start}-{}/{len}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        file.replace('.', "-"),
        start + body.len() - 1,
        body.len()
    );
    let _ = stream.write_all(header.as_bytes()).await;
    if stall.as_deref() == Some(file) && body.len() > 1 {
        let _ = stream.write_all(&body[..body.len() / 2]).await;
        let _ = stream.flush().await;
        // Nothing more, and the connection stays open.
        std::future::pending::<()>().await;
    }
    let _ = stream.write_all(body).await;
    let _ = stream.shutdown().await;
}
