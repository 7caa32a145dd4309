#!/usr/bin/env python3
"""Set the egress address pair on several kilo-egressd nodes over mutual TLS, check each one
with GetRules, and report per node.

    python3 set_egress.py --ca ca.pem --cert ops.pem --key ops-key.pem \\
        --egress 198.51.100.20 --egress 2001:db8::20 node-a:7443 node-b:7443

An empty --egress list (give `--clear`) returns the nodes to MASQUERADE. The gRPC stubs are
generated from the repository's proto/ directory (or --proto-dir) with grpcio-tools at start,
so the script always matches the API it ships with. Needs: pip install grpcio grpcio-tools.

Exit status: 0 when every node took and reports the pair, 1 when any node failed, 2 for bad
arguments. With --json each node's result is printed as one JSON object per line.
"""

import argparse
import atexit
import importlib
import json
import os
import shutil
import sys
import tempfile

import grpc

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_PROTO_DIR = os.path.normpath(os.path.join(HERE, "..", "..", "proto"))
PROTO = "kilo/egress/v1/egress.proto"


def load_stubs(proto_dir):
    """Compiles PROTO from proto_dir into a temporary directory and imports the modules."""
    from grpc_tools import protoc
    import grpc_tools

    out = tempfile.mkdtemp(prefix="kilo-egress-stubs-")
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    rc = protoc.main([
        "grpc_tools.protoc",
        f"-I{proto_dir}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        os.path.join(proto_dir, PROTO),
    ])
    if rc != 0:
        sys.exit(f"set_egress.py: cannot compile {os.path.join(proto_dir, PROTO)} (protoc exit {rc})")
    sys.path.insert(0, out)
    pb2 = importlib.import_module("kilo.egress.v1.egress_pb2")
    pb2_grpc = importlib.import_module("kilo.egress.v1.egress_pb2_grpc")
    return pb2, pb2_grpc


def read(path, flag):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        sys.stderr.write(f"set_egress.py: cannot read {flag} {path}: {e.strerror}\n")
        sys.exit(2)


def set_node(pb2, pb2_grpc, node, credentials, args):
    """Sets the pair on one node and reads it back. Returns a result dict."""
    result = {"node": node, "ok": False}
    options = []
    if args.server_name:
        options.append(("grpc.ssl_target_name_override", args.server_name))
    try:
        with grpc.secure_channel(node, credentials, options=options) as channel:
            stub = pb2_grpc.EgressServiceStub(channel)
            reply = stub.SetEgress(
                pb2.SetEgressRequest(egress_ips=args.egress), timeout=args.timeout
            )
            rules = stub.GetRules(pb2.GetRulesRequest(), timeout=args.timeout)
    except grpc.RpcError as e:
        result["error"] = f"{e.code().name}: {e.details()}"
        return result
    result.update(
        ipv4=rules.egress.ipv4,
        ipv6=rules.egress.ipv6,
        generation=rules.generation,
        in_sync=rules.in_sync,
        warnings=list(reply.warnings),
    )
    if (rules.egress.ipv4, rules.egress.ipv6) != (reply.egress.ipv4, reply.egress.ipv6):
        result["error"] = (
            f"GetRules reports ipv4={rules.egress.ipv4 or 'MASQUERADE'} "
            f"ipv6={rules.egress.ipv6 or 'MASQUERADE'}, not the pair just set"
        )
    elif not rules.in_sync:
        result["error"] = f"the rules are not in sync: {rules.last_error or 'see GetRules'}"
    else:
        result["ok"] = True
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("nodes", nargs="+", metavar="HOST:PORT", help="kilo-egressd TLS listeners")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--egress", action="append", metavar="ADDR",
                       help="an egress address (one IPv4 and/or one IPv6; repeat)")
    group.add_argument("--clear", action="store_true", help="return to MASQUERADE")
    parser.add_argument("--ca", required=True, help="CA certificate that signed the servers' certificates")
    parser.add_argument("--cert", required=True, help="this client's certificate (a --writer identity)")
    parser.add_argument("--key", required=True, help="this client's private key")
    parser.add_argument("--server-name", help="expected name in the servers' certificates, if not the HOST")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per call (default 10)")
    parser.add_argument("--proto-dir", default=DEFAULT_PROTO_DIR, help="directory holding kilo/egress/v1/egress.proto")
    parser.add_argument("--json", action="store_true", help="one JSON object per node on stdout")
    args = parser.parse_args()
    if args.clear:
        args.egress = []

    pb2, pb2_grpc = load_stubs(args.proto_dir)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=read(args.ca, "--ca"),
        private_key=read(args.key, "--key"),
        certificate_chain=read(args.cert, "--cert"),
    )
    failed = 0
    for node in args.nodes:
        result = set_node(pb2, pb2_grpc, node, credentials, args)
        failed += not result["ok"]
        if args.json:
            print(json.dumps(result), flush=True)
        elif result["ok"]:
            print(f"{node}: OK ipv4={result['ipv4'] or 'MASQUERADE'} "
                  f"ipv6={result['ipv6'] or 'MASQUERADE'} generation={result['generation']}", flush=True)
        else:
            print(f"{node}: FAILED {result['error']}", flush=True)
    if not args.json:
        print(f"{len(args.nodes) - failed} of {len(args.nodes)} node(s) OK")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
