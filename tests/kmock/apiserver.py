#!/usr/bin/env python3
"""A small Kubernetes API server for the watcher's tests and for Kilo's agent (kg): kmock's
KubernetesEmulator (PyPI `kmock`), extended so kube-rs's watcher and client-go's informers work against
it, plus a client for the tests to drive it.

    apiserver.py serve --port PORT            serve until SIGTERM; prints "listening on http://..."
    apiserver.py --server URL create-node [--pod-cidr CIDR] NAME [KEY=VALUE ...]
                                              a Node with these annotations (and spec.podCIDR)
    apiserver.py --server URL annotate NAME KEY=VALUE | KEY-       set or remove one annotation
    apiserver.py --server URL heartbeat NAME  change the Node's status only (as the kubelet does)
    apiserver.py --server URL events          print the events.k8s.io Events as one JSON list
    apiserver.py --server URL expire-watches  end every open watch with a 410 Gone ERROR event
    apiserver.py --server URL drop-watches    close every open watch stream without an event
    apiserver.py --server URL requests        print the requests served so far, one per line
    apiserver.py --server URL node NAME       print the Node as JSON
    apiserver.py --server URL timeline        print, as one JSON list, every Node write received and
                                              every Node watch event sent: {"time": UNIX SECONDS,
                                              "what": "write"|"event", "egress": the egress annotation}
    apiserver.py --server URL create-peer NAME --allowed-ip CIDR [--allowed-ip CIDR ...]
                                              a Kilo Peer (kilo.squat.ai/v1alpha1) with a random key
    apiserver.py --server URL delete-peer NAME
    apiserver.py --server URL peers           print the names of the Kilo Peers, one per line

What kmock lacks and this adds (see shared/NOTES.md):
  * metadata.resourceVersion on every create and update (kube-rs's watcher needs it);
  * list and watch filtered by fieldSelector `metadata.name=X` (the watcher's only selector);
  * groupVersion `v1` for /api/v1 discovery;
  * a list resourceVersion, and the control endpoints under /_control/ used above;
  * a timeline of Node writes and watch events (egress-bench's watch phase times the watcher by it);
  * for kg (client-go): the CRD peers.kilo.squat.ai (apiextensions.k8s.io/v1), the cluster-scoped
    resource kilo.squat.ai/v1alpha1 peers, watch responses with Content-Type application/json (client-go
    refuses kmock's application/octet-stream), and a new resourceVersion on JSON patches too. kg also
    needs spec.podCIDR and at least one annotation on its Node, and the environment
    KUBE_FEATURE_WatchListClient=false (this emulator sends no bookmarks): see tests/src/realkg.rs.
Its watch re-sends every object as ADDED when it starts, like a re-list: the watcher must be
idempotent.
"""
import argparse
import asyncio
import base64
import datetime
import itertools
import json
import os
import signal
import sys
import time
import urllib.error
import urllib.request

EXPIRE = {'type': '_KMOCK_EXPIRE'}
EGRESS_ANNOTATION = 'kilo.squat.ai/egress-ip'
PEERS = 'kilo.squat.ai/v1alpha1/peers'
CRDS = 'apiextensions.k8s.io/v1/customresourcedefinitions'
PEER_CRD = {
    'apiVersion': 'apiextensions.k8s.io/v1', 'kind': 'CustomResourceDefinition',
    'metadata': {'name': 'peers.kilo.squat.ai', 'resourceVersion': '0', 'uid': 'uid-peers-crd'},
    'spec': {
        'group': 'kilo.squat.ai', 'scope': 'Cluster',
        'names': {'kind': 'Peer', 'listKind': 'PeerList', 'plural': 'peers', 'singular': 'peer'},
        'versions': [{'name': 'v1alpha1', 'served': True, 'storage': True,
                      'schema': {'openAPIV3Schema': {'type': 'object', 'x-kubernetes-preserve-unknown-fields': True}}}],
    },
}
DROP = {'type': '_KMOCK_DROP'}


