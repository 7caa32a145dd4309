//! What a raw HTTP/2 client sees for the `:authority` it sends: on the unix socket every value
//! is served (a socket path, its %-encoding, garbage, none at all), on loopback TCP the server
//! keeps its normal semantics and refuses a path; garbage frames on the unix socket close that
//! connection only; and the server's SETTINGS stay what `kilo_egressd::authority` relies on, and
//! bound the streams a client may open at once.

use kilo_egressd::engine::{Engine, EngineConfig};
use kilo_egressd::listen::ListenAddr;
use kilo_egressd::rules::ModeConfig;
use kilo_egressd::server::Limits;
use kilo_egressd::state::StateStore;
use kilo_egressd::testing::{FakeNetfilter, serve};
use loona_hpack::{Decoder, Encoder};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const GET_RULES: &[u8] = b"/kilo.egress.v1.EgressService/GetRules";

/// How a request ended.
#[derive(Debug, PartialEq)]
enum Outcome {
    /// The response's `grpc-status`.
    Status(String),
    /// RST_STREAM with this error code.
    Reset(u32),
    /// GOAWAY with this error code, or the connection closed (None).
    Closed(Option<u32>),
}

struct Started {
    socket: std::path::PathBuf,
    tcp: std::net::SocketAddr,
    _dir: tempfile::TempDir,
    _stop: Vec<tokio::sync::oneshot::Sender<()>>,
}

