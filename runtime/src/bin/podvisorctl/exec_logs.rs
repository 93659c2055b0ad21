//! `exec` (run a command in a container, exit with its code) and `logs` (a container's CRI
//! log, partial entries joined into lines).

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use k8s_cri::v1 as cri;
use podvisor_runtime::logs::{Stream, parse_line};

use crate::client::{Cri, rpc_error};

impl Cri {
    pub(crate) async fn exec(
        &mut self,
        id: &str,
        cmd: Vec<String>,
        timeout: i64,
    ) -> anyhow::Result<ExitCode> {
        let id = self.container_id(id).await?;
        let out = self
            .runtime
            .exec_sync(cri::ExecSyncRequest {
                container_id: id.clone(),
                cmd,
                timeout,
            })
            .await
            .map_err(rpc_error(format_args!("exec in container {id}")))?
            .into_inner();
        let mut stdout = std::io::stdout().lock();
        stdout.write_all(&out.stdout).context("write stdout")?;
        stdout.flush().context("write stdout")?;
        let mut stderr = std::io::stderr().lock();
        stderr.write_all(&out.stderr).context("write stderr")?;
        stderr.flush().context("write stderr")?;
        // A code outside 0..=255 (a runtime's -1 for "unknown") still means failure.
        Ok(ExitCode::from(
            u8::try_from(out.exit_code).unwrap_or(u8::MAX),
        ))
    }

    pub(crate) async fn logs(&mut self, id: &str) -> anyhow::Result<()> {
        let id = self.container_id(id).await?;
        let status = self
            .container_status(&id)
            .await?
            .status
            .with_context(|| format!("container {id}: no status"))?;
        if status.log_path.is_empty() {
            bail!("container {id} has no log path");
        }
        let path = PathBuf::from(&status.log_path);
        let file =
            std::fs::File::open(&path).with_context(|| format!("open log {}", path.display()))?;
        let mut joiner = LogJoiner::default();
        let mut malformed = 0usize;
        let mut stdout = std::io::stdout().lock();
        let mut stderr = std::io::stderr().lock();
        for line in BufReader::new(file).split(b'\n') {
            let line = line.with_context(|| format!("read log {}", path.display()))?;
            let line = String::from_utf8_lossy(&line);
            let Some(entry) = parse_line(&line) else {
                malformed += 1;
                continue;
            };
            if let Some((stream, text)) = joiner.push(entry.stream, entry.partial, entry.text) {
                write_line(&mut stdout, &mut stderr, stream, &text, true)?;
            }
        }
        // Output the container did not end with a newline.
        for (stream, text) in joiner.finish() {
            write_line(&mut stdout, &mut stderr, stream, &text, false)?;
        }
        stdout.flush().context("write stdout")?;
        if malformed > 0 {
            eprintln!(
                "podvisorctl: skipped {malformed} malformed lines of {}",
                path.display()
            );
        }
        Ok(())
    }
}

/// Joins the `P` (partial) entries of a CRI log into whole lines, per stream.
#[derive(Debug, Default)]
pub(crate) struct LogJoiner {
    /// Text of partial entries not yet ended by an `F` entry: stdout, stderr.
    pending: [String; 2],
}

impl LogJoiner {
    /// Takes one entry; returns a line once its `F` entry arrives.
    pub(crate) fn push(
        &mut self,
        stream: Stream,
        partial: bool,
        text: &str,
    ) -> Option<(Stream, String)> {
        let pending = &mut self.pending[stream_index(stream)];
        pending.push_str(text);
        if partial {
            None
        } else {
            Some((stream, std::mem::take(pending)))
        }
    }

    /// What is left: output that did not end with a newline.
    pub(crate) fn finish(self) -> Vec<(Stream, String)> {
        let [out, err] = self.pending;
        [(Stream::Stdout, out), (Stream::Stderr, err)]
            .into_iter()
            .filter(|(_, text)| !text.is_empty())
            .collect()
    }
}

fn stream_index(stream: Stream) -> usize {
    match stream {
        Stream::Stdout => 0,
        Stream::Stderr => 1,
    }
}

pub(crate) fn write_line(
    stdout: &mut impl Write,
    stderr: &mut impl Write,
    stream: Stream,
    text: &str,
    newline: bool,
) -> anyhow::Result<()> {
    let out: &mut dyn Write = match stream {
        Stream::Stdout => stdout,
        Stream::Stderr => stderr,
    };
    out.write_all(text.as_bytes())
        .and_then(|()| {
            if newline {
                out.write_all(b"\n")
            } else {
                Ok(())
            }
        })
        .with_context(|| format!("write {}", stream.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_lines_joined() {
        let log = "\
2024-05-01T12:00:00.1Z stdout F whole\n\
2024-05-01T12:00:00.2Z stderr P err-a\n\
2024-05-01T12:00:00.3Z stdout P out-a\n\
2024-05-01T12:00:00.4Z stderr F err-b\n\
2024-05-01T12:00:00.5Z stdout P out-b\n";
        let mut joiner = LogJoiner::default();
        let lines: Vec<(Stream, String)> = log
            .lines()
            .filter_map(|l| {
                let e = parse_line(l).expect("valid line");
                joiner.push(e.stream, e.partial, e.text)
            })
            .collect();
        assert_eq!(
            lines,
            [
                (Stream::Stdout, "whole".to_string()),
                (Stream::Stderr, "err-aerr-b".to_string()),
            ]
        );
        assert_eq!(
            joiner.finish(),
            [(Stream::Stdout, "out-aout-b".to_string())]
        );
    }
}