def build_emulator():
    import aiohttp.web
    import kmock

    class Emulator(kmock.KubernetesEmulator):
        """KubernetesEmulator with resource versions, field selectors and control endpoints."""

        def __attrs_post_init__(self):
            super().__attrs_post_init__()
            self.rv_counter = itertools.count(1)
            self.rv = 0
            self.timeline = []

        def _next_rv(self):
            self.rv = next(self.rv_counter)
            return str(self.rv)

        async def _handle(self, request):
            if request.url.path.startswith('/_control/'):
                return await self._control(request)
            if request.action == kmock.action.UPDATE and request.url.path.startswith('/api/v1/nodes/'):
                egress = None
                if isinstance(request.data, dict):
                    egress = ((request.data.get('metadata') or {}).get('annotations') or {}).get(EGRESS_ANNOTATION)
                self.timeline.append({'time': time.time(), 'what': 'write', 'egress': egress})
            if request.action == kmock.action.UPDATE and isinstance(request.data, list):
                # A JSON patch (kg's clean-up removes its annotations so): add a new version too.
                request.data.append({'op': 'add', 'path': '/metadata/resourceVersion', 'value': self._next_rv()})
            if request.action in (kmock.action.CREATE, kmock.action.UPDATE) and isinstance(request.data, dict):
                request.data.setdefault('metadata', {})['resourceVersion'] = self._next_rv()
                if request.action == kmock.action.CREATE:
                    meta = request.data['metadata']
                    meta.setdefault('uid', f"uid-{self.rv}")
                    meta.setdefault('creationTimestamp',
                                    datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%dT%H:%M:%SZ'))
            return await super()._handle(request)

        async def _control(self, request):
            verb = request.url.path.removeprefix('/_control/')
            if verb in ('expire-watches', 'drop-watches'):
                marker = EXPIRE if verb == 'expire-watches' else DROP
                for bus in list(self._buses.values()):
                    await bus.put(marker)
                return aiohttp.web.json_response({'done': verb})
            if verb == 'timeline':
                return aiohttp.web.json_response(self.timeline)
            if verb == 'requests':
                lines = [f"{r.method} {r.url.path_qs}" for r in self._requests]
                return aiohttp.web.json_response(lines)
            return aiohttp.web.json_response({'error': f'unknown control {verb}'}, status=404)

        @staticmethod
        def _selected_name(request):
            selector = request.params.get('fieldSelector', '')
            for term in filter(None, selector.split(',')):
                key, _, value = term.partition('=')
                if key == 'metadata.name':
                    return value.lstrip('=')
                raise kmock.KubernetesError(status=400, reason='BadRequest',
                                            message=f'field selector {term!r} is not supported')
            return None

        @staticmethod
        def _name_of(obj):
            return (obj or {}).get('metadata', {}).get('name')

        async def _serve_list(self, request):
            name = self._selected_name(request)
            payload = await super()._serve_list(request)
            if name is not None:
                payload['items'] = [o for o in payload['items'] if self._name_of(o) == name]
            payload['metadata'] = {'resourceVersion': str(self.rv)}
            info = self._resources.get(request.resource) if request.resource in self._resources else None
            kind = info.kind if info is not None and info.kind else 'Event' if request.resource.plural == 'events' else ''
            payload['apiVersion'] = f"{request.resource.group}/{request.resource.version}".lstrip('/')
            payload['kind'] = f"{kind}List"
            return payload

        def _serve_watch(self, request):
            # client-go decodes a watch only when it is declared JSON.
            return kmock.Response(headers={'Content-Type': 'application/json'},
                                  payload=self._watch_events(request))

        async def _watch_events(self, request):
            name = self._selected_name(request)
            async for event in super()._serve_watch(request):
                if event is EXPIRE or event == EXPIRE:
                    yield {'type': 'ERROR', 'object': {
                        'apiVersion': 'v1', 'kind': 'Status', 'metadata': {}, 'status': 'Failure',
                        'code': 410, 'reason': 'Expired',
                        'message': 'too old resource version (expired by the test)'}}
                    return
                if event is DROP or event == DROP:
                    return
                if isinstance(event, dict) and name is not None and self._name_of(event.get('object')) != name:
                    continue
                if isinstance(event, dict) and (event.get('object') or {}).get('kind') == 'Node':
                    annotations = event['object'].get('metadata', {}).get('annotations') or {}
                    self.timeline.append({'time': time.time(), 'what': 'event',
                                          'egress': annotations.get(EGRESS_ANNOTATION)})
                yield event

        async def _serve_version(self, request):
            payload = await super()._serve_version(request)
            if request.resource is not None and request.resource.group == '':
                payload['groupVersion'] = request.resource.version
            return payload

    return Emulator()


async def serve(host, port):
    import kmock
    emulator = build_emulator()
    verbs = {'get', 'list', 'watch', 'create', 'update', 'patch', 'delete'}
    emulator.resources['v1/nodes'] = kmock.ResourceInfo(
        kind='Node', singular='node', namespaced=False, verbs=verbs)
    # What Kilo's agent needs: its Peer CRD, registered, and the Peers themselves.
    emulator.resources[PEERS] = kmock.ResourceInfo(
        kind='Peer', singular='peer', namespaced=False, verbs=verbs)
    emulator.resources[CRDS] = kmock.ResourceInfo(
        kind='CustomResourceDefinition', singular='customresourcedefinition', namespaced=False, verbs=verbs)
    emulator.objects[kmock.resource(CRDS), None, PEER_CRD['metadata']['name']] = PEER_CRD
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with emulator, kmock.Server(emulator, host=host, port=port) as server:
        print(f"listening on http://{server.host}:{server.port}", flush=True)
        await stop.wait()
        # Like a real API server going away: connections are cut; nothing waits for clients
        # (a graceful aiohttp shutdown would wait for the open watches forever).
        sys.stdout.flush()
        os._exit(0)


def call(server, method, path, body=None, content_type='application/json'):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(server + path, data=data, method=method,
                                     headers={'Content-Type': content_type})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read() or b'null')
    except urllib.error.HTTPError as error:
        if error.code == 404 and method == 'GET':
            return None
        sys.exit(f"{method} {path}: HTTP {error.code}: {error.read().decode(errors='replace')}")


