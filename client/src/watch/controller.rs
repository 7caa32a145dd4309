//! The watcher's controller: turns each observation of its Node into at most one call to
//! kilo-egressd, and reports the outcome as Events on the Node. Level-triggered: the annotation
//! is compared with what kilo-egressd reports (GetRules), never with what was sent last.

use super::decide::{Action, decide, describe, request_entries};
use super::egress::EgressServer;
use super::metrics::WatchMetrics;
use crate::ClientError;
use k8s_openapi::api::core::v1::{Node, ObjectReference};
use kilo_egress_api::egress::{EgressAddrs, Family};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Client, Resource};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use tracing::{info, warn};

/// The reason of the Normal Event posted when a new pair was programmed.
pub const REASON_APPLIED: &str = "EgressApplied";
/// The reason of the Warning Event posted for an invalid annotation.
pub const REASON_INVALID: &str = "InvalidEgressIP";
/// The reason of the Warning Event posted when a chosen address is not on the node.
pub const REASON_ADDRESS_ABSENT: &str = "EgressAddressAbsent";
/// The reason of the Normal Event posted when a chosen address is on the node again.
pub const REASON_ADDRESS_PRESENT: &str = "EgressAddressPresent";
/// The `reportingController` of the Events.
pub const REPORTING_CONTROLLER: &str = "kilo-egress-watch";
/// How many distinct Event messages keep their own series before the cache starts over.
const MAX_EVENT_SERIES: usize = 64;

/// What one reconcile did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The annotation value is the one handled last and nothing failed since: no call at all
    /// (the Node changes every few seconds for status heartbeats).
    Unchanged,
    /// kilo-egressd already programs what the annotation says.
    InSync,
    /// SetEgress was called with this pair, described for people.
    Applied(String),
    /// The annotation is invalid (the message says why); what is programmed stays.
    Invalid(String),
}

/// Reconciles one Node's annotation with kilo-egressd.
pub struct Controller<E> {
    egress: E,
    client: Client,
    annotation: String,
    reporter: Reporter,
    /// One recorder per distinct event (reason + note): kube's recorder folds repeats of an
    /// event into a series (PATCH), and must never fold a new pair into an old pair's event.
    recorders: HashMap<(String, String), Recorder>,
    /// The annotation value (`None`: absent) last handled without error.
    handled: Option<Option<String>>,
    /// The invalid value last reported with a Warning Event.
    warned: Option<String>,
    /// The chosen addresses last reported as not on the node, per family.
    absent: BTreeMap<Family, String>,
    /// Where SetEgress calls and invalid annotations are counted.
    metrics: Arc<WatchMetrics>,
}

impl<E: EgressServer> Controller<E> {
    /// A controller for the annotation key `annotation` that programs `egress` and posts
    /// Events through `client` as instance `instance` (the node name).
    pub fn new(egress: E, client: Client, annotation: &str, instance: &str) -> Self {
        Controller {
            egress,
            client,
            annotation: annotation.to_string(),
            reporter: Reporter {
                controller: REPORTING_CONTROLLER.to_string(),
                instance: Some(instance.to_string()),
            },
            recorders: HashMap::new(),
            handled: None,
            warned: None,
            absent: BTreeMap::new(),
            metrics: Arc::default(),
        }
    }

    /// The same controller, counting into `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<WatchMetrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// The annotation's value on `node`.
    pub fn value_of(&self, node: &Node) -> Option<String> {
        node.metadata
            .annotations
            .as_ref()
            .and_then(|annotations| annotations.get(&self.annotation))
            .cloned()
    }

    /// Handles a watch event for `node`: nothing when the annotation is the value handled last,
    /// otherwise [`Controller::reconcile`].
    pub async fn observe(&mut self, node: &Node) -> Result<Outcome, ClientError> {
        if self.handled.as_ref() == Some(&self.value_of(node)) {
            return Ok(Outcome::Unchanged);
        }
        self.reconcile(node).await
    }

