//! The agent's end of the worker link (see `parallel::runtime::link`): one loopback TCP
//! connection per worker, JSON lines.

use parallel::runtime::link::{Relayed, ToAgent, ToWorker};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc::UnboundedSender;

/// What the worker connections tell the agent's loop.
pub enum LinkMsg {
    Hello {
        rank: usize,
        data_addr: String,
        writer: OwnedWriteHalf,
    },
    /// A report to forward to the coordinator as is; `prompt` unless it is a periodic
    /// position (steps and events are relayed at once, positions with the next heartbeat).
    Report { line: String, prompt: bool },
    /// A worker's last words before exiting non-zero.
    Error { rank: usize, message: String },
    /// A worker closed its link: everything it sent has been read.
    Closed { rank: usize },
}

/// Accept worker connections forever, each read by its own task.
pub async fn accept(listener: TcpListener, tx: UnboundedSender<LinkMsg>) {
    while let Ok((stream, _)) = listener.accept().await {
        tokio::spawn(read_worker(stream, tx.clone()));
    }
}

async fn read_worker(stream: TcpStream, tx: UnboundedSender<LinkMsg>) {
    let _ = stream.set_nodelay(true);
    let (read, write) = stream.into_split();
    let mut writer = Some(write);
    let mut lines = BufReader::new(read).lines();
    let mut hello_rank = None;
    while let Ok(Some(line)) = lines.next_line().await {
        let msg = match serde_json::from_str::<ToAgent<Relayed>>(&line) {
            Ok(ToAgent::Hello {
                rank, data_addr, ..
            }) => match writer.take() {
                Some(writer) => {
                    hello_rank = Some(rank);
                    LinkMsg::Hello {
                        rank,
                        data_addr,
                        writer,
                    }
                }
                None => continue,
            },
            Ok(ToAgent::Error { rank, message }) => {
                let _ = tx.send(LinkMsg::Report { line, prompt: true });
                LinkMsg::Error { rank, message }
            }
            Ok(ToAgent::Position(_)) => LinkMsg::Report {
                line,
                prompt: false,
            },
            Ok(_) => LinkMsg::Report { line, prompt: true },
            Err(e) => {
                tracing::warn!("a worker sent an unreadable line ({e}): {line}");
                continue;
            }
        };
        if tx.send(msg).is_err() {
            return;
        }
    }
    if let Some(rank) = hello_rank {
        let _ = tx.send(LinkMsg::Closed { rank });
    }
}

/// Hand a worker the peer table.
pub async fn send_peers(
    writer: &mut OwnedWriteHalf,
    addrs: &[String],
    nonce: u64,
) -> std::io::Result<()> {
    let msg = ToWorker::Peers {
        addrs: addrs.to_vec(),
        nonce,
    };
    let mut line = serde_json::to_vec(&msg).map_err(std::io::Error::other)?;
    line.push(b'\n');
    writer.write_all(&line).await?;
    writer.flush().await
}
