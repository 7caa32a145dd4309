//! The watcher's liveness: `kilo-egress watch --heartbeat-file PATH` rewrites PATH each time its
//! loop made progress (a Node watch event handled, or a periodic resync's round-trip with
//! kilo-egressd), and `kilo-egress watch-alive --heartbeat-file PATH --max-age D` (the
//! DaemonSet's exec probe) fails once the last heartbeat is older than D: the loop, its Node
//! watch and its link to kilo-egressd have all been stuck that long.
//!
//! The file holds one RFC 3339 time (UTC), written to a temporary file and renamed, so a probe
//! never reads half a line. The decision itself, [`judge`], is pure and unit-tested.
//!
//! What it does not flag on purpose: a failing Node watch while kilo-egressd still answers (an
//! unreachable API server: kube-rs retries with backoff and drops an idle watch stream on its
//! own after 290 s plus a margin; restarting the container would not bring the API server back,
//! and a restart loop would delay the watcher once it does), and a Node that is not registered
//! (the periodic resync still reaches kilo-egressd, and the log says what is wrong).

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};
use tracing::{info, warn};

/// The environment variable that sets `--heartbeat-file` of `watch` and of `watch-alive`.
pub const HEARTBEAT_FILE_ENV: &str = "KILO_EGRESS_HEARTBEAT_FILE";

/// The shortest pause between two writes of the heartbeat file (Node events can come in bursts).
pub const MIN_BEAT_INTERVAL: Duration = Duration::from_secs(1);

/// Arguments of `kilo-egress watch-alive`.
#[derive(Debug, Clone, clap::Args)]
pub struct AliveArgs {
    /// The heartbeat file `kilo-egress watch --heartbeat-file` writes.
    #[arg(long, env = HEARTBEAT_FILE_ENV, value_name = "PATH")]
    pub heartbeat_file: PathBuf,
    /// Fail when the last heartbeat is older than this (keep it well above the watcher's
    /// --resync-interval, which bounds the time between two heartbeats of a healthy watcher).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub max_age: Duration,
}

/// The outcome of [`judge`]: whether the watcher counts as alive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The last heartbeat is `age` old, within the bound.
    Alive {
        /// How old the last heartbeat is (zero when it lies in the future: the clock stepped
        /// back, and the next heartbeat uses the new clock).
        age: Duration,
    },
    /// The last heartbeat is `age` old, more than `max_age`.
    Stale {
        /// How old the last heartbeat is.
        age: Duration,
        /// The bound it exceeds.
        max_age: Duration,
    },
    /// There is no heartbeat file: the watcher has not made progress since it started (or runs
    /// without `--heartbeat-file`).
    Missing,
    /// The file exists but does not hold a time (`reason` says why).
    Unreadable {
        /// What went wrong reading or parsing it.
        reason: String,
    },
}

impl Verdict {
    /// True for [`Verdict::Alive`].
    pub fn is_alive(&self) -> bool {
        matches!(self, Verdict::Alive { .. })
    }
}

/// Decides from the time of the last heartbeat (`None`: no heartbeat file) whether the watcher
/// is alive at `now`: alive when the heartbeat is at most `max_age` old. A heartbeat from the
/// future counts as fresh.
pub fn judge(last: Option<SystemTime>, now: SystemTime, max_age: Duration) -> Verdict {
    let Some(last) = last else {
        return Verdict::Missing;
    };
    let age = now.duration_since(last).unwrap_or(Duration::ZERO);
    if age > max_age {
        Verdict::Stale { age, max_age }
    } else {
        Verdict::Alive { age }
    }
}

/// The heartbeat file's line for `at`.
pub fn render(at: SystemTime) -> String {
    format!("{}\n", humantime::format_rfc3339_millis(at))
}

/// The time in a heartbeat file's text.
pub fn parse(text: &str) -> Result<SystemTime, String> {
    let line = text.trim();
    humantime::parse_rfc3339(line)
        .map_err(|err| format!("{line:?} is not an RFC 3339 time ({err})"))
}