    /// Compares the annotation with what kilo-egressd programs and acts: SetEgress when they
    /// differ, a Warning Event when the annotation is invalid, nothing when they agree. On error
    /// the value counts as not handled, so the next observation tries again.
    pub async fn reconcile(&mut self, node: &Node) -> Result<Outcome, ClientError> {
        let value = self.value_of(node);
        self.handled = None;
        let current = self.egress.current().await?;
        let outcome = match decide(value.as_deref(), &current) {
            Action::InSync => {
                self.report_absence(node, &current).await;
                Outcome::InSync
            }
            Action::Apply(parsed) => {
                for warning in parsed.warnings() {
                    warn!(annotation = %self.annotation, "{warning}");
                }
                let pair = describe(&parsed.addrs);
                let applied = self.egress.apply(request_entries(&parsed.addrs)).await;
                self.metrics.set_egress(applied.is_ok());
                applied?;
                info!(old = %describe(&current), new = %pair, "egress applied");
                let note = format!("kilo-egressd now SNATs pod egress to {pair}");
                self.publish(node, EventType::Normal, REASON_APPLIED, note)
                    .await;
                self.report_absence(node, &parsed.addrs).await;
                Outcome::Applied(pair)
            }
            Action::Reject(invalid) => {
                let value = value.clone().unwrap_or_default();
                let note = format!(
                    "annotation {}={value:?} is invalid: {invalid}; still programmed: {}",
                    self.annotation,
                    describe(&current)
                );
                warn!("{note}");
                self.metrics
                    .invalid_annotation(self.warned.as_ref() != Some(&value));
                if self.warned.as_ref() != Some(&value) {
                    self.publish(node, EventType::Warning, REASON_INVALID, note.clone())
                        .await;
                    self.warned = Some(value);
                }
                Outcome::Invalid(note)
            }
        };
        if !matches!(outcome, Outcome::Invalid(_)) {
            self.warned = None;
        }
        self.handled = Some(value);
        Ok(outcome)
    }

    /// One round-trip with kilo-egressd (GetRules), to prove the link when there is no Node to
    /// reconcile.
    pub async fn ping(&mut self) -> Result<(), ClientError> {
        self.egress.current().await.map(drop)
    }

    /// Posts a Warning Event for each chosen address kilo-egressd newly reports as not on the
    /// node, and a Normal one for each that is back, comparing with the last report.
    async fn report_absence(&mut self, node: &Node, chosen: &EgressAddrs) {
        let now = self.egress.absent();
        for (family, note) in &now {
            if self.absent.get(family) != Some(note) {
                let note = format!("{family} egress address {note}");
                warn!("{note}");
                self.publish(node, EventType::Warning, REASON_ADDRESS_ABSENT, note)
                    .await;
            }
        }
        let before: Vec<Family> = self.absent.keys().copied().collect();
        for family in before {
            if let (false, Some(addr)) = (now.contains_key(&family), chosen.get(family)) {
                let note = format!(
                    "{family} egress address {addr} is on the node again: kilo-egressd SNATs pod egress to it"
                );
                info!("{note}");
                self.publish(node, EventType::Normal, REASON_ADDRESS_PRESENT, note)
                    .await;
            }
        }
        self.absent = now;
    }

    /// Posts an Event on `node`; a failure is logged, never fatal (the rules matter more).
    async fn publish(&mut self, node: &Node, type_: EventType, reason: &str, note: String) {
        let reference: ObjectReference = node.object_ref(&());
        if self.recorders.len() >= MAX_EVENT_SERIES {
            self.recorders.clear();
        }
        let recorder = self
            .recorders
            .entry((reason.to_string(), note.clone()))
            .or_insert_with(|| Recorder::new(self.client.clone(), self.reporter.clone()));
        let event = Event {
            type_,
            reason: reason.to_string(),
            note: Some(note),
            action: "SetEgress".to_string(),
            secondary: None,
        };
        if let Err(error) = recorder.publish(&event, &reference).await {
            warn!(reason, %error, "could not post the Event on the Node (is events.k8s.io create/patch granted?)");
        }
    }
}

#[cfg(test)]
mod tests {
    //! The controller against kube-rs's mocked client (tower-test): each test scripts the API
    //! server's side: it records every request, so a test sees each Event posted and any other call.
    use super::*;
    use http::{Request, Response};
    use kilo_egress_api::egress::EgressAddrs;
    use kube::client::Body;
    use serde_json::{Value, json};
    use std::sync::{Arc, Mutex};
    use tower_test::mock;