def annotations(pairs):
    result = {}
    for pair in pairs:
        if pair.endswith('-') and '=' not in pair:
            result[pair[:-1]] = None
        else:
            key, sep, value = pair.partition('=')
            if not sep:
                sys.exit(f"{pair!r}: expected KEY=VALUE or KEY-")
            result[key] = value
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--server', default='http://127.0.0.1:6443')
    sub = parser.add_subparsers(dest='command', required=True)
    p = sub.add_parser('serve')
    p.add_argument('--host', default='127.0.0.1')
    p.add_argument('--port', type=int, default=0)
    p = sub.add_parser('create-node')
    p.add_argument('name')
    p.add_argument('--pod-cidr', help="the Node's spec.podCIDR")
    p.add_argument('annotations', nargs='*')
    p = sub.add_parser('node')
    p.add_argument('name')
    p = sub.add_parser('create-peer')
    p.add_argument('name')
    p.add_argument('--allowed-ip', action='append', required=True, help='a CIDR; repeat for more')
    p = sub.add_parser('delete-peer')
    p.add_argument('name')
    sub.add_parser('peers')
    p = sub.add_parser('annotate')
    p.add_argument('name')
    p.add_argument('annotation')
    p = sub.add_parser('heartbeat')
    p.add_argument('name')
    for verb in ('events', 'expire-watches', 'drop-watches', 'requests', 'timeline'):
        sub.add_parser(verb)
    args = parser.parse_args()

    if args.command == 'serve':
        asyncio.run(serve(args.host, args.port))
    elif args.command == 'create-node':
        meta = {'name': args.name, 'annotations': annotations(args.annotations)}
        node = {'apiVersion': 'v1', 'kind': 'Node', 'metadata': meta}
        if args.pod_cidr:
            node['spec'] = {'podCIDR': args.pod_cidr, 'podCIDRs': [args.pod_cidr]}
        call(args.server, 'POST', '/api/v1/nodes', node)
    elif args.command == 'node':
        found = call(args.server, 'GET', f'/api/v1/nodes/{args.name}')
        if found is None:
            sys.exit(f"no Node {args.name}")
        print(json.dumps(found))
    elif args.command == 'create-peer':
        key = base64.b64encode(os.urandom(32)).decode()
        peer = {'apiVersion': 'kilo.squat.ai/v1alpha1', 'kind': 'Peer', 'metadata': {'name': args.name},
                'spec': {'allowedIPs': args.allowed_ip, 'publicKey': key, 'persistentKeepalive': 0}}
        call(args.server, 'POST', f'/apis/{PEERS}', peer)
    elif args.command == 'delete-peer':
        call(args.server, 'DELETE', f'/apis/{PEERS}/{args.name}')
    elif args.command == 'peers':
        found = call(args.server, 'GET', f'/apis/{PEERS}') or {'items': []}
        print('\n'.join(p['metadata']['name'] for p in found['items']))
    elif args.command == 'annotate':
        patch = {'metadata': {'annotations': annotations([args.annotation])}}
        call(args.server, 'PATCH', f'/api/v1/nodes/{args.name}', patch, 'application/merge-patch+json')
    elif args.command == 'heartbeat':
        now = datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%dT%H:%M:%S.%fZ')
        patch = {'status': {'conditions': [{'type': 'Ready', 'status': 'True', 'lastHeartbeatTime': now}]}}
        call(args.server, 'PATCH', f'/api/v1/nodes/{args.name}', patch, 'application/merge-patch+json')
    elif args.command == 'events':
        found = call(args.server, 'GET', '/apis/events.k8s.io/v1/events') or {'items': []}
        print(json.dumps(found['items']))
    elif args.command == 'requests':
        print('\n'.join(call(args.server, 'GET', '/_control/requests')))
    elif args.command == 'timeline':
        print(json.dumps(call(args.server, 'GET', '/_control/timeline')))
    else:
        call(args.server, 'POST', f'/_control/{args.command}', {})


if __name__ == '__main__':
    main()
