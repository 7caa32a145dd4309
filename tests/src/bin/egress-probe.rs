//! `egress-probe`: shows which source address a TCP server sees.
//!
//! `egress-probe listen ADDR PORT` accepts TCP connections on ADDR:PORT and answers each one with
//! the peer's IP address as text, then closes it. It prints `listening on ADDR:PORT` once bound and
//! runs until killed.
//!
//! `egress-probe connect ADDR PORT [--timeout-ms N]` connects to a listener and prints what it
//! wrote, i.e. the source address the listener saw. It exits non-zero when the connection or the
//! read fails or times out (default 2000 ms).
//!
//! UDP, for flows that outlive a switch: `egress-probe udp-listen ADDR PORT` prints `listening on
//! ADDR:PORT`, then one line per datagram with the source address it came from;
//! `egress-probe udp-send ADDR PORT FROM_PORT [--interval-ms N]` sends a datagram from the fixed
//! local port FROM_PORT every N ms (default 100) until killed: one conntrack flow.

use anyhow::{Context, bail};
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::ExitCode;
use std::time::Duration;

const USAGE: &str = "usage: egress-probe listen ADDR PORT | egress-probe connect ADDR PORT [--timeout-ms N] \
     | egress-probe udp-listen ADDR PORT | egress-probe udp-send ADDR PORT FROM_PORT [--interval-ms N]";

fn socket_addr(addr: &str, port: &str) -> anyhow::Result<SocketAddr> {
    let ip: IpAddr = addr
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .with_context(|| format!("{addr:?} is not an IP address"))?;
    let port: u16 = port
        .parse()
        .with_context(|| format!("{port:?} is not a port"))?;
    Ok(SocketAddr::new(ip, port))
}

fn listen(addr: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr).with_context(|| format!("bind {addr}"))?;
    println!("listening on {addr}");
    std::io::stdout().flush()?;
    for stream in listener.incoming() {
        let mut stream = match stream {
            Ok(stream) => stream,
            Err(err) => {
                eprintln!("egress-probe: accept: {err}");
                continue;
            }
        };
        let peer = match stream.peer_addr() {
            Ok(peer) => peer.ip().to_canonical().to_string(),
            Err(err) => {
                eprintln!("egress-probe: peer address: {err}");
                continue;
            }
        };
        if let Err(err) = stream.write_all(peer.as_bytes()) {
            eprintln!("egress-probe: answer {peer}: {err}");
        }
    }
    Ok(())
}

fn connect(addr: SocketAddr, timeout: Duration) -> anyhow::Result<String> {
    let mut stream =
        TcpStream::connect_timeout(&addr, timeout).with_context(|| format!("connect {addr}"))?;
    stream.set_read_timeout(Some(timeout))?;
    let mut seen = String::new();
    stream
        .read_to_string(&mut seen)
        .with_context(|| format!("read from {addr}"))?;
    if seen.is_empty() {
        bail!("{addr} closed the connection without naming the source address");
    }
    Ok(seen)
}

fn udp_listen(addr: SocketAddr) -> anyhow::Result<()> {
    let socket = UdpSocket::bind(addr).with_context(|| format!("bind udp {addr}"))?;
    println!("listening on {addr}");
    std::io::stdout().flush()?;
    let mut datagram = [0u8; 512];
    loop {
        let (_, peer) = socket.recv_from(&mut datagram)?;
        println!("{}", peer.ip().to_canonical());
        std::io::stdout().flush()?;
    }
}

fn udp_send(to: SocketAddr, from_port: u16, interval: Duration) -> anyhow::Result<()> {
    let local: SocketAddr = match to {
        SocketAddr::V4(_) => ([0, 0, 0, 0], from_port).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, from_port).into(),
    };
    let socket = UdpSocket::bind(local).with_context(|| format!("bind udp {local}"))?;
    for n in 0u64.. {
        // A send may fail while no route or neighbour is there yet: keep the flow going.
        if let Err(err) = socket.send_to(n.to_string().as_bytes(), to) {
            eprintln!("egress-probe: send to {to}: {err}");
        }
        std::thread::sleep(interval);
    }
    Ok(())
}

fn run(args: &[String]) -> anyhow::Result<()> {
    match args {
        [cmd, addr, port] if cmd == "listen" => listen(socket_addr(addr, port)?),
        [cmd, addr, port, rest @ ..] if cmd == "connect" => {
            let timeout_ms = match rest {
                [] => 2000,
                [flag, ms] if flag == "--timeout-ms" => ms
                    .parse()
                    .with_context(|| format!("--timeout-ms {ms:?} is not a number"))?,
                _ => bail!("{USAGE}"),
            };
            let seen = connect(socket_addr(addr, port)?, Duration::from_millis(timeout_ms))?;
            println!("{seen}");
            Ok(())
        }
        [cmd, addr, port] if cmd == "udp-listen" => udp_listen(socket_addr(addr, port)?),
        [cmd, addr, port, from, rest @ ..] if cmd == "udp-send" => {
            let interval_ms = match rest {
                [] => 100,
                [flag, ms] if flag == "--interval-ms" => ms
                    .parse()
                    .with_context(|| format!("--interval-ms {ms:?} is not a number"))?,
                _ => bail!("{USAGE}"),
            };
            let from: u16 = from
                .parse()
                .with_context(|| format!("{from:?} is not a port"))?;
            udp_send(
                socket_addr(addr, port)?,
                from,
                Duration::from_millis(interval_ms),
            )
        }
        _ => bail!("{USAGE}"),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("egress-probe: {err:#}");
            ExitCode::FAILURE
        }
    }
}