    /// kilo-egressd as the controller sees it: a pair, a log of calls, optionally failing.
    #[derive(Clone, Default)]
    struct FakeEgress {
        state: Arc<Mutex<FakeState>>,
    }

    #[derive(Default)]
    struct FakeState {
        current: EgressAddrs,
        gets: usize,
        sets: Vec<Vec<String>>,
        down: bool,
        absent: BTreeMap<Family, String>,
    }

    impl FakeEgress {
        fn with(f: impl FnOnce(&mut FakeState)) -> FakeEgress {
            let fake = FakeEgress::default();
            f(&mut fake.state.lock().unwrap());
            fake
        }
        fn sets(&self) -> Vec<Vec<String>> {
            self.state.lock().unwrap().sets.clone()
        }
        fn gets(&self) -> usize {
            self.state.lock().unwrap().gets
        }
    }

    fn unreachable_error() -> ClientError {
        ClientError::Connect {
            addr: crate::ServerAddr::default(),
            reason: "connection refused".into(),
        }
    }

    impl EgressServer for FakeEgress {
        async fn current(&mut self) -> Result<EgressAddrs, ClientError> {
            let mut state = self.state.lock().unwrap();
            if state.down {
                return Err(unreachable_error());
            }
            state.gets += 1;
            Ok(state.current)
        }
        async fn apply(&mut self, entries: Vec<String>) -> Result<(), ClientError> {
            let mut state = self.state.lock().unwrap();
            if state.down {
                return Err(unreachable_error());
            }
            state.current = kilo_egress_api::egress::parse_egress_list(&entries)?.addrs;
            state.sets.push(entries);
            Ok(())
        }
        fn absent(&self) -> BTreeMap<Family, String> {
            self.state.lock().unwrap().absent.clone()
        }
    }