/// Reads the heartbeat file at `path` and judges it at `now`.
pub fn check(path: &Path, now: SystemTime, max_age: Duration) -> Verdict {
    match std::fs::read_to_string(path) {
        Ok(text) => match parse(&text) {
            Ok(last) => judge(Some(last), now, max_age),
            Err(reason) => Verdict::Unreadable { reason },
        },
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => judge(None, now, max_age),
        Err(err) => Verdict::Unreadable {
            reason: err.to_string(),
        },
    }
}

/// Prints what `watch-alive` says about one verdict.
struct Report<'a> {
    path: &'a Path,
    verdict: &'a Verdict,
}

impl fmt::Display for Report<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = self.path.display();
        let round = |d: &Duration| Duration::from_millis(d.as_millis() as u64);
        match self.verdict {
            Verdict::Alive { age } => write!(
                f,
                "alive: kilo-egress watch made progress {} ago ({path})",
                humantime::format_duration(round(age))
            ),
            Verdict::Stale { age, max_age } => write!(
                f,
                "stuck: kilo-egress watch made no progress for {} (more than --max-age {}): \
                 no Node watch event handled and no round-trip with kilo-egressd succeeded since \
                 its last heartbeat ({path}); see its log",
                humantime::format_duration(round(age)),
                humantime::format_duration(*max_age)
            ),
            Verdict::Missing => write!(
                f,
                "no heartbeat at {path}: kilo-egress watch has not made progress since it started \
                 (kilo-egressd unreachable?), or it runs without --heartbeat-file {path}"
            ),
            Verdict::Unreadable { reason } => {
                write!(f, "cannot read the heartbeat file {path}: {reason}")
            }
        }
    }
}

/// `kilo-egress watch-alive`: exit 0 when the heartbeat is fresh, 1 otherwise, with one line
/// saying why (stdout when alive, stderr when not).
pub fn alive(args: &AliveArgs) -> ExitCode {
    let verdict = check(&args.heartbeat_file, SystemTime::now(), args.max_age);
    let report = Report {
        path: &args.heartbeat_file,
        verdict: &verdict,
    };
    if verdict.is_alive() {
        println!("{report}");
        ExitCode::SUCCESS
    } else {
        eprintln!("kilo-egress watch-alive: {report}");
        ExitCode::from(1)
    }
}

/// The writer side, held by the watch loop.
#[derive(Debug)]
pub struct Heartbeat {
    path: Option<PathBuf>,
    last: Option<SystemTime>,
    failing: bool,
}

impl Heartbeat {
    /// A heartbeat written to `path`; `None` writes nothing.
    pub fn new(path: Option<PathBuf>) -> Heartbeat {
        Heartbeat {
            path,
            last: None,
            failing: false,
        }
    }

    /// Records progress at `now`: rewrites the file unless it was written less than
    /// [`MIN_BEAT_INTERVAL`] ago. A failure to write is logged (once until it works again),
    /// never fatal: the probe then reports the watcher as stuck, which the log explains.
    pub fn beat(&mut self, now: SystemTime) {
        let Some(path) = &self.path else {
            return;
        };
        // Skipped only within a second after the last write; a clock that stepped back writes.
        if self.last.is_some_and(|last| {
            now.duration_since(last)
                .is_ok_and(|since| since < MIN_BEAT_INTERVAL)
        }) {
            return;
        }
        match write_atomically(path, &render(now)) {
            Ok(()) => {
                if self.failing {
                    info!(path = %path.display(), "heartbeat file written again");
                }
                self.failing = false;
                self.last = Some(now);
            }
            Err(err) => {
                if !self.failing {
                    warn!(path = %path.display(), error = %err, "cannot write the heartbeat file: the liveness probe will fail");
                }
                self.failing = true;
            }
        }
    }
}