/// The server on a unix socket and on loopback TCP, over the in-memory netfilter fake.
async fn start() -> Started {
    let dir = tempfile::tempdir().unwrap();
    let mode = ModeConfig::Own {
        source_cidrs: vec!["10.44.0.0/24".parse().unwrap()],
        no_nat_cidrs: vec![],
    };
    let (engine, _thread) = Engine::start(
        EngineConfig::quiet(mode),
        Arc::new(FakeNetfilter::new()),
        StateStore::new(dir.path().join("state")),
    );
    let socket = dir.path().join("api.sock");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let tcp: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let mut stops = Vec::new();
    for listen in [
        ListenAddr::Unix(socket.clone()),
        format!("tcp://{tcp}").parse().unwrap(),
    ] {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        stops.push(stop);
        let engine = engine.clone();
        tokio::spawn(async move {
            serve(&listen, engine, Limits::default(), async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        });
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !(socket.exists() && tokio::net::TcpStream::connect(tcp).await.is_ok()) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "server did not come up"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Started {
        socket,
        tcp,
        _dir: dir,
        _stop: stops,
    }
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

async fn read_frame(io: &mut (impl AsyncRead + Unpin)) -> Option<(u8, u8, u32, Vec<u8>)> {
    let mut head = [0u8; 9];
    io.read_exact(&mut head).await.ok()?;
    let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
    let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
    let mut payload = vec![0; len];
    io.read_exact(&mut payload).await.ok()?;
    Some((head[3], head[4], stream, payload))
}

/// Sends one GetRules per entry of `authorities` on one connection (streams 1, 3, ..., the
/// client's HPACK encoder keeping its dynamic table across them, as real clients do) and returns
/// how each ended, plus the server's SETTINGS.
async fn get_rules_raw(
    mut io: impl AsyncRead + AsyncWrite + Unpin,
    authorities: &[Option<&[u8]>],
) -> (Vec<Outcome>, Vec<(u16, u32)>) {
    let mut encoder = Encoder::new();
    let mut bytes = PREFACE.to_vec();
    bytes.extend(frame(0x4, 0, 0, &[]));
    for (i, authority) in authorities.iter().enumerate() {
        let stream = 1 + 2 * i as u32;
        let mut fields: Vec<(&[u8], &[u8])> = vec![
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", GET_RULES),
        ];
        if let Some(authority) = authority {
            fields.push((b":authority", authority));
        }
        fields.extend([
            (&b"content-type"[..], &b"application/grpc"[..]),
            (b"te", b"trailers"),
        ]);
        bytes.extend(frame(0x1, 0x4, stream, &encoder.encode(fields)));
        bytes.extend(frame(0x0, 0x1, stream, &[0, 0, 0, 0, 0]));
    }
    io.write_all(&bytes).await.unwrap();
    let mut outcomes: Vec<Option<Outcome>> = authorities.iter().map(|_| None).collect();
    let mut settings = Vec::new();
    let mut decoder = Decoder::new();
    let read = async {
        while outcomes.iter().any(Option::is_none) {
            let Some((kind, flags, stream, payload)) = read_frame(&mut io).await else {
                for outcome in outcomes.iter_mut().filter(|o| o.is_none()) {
                    *outcome = Some(Outcome::Closed(None));
                }
                break;
            };
            let index = (stream as usize).saturating_sub(1) / 2;
            match kind {
                0x4 if flags & 0x1 == 0 => {
                    for entry in payload.chunks(6) {
                        let id = u16::from_be_bytes([entry[0], entry[1]]);
                        let value = u32::from_be_bytes([entry[2], entry[3], entry[4], entry[5]]);
                        settings.push((id, value));
                    }
                    io.write_all(&frame(0x4, 0x1, 0, &[])).await.unwrap();
                }
                0x1 => {
                    let fields = decoder
                        .decode(&payload)
                        .expect("the server's HPACK decodes");
                    if let Some((_, status)) = fields.iter().find(|(n, _)| n == b"grpc-status") {
                        outcomes[index] =
                            Some(Outcome::Status(String::from_utf8_lossy(status).into()));
                    }
                }
                0x3 => {
                    let code = u32::from_be_bytes(payload[..4].try_into().unwrap());
                    outcomes[index] = Some(Outcome::Reset(code));
                }
                0x7 => {
                    let code = u32::from_be_bytes(payload[4..8].try_into().unwrap());
                    for outcome in outcomes.iter_mut().filter(|o| o.is_none()) {
                        *outcome = Some(Outcome::Closed(Some(code)));
                    }
                }
                _ => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("every request ends within 10 s");
    (outcomes.into_iter().map(Option::unwrap).collect(), settings)
}

const PATH: &[u8] = b"/run/kilo-egress/kilo-egressd.sock";
const ENCODED_PATH: &[u8] = b"%2Frun%2Fkilo-egress%2Fkilo-egressd.sock";

#[tokio::test]
async fn unix_socket_serves_any_authority_a_client_sends_or_none() {
    let server = start().await;
    let authorities: [Option<&[u8]>; 7] = [
        Some(ENCODED_PATH),
        Some(PATH),
        Some(b"localhost"),
        None,
        Some(b""),
        Some(b"garbage \x01\x7f%%% [not an authority"),
        Some(ENCODED_PATH),
    ];
    let io = tokio::net::UnixStream::connect(&server.socket)
        .await
        .unwrap();
    let (outcomes, _) = get_rules_raw(io, &authorities).await;
    for (authority, outcome) in authorities.iter().zip(&outcomes) {
        assert_eq!(
            *outcome,
            Outcome::Status("0".into()),
            "{:?}",
            authority.map(String::from_utf8_lossy)
        );
    }
}

#[tokio::test]
async fn loopback_tcp_keeps_http2_semantics_and_refuses_a_path_as_authority() {
    let server = start().await;
    let io = tokio::net::TcpStream::connect(server.tcp).await.unwrap();
    let (outcomes, _) = get_rules_raw(io, &[Some(PATH), Some(b"localhost")]).await;
    assert_eq!(
        outcomes,
        [Outcome::Reset(1), Outcome::Status("0".into())],
        "PROTOCOL_ERROR for the path, served with a valid authority"
    );
}

#[tokio::test]
async fn garbage_frames_close_that_unix_connection_and_the_server_serves_the_next() {
    let server = start().await;
    let garbage: [Vec<u8>; 3] = [
        // CONTINUATION without HEADERS.
        frame(0x9, 0x4, 1, b"\x82"),
        // A header block that is not HPACK (index 0).
        frame(0x1, 0x4, 1, b"\x80"),
        // A HEADERS frame announcing 16 MiB.
        vec![0xff, 0xff, 0xff, 0x1, 0x4, 0, 0, 0, 1],
    ];
    for bytes in garbage {
        let mut io = tokio::net::UnixStream::connect(&server.socket)
            .await
            .unwrap();
        io.write_all(&[PREFACE, &frame(0x4, 0, 0, &[]), &bytes].concat())
            .await
            .unwrap();
        let closed = tokio::time::timeout(Duration::from_secs(10), async {
            let mut sink = Vec::new();
            io.read_to_end(&mut sink).await
        })
        .await
        .expect("the server closes the connection");
        // Reset by the peer or closed after the server's SETTINGS: either is a clean end.
        let _ = closed;
        let io = tokio::net::UnixStream::connect(&server.socket)
            .await
            .unwrap();
        let (outcomes, _) = get_rules_raw(io, &[Some(PATH)]).await;
        assert_eq!(outcomes, [Outcome::Status("0".into())]);
    }
}

#[tokio::test]
async fn server_settings_keep_the_hpack_table_and_frame_size_the_boundary_assumes() {
    let server = start().await;
    let io = tokio::net::UnixStream::connect(&server.socket)
        .await
        .unwrap();
    let (_, settings) = get_rules_raw(io, &[None]).await;
    for (id, value) in settings {
        match id {
            // SETTINGS_HEADER_TABLE_SIZE: the boundary's decoder allows the default only.
            0x1 => assert_eq!(
                value as usize,
                kilo_egressd::authority::HEADER_TABLE_SIZE,
                "the server advertises another HPACK table size: update crate::authority"
            ),
            // SETTINGS_MAX_FRAME_SIZE: the boundary writes header frames of the default size.
            0x5 => assert!(value as usize >= kilo_egressd::authority::MAX_FRAME_SIZE),
            _ => {}
        }
    }
}

#[tokio::test]
async fn server_settings_bound_the_calls_a_connection_has_in_flight() {
    // Unbounded, 1,000 concurrent calls on 16 connections held ~8 MB of request state and
    // replies at once; announced, a client's further calls wait in the client.
    let server = start().await;
    let io = tokio::net::UnixStream::connect(&server.socket)
        .await
        .unwrap();
    let (_, settings) = get_rules_raw(io, &[None]).await;
    let max_streams = settings
        .iter()
        .find(|(id, _)| *id == 0x3)
        .map(|(_, value)| *value as usize);
    assert_eq!(max_streams, Some(Limits::default().per_connection));
    assert!(Limits::default().per_connection <= 16);
}