    fn node(annotation: Option<&str>, heartbeat: &str) -> Node {
        let mut value = json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": "node-a", "uid": "uid-a", "resourceVersion": heartbeat},
            "status": {"conditions": [{"type": "Ready", "status": "True", "lastHeartbeatTime": "2026-11-24T20:00:00Z", "reason": heartbeat}]},
        });
        if let Some(annotation) = annotation {
            value["metadata"]["annotations"] = json!({ "kilo.squat.ai/egress-ip": annotation });
        }
        serde_json::from_value(value).unwrap()
    }

    /// What the mocked API server was asked: method, path and the JSON body.
    #[derive(Debug)]
    struct Served {
        method: http::Method,
        path: String,
        body: Value,
    }

    /// A client whose API server answers every request by echoing its body, recording it; the
    /// task ends, returning the record, once every clone of the client is dropped.
    fn mocked() -> (Client, tokio::task::JoinHandle<Vec<Served>>) {
        let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
        let server = tokio::spawn(async move {
            let mut served = Vec::new();
            while let Some((request, send)) = handle.next_request().await {
                let method = request.method().clone();
                let path = request.uri().path().to_string();
                let body = request.into_body().collect_bytes().await.unwrap();
                send.send_response(Response::builder().body(Body::from(body.to_vec())).unwrap());
                served.push(Served {
                    method,
                    path,
                    body: serde_json::from_slice(&body).unwrap_or(Value::Null),
                });
            }
            served
        });
        (Client::new(service, "default"), server)
    }

    /// Drops the controller (and so every client) and returns the Events it created; fails on
    /// any other request.
    async fn events_created<E>(
        controller: Controller<E>,
        server: tokio::task::JoinHandle<Vec<Served>>,
    ) -> Vec<Value> {
        drop(controller);
        let served = server.await.unwrap();
        served
            .into_iter()
            .map(|s| {
                assert_eq!(
                    (&s.method, s.path.as_str()),
                    (
                        &http::Method::POST,
                        "/apis/events.k8s.io/v1/namespaces/default/events"
                    ),
                    "unexpected request {s:?}"
                );
                s.body
            })
            .collect()
    }

    fn controller(egress: FakeEgress, client: Client) -> Controller<FakeEgress> {
        Controller::new(egress, client, "kilo.squat.ai/egress-ip", "node-a")
    }

    #[tokio::test]
    async fn an_absent_address_posts_one_warning_and_a_normal_event_when_back() {
        let egress = FakeEgress::with(|s| {
            s.current = kilo_egress_api::egress::parse_egress_list(&["198.51.100.20"])
                .unwrap()
                .addrs;
            s.absent.insert(
                Family::Ipv4,
                "198.51.100.20 is not assigned to any interface: MASQUERADE until it is usable"
                    .into(),
            );
        });
        let (client, server) = mocked();
        let mut c = controller(egress.clone(), client);
        let seen = node(Some("198.51.100.20"), "1");
        assert_eq!(c.reconcile(&seen).await.unwrap(), Outcome::InSync);
        // A resync while it is still absent: no second Event.
        assert_eq!(c.reconcile(&seen).await.unwrap(), Outcome::InSync);
        egress.state.lock().unwrap().absent.clear();
        assert_eq!(c.reconcile(&seen).await.unwrap(), Outcome::InSync);
        c.reconcile(&seen).await.unwrap();
        let events = events_created(c, server).await;
        assert_eq!(events.len(), 2, "{events:#?}");
        assert_eq!(events[0]["type"], "Warning");
        assert_eq!(events[0]["reason"], REASON_ADDRESS_ABSENT);
        assert_eq!(
            events[0]["note"],
            "IPv4 egress address 198.51.100.20 is not assigned to any interface: MASQUERADE until it is usable"
        );
        assert_eq!(events[1]["type"], "Normal");
        assert_eq!(events[1]["reason"], REASON_ADDRESS_PRESENT);
        assert!(
            events[1]["note"]
                .as_str()
                .unwrap()
                .contains("198.51.100.20 is on the node again"),
            "{events:#?}"
        );
    }

    #[tokio::test]
    async fn change_calls_set_egress_once_and_posts_one_normal_event() {
        let egress = FakeEgress::default();
        let (client, server) = mocked();
        let mut c = controller(egress.clone(), client);
        let outcome = c
            .observe(&node(Some("2001:db8::20, 198.51.100.20"), "1"))
            .await
            .unwrap();
        assert_eq!(
            outcome,
            Outcome::Applied("198.51.100.20, 2001:db8::20".into())
        );
        let again = c
            .observe(&node(Some("2001:db8::20, 198.51.100.20"), "2"))
            .await
            .unwrap();
        assert_eq!(again, Outcome::Unchanged);
        let events = events_created(c, server).await;
        assert_eq!(events.len(), 1, "one Event per change: {events:?}");
        let event = &events[0];
        assert_eq!(event["type"], "Normal");
        assert_eq!(event["reason"], REASON_APPLIED);
        assert_eq!(event["regarding"]["kind"], "Node");
        assert_eq!(event["regarding"]["name"], "node-a");
        assert_eq!(event["reportingController"], REPORTING_CONTROLLER);
        let note = event["note"].as_str().unwrap();
        assert!(note.contains("198.51.100.20, 2001:db8::20"), "{note}");
        assert_eq!(
            egress.sets(),
            [vec![
                "198.51.100.20".to_string(),
                "2001:db8::20".to_string()
            ]]
        );
    }

    #[tokio::test]
    async fn heartbeats_make_no_call_at_all() {
        let egress = FakeEgress::with(|s| s.current.ipv4 = Some("198.51.100.20".parse().unwrap()));
        let (client, server) = mocked();
        let mut c = controller(egress.clone(), client);
        // First sight: one GetRules, already in sync, no SetEgress, no Event.
        let first = c.observe(&node(Some("198.51.100.20"), "1")).await.unwrap();
        assert_eq!(first, Outcome::InSync);
        for beat in ["2", "3", "4"] {
            let outcome = c.observe(&node(Some("198.51.100.20"), beat)).await.unwrap();
            assert_eq!(outcome, Outcome::Unchanged, "heartbeat {beat}");
        }
        assert_eq!(egress.gets(), 1, "only the first sight reads kilo-egressd");
        assert!(egress.sets().is_empty());
        assert!(events_created(c, server).await.is_empty(), "no Event");
    }

    #[tokio::test]
    async fn removal_clears_and_says_masquerade() {
        let egress = FakeEgress::with(|s| s.current.ipv4 = Some("198.51.100.20".parse().unwrap()));
        let (client, server) = mocked();
        let mut c = controller(egress.clone(), client);
        let outcome = c.observe(&node(None, "1")).await.unwrap();
        assert_eq!(outcome, Outcome::Applied("none (MASQUERADE)".into()));
        assert_eq!(egress.sets(), [Vec::<String>::new()]);
        let events = events_created(c, server).await;
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!(events[0]["reason"], REASON_APPLIED);
        assert!(events[0]["note"].as_str().unwrap().contains("MASQUERADE"));
    }

    #[tokio::test]
    async fn invalid_value_warns_once_and_keeps_the_programmed_pair() {
        let egress = FakeEgress::with(|s| s.current.ipv4 = Some("198.51.100.20".parse().unwrap()));
        let (client, server) = mocked();
        let mut c = controller(egress.clone(), client);
        let bad = node(Some("198.51.100.20,2001:db8::/64"), "1");
        let outcome = c.observe(&bad).await.unwrap();
        assert!(matches!(outcome, Outcome::Invalid(_)), "{outcome:?}");
        // Heartbeats and resyncs of the same bad value: no second Event, never a SetEgress.
        assert_eq!(
            c.observe(&node(Some("198.51.100.20,2001:db8::/64"), "2"))
                .await
                .unwrap(),
            Outcome::Unchanged
        );
        assert!(matches!(
            c.reconcile(&bad).await.unwrap(),
            Outcome::Invalid(_)
        ));
        assert!(egress.sets().is_empty(), "the last good pair stays");
        let events = events_created(c, server).await;
        assert_eq!(events.len(), 1, "one Warning per bad value: {events:?}");
        let event = &events[0];
        assert_eq!(event["type"], "Warning");
        assert_eq!(event["reason"], REASON_INVALID);
        let note = event["note"].as_str().unwrap();
        assert!(
            note.contains("#2 \"2001:db8::/64\""),
            "names the entry: {note}"
        );
        assert!(
            note.contains("is a prefix, not an address"),
            "names the rule: {note}"
        );
        assert!(note.contains("still programmed: 198.51.100.20"), "{note}");
    }

    #[tokio::test]
    async fn unreachable_kilo_egressd_is_retried_and_the_change_not_lost() {
        let egress = FakeEgress::with(|s| s.down = true);
        let (client, server) = mocked();
        let mut c = controller(egress.clone(), client);
        let wanted = node(Some("198.51.100.20"), "1");
        assert!(c.observe(&wanted).await.is_err());
        // The same value seen again is not "unchanged": it was never applied.
        assert!(c.observe(&node(Some("198.51.100.20"), "2")).await.is_err());
        egress.state.lock().unwrap().down = false;
        let outcome = c.reconcile(&wanted).await.unwrap();
        assert_eq!(outcome, Outcome::Applied("198.51.100.20".into()));
        assert_eq!(egress.sets(), [vec!["198.51.100.20".to_string()]]);
        assert_eq!(events_created(c, server).await.len(), 1);
    }

    #[tokio::test]
    async fn state_lost_by_kilo_egressd_is_reasserted_on_resync() {
        let egress = FakeEgress::with(|s| s.current.ipv4 = Some("198.51.100.20".parse().unwrap()));
        let (client, server) = mocked();
        let mut c = controller(egress.clone(), client);
        let wanted = node(Some("198.51.100.20"), "1");
        assert_eq!(c.observe(&wanted).await.unwrap(), Outcome::InSync);
        // kilo-egressd was cleaned up and restarted: MASQUERADE.
        egress.state.lock().unwrap().current = EgressAddrs::NONE;
        let outcome = c.reconcile(&wanted).await.unwrap();
        assert_eq!(outcome, Outcome::Applied("198.51.100.20".into()));
        assert_eq!(egress.sets(), [vec!["198.51.100.20".to_string()]]);
        let events = events_created(c, server).await;
        assert_eq!(events.len(), 1, "{events:?}");
    }
}