/// Writes `text` to `path` through a temporary file beside it and a rename.
fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: Duration = Duration::from_secs(60);

    /// A directory of its own under the system's temporary directory, removed when dropped.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            let dir = std::env::temp_dir().join(format!(
                "kilo-egress-heartbeat-{}-{name}",
                std::process::id()
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
        fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + secs)
    }

    #[test]
    fn a_heartbeat_is_alive_up_to_max_age_and_stale_after() {
        assert_eq!(
            judge(Some(at(0)), at(0), MAX),
            Verdict::Alive {
                age: Duration::ZERO
            }
        );
        assert!(
            judge(Some(at(0)), at(60), MAX).is_alive(),
            "exactly max-age"
        );
        assert_eq!(
            judge(Some(at(0)), at(61), MAX),
            Verdict::Stale {
                age: Duration::from_secs(61),
                max_age: MAX
            }
        );
    }

    #[test]
    fn no_heartbeat_is_not_alive_and_a_future_one_is() {
        assert_eq!(judge(None, at(0), MAX), Verdict::Missing);
        assert_eq!(
            judge(Some(at(30)), at(0), MAX),
            Verdict::Alive {
                age: Duration::ZERO
            },
            "the clock stepped back"
        );
    }

    #[test]
    fn the_file_round_trips_and_garbage_is_unreadable() {
        let now = at(12) + Duration::from_millis(345);
        assert_eq!(parse(&render(now)).unwrap(), now);
        assert!(render(now).ends_with("Z\n"), "{}", render(now));
        assert!(parse("yesterday").is_err());
        let dir = TempDir::new("check");
        let path = dir.path().join("heartbeat");
        assert_eq!(check(&path, now, MAX), Verdict::Missing);
        std::fs::write(&path, "garbage").unwrap();
        assert!(matches!(check(&path, now, MAX), Verdict::Unreadable { .. }));
    }

    #[test]
    fn the_writer_rewrites_at_most_once_a_second_and_the_check_reads_it() {
        let dir = TempDir::new("writer");
        let path = dir.path().join("heartbeat");
        let mut heartbeat = Heartbeat::new(Some(path.clone()));
        heartbeat.beat(at(0));
        assert_eq!(
            parse(&std::fs::read_to_string(&path).unwrap()).unwrap(),
            at(0)
        );
        heartbeat.beat(at(0) + Duration::from_millis(500));
        assert_eq!(
            parse(&std::fs::read_to_string(&path).unwrap()).unwrap(),
            at(0),
            "not rewritten within a second"
        );
        // The clock stepped back an hour: written at once, not an hour later.
        heartbeat.beat(at(0) - Duration::from_secs(3600));
        assert_eq!(
            parse(&std::fs::read_to_string(&path).unwrap()).unwrap(),
            at(0) - Duration::from_secs(3600)
        );
        heartbeat.beat(at(2));
        assert!(check(&path, at(62), MAX).is_alive());
        assert!(!check(&path, at(63), MAX).is_alive());
        assert!(!dir.path().join("heartbeat.tmp").exists());
        // Unwritable: logged, not fatal, and the old heartbeat ages.
        let mut nowhere = Heartbeat::new(Some(dir.path().join("missing/heartbeat")));
        nowhere.beat(at(3));
        assert!(nowhere.failing);
        Heartbeat::new(None).beat(at(4));
    }

    #[test]
    fn reports_say_what_to_look_at() {
        let path = Path::new("/run/kilo-egress-watch/heartbeat");
        let stale = Verdict::Stale {
            age: Duration::from_millis(61_234),
            max_age: MAX,
        };
        let text = Report {
            path,
            verdict: &stale,
        }
        .to_string();
        assert!(text.starts_with("stuck: "), "{text}");
        assert!(
            text.contains("1m 1s 234ms") && text.contains("--max-age 1m"),
            "{text}"
        );
        let missing = Report {
            path,
            verdict: &Verdict::Missing,
        }
        .to_string();
        assert!(
            missing.contains("no heartbeat at /run/kilo-egress-watch/heartbeat"),
            "{missing}"
        );
    }
}
